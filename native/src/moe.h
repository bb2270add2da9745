// Fused routed-expert MoE for one layer on the CPU (see moe.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace krasis {

// One layer's routed experts in the CPU layout (kernels.h). E experts, hidden D, width I.
// gate/up: [E, I, D] weights with [E, I, D/G] scales; down: [E, D, I] with [E, D, I/G].
struct MoeWeights {
    const uint8_t* gate_q;
    const float* gate_s;
    const uint8_t* up_q;
    const float* up_s;
    const uint8_t* down_q;
    const float* down_s;
    int n_experts;
    int hidden;
    int width;
    int bits;
    int group_size;
};

class MoeRunner {
  public:
    explicit MoeRunner(int n_threads);
    int threads() const { return pool_.size(); }
    int spin_us() const { return pool_.spin_us(); }

    // x [M, D] float32, ids [M, K] int64, weights [M, K] float32 -> out [M, D] float32.
    void forward(const float* x, int M, const int64_t* ids, const float* topk_weights, int K,
                 const MoeWeights& w, float* out);

    // A quantized linear layer: x [M, K] float32 times W [N, K] (CPU layout) -> out [M, N].
    void linear(const float* x, int M, const uint8_t* w_q, const float* w_s, int N, int K,
                int bits, int group_size, float* out);

    // Sums a buffer with the pool's threads (for read-bandwidth measurements).
    uint64_t stream_read(const uint8_t* data, size_t n_bytes);

  private:
    void route(int M, const int64_t* ids, const float* topk_weights, int K, int n_experts);
    void quantize_rows(const KernelTable& kt, const float* x, int rows, int K, int G, int8_t* q,
                       float* s, int32_t* sum);
    int start_chunks(const MoeWeights& w);
    void gate_up_task(const MoeWeights& w, const KernelTable& kt, int i);
    void quantize_h_chunk(const MoeWeights& w, const KernelTable& kt, int e, int c0);
    void down_task(const MoeWeights& w, const KernelTable& kt, int M, float* out, int i);

    ThreadPool pool_;
    std::mutex call_mu_;
    // Scratch, grown only when M * K grows (no allocation per call otherwise).
    std::vector<int8_t> xq_;
    std::vector<float> xs_;
    std::vector<int32_t> xsum_;
    std::vector<int> expert_count_;   // [E]
    std::vector<int> expert_offset_;  // [E + 1]: pairs of expert e are [offset[e], offset[e+1])
    std::vector<int> active_;         // experts with at least one pair
    std::vector<int> pair_token_;     // [P] token of each (token, slot) pair, grouped by expert
    std::vector<float> pair_weight_;  // [P]
    std::vector<float> h_;            // [P, I] SiLU(gate) * up
    std::vector<int8_t> hq_;
    std::vector<float> hs_;
    std::vector<int32_t> hsum_;
    // [active experts x chunks of h]: gate/up tasks still to finish in each chunk; the task that
    // finishes a chunk quantizes it for the expert's pairs (no pass over h between the phases).
    std::unique_ptr<std::atomic<int>[]> chunk_left_;
    size_t chunk_capacity_ = 0;
    int chunk_ = 0;  // elements of h per chunk: G, or lcm(G, 128) when the INT4 pair order is kept
};

}  // namespace krasis

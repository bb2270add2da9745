// Fused MoE: route -> quantize x -> one pool job of two phases: gate/up + SiLU (tasks: expert x
// 16-row blocks; the task that completes a chunk of h quantizes it) | down + weighted sum
// (tasks: 16-row blocks of the output, so writes never race).
// Legend: M tokens, K experts per token, P = M*K pairs, E experts, D hidden, I width, G group.
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace krasis {

namespace {

constexpr int kRowBlock = 16;  // weight rows per task

template <class T>
void ensure(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

inline size_t row_bytes(int bits, int K) { return bits == 8 ? size_t(K) : size_t(K) / 2; }

// q points at [natural K | paired K] int8 values (see QActRow).
inline QActRow act_row(const int8_t* q, const float* scale, const int32_t* sum, int K) {
    return {q, scale, sum, K % kPair == 0 ? q + K : nullptr};
}

}  // namespace

MoeRunner::MoeRunner(int n_threads) : pool_(n_threads > 0 ? n_threads : default_threads()) {}

void MoeRunner::route(int M, const int64_t* ids, const float* topk_weights, int K, int n_experts) {
    const int P = M * K;
    ensure(expert_count_, n_experts);
    ensure(expert_offset_, n_experts + 1);
    ensure(pair_token_, P);
    ensure(pair_weight_, P);
    std::fill(expert_count_.begin(), expert_count_.begin() + n_experts, 0);
    for (int p = 0; p < P; ++p) {
        if (ids[p] < 0 || ids[p] >= n_experts) throw std::invalid_argument("expert id out of range");
        ++expert_count_[ids[p]];
    }
    active_.clear();
    expert_offset_[0] = 0;
    for (int e = 0; e < n_experts; ++e) {
        expert_offset_[e + 1] = expert_offset_[e] + expert_count_[e];
        if (expert_count_[e] > 0) active_.push_back(e);
        expert_count_[e] = expert_offset_[e];  // reused as fill cursor
    }
    for (int p = 0; p < P; ++p) {
        const int slot = expert_count_[ids[p]]++;
        pair_token_[slot] = p / K;
        pair_weight_[slot] = topk_weights[p];
    }
}

void MoeRunner::quantize_rows(const KernelTable& kt, const float* x, int rows, int K, int G,
                              int8_t* q, float* s, int32_t* sum) {
    auto task = [&](int r) {
        int8_t* qr = q + size_t(r) * 2 * K;  // [natural K | paired K]
        kt.quantize(x + size_t(r) * K, K, G, qr, s + size_t(r) * (K / G), sum + size_t(r) * (K / G),
                    qr + K);
    };
    if (size_t(rows) * K < 32768) {
        for (int r = 0; r < rows; ++r) task(r);
    } else {
        pool_.parallel_for(rows, task);
    }
}

// One countdown per (active expert, chunk of h), set to the gate/up tasks covering the chunk;
// returns the number of gate/up tasks.
int MoeRunner::start_chunks(const MoeWeights& w) {
    const int I = w.width;
    chunk_ = I % kPair == 0 ? std::lcm(w.group_size, kPair) : w.group_size;
    const size_t n = active_.size() * size_t(I / chunk_);
    if (chunk_capacity_ < n) {
        chunk_left_.reset(new std::atomic<int>[n]);
        chunk_capacity_ = n;
    }
    for (size_t i = 0; i < n; ++i)
        chunk_left_[i].store(chunk_ / kRowBlock, std::memory_order_relaxed);
    return int(active_.size()) * (I / kRowBlock);
}

// Quantizes h[p, c0 : c0 + chunk] for the pairs p of expert e (a chunk holds whole groups and
// whole 128-element pair blocks, so this equals quantizing the rows whole).
void MoeRunner::quantize_h_chunk(const MoeWeights& w, const KernelTable& kt, int e, int c0) {
    const int I = w.width, G = w.group_size;
    for (int p = expert_offset_[e]; p < expert_offset_[e + 1]; ++p) {
        int8_t* q = hq_.data() + size_t(p) * 2 * I;  // [natural I | paired I]
        const size_t s = size_t(p) * (I / G) + c0 / G;
        kt.quantize(h_.data() + size_t(p) * I + c0, chunk_, G, q + c0, hs_.data() + s,
                    hsum_.data() + s, I % kPair == 0 ? q + I + c0 : nullptr);
    }
}

// Task i = (active expert i / blocks, 16-row block i % blocks):
// h[p, n] = SiLU(gate_e[n] . x_t) * (up_e[n] . x_t) for the pairs p = (t, e), then the chunk's
// countdown; the task that ends it quantizes the chunk.
void MoeRunner::gate_up_task(const MoeWeights& w, const KernelTable& kt, int i) {
    const int D = w.hidden, I = w.width, G = w.group_size;
    const int blocks = I / kRowBlock, slot = i / blocks, e = active_[slot];
    const int r0 = (i % blocks) * kRowBlock, r1 = r0 + kRowBlock;
    const size_t rb = row_bytes(w.bits, D);
    const DotTileFn dot = w.bits == 8 ? kt.dot_q8 : kt.dot_q4;
    const uint8_t* gq = w.gate_q + size_t(e) * I * rb;
    const uint8_t* uq = w.up_q + size_t(e) * I * rb;
    const float* gs = w.gate_s + size_t(e) * I * (D / G);
    const float* us = w.up_s + size_t(e) * I * (D / G);
    for (int p0 = expert_offset_[e]; p0 < expert_offset_[e + 1]; p0 += kMaxTile) {
        const int T = std::min(kMaxTile, expert_offset_[e + 1] - p0);
        QActRow acts[kMaxTile];
        for (int t = 0; t < T; ++t) {
            const size_t tok = size_t(pair_token_[p0 + t]);
            acts[t] = act_row(xq_.data() + tok * 2 * D, xs_.data() + tok * (D / G),
                              xsum_.data() + tok * (D / G), D);
        }
        for (int n = r0; n < r1; n += kt.max_rows[T]) {
            const int R = std::min(kt.max_rows[T], r1 - n);
            float g[kMaxRows * kMaxTile], u[kMaxRows * kMaxTile];
            dot(gq + n * rb, gs + size_t(n) * (D / G), R, acts, T, D, G, g);
            dot(uq + n * rb, us + size_t(n) * (D / G), R, acts, T, D, G, u);
            for (int r = 0; r < R; ++r)
                for (int t = 0; t < T; ++t)
                    h_[size_t(p0 + t) * I + n + r] = silu(g[r * T + t]) * u[r * T + t];
        }
    }
    const int c = r0 / chunk_;
    if (chunk_left_[size_t(slot) * (I / chunk_) + c].fetch_sub(1, std::memory_order_acq_rel) == 1)
        quantize_h_chunk(w, kt, e, c * chunk_);
}

// Task i = 16-row block of the output:
// out[t, d] = sum over pairs p = (t, e) of weight_p * (down_e[d] . h_p).
void MoeRunner::down_task(const MoeWeights& w, const KernelTable& kt, int M, float* out, int i) {
    const int D = w.hidden, I = w.width, G = w.group_size;
    const size_t rb = row_bytes(w.bits, I);
    const DotTileFn dot = w.bits == 8 ? kt.dot_q8 : kt.dot_q4;
    const int r0 = i * kRowBlock, r1 = std::min(D, r0 + kRowBlock);
    for (int t = 0; t < M; ++t) std::fill(out + size_t(t) * D + r0, out + size_t(t) * D + r1, 0.0f);
    for (const int e : active_) {
        const uint8_t* dq = w.down_q + size_t(e) * D * rb;
        const float* ds = w.down_s + size_t(e) * D * (I / G);
        for (int p0 = expert_offset_[e]; p0 < expert_offset_[e + 1]; p0 += kMaxTile) {
            const int T = std::min(kMaxTile, expert_offset_[e + 1] - p0);
            QActRow acts[kMaxTile];
            for (int t = 0; t < T; ++t) {
                const size_t p = size_t(p0 + t);
                acts[t] = act_row(hq_.data() + p * 2 * I, hs_.data() + p * (I / G),
                                  hsum_.data() + p * (I / G), I);
            }
            for (int d = r0; d < r1; d += kt.max_rows[T]) {
                const int R = std::min(kt.max_rows[T], r1 - d);
                float y[kMaxRows * kMaxTile];
                dot(dq + d * rb, ds + size_t(d) * (I / G), R, acts, T, I, G, y);
                for (int r = 0; r < R; ++r)
                    for (int t = 0; t < T; ++t)
                        out[size_t(pair_token_[p0 + t]) * D + d + r] += pair_weight_[p0 + t] * y[r * T + t];
            }
        }
    }
}

// One pool job of two phases: gate/up (+ quantize h chunk by chunk), then down.
void MoeRunner::forward(const float* x, int M, const int64_t* ids, const float* topk_weights, int K,
                        const MoeWeights& w, float* out) {
    std::lock_guard<std::mutex> lock(call_mu_);
    const int D = w.hidden, I = w.width, G = w.group_size, P = M * K;
    const KernelTable& kt = active_kernels();
    route(M, ids, topk_weights, K, w.n_experts);
    ensure(xq_, size_t(M) * 2 * D);
    ensure(xs_, size_t(M) * (D / G));
    ensure(xsum_, size_t(M) * (D / G));
    ensure(h_, size_t(P) * I);
    ensure(hq_, size_t(P) * 2 * I);
    ensure(hs_, size_t(P) * (I / G));
    ensure(hsum_, size_t(P) * (I / G));
    quantize_rows(kt, x, M, D, G, xq_.data(), xs_.data(), xsum_.data());
    const int gate_up_tasks = start_chunks(w);
    auto gate_up = [&](int i) { gate_up_task(w, kt, i); };
    auto down = [&](int i) { down_task(w, kt, M, out, i); };
    pool_.parallel_for2(gate_up_tasks, gate_up, (D + kRowBlock - 1) / kRowBlock, down);
}

void MoeRunner::linear(const float* x, int M, const uint8_t* w_q, const float* w_s, int N, int K,
                       int bits, int group_size, float* out) {
    std::lock_guard<std::mutex> lock(call_mu_);
    const int G = group_size;
    const KernelTable& kt = active_kernels();
    const DotTileFn dot = bits == 8 ? kt.dot_q8 : kt.dot_q4;
    const size_t rb = row_bytes(bits, K);
    ensure(xq_, size_t(M) * 2 * K);
    ensure(xs_, size_t(M) * (K / G));
    ensure(xsum_, size_t(M) * (K / G));
    quantize_rows(kt, x, M, K, G, xq_.data(), xs_.data(), xsum_.data());
    const int blocks = (N + kRowBlock - 1) / kRowBlock;
    auto task = [&](int i) {
        const int r0 = i * kRowBlock, r1 = std::min(N, r0 + kRowBlock);
        for (int t0 = 0; t0 < M; t0 += kMaxTile) {
            const int T = std::min(kMaxTile, M - t0);
            QActRow acts[kMaxTile];
            for (int t = 0; t < T; ++t) {
                const size_t tok = size_t(t0 + t);
                acts[t] = act_row(xq_.data() + tok * 2 * K, xs_.data() + tok * (K / G),
                                  xsum_.data() + tok * (K / G), K);
            }
            for (int n = r0; n < r1; n += kt.max_rows[T]) {
                const int R = std::min(kt.max_rows[T], r1 - n);
                float y[kMaxRows * kMaxTile];
                dot(w_q + n * rb, w_s + size_t(n) * (K / G), R, acts, T, K, G, y);
                for (int r = 0; r < R; ++r)
                    for (int t = 0; t < T; ++t) out[size_t(t0 + t) * N + n + r] = y[r * T + t];
            }
        }
    };
    pool_.parallel_for(blocks, task);
}

uint64_t MoeRunner::stream_read(const uint8_t* data, size_t n_bytes) {
    const size_t n_words = n_bytes / sizeof(uint64_t);
    const int n_tasks = pool_.size() * 8;
    std::vector<uint64_t> partial(size_t(n_tasks), 0);
    auto task = [&](int i) {
        const size_t lo = n_words * size_t(i) / n_tasks, hi = n_words * size_t(i + 1) / n_tasks;
        const uint64_t* words = reinterpret_cast<const uint64_t*>(data);
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        size_t j = lo;
        for (; j + 4 <= hi; j += 4) {
            if (j % 8 == 0) prefetch_weights(words + j);  // a line per 64 bytes, as the kernels
            s0 += words[j];
            s1 += words[j + 1];
            s2 += words[j + 2];
            s3 += words[j + 3];
        }
        for (; j < hi; ++j) s0 += words[j];
        partial[size_t(i)] = s0 + s1 + s2 + s3;
    };
    pool_.parallel_for(n_tasks, task);
    uint64_t total = 0;
    for (const uint64_t v : partial) total += v;
    return total;
}

}  // namespace krasis

// krasis_native: block layouts and the per-ISA kernel table.
//
// Weight matrix W [N, K] (N output rows, K inputs), symmetric, one float32 scale per group of
// G consecutive inputs of a row (G a multiple of 32, K a multiple of G and of 64 for INT4).
//   INT8: qweight int8 [N, K], row-major; value = q * scale, q in [-127, 127].
//   INT4: qweight uint8 [N, K/2]: each row is K/64 units of BlockQ4x64; in unit u, byte j holds
//         element 64u+j in its low nibble and element 64u+32+j in its high nibble, stored as
//         q + 8 (q in [-8, 7]); value = q * scale.
//   scales float32 [N, K/G], row-major.
// Activations are quantized on the fly per token to int8 with one float scale per group of G
// (QActRow); the integer dot product of a group is exact, then scaled by w_scale * a_scale.
#pragma once

#include <xmmintrin.h>

#include <cstddef>
#include <cfloat>
#include <cstdint>

namespace krasis {

constexpr int kUnit = 64;        // elements per SIMD unit (one zmm of int8)
constexpr int kHalf = 32;        // smallest group size
constexpr int kMaxTile = 4;      // tokens per dot-product call
constexpr int kMaxRows = 4;      // weight rows per dot-product call

struct BlockQ8x64 { int8_t qs[kUnit]; };
struct BlockQ4x64 { uint8_t qs[kUnit / 2]; };
static_assert(sizeof(BlockQ8x64) == 64, "INT8 unit must be 64 bytes");
static_assert(sizeof(BlockQ4x64) == 32, "INT4 unit must be 32 bytes");

// Software prefetch distance of the weight stream. A tile reads R consecutive rows side by
// side, so the hardware prefetchers see several short streams per 4 KiB page and fall behind:
// at M=1 the INT4 kernel reached about half the read bandwidth per thread. Each SIMD kernel
// prefetches the line this many bytes past the one it loads (the next tile's rows; harmless
// past the end). Measured: 4096 and 2048 both about 2x at M=1 on 1 and 2 threads.
#ifndef KRASIS_PREFETCH_BYTES
#define KRASIS_PREFETCH_BYTES 4096
#endif
constexpr int kPrefetchBytes = KRASIS_PREFETCH_BYTES;

inline void prefetch_weights(const void* p) {
    _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

constexpr int kPair = 2 * kUnit;  // 128 elements: two INT4 units read by one 64-byte load

// A group whose largest |x| is at most this quantizes to zeros: above it 127 / amax is finite;
// below it the inverse overflows to inf, which each instruction set turned into other bytes
// (and the scalar code into undefined behaviour).
constexpr float kMinActAmax = 127.0f / FLT_MAX;

// One token's activation row, quantized: K int8 values, K/G scales, K/G sums of the int8 values
// (the INT4 kernels subtract 8 * sum to undo the +8 offset of stored nibbles). q_pair, when not
// null (K % 128 == 0), holds the same values with every 128-element block reordered as
// [0..31, 64..95, 32..63, 96..127]: the order of the low then high nibbles of a 64-byte load of
// two INT4 units, so the AVX-512 INT4 kernel needs no lane shuffle.
struct QActRow {
    const int8_t* q;
    const float* scale;
    const int32_t* sum;
    const int8_t* q_pair;
};

// A tile of R consecutive weight rows times T activation rows (R <= max_rows[T], T <= kMaxTile):
// out[r * T + t] = sum_k W[r, k] * A_t[k]. Row r starts at w + r * row_bytes (K or K/2 bytes),
// its scales at w_scale + r * (K / G). K elements per row, group size G.
using DotTileFn = void (*)(const uint8_t* w, const float* w_scale, int R, const QActRow* acts,
                           int T, int K, int G, float* out);

// Activation quantization of one row (see quantize_act_row below); every ISA's version gives
// the same bytes as the scalar reference for finite inputs.
using QuantizeFn = void (*)(const float* x, int K, int G, int8_t* q, float* scale, int32_t* sum,
                            int8_t* q_pair);

struct KernelTable {
    const char* name;
    DotTileFn dot_q8;
    DotTileFn dot_q4;
    int max_rows[kMaxTile + 1];  // by T; index 0 unused
    QuantizeFn quantize;
};

const KernelTable& kernels_scalar();
const KernelTable* kernels_avx2();    // nullptr when the CPU lacks AVX2/FMA
const KernelTable* kernels_avx512();  // nullptr when the CPU lacks AVX-512 F/BW/VL/VNNI

// Selected table (dispatch.cpp). select_isa("auto" | "scalar" | "avx2" | "avx512") returns false
// when the CPU cannot run the requested ISA.
const KernelTable& active_kernels();
bool select_isa(const char* name);

// Activation quantization, the scalar reference: per group of G, amax = max |x|,
// scale = amax / 127, q = nearbyint(x * (127 / amax)) (0 when amax is 0), sum = sum of q.
// x float [K] -> q int8 [K], scale float [K/G], sum int32 [K/G], and q_pair int8 [K] when
// q_pair is not null and K % 128 == 0. The SIMD versions (KernelTable::quantize) compute the
// same products and round in the same (current, nearest-even) mode, so every ISA sees identical
// int8 inputs. A chunk of a row (a multiple of G and, for q_pair, of 128) can be quantized
// on its own: groups and 128-element blocks do not straddle chunks.
void quantize_act_row(const float* x, int K, int G, int8_t* q, float* scale, int32_t* sum,
                      int8_t* q_pair);
// q [K] -> q_pair [K]: each 128-element block reordered as [0..31, 64..95, 32..63, 96..127].
void pair_order(const int8_t* q, int K, int8_t* q_pair);

}  // namespace krasis

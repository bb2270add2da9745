// AVX-512 VNNI kernels (vpdpbusd): compiled with per-function target attributes, so this file
// builds on any x86-64 and runs only where dispatch.cpp found AVX-512 F/BW/VL and VNNI.
// w_row: one weight row (INT8: K bytes; INT4: K/64 BlockQ4x64 units), w_scale: [K/G].
// acts: T quantized activation rows, out: [T]. A group is walked in 64-element units (zmm) and,
// when G is an odd multiple of 32, one 32-element half (ymm).
#include <immintrin.h>

#include "kernels.h"

#define KRASIS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

namespace krasis {

namespace {

// INT4 with G % 128 == 0: one 64-byte load holds two units (128 weights); its low nibbles meet
// activations [0..31, 64..95] and its high nibbles [32..63, 96..127] of the block, which is the
// order of QActRow::q_pair, so no lane shuffle is needed (3 ALU ops per 64 bytes).
template <int R, int T>
KRASIS_AVX512 void dot_q4_avx512_pairs(const uint8_t* w, const float* w_scale, const QActRow* acts,
                                       int K, int G, float* out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int pairs = G / kPair, n_groups = K / G;
    const uint8_t* wr[R];
    const int8_t* aq[T];
    __m512 accf[R][T];
    for (int r = 0; r < R; ++r) {
        wr[r] = w + size_t(r) * (K / 2);
        for (int t = 0; t < T; ++t) accf[r][t] = _mm512_setzero_ps();
    }
    for (int t = 0; t < T; ++t) aq[t] = acts[t].q_pair;
    for (int g = 0; g < n_groups; ++g) {
        __m512i acc[R][T];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
        for (int u = 0; u < pairs; ++u) {
            __m512i a_lo[T], a_hi[T];
            for (int t = 0; t < T; ++t) {
                a_lo[t] = _mm512_loadu_si512(aq[t]);
                a_hi[t] = _mm512_loadu_si512(aq[t] + kUnit);
                aq[t] += kPair;
            }
            for (int r = 0; r < R; ++r) {
                const __m512i raw = _mm512_loadu_si512(wr[r]);
                prefetch_weights(wr[r]);
                wr[r] += kUnit;
                const __m512i lo = _mm512_and_si512(raw, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                for (int t = 0; t < T; ++t) {
                    acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo, a_lo[t]);
                    acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi, a_hi[t]);
                }
            }
        }
        for (int r = 0; r < R; ++r) {
            const float ws = w_scale[size_t(r) * n_groups + g];
            for (int t = 0; t < T; ++t) {
                const __m512i corr = _mm512_zextsi128_si512(_mm_cvtsi32_si128(8 * acts[t].sum[g]));
                const __m512 s = _mm512_set1_ps(ws * acts[t].scale[g]);
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], corr));
                accf[r][t] = _mm512_fmadd_ps(dot, s, accf[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) out[r * T + t] = _mm512_reduce_add_ps(accf[r][t]);
}

// Generic path (any G multiple of 32). INT8: vpdpbusd needs u8 x s8, so activations enter as a + 128 (a ^ 0x80) and the kernel
// subtracts 128 * sum(w), itself a vpdpbusd of ones and w, shared by the T tokens.
// Whole 64-element units only (G % 64 == 0): a tile of R rows x T tokens, pointer walks.
// Each unit's weights are loaded once for T tokens, each activation once for R rows.
template <int R, int T>
KRASIS_AVX512 void dot_q8_avx512_tile(const uint8_t* w, const float* w_scale, const QActRow* acts,
                                      int K, int G, float* out) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    const __m512i ones = _mm512_set1_epi8(1);
    const int units = G / kUnit, n_groups = K / G;
    const uint8_t* wr[R];
    const int8_t* aq[T];
    __m512 accf[R][T];
    for (int r = 0; r < R; ++r) {
        wr[r] = w + size_t(r) * K;
        for (int t = 0; t < T; ++t) accf[r][t] = _mm512_setzero_ps();
    }
    for (int t = 0; t < T; ++t) aq[t] = acts[t].q;
    for (int g = 0; g < n_groups; ++g) {
        __m512i acc[R][T], wsum[R];
        for (int r = 0; r < R; ++r) {
            wsum[r] = _mm512_setzero_si512();
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
        }
        for (int u = 0; u < units; ++u) {
            __m512i a[T], wv[R];
            for (int t = 0; t < T; ++t) a[t] = _mm512_xor_si512(_mm512_loadu_si512(aq[t]), flip), aq[t] += kUnit;
            for (int r = 0; r < R; ++r) {
                wv[r] = _mm512_loadu_si512(wr[r]);
                prefetch_weights(wr[r]);
                wr[r] += kUnit;
                wsum[r] = _mm512_dpbusd_epi32(wsum[r], ones, wv[r]);
                for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], a[t], wv[r]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const __m512i offset = _mm512_slli_epi32(wsum[r], 7);
            const float ws = w_scale[size_t(r) * n_groups + g];
            for (int t = 0; t < T; ++t) {
                const __m512 s = _mm512_set1_ps(ws * acts[t].scale[g]);
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], offset));
                accf[r][t] = _mm512_fmadd_ps(dot, s, accf[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) out[r * T + t] = _mm512_reduce_add_ps(accf[r][t]);
}

template <int R, int T>
KRASIS_AVX512 void dot_q4_avx512_tile(const uint8_t* w, const float* w_scale, const QActRow* acts,
                                      int K, int G, float* out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int units = G / kUnit, n_groups = K / G;
    const uint8_t* wr[R];
    const int8_t* aq[T];
    __m512 accf[R][T];
    for (int r = 0; r < R; ++r) {
        wr[r] = w + size_t(r) * (K / 2);
        for (int t = 0; t < T; ++t) accf[r][t] = _mm512_setzero_ps();
    }
    for (int t = 0; t < T; ++t) aq[t] = acts[t].q;
    for (int g = 0; g < n_groups; ++g) {
        __m512i acc[R][T];
        for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
        for (int u = 0; u < units; ++u) {
            __m512i a[T];
            for (int t = 0; t < T; ++t) a[t] = _mm512_loadu_si512(aq[t]), aq[t] += kUnit;
            for (int r = 0; r < R; ++r) {
                const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r]));
                prefetch_weights(wr[r]);
                wr[r] += kUnit / 2;
                const __m512i wv = _mm512_and_si512(
                    _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), low4);
                for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], wv, a[t]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const float ws = w_scale[size_t(r) * n_groups + g];
            for (int t = 0; t < T; ++t) {
                const __m512i corr = _mm512_zextsi128_si512(_mm_cvtsi32_si128(8 * acts[t].sum[g]));
                const __m512 s = _mm512_set1_ps(ws * acts[t].scale[g]);
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], corr));
                accf[r][t] = _mm512_fmadd_ps(dot, s, accf[r][t]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) out[r * T + t] = _mm512_reduce_add_ps(accf[r][t]);
}

template <int T>
KRASIS_AVX512 void dot_q8_avx512_t(const uint8_t* w_row, const float* w_scale, const QActRow* acts,
                                   int K, int G, float* out) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 accf[T];
    for (int t = 0; t < T; ++t) accf[t] = _mm512_setzero_ps();
    for (int g = 0; g < K / G; ++g) {
        const int end = (g + 1) * G;
        __m512i acc[T];
        __m512i wsum = _mm512_setzero_si512();
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
        int k = g * G;
        for (; k + kUnit <= end; k += kUnit) {
            const __m512i w = _mm512_loadu_si512(w_row + k);
            wsum = _mm512_dpbusd_epi32(wsum, ones, w);
            for (int t = 0; t < T; ++t) {
                const __m512i a = _mm512_xor_si512(_mm512_loadu_si512(acts[t].q + k), flip);
                acc[t] = _mm512_dpbusd_epi32(acc[t], a, w);
            }
        }
        if (k < end) {  // one 32-element half left
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_row + k));
            const __m256i ws = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm512_castsi512_si256(ones), w);
            wsum = _mm512_add_epi32(wsum, _mm512_zextsi256_si512(ws));
            for (int t = 0; t < T; ++t) {
                const __m256i a = _mm256_xor_si256(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[t].q + k)),
                    _mm512_castsi512_si256(flip));
                const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, w);
                acc[t] = _mm512_add_epi32(acc[t], _mm512_zextsi256_si512(d));
            }
        }
        const __m512i offset = _mm512_slli_epi32(wsum, 7);
        for (int t = 0; t < T; ++t) {
            const __m512 s = _mm512_set1_ps(w_scale[g] * acts[t].scale[g]);
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], offset));
            accf[t] = _mm512_fmadd_ps(dot, s, accf[t]);
        }
    }
    for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(accf[t]);
}

// INT4: stored nibbles (q + 8, u8) times a (s8) with vpdpbusd; subtract 8 * sum(a) per group.
template <int T>
KRASIS_AVX512 void dot_q4_avx512_t(const uint8_t* w_row, const float* w_scale, const QActRow* acts,
                                   int K, int G, float* out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 accf[T];
    for (int t = 0; t < T; ++t) accf[t] = _mm512_setzero_ps();
    for (int g = 0; g < K / G; ++g) {
        const int end = (g + 1) * G;
        __m512i acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
        for (int k = g * G; k < end;) {
            const uint8_t* unit = w_row + (k / kUnit) * (kUnit / 2);
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit));
            if (k % kUnit == 0 && k + kUnit <= end) {  // whole unit: elements k..k+63 in order
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw),
                                                        _mm256_srli_epi16(raw, 4), 1);
                const __m512i w = _mm512_and_si512(both, low4);
                for (int t = 0; t < T; ++t)
                    acc[t] = _mm512_dpbusd_epi32(acc[t], w, _mm512_loadu_si512(acts[t].q + k));
                k += kUnit;
            } else {  // one half: low nibbles (first 32) or high nibbles (last 32)
                const __m256i nib = (k % kUnit) == 0 ? raw : _mm256_srli_epi16(raw, 4);
                const __m256i w = _mm256_and_si256(nib, _mm512_castsi512_si256(low4));
                for (int t = 0; t < T; ++t) {
                    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[t].q + k));
                    const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
                    acc[t] = _mm512_add_epi32(acc[t], _mm512_zextsi256_si512(d));
                }
                k += kHalf;
            }
        }
        for (int t = 0; t < T; ++t) {
            const __m512i corr = _mm512_zextsi128_si512(_mm_cvtsi32_si128(8 * acts[t].sum[g]));
            const __m512 s = _mm512_set1_ps(w_scale[g] * acts[t].scale[g]);
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], corr));
            accf[t] = _mm512_fmadd_ps(dot, s, accf[t]);
        }
    }
    for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(accf[t]);
}

using TileFn = void (*)(const uint8_t*, const float*, const QActRow*, int, int, float*);
using RowFn = void (*)(const uint8_t*, const float*, const QActRow*, int, int, float*);

// [R - 1][T - 1] -> tile function, for the whole-unit path.
#define KRASIS_TILES(F)                                                                    \
    {{F<1, 1>, F<1, 2>, F<1, 3>, F<1, 4>}, {F<2, 1>, F<2, 2>, F<2, 3>, F<2, 4>},          \
     {F<3, 1>, F<3, 2>, F<3, 3>, F<3, 4>}, {F<4, 1>, F<4, 2>, F<4, 3>, F<4, 4>}}

const TileFn kQ8Tiles[kMaxRows][kMaxTile] = KRASIS_TILES(dot_q8_avx512_tile);
const TileFn kQ4Tiles[kMaxRows][kMaxTile] = KRASIS_TILES(dot_q4_avx512_tile);
const TileFn kQ4PairTiles[kMaxRows][kMaxTile] = KRASIS_TILES(dot_q4_avx512_pairs);
const RowFn kQ8Rows[kMaxTile] = {dot_q8_avx512_t<1>, dot_q8_avx512_t<2>, dot_q8_avx512_t<3>,
                                 dot_q8_avx512_t<4>};
const RowFn kQ4Rows[kMaxTile] = {dot_q4_avx512_t<1>, dot_q4_avx512_t<2>, dot_q4_avx512_t<3>,
                                 dot_q4_avx512_t<4>};

KRASIS_AVX512 void dot_q8_avx512(const uint8_t* w, const float* ws, int R, const QActRow* a, int T,
                                 int K, int G, float* out) {
    if (G % kUnit == 0) return kQ8Tiles[R - 1][T - 1](w, ws, a, K, G, out);
    for (int r = 0; r < R; ++r)
        kQ8Rows[T - 1](w + size_t(r) * K, ws + size_t(r) * (K / G), a, K, G, out + r * T);
}

KRASIS_AVX512 void dot_q4_avx512(const uint8_t* w, const float* ws, int R, const QActRow* a, int T,
                                 int K, int G, float* out) {
    if (G % kPair == 0 && a[0].q_pair != nullptr) return kQ4PairTiles[R - 1][T - 1](w, ws, a, K, G, out);
    if (G % kUnit == 0) return kQ4Tiles[R - 1][T - 1](w, ws, a, K, G, out);
    for (int r = 0; r < R; ++r)
        kQ4Rows[T - 1](w + size_t(r) * (K / 2), ws + size_t(r) * (K / G), a, K, G, out + r * T);
}

// quantize_act_row with 16 floats per step: the same amax, scale and products as the scalar
// reference; vcvtps2dq rounds in the current mode as nearbyint does; |q| <= 127, so the
// saturating narrowing to int8 never clips.
KRASIS_AVX512 void quantize_avx512(const float* x, int K, int G, int8_t* q, float* scale,
                                   int32_t* sum, int8_t* q_pair) {
    constexpr int kLanes = 16;
    for (int g = 0; g < K / G; ++g) {
        const float* xg = x + g * G;
        __m512 vmax = _mm512_setzero_ps();
        for (int k = 0; k < G; k += kLanes)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
        const float amax = _mm512_reduce_max_ps(vmax);
        const __m512 inv = _mm512_set1_ps(amax > kMinActAmax ? 127.0f / amax : 0.0f);
        __m512i vsum = _mm512_setzero_si512();
        for (int k = 0; k < G; k += kLanes) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), inv));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * G + k), _mm512_cvtsepi32_epi8(v));
            vsum = _mm512_add_epi32(vsum, v);
        }
        scale[g] = amax / 127.0f;
        sum[g] = _mm512_reduce_add_epi32(vsum);
    }
    if (q_pair != nullptr && K % kPair == 0) pair_order(q, K, q_pair);
}

}  // namespace

const KernelTable* kernels_avx512() {
    static const KernelTable table{"avx512", dot_q8_avx512, dot_q4_avx512, {0, 4, 4, 2, 2},
                                   quantize_avx512};
    __builtin_cpu_init();
    const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return ok ? &table : nullptr;
}

}  // namespace krasis

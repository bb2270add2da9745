// AVX2 + FMA kernels (maddubs): compiled with per-function target attributes, so this file
// builds on any x86-64 and runs only where dispatch.cpp found AVX2 and FMA.
// w_row: one weight row (INT8: K bytes; INT4: K/64 BlockQ4x64 units), w_scale: [K/G].
// acts: T quantized activation rows, out: [T]. Groups are walked in 32-element halves.
#include <immintrin.h>

#include "kernels.h"

#define KRASIS_AVX2 __attribute__((target("avx2,fma")))

namespace krasis {

namespace {

KRASIS_AVX2 inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// INT8: |w| (u8) times sign(a, w) (s8): pairs stay below 2*127*127, so maddubs cannot saturate.
template <int T>
KRASIS_AVX2 void dot_q8_avx2_t(const uint8_t* w_row, const float* w_scale, const QActRow* acts,
                               int K, int G, float* out) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 accf[T];
    for (int t = 0; t < T; ++t) accf[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / G; ++g) {
        __m256i acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
        for (int k = g * G; k < (g + 1) * G; k += kHalf) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_row + k));
            if (k % kUnit == 0) prefetch_weights(w_row + k);  // one per 64-byte line
            const __m256i aw = _mm256_sign_epi8(w, w);
            for (int t = 0; t < T; ++t) {
                const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[t].q + k));
                const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones16));
            }
        }
        for (int t = 0; t < T; ++t) {
            const __m256 s = _mm256_set1_ps(w_scale[g] * acts[t].scale[g]);
            accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), s, accf[t]);
        }
    }
    for (int t = 0; t < T; ++t) out[t] = hsum_ps(accf[t]);
}

// INT4: stored nibbles (q + 8, u8) times a (s8): pairs stay below 2*15*128; subtract 8 * sum(a).
template <int T>
KRASIS_AVX2 void dot_q4_avx2_t(const uint8_t* w_row, const float* w_scale, const QActRow* acts,
                               int K, int G, float* out) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 accf[T];
    for (int t = 0; t < T; ++t) accf[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / G; ++g) {
        __m256i acc[T];
        for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
        for (int k = g * G; k < (g + 1) * G; k += kHalf) {
            const uint8_t* unit = w_row + (k / kUnit) * (kUnit / 2);
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit));
            if (k % kPair == 0) prefetch_weights(unit);  // one per 64-byte line (two units)
            const __m256i w = (k % kUnit) == 0 ? _mm256_and_si256(raw, low4)
                                               : _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            for (int t = 0; t < T; ++t) {
                const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[t].q + k));
                const __m256i p = _mm256_maddubs_epi16(w, a);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones16));
            }
        }
        for (int t = 0; t < T; ++t) {
            const __m256i corr = _mm256_zextsi128_si256(_mm_cvtsi32_si128(8 * acts[t].sum[g]));
            const __m256 s = _mm256_set1_ps(w_scale[g] * acts[t].scale[g]);
            accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t], corr)), s, accf[t]);
        }
    }
    for (int t = 0; t < T; ++t) out[t] = hsum_ps(accf[t]);
}

KRASIS_AVX2 void dot_q8_avx2_row(const uint8_t* w, const float* ws, const QActRow* a, int T,
                                 int K, int G, float* out) {
    switch (T) {
        case 1: return dot_q8_avx2_t<1>(w, ws, a, K, G, out);
        case 2: return dot_q8_avx2_t<2>(w, ws, a, K, G, out);
        case 3: return dot_q8_avx2_t<3>(w, ws, a, K, G, out);
        default: return dot_q8_avx2_t<4>(w, ws, a, K, G, out);
    }
}

KRASIS_AVX2 void dot_q8_avx2(const uint8_t* w, const float* ws, int R, const QActRow* a, int T,
                             int K, int G, float* out) {
    for (int r = 0; r < R; ++r)
        dot_q8_avx2_row(w + size_t(r) * K, ws + size_t(r) * (K / G), a, T, K, G, out + r * T);
}

KRASIS_AVX2 void dot_q4_avx2_row(const uint8_t* w, const float* ws, const QActRow* a, int T,
                                 int K, int G, float* out) {
    switch (T) {
        case 1: return dot_q4_avx2_t<1>(w, ws, a, K, G, out);
        case 2: return dot_q4_avx2_t<2>(w, ws, a, K, G, out);
        case 3: return dot_q4_avx2_t<3>(w, ws, a, K, G, out);
        default: return dot_q4_avx2_t<4>(w, ws, a, K, G, out);
    }
}

KRASIS_AVX2 void dot_q4_avx2(const uint8_t* w, const float* ws, int R, const QActRow* a, int T,
                             int K, int G, float* out) {
    for (int r = 0; r < R; ++r)
        dot_q4_avx2_row(w + size_t(r) * (K / 2), ws + size_t(r) * (K / G), a, T, K, G, out + r * T);
}

// quantize_act_row with 8 floats per step (32 per group slice, G % 32 == 0): the same amax,
// scale and products as the scalar reference; vcvtps2dq rounds in the current mode as
// nearbyint does; |q| <= 127, so the saturating packs never clip.
KRASIS_AVX2 void quantize_avx2(const float* x, int K, int G, int8_t* q, float* scale,
                               int32_t* sum, int8_t* q_pair) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lanes
    for (int g = 0; g < K / G; ++g) {
        const float* xg = x + g * G;
        __m256 vmax = _mm256_setzero_ps();
        for (int k = 0; k < G; k += 8)
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + k)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const __m256 inv = _mm256_set1_ps(amax > kMinActAmax ? 127.0f / amax : 0.0f);
        __m256i vsum = _mm256_setzero_si256();
        for (int k = 0; k < G; k += kHalf) {
            __m256i v[4];
            for (int j = 0; j < 4; ++j) {
                v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8 * j), inv));
                vsum = _mm256_add_epi32(vsum, v[j]);
            }
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                                      _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * G + k),
                                _mm256_permutevar8x32_epi32(packed, order));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        scale[g] = amax / 127.0f;
        sum[g] = _mm_cvtsi128_si32(s4);
    }
    if (q_pair != nullptr && K % kPair == 0) pair_order(q, K, q_pair);
}

}  // namespace

const KernelTable* kernels_avx2() {
    static const KernelTable table{"avx2", dot_q8_avx2, dot_q4_avx2, {0, 1, 1, 1, 1},
                                   quantize_avx2};
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return nullptr;
    return &table;
}

}  // namespace krasis

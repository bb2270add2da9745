// Scalar reference kernels: plain C++, the definition the SIMD versions are tested against.
// w_row: one weight row (INT8: K bytes; INT4: K/64 BlockQ4x64 units), w_scale: [K/G].
// acts: T quantized activation rows (K int8 + K/G scales + K/G sums each), out: [T].
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace krasis {

namespace {

void dot_q8_row(const uint8_t* w_row, const float* w_scale, const QActRow* acts, int T, int K,
                   int G, float* out) {
    const int8_t* w = reinterpret_cast<const int8_t*>(w_row);
    for (int t = 0; t < T; ++t) {
        float acc = 0.0f;
        for (int g = 0; g < K / G; ++g) {
            int32_t dot = 0;
            for (int k = g * G; k < (g + 1) * G; ++k) dot += int32_t(w[k]) * acts[t].q[k];
            acc += float(dot) * (w_scale[g] * acts[t].scale[g]);
        }
        out[t] = acc;
    }
}

// Element k of an INT4 row: unit k/64, byte k%32, low nibble when (k%64) < 32.
inline int q4_at(const uint8_t* w_row, int k) {
    const uint8_t byte = w_row[(k / kUnit) * (kUnit / 2) + (k % (kUnit / 2))];
    const int nibble = (k % kUnit) < kUnit / 2 ? (byte & 0xF) : (byte >> 4);
    return nibble - 8;
}

void dot_q4_row(const uint8_t* w_row, const float* w_scale, const QActRow* acts, int T, int K,
                   int G, float* out) {
    for (int t = 0; t < T; ++t) {
        float acc = 0.0f;
        for (int g = 0; g < K / G; ++g) {
            int32_t dot = 0;
            for (int k = g * G; k < (g + 1) * G; ++k) dot += q4_at(w_row, k) * acts[t].q[k];
            acc += float(dot) * (w_scale[g] * acts[t].scale[g]);
        }
        out[t] = acc;
    }
}

void dot_q8_scalar(const uint8_t* w, const float* ws, int R, const QActRow* acts, int T, int K,
                   int G, float* out) {
    for (int r = 0; r < R; ++r)
        dot_q8_row(w + size_t(r) * K, ws + size_t(r) * (K / G), acts, T, K, G, out + r * T);
}

void dot_q4_scalar(const uint8_t* w, const float* ws, int R, const QActRow* acts, int T, int K,
                   int G, float* out) {
    for (int r = 0; r < R; ++r)
        dot_q4_row(w + size_t(r) * (K / 2), ws + size_t(r) * (K / G), acts, T, K, G, out + r * T);
}

}  // namespace

const KernelTable& kernels_scalar() {
    static const KernelTable table{"scalar", dot_q8_scalar, dot_q4_scalar, {0, 1, 1, 1, 1},
                                   quantize_act_row};
    return table;
}

void quantize_act_row(const float* x, int K, int G, int8_t* q, float* scale, int32_t* sum,
                      int8_t* q_pair) {
    for (int g = 0; g < K / G; ++g) {
        const float* xg = x + g * G;
        float amax = 0.0f;
        for (int k = 0; k < G; ++k) amax = std::fmax(amax, std::fabs(xg[k]));
        const float d = amax / 127.0f;
        const float inv = amax > kMinActAmax ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        for (int k = 0; k < G; ++k) {
            const int v = int(std::nearbyint(xg[k] * inv));
            q[g * G + k] = int8_t(v);
            s += v;
        }
        scale[g] = d;
        sum[g] = s;
    }
    if (q_pair != nullptr && K % kPair == 0) pair_order(q, K, q_pair);
}

void pair_order(const int8_t* q, int K, int8_t* q_pair) {
    constexpr int kQuarter = kPair / 4;
    static const int kFrom[4] = {0, 2 * kQuarter, kQuarter, 3 * kQuarter};  // block offsets
    for (int b = 0; b < K; b += kPair)
        for (int part = 0; part < 4; ++part)
            std::memcpy(q_pair + b + part * kQuarter, q + b + kFrom[part], kQuarter);
}

}  // namespace krasis

// The fused element-wise ops of a step, the ones the CPU profile showed worth fusing:
//   add_rms_norm: sum = x + delta; normed = sum / sqrt(mean(sum^2) + eps) * w   (one block per row)
//   silu_mul:     out[r, i] = silu(gu[r, i]) * gu[r, inter + i]                 (gate/up fused output)
//   rotary_qk:    q [T, H, D] and k [T, KVH, D] rotated by their tokens' cos/sin rows [T, D/2], into
//                 out = q' [T, H, D] followed by k' [T, KVH, D]; pairs (i, i + D/2) or, interleaved,
//                 (2i, 2i + 1).
// f32 arithmetic throughout; the start-up self-check compares each with its candle reference.
#include "common.cuh"

template <typename T, int THREADS>
__device__ void add_rms_norm(T* out, const T* x, const T* delta, const T* w, uint32_t rows, uint32_t dim, float eps) {
    const size_t r = blockIdx.x;
    const T* xr = x + r * dim;
    const T* dr = delta + r * dim;
    T* sum = out + r * dim;
    T* normed = out + (size_t)rows * dim + r * dim;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < dim; i += THREADS) {
        const float v = to_f(xr[i]) + to_f(dr[i]);
        sum[i] = from_f<T>(v);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum<THREADS>(ss) / dim + eps);
    for (uint32_t i = threadIdx.x; i < dim; i += THREADS) {
        const float v = to_f(xr[i]) + to_f(dr[i]);
        normed[i] = from_f<T>(v * inv * to_f(w[i]));
    }
}

template <typename T>
__device__ void silu_mul(T* out, const T* gu, uint32_t rows, uint32_t inter) {
    const size_t total = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i % inter;
        const float g = to_f(gu[r * 2 * inter + c]), u = to_f(gu[r * 2 * inter + inter + c]);
        out[i] = from_f<T>(g / (1.f + expf(-g)) * u);
    }
}

template <typename T>
__device__ void rotary_qk(T* out, const T* q, const T* k, const T* cos, const T* sin, uint32_t tokens, uint32_t heads,
                          uint32_t kv_heads, uint32_t d, uint32_t interleaved) {
    const uint32_t half = d / 2, all = heads + kv_heads;
    const size_t total = (size_t)tokens * all * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / ((size_t)all * half);
        const uint32_t h = (i / half) % all, p = i % half;
        const bool is_q = h < heads;
        const size_t row = is_q ? (size_t)t * heads + h : (size_t)t * kv_heads + (h - heads);
        const T* src = (is_q ? q : k) + row * d;
        T* dst = out + (is_q ? 0 : (size_t)tokens * heads * d) + row * d;
        const uint32_t a = interleaved ? 2 * p : p, b = interleaved ? 2 * p + 1 : p + half;
        const float c = to_f(cos[t * half + p]), s = to_f(sin[t * half + p]);
        const float x0 = to_f(src[a]), x1 = to_f(src[b]);
        dst[a] = from_f<T>(x0 * c - x1 * s);
        dst[b] = from_f<T>(x0 * s + x1 * c);
    }
}

#define FUSED(t, TT)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) tessera_add_rms_norm_##t(                              \
        TT* out, const TT* x, const TT* delta, const TT* w, uint32_t rows, uint32_t dim, float eps) {        \
        add_rms_norm<TT, 256>(out, x, delta, w, rows, dim, eps);                                             \
    }                                                                                                        \
    extern "C" __global__ void tessera_silu_mul_##t(TT* out, const TT* gu, uint32_t rows, uint32_t inter) { \
        silu_mul<TT>(out, gu, rows, inter);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void tessera_rotary_qk_##t(TT* out, const TT* q, const TT* k, const TT* cos,       \
                                                     const TT* sin, uint32_t tokens, uint32_t heads,        \
                                                     uint32_t kv_heads, uint32_t d, uint32_t interleaved) { \
        rotary_qk<TT>(out, q, k, cos, sin, tokens, heads, kv_heads, d, interleaved);                         \
    }

FUSED(f32, float)
FUSED(f16, __half)
FUSED(bf16, __nv_bfloat16)

// Shared helpers of Tessera's CUDA kernels: f32 <-> element conversions and block reductions.
// Every kernel accumulates in f32, as the CPU kernels and the candle references do.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum of `v` over the block's THREADS threads (a multiple of 32, at most 1024), in every thread.
template <int THREADS> __device__ __forceinline__ float block_sum(float v) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (THREADS == 32) return v;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = lane < THREADS / 32 ? part[lane] : 0.f;
    t = warp_sum(t);
    __syncthreads();  // `part` is reused by the next call
    return t;
}

// Launch-time dtype names used in the entry points: f32, f16, bf16.
#define TESSERA_F32 float
#define TESSERA_F16 __half
#define TESSERA_BF16 __nv_bfloat16

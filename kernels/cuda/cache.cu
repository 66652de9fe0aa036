// Reshape-and-cache: row r of `rows` ([n, row_len], row_len = kv_heads * head_dim) goes to cache
// slot `slots[r]` (cache layout [slot, kv_head, head_dim]), rounded to the cache's type to
// nearest even, as kernels/src/attention.rs `write_cache_rows` does. The caller checks every slot
// is inside the cache before launching (a bad slot is an error there, never a wild write here).
#include "common.cuh"

template <typename T, typename C>
__device__ void cache_rows(C* cache, const T* rows, const uint32_t* slots, uint32_t n, uint32_t row_len) {
    const size_t total = (size_t)n * row_len;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / row_len, c = i % row_len;
        cache[(size_t)slots[r] * row_len + c] = from_f<C>(to_f(rows[i]));
    }
}

#define CACHE(t, c, TT, CC)                                                                               \
    extern "C" __global__ void tessera_reshape_and_cache_##t##_##c(CC* cache, const TT* rows,               \
                                                                    const uint32_t* slots, uint32_t n,      \
                                                                    uint32_t row_len) {                     \
        cache_rows<TT, CC>(cache, rows, slots, n, row_len);                                                 \
    }

CACHE(f32, f32, float, float)
CACHE(f32, f16, float, __half)
CACHE(f32, bf16, float, __nv_bfloat16)
CACHE(f16, f16, __half, __half)
CACHE(bf16, bf16, __nv_bfloat16, __nv_bfloat16)

// Paged attention over block tables, decode and chunked prefill in one kernel (a decode row is
// a sequence whose step has one query): K/V are read in place from the paged cache (layout
// [slot, kv_head, head_dim], slot = table[j / block_size] * block_size + j % block_size), the
// softmax is online, causal within the step's queries, in f32. One block per (query row, head),
// one thread per head dimension. Same arithmetic as kernels/src/attention.rs (scores scaled by
// `scale` = 1/sqrt(head_dim)); the start-up self-check compares it with the reference.
#include "common.cuh"

template <typename T, typename C, int D>
__device__ void attend(T* out, const T* q, const C* k_cache, const C* v_cache, const uint32_t* tables,
                       uint32_t table_stride, const uint32_t* seqs, const uint32_t* seq_of_row, uint32_t heads,
                       uint32_t kv_heads, uint32_t block_size, float scale) {
    const uint32_t row = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const uint32_t s = seq_of_row[row];
    const uint32_t q_start = seqs[3 * s], q_len = seqs[3 * s + 1], ctx = seqs[3 * s + 2];
    // Query i of the step sits at context position ctx - q_len + i and sees every position up to it.
    const uint32_t visible = ctx - q_len + (row - q_start) + 1;
    const uint32_t kvh = h / (heads / kv_heads);
    const float qd = to_f(q[((size_t)row * heads + h) * D + d]) * scale;
    const uint32_t* table = tables + (size_t)s * table_stride;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (uint32_t j = 0; j < visible; ++j) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const size_t at = (slot * kv_heads + kvh) * D + d;
        const float score = block_sum<D>(qd * to_f(k_cache[at]));
        const float m2 = fmaxf(m, score);
        const float keep = expf(m - m2), p = expf(score - m2);
        l = l * keep + p;
        acc = acc * keep + p * to_f(v_cache[at]);
        m = m2;
    }
    out[((size_t)row * heads + h) * D + d] = from_f<T>(acc / l);
}

#define ATTENTION(t, c, TT, CC, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(D) tessera_paged_attention_##t##_##c##_##D(                \
        TT* out, const TT* q, const CC* k_cache, const CC* v_cache, const uint32_t* tables,                 \
        uint32_t table_stride, const uint32_t* seqs, const uint32_t* seq_of_row, uint32_t heads,             \
        uint32_t kv_heads, uint32_t block_size, float scale) {                                               \
        attend<TT, CC, D>(out, q, k_cache, v_cache, tables, table_stride, seqs, seq_of_row, heads, kv_heads, \
                          block_size, scale);                                                                \
    }
#define ATTENTION_DIMS(t, c, TT, CC) ATTENTION(t, c, TT, CC, 64) ATTENTION(t, c, TT, CC, 128)

ATTENTION_DIMS(f32, f32, float, float)
ATTENTION_DIMS(f32, f16, float, __half)
ATTENTION_DIMS(f32, bf16, float, __nv_bfloat16)
ATTENTION_DIMS(f16, f16, __half, __half)
ATTENTION_DIMS(bf16, bf16, __nv_bfloat16, __nv_bfloat16)

/* Shared by the DiTAS CPU kernels (int_linear.c, alpha_search_bf16.c): includes, the packed-block
   width and the two vector helpers. DITAS_NB (columns per packed block) and DITAS_QR (rows per LoRA
   block of ditas_encode) are passed by the build (quant/kernels/ops_avx512.py), which defines them once. */
#ifndef DITAS_SIMD_H
#define DITAS_SIMD_H
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#ifndef DITAS_NB
#error "DITAS_NB must be defined by the build (quant/kernels/ops_avx512.py)"
#endif
#ifndef DITAS_QR
#error "DITAS_QR must be defined by the build (quant/kernels/ops_avx512.py)"
#endif
#define NB DITAS_NB
#define QR DITAS_QR

int ditas_qgemm_supported(void);

/* lanes of a 16-wide vector that hold elements, `left` elements from here to the end */
static inline __attribute__((always_inline)) __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

/* float32 -> bfloat16, round to nearest even (torch's conversion for finite values) */
static inline __attribute__((always_inline)) __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

#endif

/* Round-to-nearest weight quantization of the LoRA loop in one pass (quant/method/lora.py, fit_lora; loaded by
   quant/kernels/ops_avx512.py). For each row m of W (rows x K, row stride K) and each group g of G consecutive
   columns (the ditas scheme's groups, G a multiple of 16), with v = W - LR (LR: NULL for none):
     mn, mx = min, max of v over the group;  rng = mx - mn
     scale  = rng > 0 ? rng / levels : (mn != 0 ? |mn| : 1);   zero = nearbyint(-mn / scale)
     code   = clamp(nearbyint(v / scale) + zero, 0, levels)        -> codes[m, k] (uint8)
     e      = W - (code - zero) * scale                            -> E[m, k] (float32)
   scale, zero -> (rows x K/G). Each line is quant.method.quantizer's affine_params / encode / decode in the same
   IEEE single operations (true division, round half to even, no contraction: -std=c11), so codes, scales,
   zero points and E equal the torch ops' bit for bit. */
#include "ditas_simd.h"

void ditas_quant_residual(int64_t rows, int64_t K, int64_t G, const float *W, const float *LR, int64_t levels,
                          uint8_t *codes, float *scale, float *zero, float *E, int64_t nthreads) {
    const int64_t ng = K / G;
#pragma omp parallel for num_threads((int)nthreads) schedule(static)
    for (int64_t m = 0; m < rows; m++) {
        for (int64_t g = 0; g < ng; g++) {
            const int64_t off = m * K + g * G;
            __m512 lo = _mm512_set1_ps(__builtin_inff()), hi = _mm512_set1_ps(-__builtin_inff());
            for (int64_t k = 0; k < G; k += 16) {
                __m512 v = _mm512_loadu_ps(W + off + k);
                if (LR)
                    v = _mm512_sub_ps(v, _mm512_loadu_ps(LR + off + k));
                lo = _mm512_min_ps(lo, v);
                hi = _mm512_max_ps(hi, v);
            }
            const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi), rng = mx - mn;
            const float sc = rng > 0 ? rng / (float)levels : (mn != 0 ? __builtin_fabsf(mn) : 1.0f);
            const float zp = __builtin_nearbyintf(-mn / sc);
            scale[m * ng + g] = sc;
            zero[m * ng + g] = zp;
            const __m512 scv = _mm512_set1_ps(sc), zpv = _mm512_set1_ps(zp), top = _mm512_set1_ps((float)levels);
            const __m512 zero_v = _mm512_setzero_ps();
            for (int64_t k = 0; k < G; k += 16) {
                __m512 w = _mm512_loadu_ps(W + off + k), v = w;
                if (LR)
                    v = _mm512_sub_ps(v, _mm512_loadu_ps(LR + off + k));
                v = _mm512_roundscale_ps(_mm512_div_ps(v, scv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zpv), zero_v), top);
                _mm_storeu_si128((__m128i *)(codes + off + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
                _mm512_storeu_ps(E + off + k, _mm512_sub_ps(w, _mm512_mul_ps(_mm512_sub_ps(v, zpv), scv)));
            }
        }
    }
}

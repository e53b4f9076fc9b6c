/* Reference-scheme alpha search in bfloat16 for x86 CPUs with AVX512-BF16 (quant/search/losses.py,
   LossEngine._reference_losses with matmul_dtype bf16; loaded by quant/kernels/ops_avx512.py).
   For candidate q and row i of a chunk of n rows (global row r0 + i), with the quantizer's own codes
     t = min(round(x / s[q] / sc[q, r0 + i]), top[q, r0 + i]);  e = (t sc) s[q] - x
     acc[q] += 2 <e, partner[i]>             (split)
     acc[q] += || bf16(e) M (+ partner[i]) ||^2     (partner added when not split)
   s: (k, c); sc, top: (k, rows); M: c x w in bfloat16, packed for vdpbf16ps as
   Mp[j][c/2][32][2] (pairs of consecutive c, 32-column blocks, c padded to even, w to 32);
   partner: n x pw. Per-thread partial sums go to part (nthreads x k doubles), summed by the caller.
   */
#include "ditas_simd.h"

int ditas_bf16_supported(void) {
    __builtin_cpu_init();
    return ditas_qgemm_supported() && __builtin_cpu_supports("avx512bf16");
}

#define SR 6  /* stacked (candidate, row) rows per micro-tile */

static inline __attribute__((always_inline)) void sq_ukernel(
        const int mr, const uint16_t *E, int64_t cpad, const uint16_t *Mp, int64_t j, const float *partner,
        int64_t pw, int64_t w, const int64_t *prow, float *sums) {
    const int64_t c2 = cpad / 2, n0 = j * NB;
    const uint16_t *bp = Mp + j * c2 * (NB * 2);
    __m512 acc[SR][2];
    for (int i = 0; i < mr; i++) {
        acc[i][0] = _mm512_setzero_ps();
        acc[i][1] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < c2; c++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)bp);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512((const void *)(bp + 32));
        bp += NB * 2;
        for (int i = 0; i < mr; i++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(E + i * cpad + 2 * c));
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
        }
    }
    int64_t left = w - n0;
    __mmask16 k0 = tail_mask(left), k1 = tail_mask(left - 16);
    for (int i = 0; i < mr; i++) {
        __m512 z0 = acc[i][0], z1 = acc[i][1];
        if (partner) {
            z0 = _mm512_add_ps(z0, _mm512_maskz_loadu_ps(k0, partner + prow[i] * pw + n0));
            z1 = _mm512_add_ps(z1, _mm512_maskz_loadu_ps(k1, partner + prow[i] * pw + n0 + 16));
        }
        z0 = _mm512_maskz_mov_ps(k0, z0);
        z1 = _mm512_maskz_mov_ps(k1, z1);
        sums[i] += _mm512_reduce_add_ps(_mm512_fmadd_ps(z0, z0, _mm512_mul_ps(z1, z1)));
    }
}

void ditas_ref_losses(int64_t n, int64_t rows, int64_t r0, int64_t c, int64_t w, int64_t k, const float *x,
                      const float *s, const float *sc, const float *top, const uint16_t *Mp, const float *partner,
                      int64_t pw, int64_t split, uint16_t *E, double *part, int64_t nthreads) {
    const int64_t cpad = c + (c & 1), stacked = k * n, nblk = (w + NB - 1) / NB;
    /* phase 1: E = bf16(activation error) for every (candidate, row); the cross term */
#pragma omp parallel num_threads((int)nthreads)
    {
        double *mine = part + (int64_t)omp_get_thread_num() * k;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < stacked; r++) {
            const int64_t q = r / n, i = r % n;
            const float *xr = x + i * c;
            const __m512 tp = _mm512_set1_ps(top[q * rows + r0 + i]);
            const __m512 scv = _mm512_set1_ps(sc[q * rows + r0 + i]);
            __m512 cross = _mm512_setzero_ps();
            for (int64_t cc = 0; cc < c; cc += 16) {
                __mmask16 mask = tail_mask(c - cc);
                const __m512 xv = _mm512_maskz_loadu_ps(mask, xr + cc);
                const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), mask, s + q * c + cc);
                __m512 t = _mm512_div_ps(_mm512_div_ps(xv, sv), scv);
                t = _mm512_min_ps(_mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), tp);
                __m512 e = _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(t, scv), sv), xv);
                e = _mm512_maskz_mov_ps(mask, e);
                if (split)
                    cross = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(mask, partner + i * pw + cc), cross);
                _mm256_mask_storeu_epi16(E + r * cpad + cc, mask, to_bf16(e));
            }
            if (cpad != c)
                E[r * cpad + c] = 0;
            if (split)
                mine[q] += 2.0 * (double)_mm512_reduce_add_ps(cross);
        }
        /* phase 2: sum of squares of E M (+ partner) per candidate, in (6 stacked rows x 32 columns) tiles */
        const int64_t ntile = (stacked + SR - 1) / SR;
#pragma omp for schedule(static) collapse(2)
        for (int64_t tb = 0; tb < ntile; tb++) {
            for (int64_t j = 0; j < nblk; j++) {
                const int64_t s0 = tb * SR, mr = stacked - s0 < SR ? stacked - s0 : SR;
                float sums[SR] = {0};
                int64_t prow[SR];
                for (int64_t i = 0; i < mr; i++)
                    prow[i] = (s0 + i) % n;
                const float *pp = split ? 0 : partner;
                const uint16_t *Et = E + s0 * cpad;
                switch (mr) {
                    case 6: sq_ukernel(6, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                    case 5: sq_ukernel(5, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                    case 4: sq_ukernel(4, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                    case 3: sq_ukernel(3, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                    case 2: sq_ukernel(2, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                    default: sq_ukernel(1, Et, cpad, Mp, j, pp, pw, w, prow, sums); break;
                }
                for (int64_t i = 0; i < mr; i++)
                    mine[(s0 + i) / n] += (double)sums[i];
            }
        }
    }
}

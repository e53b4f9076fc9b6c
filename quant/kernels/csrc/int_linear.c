/* Fused W8A8 / W4A8 linear for x86 CPUs with AVX512-VNNI (see quant/kernels/ops_avx512.py).

   out[m, n] = act( sx[m] * ( sum_g sw[g, n] * D_g[m, n]  +  sum_r lp[m, r] Lt[r, n] ) + bias[n] )

   D_g[m, n] = sum_{k in g} A[m, k] B[k, n] + sa[m, g] dq[g, n] - zx[m] cbd[g, n]      (int32, exact)

   A: activation codes (uint8, M x K, row stride lda), zx their zero points; B = W - c: the weight
   codes W minus a per-(group, column) integer offset c; with zw the weight zero points,
   dq = c - zw, sa[m, g] = sum_{k in g} A[m, k] and cbd = sum_{k in g} (W - zw), the identity
       sum_{k in g} (A - zx)(W - zw) = sum (A - zx)(B + dq) = A_g B_g + sa dq - zx cbd
   holds for any c (cbd does not depend on c; dq == 0 needs no sa, the caller passes dq = sa = NULL).

   ditas_qgemm (8-bit weights): c = zw clamped into [2^b - 128, 128], so that B fits int8;
   Bp[j][k/4][c][k%4] = B[k, 32 j + c], one byte per weight (quant/kernels/ops_avx512.py pack_b).
   ditas_qgemm_w4 (weights of <= 4 bits): c = 0, B = W the raw codes 0..15 (W - zw, -15..15,
   would not fit a signed nibble), so dq = -zw and cbd = CW - G zw with CW the group's column
   sums of W; two codes per byte (pack_b4): Bp4[j][k/8][c][t] = W[8(k/8) + t, 32 j + c]
   | W[8(k/8) + 4 + t, 32 j + c] << 4 for t < 4, i.e. the low nibbles of each 128-byte step are
   the 8-bit layout's step k/4 = 2(k/8), the high nibbles its step 2(k/8) + 1; in registers
   (q & 15) and ((q >> 4) & 15) are vpdpbusd's s8 operands (0..15, exact products with u8 A).
   K and G are multiples of 8 there (4 for ditas_qgemm).

   Blocks of 32 columns, N padded to Npad = 32 * blocks with zero columns.
   sw, cbd, dq: (ng, Npad) row-major; sa: (M, ng); zx, sx: per row with stride 0 or 1;
   lp: (M, r); Lt: (r, Npad); bias: (Npad). Outputs: float32 or bfloat16 (round to nearest
   even), M x N with row stride ldo. act: identity, or GELU (tanh form) when gelu != 0.

   The integer part (vpdpbusd: u8 x s8 products summed in int32 without saturation, then
   the rank-1 zero-point corrections) is exact when the caller's int32 bound holds; the
   float epilogue accumulates group by group in registers, so the int32 partials never
   leave them. No fast-math: the only float operations are the epilogue's. */
#include "ditas_simd.h"

#define MR 6
#define MC 96

int ditas_qgemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

static inline __attribute__((always_inline)) void store16(void *out, int64_t ldo, int64_t m, int64_t n,
                                                          __m512 v, __mmask16 mask, int bf16) {
    if (bf16) {
        _mm256_mask_storeu_epi16((uint16_t *)out + m * ldo + n, mask, to_bf16(v));
    } else {
        _mm512_mask_storeu_ps((float *)out + m * ldo + n, mask, v);
    }
}

/* exp(y) for y clamped to [-100, 100] (Cephes expf polynomial, ~1 ulp; vscalefps scales by 2^n) */
static inline __attribute__((always_inline)) __m512 exp_ps(__m512 y) {
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(100.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* GELU, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3) */
static inline __attribute__((always_inline)) __m512 gelu_tanh_ps(__m512 x) {
    __m512 x2 = _mm512_mul_ps(x, x);
    __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(x2, _mm512_set1_ps(0.044715f)), x, x),
                             _mm512_set1_ps(-1.5957691216057308f));  /* -2 sqrt(2/pi) */
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(u)));
}

/* mr rows (m0..m0+mr) x 32 columns (block j); mr and w4 (Bp holds pack_b4's nibbles) are literals at
   every call site. */
static inline __attribute__((always_inline)) void ukernel(
        const int mr, const int w4, int64_t m0, int64_t j, int64_t N, int64_t Npad, int64_t K, int64_t G,
        const uint8_t *A, int64_t lda, const int8_t *Bp, const float *sw, const int32_t *cbd,
        const int32_t *dq, const int32_t *sa, const int32_t *zx, int64_t zs, const float *sx, int64_t ss,
        const float *lp, int64_t lpld, int64_t r, const float *Lt, const float *bias, void *out, int64_t ldo,
        int bf16, int gelu) {
    const int64_t ng = K / G, n0 = j * NB;
    const int8_t *bp = Bp + j * K * (w4 ? NB / 2 : NB);  /* a block: K x 32 weights, 1 or 1/2 byte each */
    __m512 facc[MR][2];
    __m512i zv[MR];
    for (int i = 0; i < mr; i++) {
        facc[i][0] = _mm512_setzero_ps();
        facc[i][1] = _mm512_setzero_ps();
        zv[i] = _mm512_set1_epi32(zx[(m0 + i) * zs]);
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512i acc[MR][2];
        for (int i = 0; i < mr; i++) {
            acc[i][0] = _mm512_setzero_si512();
            acc[i][1] = _mm512_setzero_si512();
        }
        const uint8_t *a = A + m0 * lda + g * G;
        if (w4) {
            const __m512i nib = _mm512_set1_epi8(0x0f);
            for (int64_t k = 0; k < G; k += 8) {  /* one 128-byte step: 8 K values x 32 columns */
                __m512i q0 = _mm512_loadu_si512((const void *)bp);
                __m512i q1 = _mm512_loadu_si512((const void *)(bp + 64));
                bp += NB * 4;
                __m512i b0 = _mm512_and_si512(q0, nib), b1 = _mm512_and_si512(q1, nib);
                __m512i b2 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), nib);
                __m512i b3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), nib);
                for (int i = 0; i < mr; i++) {
                    __m512i av = _mm512_set1_epi32(*(const int32_t *)(a + i * lda + k));
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b0);
                    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b1);
                }
                for (int i = 0; i < mr; i++) {
                    __m512i av = _mm512_set1_epi32(*(const int32_t *)(a + i * lda + k + 4));
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b2);
                    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b3);
                }
            }
        } else {
            for (int64_t k = 0; k < G; k += 4) {
                __m512i b0 = _mm512_loadu_si512((const void *)bp);
                __m512i b1 = _mm512_loadu_si512((const void *)(bp + 64));
                bp += NB * 4;
                for (int i = 0; i < mr; i++) {
                    __m512i av = _mm512_set1_epi32(*(const int32_t *)(a + i * lda + k));
                    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], av, b0);
                    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], av, b1);
                }
            }
        }
        const int64_t go = g * Npad + n0;
        __m512i c0 = _mm512_loadu_si512((const void *)(cbd + go));
        __m512i c1 = _mm512_loadu_si512((const void *)(cbd + go + 16));
        __m512 s0 = _mm512_loadu_ps(sw + go), s1 = _mm512_loadu_ps(sw + go + 16);
        __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
        if (dq) {
            d0 = _mm512_loadu_si512((const void *)(dq + go));
            d1 = _mm512_loadu_si512((const void *)(dq + go + 16));
        }
        for (int i = 0; i < mr; i++) {
            __m512i p0 = _mm512_sub_epi32(acc[i][0], _mm512_mullo_epi32(zv[i], c0));
            __m512i p1 = _mm512_sub_epi32(acc[i][1], _mm512_mullo_epi32(zv[i], c1));
            if (dq) {
                __m512i sv = _mm512_set1_epi32(sa[(m0 + i) * ng + g]);
                p0 = _mm512_add_epi32(p0, _mm512_mullo_epi32(sv, d0));
                p1 = _mm512_add_epi32(p1, _mm512_mullo_epi32(sv, d1));
            }
            facc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), s0, facc[i][0]);
            facc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), s1, facc[i][1]);
        }
    }
    for (int64_t q = 0; q < r; q++) {
        __m512 l0 = _mm512_loadu_ps(Lt + q * Npad + n0), l1 = _mm512_loadu_ps(Lt + q * Npad + n0 + 16);
        for (int i = 0; i < mr; i++) {
            __m512 pv = _mm512_set1_ps(lp[(m0 + i) * lpld + q]);
            facc[i][0] = _mm512_fmadd_ps(pv, l0, facc[i][0]);
            facc[i][1] = _mm512_fmadd_ps(pv, l1, facc[i][1]);
        }
    }
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias) {
        b0 = _mm512_loadu_ps(bias + n0);
        b1 = _mm512_loadu_ps(bias + n0 + 16);
    }
    int64_t left = N - n0;
    __mmask16 k0 = tail_mask(left), k1 = tail_mask(left - 16);
    for (int i = 0; i < mr; i++) {
        __m512 sv = _mm512_set1_ps(sx[(m0 + i) * ss]);
        __m512 y0 = _mm512_fmadd_ps(facc[i][0], sv, b0), y1 = _mm512_fmadd_ps(facc[i][1], sv, b1);
        if (gelu) {
            y0 = gelu_tanh_ps(y0);
            y1 = gelu_tanh_ps(y1);
        }
        store16(out, ldo, m0 + i, n0, y0, k0, bf16);
        if (k1)
            store16(out, ldo, m0 + i, n0 + 16, y1, k1, bf16);
    }
}

#define UK(mr) ukernel(mr, w4, m, j, N, Npad, K, G, A, lda, Bp, sw, cbd, dq, sa, zx, zs, sx, ss, lp, lpld, r, Lt, \
                       bias, out, ldo, (int)out_bf16, (int)gelu)

static inline __attribute__((always_inline)) void qgemm(
        const int w4, int64_t M, int64_t N, int64_t Npad, int64_t K, int64_t G,
        const uint8_t *A, int64_t lda, const int8_t *Bp, const float *sw, const int32_t *cbd,
        const int32_t *dq, const int32_t *sa, const int32_t *zx, int64_t zs, const float *sx,
        int64_t ss, const float *lp, int64_t lpld, int64_t r, const float *Lt, const float *bias,
        void *out, int64_t ldo, int64_t out_bf16, int64_t gelu, int64_t nthreads) {
    const int64_t nblocks = Npad / NB, nchunks = (M + MC - 1) / MC;
    /* one work unit = MC rows x 32 columns: the B block (K x 32) stays in L2 across the rows,
       consecutive units of a thread share the A rows */
#pragma omp parallel for num_threads((int)nthreads) schedule(static) collapse(2)
    for (int64_t c = 0; c < nchunks; c++) {
        for (int64_t j = 0; j < nblocks; j++) {
            int64_t mend = (c + 1) * MC < M ? (c + 1) * MC : M;
            int64_t m = c * MC;
            for (; m + MR <= mend; m += MR)
                UK(6);
            switch (mend - m) {
                case 5: UK(5); break;
                case 4: UK(4); break;
                case 3: UK(3); break;
                case 2: UK(2); break;
                case 1: UK(1); break;
                default: break;
            }
        }
    }
}

void ditas_qgemm(int64_t M, int64_t N, int64_t Npad, int64_t K, int64_t G,
                 const uint8_t *A, int64_t lda, const int8_t *Bp, const float *sw, const int32_t *cbd,
                 const int32_t *dq, const int32_t *sa, const int32_t *zx, int64_t zs, const float *sx,
                 int64_t ss, const float *lp, int64_t lpld, int64_t r, const float *Lt, const float *bias,
                 void *out, int64_t ldo, int64_t out_bf16, int64_t gelu, int64_t nthreads) {
    qgemm(0, M, N, Npad, K, G, A, lda, Bp, sw, cbd, dq, sa, zx, zs, sx, ss, lp, lpld, r, Lt, bias, out, ldo,
          out_bf16, gelu, nthreads);
}

/* the same with Bp4 = pack_b4 of the raw <= 4-bit codes (two per byte): see the header comment */
void ditas_qgemm_w4(int64_t M, int64_t N, int64_t Npad, int64_t K, int64_t G,
                    const uint8_t *A, int64_t lda, const uint8_t *Bp4, const float *sw, const int32_t *cbd,
                    const int32_t *dq, const int32_t *sa, const int32_t *zx, int64_t zs, const float *sx,
                    int64_t ss, const float *lp, int64_t lpld, int64_t r, const float *Lt, const float *bias,
                    void *out, int64_t ldo, int64_t out_bf16, int64_t gelu, int64_t nthreads) {
    qgemm(1, M, N, Npad, K, G, A, lda, (const int8_t *)Bp4, sw, cbd, dq, sa, zx, zs, sx, ss, lp, lpld, r, Lt,
          bias, out, ldo, out_bf16, gelu, nthreads);
}

/* ---------------------------------------------------------------------------------------------
   Activation side: x float32 or bfloat16 (M x K, row stride ldx), s the smoothing factors (K) or
   NULL. v = x / s is evaluated exactly as torch does (upcast, IEEE division), so that the codes
   equal quant.method.quantizer's bit for bit:  code = clamp(nearbyint(v / scale) + zero, 0, levels).
   --------------------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) __m512 load_x(const void *x, int64_t off, int bf16, __mmask16 mask) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + off);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)x + off);
}

static inline __attribute__((always_inline)) __m512 smoothed(const void *x, int64_t off, int bf16, const float *s,
                                                             int64_t k, __mmask16 mask) {
    __m512 v = load_x(x, off, bf16, mask);
    if (s)
        v = _mm512_div_ps(v, _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), mask, s + k));
    return v;
}

/* mn[m], mx[m] = min, max over k of x[m, k] / s[k] */
void ditas_rowrange(int64_t M, int64_t K, const void *x, int64_t ldx, int64_t x_bf16, const float *s,
                    float *mn, float *mx, int64_t nthreads) {
#pragma omp parallel for num_threads((int)nthreads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        __m512 lo = _mm512_set1_ps(__builtin_inff()), hi = _mm512_set1_ps(-__builtin_inff());
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mask = tail_mask(K - k);
            __m512 v = smoothed(x, m * ldx + k, (int)x_bf16, s, k, mask);
            lo = _mm512_mask_min_ps(lo, mask, lo, v);
            hi = _mm512_mask_max_ps(hi, mask, hi, v);
        }
        mn[m] = _mm512_reduce_min_ps(lo);
        mx[m] = _mm512_reduce_max_ps(hi);
    }
}

/* a[m, k] = codes (uint8, row stride K); sa[m, g] = sum of a over group g of G columns (if sa);
   lp[m, q] = sum_k (a[m, k] - zero[m]) Rt[k, q] for q < rpad (if r: Rt is K x rpad, rpad a
   multiple of 16, row stride of lp rpad). scale, zero per row with stride 0 or 1. */
void ditas_encode(int64_t M, int64_t K, const void *x, int64_t ldx, int64_t x_bf16, const float *s,
                  const float *scale, int64_t ss, const float *zero, int64_t zs, int64_t levels,
                  uint8_t *a, int64_t G, int32_t *sa, const float *Rt, int64_t rpad, float *lp, float *scratch,
                  int64_t nthreads) {
    const int64_t ng = K / G, nblk = (M + QR - 1) / QR;
#pragma omp parallel for num_threads((int)nthreads) schedule(static)
    for (int64_t b = 0; b < nblk; b++) {
        float *buf = scratch ? scratch + (int64_t)omp_get_thread_num() * QR * K : 0;
        const int64_t m0 = b * QR, mr = M - m0 < QR ? M - m0 : QR;
        for (int64_t i = 0; i < mr; i++) {
            const int64_t m = m0 + i;
            const __m512 sc = _mm512_set1_ps(scale[m * ss]), zp = _mm512_set1_ps(zero[m * zs]);
            const __m512 top = _mm512_set1_ps((float)levels), zero_v = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 mask = tail_mask(K - k);
                __m512 v = _mm512_div_ps(smoothed(x, m * ldx + k, (int)x_bf16, s, k, mask), sc);
                v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zp), zero_v), top);
                _mm_mask_storeu_epi8(a + m * K + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
                if (buf)
                    _mm512_mask_storeu_ps(buf + i * K + k, mask, _mm512_sub_ps(v, zp));
            }
            if (sa) {
                const uint8_t *row = a + m * K;
                for (int64_t g = 0; g < ng; g++) {
                    int32_t acc = 0;
                    for (int64_t k = g * G; k < (g + 1) * G; k++)
                        acc += row[k];
                    sa[m * ng + g] = acc;
                }
            }
        }
        if (!buf)
            continue;
        for (int64_t q = 0; q < rpad; q += 16) {
            __m512 acc[QR];
            for (int64_t i = 0; i < QR; i++)
                acc[i] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {  /* all QR rows: rows past mr are scratch, never stored */
                __m512 rv = _mm512_loadu_ps(Rt + k * rpad + q);
                for (int64_t i = 0; i < QR; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(buf[i * K + k]), rv, acc[i]);
            }
            for (int64_t i = 0; i < mr; i++)
                _mm512_storeu_ps(lp + (m0 + i) * rpad + q, acc[i]);
        }
    }
}

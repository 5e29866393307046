/* Shared pieces of the decode-path CPU kernels (attention.c, layer_ops.c), which
 * gpu_runtime/native.py compiles into one library loaded through ctypes.
 *
 * Each kernel does in one pass what the torch path does with several small eager kernels, and
 * runs single-threaded: at decode sizes (a few tokens) the work is tens of microseconds, less
 * than waking torch's OpenMP threads for each of those kernels. Tensors arrive as raw pointers
 * with a dtype code (DT_*); the caller (gpu_runtime/backends/cpu.py) checks shapes, strides
 * and devices; decode attention checks the cache indices it follows itself (attention.c). Math is float32 throughout; bf16 and fp16 are converted on load and rounded to
 * nearest-even on store, where the torch reference rounds (noted per kernel).
 *
 * Built with -ffp-contract=off so that a*b + c*d is two roundings, as in torch's eager code;
 * where a fused multiply-add is wanted (dot products) it is written as fmaf.
 */
#ifndef HYDRA_KERNELS_H
#define HYDRA_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* return codes (gpu_runtime/backends/cpu.py turns each into its exception) */
enum {
    HYDRA_OK = 0,
    HYDRA_BAD_SHAPE = -1,   /* a size the kernel does not take (head dim, heads); nothing done */
    HYDRA_NO_MEMORY = -2,   /* scratch memory ran out */
    HYDRA_BAD_CONTEXT = -3, /* a context length outside [1, block table width * block size] */
    HYDRA_BAD_SLOT = -4,    /* a slot outside the cache */
    HYDRA_BAD_BLOCK = -5,   /* a block-table entry a sequence uses outside the cache */
};

#define LANES 16 /* independent partial sums: the compiler maps them onto vector registers */
#define MAX_HEAD_DIM 512
/* kernel bodies take the dtype as a constant argument and are inlined into one copy per dtype
 * (see BY_DTYPE), so the per-element dtype tests fold away and the loops vectorise */
#define INLINE static inline __attribute__((always_inline))
#define BY_DTYPE(dt, body, ...)                                                              \
    do {                                                                                     \
        if ((dt) == DT_BF16) body(__VA_ARGS__, DT_BF16);                                     \
        else if ((dt) == DT_F16) body(__VA_ARGS__, DT_F16);                                  \
        else body(__VA_ARGS__, DT_F32);                                                      \
    } while (0)

/* ---- conversions --------------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal half: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint32_t sign = (bits >> 16) & 0x8000u, absb = bits & 0x7fffffffu;
    if (absb > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (absb >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (absb < 0x38800000u) { /* below the smallest normal half: into subnormals */
        float a;
        memcpy(&a, &absb, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    }
    uint32_t rounded = absb + 0xfffu + ((absb >> 13) & 1u); /* nearest, ties to even */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

/* Row conversions. bf16 is bit shifts the compiler vectorises; fp16 uses the F16C
 * instructions 8 at a time where the CPU has them (the scalar code above for the rest). */

INLINE size_t dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* n elements of dtype dt at p to float32 */
INLINE void load_row(const void *p, float *out, int64_t n, int dt) {
    if (dt == DT_F32) {
        memcpy(out, p, (size_t)n * 4);
        return;
    }
    const uint16_t *s = p;
    int64_t i = 0;
    if (dt == DT_BF16) {
        for (; i < n; i++) out[i] = bf16_to_f32(s[i]);
        return;
    }
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
    for (; i < n; i++) out[i] = f16_to_f32(s[i]);
}

/* n float32 to dtype dt at p, rounded to nearest even */
INLINE void store_row(void *p, const float *in, int64_t n, int dt) {
    if (dt == DT_F32) {
        memcpy(p, in, (size_t)n * 4);
        return;
    }
    uint16_t *d = p;
    int64_t i = 0;
    if (dt == DT_BF16) {
        for (; i < n; i++) d[i] = f32_to_bf16(in[i]);
        return;
    }
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = f32_to_f16(in[i]);
}

/* x[i] becomes the value it takes once stored in dtype dt: what torch's eager op hands the
 * next one */
INLINE void round_row(float *x, int64_t n, int dt) {
    if (dt == DT_BF16) {
        for (int64_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
    } else if (dt == DT_F16) {
        int64_t i = 0;
#if defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                                  _MM_FROUND_TO_NEAREST_INT)));
#endif
        for (; i < n; i++) x[i] = f16_to_f32(f32_to_f16(x[i]));
    }
}

/* sum of LANES partial sums, pairwise (a tree of vector adds, not LANES - 1 dependent ones) */
INLINE float lane_sum(float *acc) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    return acc[0];
}

/* ---- exp ----------------------------------------------------------------------------- */

/* e^x in float32 within a few ulp, branch-free so loops over it vectorise (libm's expf is a
 * call per element). x = n ln2 + r with |r| <= ln2/2; e^r by its Taylor polynomial to degree 7
 * (truncation < 2e-9 relative there); 2^n built in the exponent bits. Inputs are clamped to
 * [-87, 88]: below -87 the result is ~1.6e-38 instead of smaller, which no caller can tell
 * apart once it is summed with or divided by terms of ordinary size. */
INLINE float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter; /* = round(x log2 e), as exp8 */
    float r = fmaf(n, -0.693359375f, x); /* ln2 in two parts: n * hi is exact */
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2 1
/* AVX2 + FMA + F16C helpers: 8 elements of any dtype to float32 in one register, a horizontal
 * sum, and exp_f32 on 8 lanes. Compilers leave reductions and conversions like these scalar
 * (or round-trip them through the stack), which made the portable attention 2-3x slower. */

INLINE __m256 load8(const uint8_t *p, int dt) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* exp_f32 on 8 lanes, the same operations (so the same results) */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    e = _mm256_slli_epi32(e, 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif /* HAVE_AVX2 */

#endif /* HYDRA_KERNELS_H */

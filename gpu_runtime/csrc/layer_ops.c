/* The elementwise work of a Llama decoder layer (residual add + RMSNorm, SiLU * up, RoPE)
 * and the sampler's argmax / log-sum-exp, each one pass where torch runs several kernels. */
#include "kernels.h"

int hydra_abi_version(void) { return 3; } /* native.ABI_VERSION */

/* ---- elementwise kernels of a Llama layer --------------------------------------------- */

INLINE void rms_norm(const uint8_t *x, const uint8_t *delta, const uint8_t *weight,
                     uint8_t *sum_out, uint8_t *out, int64_t rows, int64_t dim, float eps,
                     float *buf, int dt) {
    size_t es = dt_size(dt);
    float *row = buf, *w = buf + dim, *add = buf + 2 * dim;
    load_row(weight, w, dim, dt);
    for (int64_t r = 0; r < rows; r++) {
        size_t off = (size_t)(r * dim) * es;
        load_row(x + off, row, dim, dt);
        if (delta) {
            load_row(delta + off, add, dim, dt);
            for (int64_t i = 0; i < dim; i++) row[i] += add[i];
            round_row(row, dim, dt);
            store_row(sum_out + off, row, dim, dt);
        }
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= dim; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += row[i + j] * row[i + j];
        float sq = lane_sum(acc);
        for (; i < dim; i++) sq += row[i] * row[i];
        float inv = 1.0f / sqrtf(sq / (float)dim + eps);
        for (i = 0; i < dim; i++) row[i] *= inv;
        round_row(row, dim, dt);
        for (i = 0; i < dim; i++) row[i] *= w[i];
        store_row(out + off, row, dim, dt);
    }
}

/* RMSNorm of ``rows`` rows of ``dim`` in the reference's steps: x to float32, mean of squares,
 * x * (1 / sqrt(mean + eps)) rounded to the dtype, times the weight, rounded again. With
 * ``delta`` (non-NULL) the row is first x + delta rounded to the dtype (the residual add
 * before the norm), and that sum is also stored to ``sum_out``. The mean of squares is summed
 * in another order than torch's, so it may differ in its last bit: rarely visible after the
 * rounding to bf16 / fp16, within an ulp or two in float32. Returns HYDRA_OK, or
 * HYDRA_NO_MEMORY. */
int hydra_rms_norm(const void *x, const void *delta, const void *weight, void *sum_out,
                   void *out, int64_t rows, int64_t dim, float eps, int dt) {
    float *buf = malloc(sizeof(float) * (size_t)dim * 3);
    if (!buf) return HYDRA_NO_MEMORY;
    BY_DTYPE(dt, rms_norm, x, delta, weight, sum_out, out, rows, dim, eps, buf);
    free(buf);
    return HYDRA_OK;
}

#define CHUNK 512

INLINE void silu_mul(const uint8_t *gate, const uint8_t *up, uint8_t *out, int64_t n, int dt) {
    float g[CHUNK], u[CHUNK];
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t m = n - start < CHUNK ? n - start : CHUNK;
        size_t off = (size_t)start * dt_size(dt);
        load_row(gate + off, g, m, dt);
        load_row(up + off, u, m, dt);
        for (int64_t i = 0; i < m; i++) g[i] = g[i] / (1.0f + exp_f32(-g[i]));
        round_row(g, m, dt);
        for (int64_t i = 0; i < m; i++) g[i] *= u[i];
        store_row(out + off, g, m, dt);
    }
}

/* silu(gate) * up over n elements, rounded where torch's two eager ops round: silu(x) =
 * x / (1 + e^-x) rounded to the dtype, then the product rounded. */
void hydra_silu_mul(const void *gate, const void *up, void *out, int64_t n, int dt) {
    BY_DTYPE(dt, silu_mul, gate, up, out, n);
}

INLINE void rope_rows(uint8_t *x, int64_t heads, int hd, const float *c, const float *s, int dt) {
    float row[MAX_HEAD_DIM], xc[MAX_HEAD_DIM], rs[MAX_HEAD_DIM];
    int half = hd / 2;
    size_t es = dt_size(dt);
    for (int64_t h = 0; h < heads; h++) {
        uint8_t *p = x + (size_t)(h * hd) * es;
        load_row(p, row, hd, dt);
        for (int d = 0; d < hd; d++) xc[d] = row[d] * c[d];
        for (int d = 0; d < half; d++) { /* rotate_half(x) = (-x2, x1) */
            rs[d] = -row[d + half] * s[d];
            rs[d + half] = row[d] * s[d + half];
        }
        round_row(xc, hd, dt);
        round_row(rs, hd, dt);
        for (int d = 0; d < hd; d++) xc[d] += rs[d];
        store_row(p, xc, hd, dt);
    }
}

INLINE void rope_qk(uint8_t *q, int64_t q_stride, uint8_t *k, int64_t k_stride,
                    const uint8_t *cos_, const uint8_t *sin_, int64_t tokens, int64_t heads,
                    int64_t kv_heads, int hd, int dt) {
    float c[MAX_HEAD_DIM], s[MAX_HEAD_DIM];
    size_t es = dt_size(dt);
    for (int64_t t = 0; t < tokens; t++) {
        load_row(cos_ + (size_t)(t * hd) * es, c, hd, dt);
        load_row(sin_ + (size_t)(t * hd) * es, s, hd, dt);
        rope_rows(q + (size_t)(t * q_stride) * es, heads, hd, c, s, dt);
        rope_rows(k + (size_t)(t * k_stride) * es, kv_heads, hd, c, s, dt);
    }
}

/* RoPE (rotate-half convention) on queries (tokens, heads, hd) and keys (tokens, kv_heads, hd)
 * in place, each product and the sum rounded to the dtype as HF's x * cos + rotate_half(x) *
 * sin rounds in eager mode (bit-exact: the products of two dtype values are exact in
 * float32). A token's rows are ``q_stride`` / ``k_stride`` elements apart; cos, sin: (tokens,
 * hd) contiguous. Returns HYDRA_OK, or HYDRA_BAD_SHAPE when hd is out of range. */
int hydra_rope_qk(void *q, int64_t q_stride, void *k, int64_t k_stride, const void *cos_,
                  const void *sin_, int64_t tokens, int64_t heads, int64_t kv_heads, int hd,
                  int dt) {
    if (hd > MAX_HEAD_DIM || hd % 2) return HYDRA_BAD_SHAPE;
    BY_DTYPE(dt, rope_qk, q, q_stride, k, k_stride, cos_, sin_, tokens, heads, kv_heads, hd);
    return HYDRA_OK;
}

/* ---- sampling ------------------------------------------------------------------------ */

/* GCC / Clang vector types, for loops the auto-vectoriser leaves scalar (reductions): a
 * compare gives a lane mask (all ones or zero), so a select is plain bit arithmetic */
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));

INLINE vint select_int(vint mask, vint a, vint b) { return (mask & a) | (~mask & b); }

/* Index of the first largest element of x[0..n), and that element in *max_out. */
static int64_t first_argmax(const float *x, int64_t n, float *max_out) {
    float m = x[0];
    int64_t at = 0, i = 0;
    if (n >= 2 * LANES) {
        vfloat best, v;
        vint where, index;
        memcpy(&best, x, sizeof best);
        for (int j = 0; j < LANES; j++) where[j] = j;
        index = where;
        for (i = LANES; i + LANES <= n; i += LANES) {
            memcpy(&v, x + i, sizeof v);
            index += LANES;
            vint greater = v > best; /* strict: a lane keeps its first maximum */
            best = (vfloat)select_int(greater, (vint)v, (vint)best);
            where = select_int(greater, index, where);
        }
        m = best[0], at = where[0];
        for (int j = 1; j < LANES; j++)
            if (best[j] > m || (best[j] == m && where[j] < at)) m = best[j], at = where[j];
    }
    for (; i < n; i++)
        if (x[i] > m) m = x[i], at = i;
    *max_out = m;
    return at;
}

/* Per row of float32 logits (rows, vocab): the first index of the largest value (torch's
 * argmax) and the log-sum-exp (max + log sum e^(x - max)). A token's log-probability is its
 * logit minus its row's log-sum-exp: no log-softmax of the whole vocabulary is written. */
void hydra_logits_stats(const float *logits, int64_t rows, int64_t vocab, int64_t *argmax,
                        float *lse) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * vocab;
        float m;
        argmax[r] = first_argmax(x, vocab, &m);
        float sum = 0.0f;
        int64_t i = 0;
#if HAVE_AVX2
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps(), mm = _mm256_set1_ps(m);
        for (; i + 16 <= vocab; i += 16) {
            a = _mm256_add_ps(a, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mm)));
            b = _mm256_add_ps(b, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mm)));
        }
        sum = hsum8(_mm256_add_ps(a, b));
#else
        float acc[LANES] = {0};
        for (; i + LANES <= vocab; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += exp_f32(x[i + j] - m);
        sum = lane_sum(acc);
#endif
        for (; i < vocab; i++) sum += exp_f32(x[i] - m);
        lse[r] = m + logf(sum);
    }
}

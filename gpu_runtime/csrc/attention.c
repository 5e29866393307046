/* Decode attention straight from the paged KV cache: no gather of the context into a
 * contiguous tensor and no float32 copy of it (the torch path's two extra passes over the
 * cache, per layer and step). Portable C, and an AVX2 path where the CPU has it. */
#include <omp.h>

#include "kernels.h"

/* a . b over hd floats (portable fallback; the AVX2 path below is the fast one) */
INLINE float dot(const float *a, const float *b, int hd) {
    float acc[LANES] = {0};
    int d = 0;
    for (; d + LANES <= hd; d += LANES)
        for (int j = 0; j < LANES; j++) acc[j] = fmaf(a[d + j], b[d + j], acc[j]);
    float s = lane_sum(acc);
    for (; d < hd; d++) s = fmaf(a[d], b[d], s);
    return s;
}

/* One sequence's decode attention, all heads at once: the context is walked block by block
 * and each cached row (every kv head of one token, contiguous) is read once for the keys and
 * once for the values, in address order within a block. Query head h reads kv head h / group
 * (GQA). scores: heads * context floats; qf, acc: heads * hd floats each (scratch). */
INLINE void attend_sequence(const float *qf, const uint8_t *keys, const uint8_t *values,
                            const int64_t *table, int64_t context, int block_size,
                            int64_t row_bytes, int heads, int kv_heads, int hd, float scale,
                            float *scores, float *row, float *acc, int dt) {
    int group = heads / kv_heads, row_len = kv_heads * hd;
    int64_t block_bytes = row_bytes * block_size;
    for (int64_t start = 0; start < context; start += block_size) {
        const uint8_t *block = keys + table[start / block_size] * block_bytes;
        int64_t n = context - start < block_size ? context - start : block_size;
        for (int64_t o = 0; o < n; o++) {
            load_row(block + o * row_bytes, row, row_len, dt);
            for (int h = 0; h < heads; h++) /* h / group is constant for group heads */
                scores[h * context + start + o] =
                    dot(qf + h * hd, row + (h / group) * hd, hd) * scale;
        }
    }
    for (int h = 0; h < heads; h++) { /* softmax per head, max subtracted */
        float *s = scores + h * context, m = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < context; t++) m = s[t] > m ? s[t] : m;
        for (int64_t t = 0; t < context; t++) {
            s[t] = exp_f32(s[t] - m);
            sum += s[t];
        }
        float inv = 1.0f / sum;
        for (int64_t t = 0; t < context; t++) s[t] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(heads * hd));
    for (int64_t start = 0; start < context; start += block_size) {
        const uint8_t *block = values + table[start / block_size] * block_bytes;
        int64_t n = context - start < block_size ? context - start : block_size;
        for (int64_t o = 0; o < n; o++) {
            load_row(block + o * row_bytes, row, row_len, dt);
            for (int h = 0; h < heads; h++) {
                float p = scores[h * context + start + o], *out = acc + h * hd;
                const float *v = row + (h / group) * hd;
                for (int d = 0; d < hd; d++) out[d] = fmaf(p, v[d], out[d]);
            }
        }
    }
}

#if HAVE_AVX2
/* q . k over hd: q from L1, k converted as it is loaded, the sum reduced in registers */
INLINE float dot8(const float *q, const uint8_t *k, int hd, int dt) {
    size_t es = dt_size(dt);
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    int c = 0;
    for (; c + 16 <= hd; c += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c * es, dt), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), load8(k + (c + 8) * es, dt), b);
    }
    if (c < hd) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c * es, dt), a);
    return hsum8(_mm256_add_ps(a, b));
}

/* scores -> e^(score - max) in place; returns 1 / their sum */
INLINE float softmax_weights(float *s, int64_t n) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
    float m = -INFINITY, lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    __m256 sum = _mm256_setzero_ps(), mm = _mm256_set1_ps(m);
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mm));
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; t < n; t++) {
        s[t] = exp_f32(s[t] - m);
        total += s[t];
    }
    return 1.0f / total;
}

/* Rows are contiguous within a block, but the next block is anywhere: the hardware prefetcher
 * loses the stream at every block boundary. Fetching a few rows ahead through the block table
 * keeps the loads ahead of the arithmetic. */
#define PREFETCH_ROWS 4

INLINE void prefetch_row(const uint8_t *base, const int64_t *table, int64_t t, int64_t context,
                         int block_size, int64_t row_bytes) {
    if (t >= context) return;
    const uint8_t *row = base + (table[t / block_size] * block_size + t % block_size) * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)row + b, _MM_HINT_T0);
}

/* One sequence, all heads, token by token: each cached row (every kv head of a token) is read
 * whole and in address order, once for the scores and once for the values, which the
 * hardware prefetcher streams from memory (the cache of all layers is far larger than the CPU
 * caches). scores: heads * context; inv: heads; acc: heads * hd (L1-resident). */
INLINE void attend_sequence_avx2(const float *qf, const uint8_t *keys, const uint8_t *values,
                                 const int64_t *table, int64_t context, int block_size,
                                 int64_t row_bytes, int heads, int kv_heads, int hd, float scale,
                                 float *scores, float *inv, float *acc, int dt) {
    int group = heads / kv_heads;
    size_t head_bytes = (size_t)hd * dt_size(dt);
    int64_t block_bytes = row_bytes * block_size;
    for (int64_t start = 0; start < context; start += block_size) {
        const uint8_t *block = keys + table[start / block_size] * block_bytes;
        int64_t n = context - start < block_size ? context - start : block_size;
        for (int64_t o = 0; o < n; o++) {
            const uint8_t *row = block + o * row_bytes;
            prefetch_row(keys, table, start + o + PREFETCH_ROWS, context, block_size, row_bytes);
            for (int kh = 0, h = 0; kh < kv_heads; kh++)
                for (int g = 0; g < group; g++, h++)
                    scores[h * context + start + o] =
                        dot8(qf + h * hd, row + kh * head_bytes, hd, dt) * scale;
        }
    }
    for (int h = 0; h < heads; h++) inv[h] = softmax_weights(scores + h * context, context);
    memset(acc, 0, sizeof(float) * (size_t)(heads * hd));
    for (int64_t start = 0; start < context; start += block_size) {
        const uint8_t *block = values + table[start / block_size] * block_bytes;
        int64_t n = context - start < block_size ? context - start : block_size;
        for (int64_t o = 0; o < n; o++) {
            const uint8_t *row = block + o * row_bytes;
            prefetch_row(values, table, start + o + PREFETCH_ROWS, context, block_size,
                         row_bytes);
            for (int kh = 0, h = 0; kh < kv_heads; kh++) {
                const uint8_t *v = row + kh * head_bytes;
                for (int g = 0; g < group; g++, h++) {
                    __m256 p = _mm256_set1_ps(scores[h * context + start + o]);
                    float *out = acc + h * hd;
                    for (int c = 0; c < hd; c += 8)
                        _mm256_storeu_ps(out + c, _mm256_fmadd_ps(p, load8(v + c * dt_size(dt), dt),
                                                                  _mm256_loadu_ps(out + c)));
                }
            }
        }
    }
    for (int h = 0; h < heads; h++) {
        __m256 s = _mm256_set1_ps(inv[h]);
        for (int c = 0; c < hd; c += 8)
            _mm256_storeu_ps(acc + h * hd + c, _mm256_mul_ps(_mm256_loadu_ps(acc + h * hd + c), s));
    }
}
#endif

/* sequences first..last - 1 of the batch */
INLINE void decode_attention(const uint8_t *q, int64_t q_stride, const uint8_t *cache,
                             int64_t num_blocks, int block_size, const int64_t *block_tables,
                             int64_t table_width, const int64_t *context_lens, int64_t first,
                             int64_t last, int heads, int kv_heads, int hd, float scale,
                             float *scratch, int64_t max_context, uint8_t *out, int dt) {
    size_t es = dt_size(dt);
    int64_t row_bytes = (int64_t)kv_heads * hd * (int64_t)es;
    const uint8_t *keys = cache, *values = cache + num_blocks * block_size * row_bytes;
    float *scores = scratch, *qf = scores + heads * max_context, *acc = qf + heads * hd;
    float *row = acc + heads * hd, *inv = row + kv_heads * hd;
    (void)inv; /* used by the AVX2 path only */
    for (int64_t i = first; i < last; i++) {
        const int64_t *table = block_tables + i * table_width;
        load_row(q + (size_t)(i * q_stride) * es, qf, (int64_t)heads * hd, dt);
#if HAVE_AVX2
        if (hd == 64) {
            attend_sequence_avx2(qf, keys, values, table, context_lens[i], block_size, row_bytes,
                                 heads, kv_heads, 64, scale, scores, inv, acc, dt);
        } else if (hd == 128) {
            attend_sequence_avx2(qf, keys, values, table, context_lens[i], block_size, row_bytes,
                                 heads, kv_heads, 128, scale, scores, inv, acc, dt);
        } else if (hd % 8 == 0 && hd <= 256) {
            attend_sequence_avx2(qf, keys, values, table, context_lens[i], block_size, row_bytes,
                                 heads, kv_heads, hd, scale, scores, inv, acc, dt);
        } else
#endif
        attend_sequence(qf, keys, values, table, context_lens[i], block_size, row_bytes, heads,
                        kv_heads, hd, scale, scores, row, acc, dt);
        store_row(out + (size_t)(i * heads * hd) * es, acc, (int64_t)heads * hd, dt);
    }
}

/* Batches at least this large (context tokens x heads x head dim) split across two threads;
 * below it the parallel region costs more than the second half saves (batch 1 never splits). */
#define PAIR_MIN_WORK (1 << 18)

struct attention_job {
    const uint8_t *q;
    int64_t q_stride;
    const uint8_t *cache;
    int64_t num_blocks;
    int block_size;
    const int64_t *block_tables;
    int64_t table_width;
    const int64_t *context_lens;
    int64_t num_seqs, split; /* part 0: sequences [0, split), part 1: [split, num_seqs) */
    int heads, kv_heads, hd, dt;
    float scale;
    int64_t max_context;
    uint8_t *out;
    int status[2]; /* per part: HYDRA_OK, or HYDRA_NO_MEMORY when its scratch ran out */
};

/* Every cache index the step follows, checked before anything is written: each context
 * length in [1, table_width * block_size], each block-table entry a sequence uses (the first
 * ceil(context / block_size) of its row) in [0, num_blocks), each slot in [0, num_blocks *
 * block_size). Returns HYDRA_OK or the code of the first violation, its entry in *error_at
 * (the sequence; for a block, the flat index i * table_width + j). */
static int check_indices(int64_t num_blocks, int block_size, const int64_t *slot_mapping,
                         const int64_t *block_tables, int64_t table_width,
                         const int64_t *context_lens, int64_t num_seqs, int64_t *error_at) {
    for (int64_t i = 0; i < num_seqs; i++) {
        if (context_lens[i] < 1 || context_lens[i] > table_width * block_size) {
            *error_at = i;
            return HYDRA_BAD_CONTEXT;
        }
    }
    for (int64_t i = 0; i < num_seqs; i++) {
        const int64_t *table = block_tables + i * table_width;
        for (int64_t j = 0, used = (context_lens[i] + block_size - 1) / block_size; j < used; j++) {
            if (table[j] < 0 || table[j] >= num_blocks) {
                *error_at = i * table_width + j;
                return HYDRA_BAD_BLOCK;
            }
        }
    }
    for (int64_t i = 0; i < num_seqs; i++) {
        if (slot_mapping[i] < 0 || slot_mapping[i] >= num_blocks * block_size) {
            *error_at = i;
            return HYDRA_BAD_SLOT;
        }
    }
    return HYDRA_OK;
}

static void attention_part(struct attention_job *j, int part) {
    int64_t first = part ? j->split : 0, last = part ? j->num_seqs : j->split;
    if (first >= last) return;
    size_t floats = (size_t)(j->heads * j->max_context + 2 * j->heads * j->hd +
                             j->kv_heads * j->hd + j->heads);
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch) {
        j->status[part] = HYDRA_NO_MEMORY;
        return;
    }
    BY_DTYPE(j->dt, decode_attention, j->q, j->q_stride, j->cache, j->num_blocks, j->block_size,
             j->block_tables, j->table_width, j->context_lens, first, last, j->heads,
             j->kv_heads, j->hd, j->scale, scratch, j->max_context, j->out);
    free(scratch);
}

/* Writes this step's keys and values into their cache slots, then attends each sequence's one
 * query row to its whole context, read through its block table straight from the cache (no
 * gather, no float32 copy of the context).
 *
 * q:      (num_seqs, heads, hd), a token's rows ``q_stride`` elements apart
 * k, v:   (num_seqs, kv_heads, hd), a token's rows ``k_stride`` / ``v_stride`` elements apart
 * cache:  (2, num_blocks, block_size, kv_heads, hd) contiguous, keys then values
 * slot_mapping: (num_seqs,) flat slot of each new token; block_tables: (num_seqs, width)
 * context_lens: (num_seqs,) tokens in the cache after this step, each >= 1
 * out:    (num_seqs, heads * hd) contiguous
 * threads: at most this many threads (1: this one only; more: a large batch splits in two)
 * Returns HYDRA_OK; HYDRA_BAD_SHAPE, or the code of an index outside the cache (its entry in
 * *error_at, see check_indices), with nothing written; or HYDRA_NO_MEMORY. */
int hydra_decode_attention(const void *q, int64_t q_stride, const void *k, int64_t k_stride,
                           const void *v, int64_t v_stride, void *cache, int64_t num_blocks,
                           int block_size, const int64_t *slot_mapping, const int64_t *block_tables,
                           int64_t table_width, const int64_t *context_lens, int64_t num_seqs,
                           int heads, int kv_heads, int hd, int dt, float scale, void *out,
                           int threads, int64_t *error_at) {
    if (hd > MAX_HEAD_DIM || kv_heads < 1 || heads % kv_heads != 0 || block_size < 1)
        return HYDRA_BAD_SHAPE;
    int rc = check_indices(num_blocks, block_size, slot_mapping, block_tables, table_width,
                           context_lens, num_seqs, error_at);
    if (rc != HYDRA_OK) return rc;
    int64_t max_context = 0;
    for (int64_t i = 0; i < num_seqs; i++)
        max_context = context_lens[i] > max_context ? context_lens[i] : max_context;
    size_t row_bytes = (size_t)kv_heads * hd * dt_size(dt);
    uint8_t *keys = cache, *values = keys + num_blocks * block_size * row_bytes;
    int64_t total = 0;
    for (int64_t i = 0; i < num_seqs; i++) {
        size_t k_off = (size_t)(i * k_stride) * dt_size(dt);
        size_t v_off = (size_t)(i * v_stride) * dt_size(dt);
        memcpy(keys + slot_mapping[i] * row_bytes, (const uint8_t *)k + k_off, row_bytes);
        memcpy(values + slot_mapping[i] * row_bytes, (const uint8_t *)v + v_off, row_bytes);
        total += context_lens[i];
    }
    struct attention_job job = {q, q_stride, cache, num_blocks, block_size, block_tables,
                                table_width, context_lens, num_seqs, num_seqs, heads, kv_heads,
                                hd, dt, scale, max_context, out, {0, 0}};
    if (threads > 1 && num_seqs > 1 && total * heads * hd >= PAIR_MIN_WORK) {
        /* two halves of about equal context, on two of torch's OpenMP threads (native.py) */
        int64_t seen = 0;
        job.split = 1;
        for (int64_t i = 0; i < num_seqs - 1 && 2 * (seen + context_lens[i]) <= total; i++) {
            seen += context_lens[i];
            job.split = i + 1;
        }
#pragma omp parallel num_threads(2)
        {
            if (omp_get_num_threads() == 1) { /* no second thread to be had: both halves */
                attention_part(&job, 0);
                attention_part(&job, 1);
            } else {
                attention_part(&job, omp_get_thread_num());
            }
        }
    } else {
        attention_part(&job, 0);
    }
    return job.status[0] != HYDRA_OK ? job.status[0] : job.status[1];
}

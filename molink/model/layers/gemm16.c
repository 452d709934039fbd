/* x @ W.T for 16-bit weights (bfloat16 or float16) and float32 activations, a few rows at
 * a time: the weights are widened in registers and multiplied in float32, so decode reads
 * two bytes per weight instead of four and never calls a slow 16-bit product. AVX2 + FMA
 * (+ F16C for float16); compiled on first use by molink/model/layers/fused16.py.
 *
 * The weight is packed once, at load, into tiles (fused16.pack): [out/8][in/16][8][16],
 * zero-padded to whole tiles, so a tile of 8 outputs is one sequential stream of memory
 * (the prefetcher keeps up; eight row-major streams read ~1.5x slower). x is float32
 * [rows, in16] (zero-padded to in16 columns); y is float32 [rows, out8].
 *
 * bfloat16: a block of 16 weights loads as one 256-bit vector; shifting each 32-bit lane
 * left by 16 gives the even-indexed weights as float32, masking the low half the odd ones,
 * so x is split into even and odd halves per block of 16 (once per call, into xs).
 * float16: each half of the block converts with one vcvtph2ps; x is read in order.
 *
 * Results equal float32 products of the widened weights up to summation order.
 *
 * The same library (one compile, one load) holds the rest of a 16-bit decode step that
 * PyTorch spends many small operators on: attention over the paged KV cache in place
 * (molink_decode_attention: one query per sequence, float32 arithmetic; its two inner loops
 * also in AVX-512, taken at run time where the CPU has it), and RMSNorm,
 * rotate-half RoPE and SwiGLU's gate (molink_rms_norm, molink_rotary, molink_silu_mul: one
 * call each, PyTorch's operation order and roundings). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH_AHEAD 512 /* weights (1 KB): measured best of 0/512/1024/2048 */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc += block row (16 weights at w) . 16 values of x given as (first, second) halves:
 * bfloat16: (even, odd) halves of the split x; float16: (x[0:8], x[8:16]) */
static inline __m256 dot16(const uint16_t* w, __m256 first, __m256 second, __m256 acc,
                           const int f16) {
    if (f16) {
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w)), first, acc);
        return _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 8))),
                               second, acc);
    }
    const __m256i v = _mm256_loadu_si256((const __m256i*)w);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), first, acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(
        (int)0xFFFF0000u))), second, acc);
}

/* one row, the 8 outputs of one tile */
static inline void tile_row(const float* x, const uint16_t* tile, int64_t blocks, float* y,
                            const int f16) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < blocks; ++k) {
        const uint16_t* b = tile + k * 128;
        for (int line = 0; line < 256; line += 64)
            _mm_prefetch((const char*)(b + PREFETCH_AHEAD) + line, _MM_HINT_T0);
        const __m256 first = _mm256_loadu_ps(x + k * 16), second = _mm256_loadu_ps(x + k * 16 + 8);
        for (int j = 0; j < 8; ++j) acc[j] = dot16(b + j * 16, first, second, acc[j], f16);
    }
    for (int j = 0; j < 8; ++j) y[j] = hsum8(acc[j]);
}

/* two rows, 4 outputs (half = 0: outputs 0-3 of the tile, 1: outputs 4-7) */
static inline void tile_two_rows(const float* x0, const float* x1, const uint16_t* tile,
                                 int64_t blocks, float* y0, float* y1, int half, const int f16) {
    __m256 acc0[4], acc1[4];
    for (int j = 0; j < 4; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < blocks; ++k) {
        const uint16_t* b = tile + k * 128 + half * 64;
        const __m256 a0 = _mm256_loadu_ps(x0 + k * 16), b0 = _mm256_loadu_ps(x0 + k * 16 + 8);
        const __m256 a1 = _mm256_loadu_ps(x1 + k * 16), b1 = _mm256_loadu_ps(x1 + k * 16 + 8);
        for (int j = 0; j < 4; ++j) {
            acc0[j] = dot16(b + j * 16, a0, b0, acc0[j], f16);
            acc1[j] = dot16(b + j * 16, a1, b1, acc1[j], f16);
        }
    }
    for (int j = 0; j < 4; ++j) {
        y0[half * 4 + j] = hsum8(acc0[j]);
        y1[half * 4 + j] = hsum8(acc1[j]);
    }
}

static void gemm16(const float* x, int64_t rows, const uint16_t* tiles, int64_t in16,
                   int64_t out8, float* y, float* xs, int threads, const int f16) {
    if (f16) {
        xs = (float*)x; /* float16 reads x in order */
    } else {
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < in16; k += 16)
                for (int j = 0; j < 8; ++j) {
                    xs[r * in16 + k + j] = x[r * in16 + k + 2 * j];
                    xs[r * in16 + k + 8 + j] = x[r * in16 + k + 2 * j + 1];
                }
    }
    const int64_t blocks = in16 / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < out8 / 8; ++t) {
        const uint16_t* tile = tiles + t * 8 * in16;
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2)
            for (int half = 0; half < 2; ++half)
                tile_two_rows(xs + r * in16, xs + (r + 1) * in16, tile, blocks,
                              y + r * out8 + t * 8, y + (r + 1) * out8 + t * 8, half, f16);
        if (r < rows) tile_row(xs + r * in16, tile, blocks, y + r * out8 + t * 8, f16);
    }
}

/* y[rows, out8] = x[rows, in16] @ W.T for W packed as tiles; xs: rows * in16 floats of
 * scratch (bfloat16; may be NULL for float16) */
void molink_gemm_bf16(const float* x, int64_t rows, const uint16_t* tiles, int64_t in16,
                      int64_t out8, float* y, float* xs, int threads) {
    gemm16(x, rows, tiles, in16, out8, y, xs, threads, 0);
}

void molink_gemm_f16(const float* x, int64_t rows, const uint16_t* tiles, int64_t in16,
                     int64_t out8, float* y, float* xs, int threads) {
    gemm16(x, rows, tiles, in16, out8, y, xs, threads, 1);
}

/* ---- Decode attention over the paged KV cache: one query per sequence ----
 * For sequence b and KV head h, the G = heads / kv_heads query heads of h (Hugging Face's
 * repeat_kv order) attend to the keys first..positions[b] (causal; with a sliding window
 * first = positions[b] - window + 1), read in place from the cache blocks of its block table
 * (no gathered copy). Scores scale * q.k, softmax and the weighted sum of values all in
 * float32 (16-bit values widen exactly), each output rounded once (to nearest even) to the
 * cache's dtype. q: rows of [heads][D] at q_stride elements (row q_rows[b] for sequence
 * b), out: [rows][heads][D], the same rows; cache: [blocks][block_size][kv_heads][D]; D a
 * multiple of 8. */
static inline __m256 load8(const uint16_t* p, const int f16) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    return f16 ? _mm256_cvtph_ps(v)
               : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* float32 bits rounded to nearest even at bf16's precision: the bf16 value in the high
 * halves (the low halves hold the carry's leftovers) */
static inline __m256i bf16_rounded(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
}

static inline void store8(uint16_t* p, __m256 v, const int f16) {
    if (f16) {
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    const __m256i high = _mm256_srli_epi32(bf16_rounded(v), 16);
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(high),
                                                   _mm256_extracti128_si256(high, 1)));
}

/* e^x for x <= 0: 0 below -87 (and for -inf); else 2^n e^r, |r| <= ln 2 / 2, the series to
 * r^7 (relative error ~1e-7, float32's own) */
static inline __m256 exp8(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    static const float series[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                                   1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m256 p = _mm256_set1_ps(series[0]);
    for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(series[i]));
    const __m256i scale = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

#define KEY_CHUNK 64 /* keys widened to float32 at a time (D <= 512: 128 KB at most) */

typedef struct {
    const uint16_t *k_cache, *v_cache;
    int64_t block_size, kv_heads, head_dim, group;
    float scale;
} paged_cache;

/* the eight sums of a0..a7, in order */
static inline __m256 sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                           __m256 a6, __m256 a7) {
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                         _mm256_permute2f128_ps(low, high, 0x31));
}

/* scores[g][start + i] = q_g . key i, for keys widened into kf ([round8(n)][D]) */
static void score_chunk(const float* qf, const float* kf, int64_t n, int64_t D, int64_t G,
                        float* scores, int64_t padded, int64_t start) {
    for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < n; i += 8) {
            const float* k = kf + i * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                   a6 = a0, a7 = a0;
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 q = _mm256_loadu_ps(qf + g * D + d);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + d), q, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k + D + d), q, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 2 * D + d), q, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 3 * D + d), q, a3);
                a4 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 4 * D + d), q, a4);
                a5 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 5 * D + d), q, a5);
                a6 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 6 * D + d), q, a6);
                a7 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 7 * D + d), q, a7);
            }
            _mm256_storeu_ps(scores + g * padded + start + i,
                             sums8(a0, a1, a2, a3, a4, a5, a6, a7));
        }
}

/* scores row -> probabilities: e^(s - max) / sum over the first count (the rest 0) */
static void softmax(float* s, int64_t count, int64_t padded) {
    for (int64_t j = count; j < padded; ++j) s[j] = -INFINITY;
    __m256 most = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < padded; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(s + j));
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, most);
    for (int i = 0; i < 8; ++i) top = lanes[i] > top ? lanes[i] : top;
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top)));
        _mm256_storeu_ps(s + j, e);
        total = _mm256_add_ps(total, e);
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / hsum8(total));
    for (int64_t j = 0; j < padded; j += 8)
        _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inverse));
}

#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_KEYS 8 /* rows ahead */

INLINE void prefetch_row(const uint16_t* row, int64_t D) {
    for (int64_t byte = 0; byte < D * 2; byte += 64)
        _mm_prefetch((const char*)row + byte, _MM_HINT_T0);
}

/* out[h][d .. d + width] = sum_j p[h][j] v_j[d ..] for the `heads` (<= 4) rows of p; width
 * 8 or 16 (two independent FMA chains per head: one chain is bound by FMA latency) */
INLINE void weigh_values(const uint16_t* values, const int64_t* offsets, int64_t count,
                         const float* p, int64_t padded, int64_t d, const int width,
                         uint16_t* out, int64_t D, int64_t heads, const int f16) {
    const float *p0 = p, *p1 = p0 + padded, *p2 = p1 + padded, *p3 = p2 + padded;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
           b3 = a0;
    for (int64_t j = 0; j < count; ++j) {
        const uint16_t* v = values + offsets[j] + d;
        if (d == 0 && j + PREFETCH_KEYS < count)
            prefetch_row(values + offsets[j + PREFETCH_KEYS], D);
        const __m256 low = load8(v, f16);
        const __m256 w0 = _mm256_broadcast_ss(p0 + j), w1 = _mm256_broadcast_ss(p1 + j);
        const __m256 w2 = _mm256_broadcast_ss(p2 + j), w3 = _mm256_broadcast_ss(p3 + j);
        a0 = _mm256_fmadd_ps(w0, low, a0);
        a1 = _mm256_fmadd_ps(w1, low, a1);
        a2 = _mm256_fmadd_ps(w2, low, a2);
        a3 = _mm256_fmadd_ps(w3, low, a3);
        if (width == 16) {
            const __m256 high = load8(v + 8, f16);
            b0 = _mm256_fmadd_ps(w0, high, b0);
            b1 = _mm256_fmadd_ps(w1, high, b1);
            b2 = _mm256_fmadd_ps(w2, high, b2);
            b3 = _mm256_fmadd_ps(w3, high, b3);
        }
    }
    const __m256 low[4] = {a0, a1, a2, a3}, high[4] = {b0, b1, b2, b3};
    for (int64_t h = 0; h < heads; ++h) {
        store8(out + h * D + d, low[h], f16);
        if (width == 16) store8(out + h * D + d + 8, high[h], f16);
    }
}

/* The same two loops in AVX-512 (16 lanes), chosen at run time where the CPU has it
 * (molink_attention_avx512); the rest of the kernel is shared. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))

/* score_chunk for D a multiple of 16: each key's 16-lane sums halved to 8, then sums8 */
AVX512 static void score_chunk512(const float* qf, const float* kf, int64_t n, int64_t D,
                                  int64_t G, float* scores, int64_t padded, int64_t start) {
    for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < n; i += 8) {
            const float* k = kf + i * D;
            __m512 a[8];
            for (int j = 0; j < 8; ++j) a[j] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 q = _mm512_loadu_ps(qf + g * D + d);
                for (int j = 0; j < 8; ++j)
                    a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(k + j * D + d), q, a[j]);
            }
            __m256 h[8];
            for (int j = 0; j < 8; ++j)
                h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]),
                                     _mm512_extractf32x8_ps(a[j], 1));
            _mm256_storeu_ps(scores + g * padded + start + i,
                             sums8(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
        }
}

AVX512 static inline __m512 load16(const uint16_t* p, const int f16) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    return f16 ? _mm512_cvtph_ps(v)
               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

AVX512 static inline void store16(uint16_t* p, __m512 v, const int f16) {
    if (f16) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    const __m512i bits = _mm512_castps_si512(v); /* to nearest even, as bf16_rounded */
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)),
                                             odd);
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

/* weigh_values for D a multiple of 16: up to 4 heads x 64 dims in registers per pass over
 * the keys (the AVX2 loop takes 16 dims a pass); each lane sums its keys in the same order */
AVX512 static void weigh_values512(const uint16_t* values, const int64_t* offsets,
                                   int64_t count, const float* p, int64_t padded,
                                   uint16_t* out, int64_t D, int64_t heads, const int f16) {
    for (int64_t d = 0; d < D; d += 64) {
        const int64_t chunks = (D - d < 64 ? D - d : 64) / 16;
        __m512 acc[4][4];
        for (int h = 0; h < 4; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < count; ++j) {
            const uint16_t* v = values + offsets[j] + d;
            if (d == 0 && j + PREFETCH_KEYS < count)
                prefetch_row(values + offsets[j + PREFETCH_KEYS], D);
            __m512 w[4];
            for (int h = 0; h < 4; ++h) w[h] = _mm512_set1_ps(p[h * padded + j]);
            for (int c = 0; c < chunks; ++c) {
                const __m512 x = load16(v + c * 16, f16);
                for (int h = 0; h < 4; ++h) acc[h][c] = _mm512_fmadd_ps(w[h], x, acc[h][c]);
            }
        }
        for (int64_t h = 0; h < heads; ++h)
            for (int c = 0; c < chunks; ++c) store16(out + h * D + d + c * 16, acc[h][c], f16);
    }
}

static int avx512_state = -1; /* -1: not yet asked */

static int avx512_supported(void) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

/* Whether decode attention takes its AVX-512 loops (head sizes of 16): `wanted` 1 where the
 * CPU has AVX-512 (the default), 0 for the AVX2 ones, -1 to ask only. Returns the state. */
int molink_attention_avx512(int wanted) {
    if (wanted >= 0 || avx512_state < 0) avx512_state = wanted != 0 && avx512_supported();
    return avx512_state;
}

/* one sequence, one KV head: q and out point at its first query head; keys first..last.
 * buffer: qf [G][D], kf [KEY_CHUNK][D], offsets [count], scores [round4(G)][round8(count)] */
INLINE void attend(const paged_cache* c, const uint16_t* q, const int64_t* table,
                   int64_t first, int64_t last, int64_t kv_head, uint16_t* out, float* buffer,
                   const int f16, const int wide) {
    const int64_t D = c->head_dim, G = c->group, count = last - first + 1;
    const int64_t padded = (count + 7) / 8 * 8, rows = (G + 3) / 4 * 4;
    float* qf = buffer;
    float* kf = qf + G * D;
    int64_t* offsets = (int64_t*)(kf + KEY_CHUNK * D);
    float* scores = (float*)(offsets + padded);
    const __m256 scale = _mm256_set1_ps(c->scale);
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(qf + g * D + d, _mm256_mul_ps(load8(q + g * D + d, f16), scale));
    int64_t block = first / c->block_size, within = first % c->block_size;
    for (int64_t j = 0; j < count; ++j) { /* no division per key (tens of cycles each) */
        offsets[j] = ((table[block] * c->block_size + within) * c->kv_heads + kv_head) * D;
        if (++within == c->block_size) within = 0, ++block;
    }
    for (int64_t start = 0; start < count; start += KEY_CHUNK) {
        const int64_t n = count - start < KEY_CHUNK ? count - start : KEY_CHUNK;
        for (int64_t i = 0; i < n; ++i) {
            const uint16_t* k = c->k_cache + offsets[start + i];
            if (start + i + PREFETCH_KEYS < count) /* rows are scattered: no prefetcher */
                prefetch_row(c->k_cache + offsets[start + i + PREFETCH_KEYS], D);
            for (int64_t d = 0; d < D; d += 8)
                _mm256_storeu_ps(kf + i * D + d, load8(k + d, f16));
        }
        memset(kf + n * D, 0, (size_t)((n + 7) / 8 * 8 - n) * D * sizeof(float));
        (wide ? score_chunk512 : score_chunk)(qf, kf, n, D, G, scores, padded, start);
    }
    for (int64_t g = 0; g < rows; ++g) {
        if (g < G) softmax(scores + g * padded, count, padded);
        else memset(scores + g * padded, 0, (size_t)padded * sizeof(float));
    }
    for (int64_t g = 0; g < rows; g += 4) { /* four heads' sums in registers */
        const int64_t heads = G - g < 4 ? G - g : 4;
        if (wide) {
            weigh_values512(c->v_cache, offsets, count, scores + g * padded, padded, out + g * D,
                            D, heads, f16);
            continue;
        }
        int64_t d = 0;
        for (; d + 16 <= D; d += 16)
            weigh_values(c->v_cache, offsets, count, scores + g * padded, padded, d, 16,
                         out + g * D, D, heads, f16);
        if (d < D)
            weigh_values(c->v_cache, offsets, count, scores + g * padded, padded, d, 8,
                         out + g * D, D, heads, f16);
    }
}

typedef void (*attend_fn)(const paged_cache*, const uint16_t*, const int64_t*, int64_t,
                          int64_t, int64_t, uint16_t*, float*);
#define ATTEND(name, f16, wide)                                                              \
    static void name(const paged_cache* c, const uint16_t* q, const int64_t* table,           \
                     int64_t first, int64_t last, int64_t kv_head, uint16_t* out,            \
                     float* buffer) {                                                        \
        attend(c, q, table, first, last, kv_head, out, buffer, f16, wide);                   \
    }
ATTEND(attend_bf16, 0, 0)
ATTEND(attend_f16, 1, 0)
ATTEND(attend_bf16_512, 0, 1)
ATTEND(attend_f16_512, 1, 1)

/* Whether every sequence's query row, position and the blocks it reads lie within q
 * (q_count rows), its block table and the cache (num_blocks): a bad step is an error, not
 * a read out of bounds. */
static int in_bounds(const int64_t* q_rows, const int64_t* positions, const int64_t* tables,
                     int64_t max_blocks, int64_t seqs, int64_t q_count, int64_t num_blocks,
                     int64_t block_size) {
    for (int64_t b = 0; b < seqs; ++b) {
        if (q_rows[b] < 0 || q_rows[b] >= q_count || positions[b] < 0
            || positions[b] / block_size >= max_blocks)
            return 0;
        for (int64_t i = 0; i <= positions[b] / block_size; ++i)
            if (tables[b * max_blocks + i] < 0 || tables[b * max_blocks + i] >= num_blocks)
                return 0;
    }
    return 1;
}

/* Returns 0; -1 for shapes it does not take or when a buffer could not be allocated, -2 for
 * indices out of bounds (in either case nothing trustworthy written). */
int molink_decode_attention(const uint16_t* q, int64_t q_count, int64_t q_stride,
                            const int64_t* q_rows,
                            const int64_t* positions, const int64_t* tables, int64_t max_blocks,
                            int64_t seqs, const uint16_t* k_cache, const uint16_t* v_cache,
                            int64_t num_blocks, int64_t block_size, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, float scale, int64_t window,
                            int f16, uint16_t* out, int threads) {
    if (head_dim % 8 || kv_heads < 1 || heads % kv_heads || block_size < 1) return -1;
    if (!in_bounds(q_rows, positions, tables, max_blocks, seqs, q_count, num_blocks,
                   block_size))
        return -2;
    const paged_cache cache = {k_cache, v_cache, block_size, kv_heads, head_dim,
                               heads / kv_heads, scale};
    int64_t longest = 1;
    for (int64_t b = 0; b < seqs; ++b)
        longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;
    /* a sequence's heads in one task where there are sequences enough for the threads: its
     * cache blocks are then read front to back (a head's keys alone are strided) */
    const int64_t G = cache.group, per_task = seqs >= 2 * threads ? kv_heads : 1;
    const int64_t tasks = seqs * kv_heads / per_task;
    const int64_t padded = (longest + 7) / 8 * 8;
    const size_t floats = (size_t)(G * head_dim + KEY_CHUNK * head_dim + 2 * padded
                                   + (G + 3) / 4 * 4 * padded);
    const int wide = head_dim % 16 == 0 && molink_attention_avx512(-1);
    const attend_fn inner = f16 ? (wide ? attend_f16_512 : attend_f16)
                                : (wide ? attend_bf16_512 : attend_bf16);
    int failed = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads) reduction(|: failed)
#endif
    {
        float* buffer = malloc(floats * sizeof(float));
        if (!buffer) failed = 1;
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t task = 0; task < tasks; ++task) {
            if (!buffer) continue;
            for (int64_t part = 0; part < per_task; ++part) {
                const int64_t at = task * per_task + part, b = at / kv_heads, h = at % kv_heads;
                const int64_t last = positions[b];
                const int64_t first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
                const int64_t head = h * G * head_dim;
                inner(&cache, q + q_rows[b] * q_stride + head, tables + b * max_blocks, first,
                      last, h, out + q_rows[b] * heads * head_dim + head, buffer);
            }
        }
        free(buffer);
    }
    (void)threads;
    return failed ? -1 : 0;
}

/* ---- A decoder layer's small operators on 16-bit activations, one call each, in the
 * operation order (and so the roundings) of the PyTorch code they replace. ---- */

/* e^x for any x (clamped to [-87, 88]) */
static inline __m256 exp8_any(__m256 x) {
    return exp8(_mm256_min_ps(x, _mm256_set1_ps(88.0f)));
}

static inline __m256 round16(__m256 v, const int f16) { /* to the 16-bit dtype and back */
    if (f16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_rounded(v),
                                                _mm256_set1_epi32((int)0xFFFF0000)));
}

/* RMSNorm as Hugging Face: y = 16-bit(x * 1 / sqrt(mean(x^2) + eps)) in float32, then
 * out = 16-bit(weight * y). x rows at x_stride elements; n a multiple of 8. */
void molink_rms_norm(const uint16_t* x, int64_t rows, int64_t n, int64_t x_stride,
                     const uint16_t* weight, float eps, int f16, uint16_t* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* row = x + r * x_stride;
        __m256 squares = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 8) {
            const __m256 v = load8(row + i, f16);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        const __m256 inverse = _mm256_set1_ps(1.0f / sqrtf(hsum8(squares) / (float)n + eps));
        for (int64_t i = 0; i < n; i += 8) {
            const __m256 y = round16(_mm256_mul_ps(load8(row + i, f16), inverse), f16);
            store8(out + r * n + i, _mm256_mul_ps(load8(weight + i, f16), y), f16);
        }
    }
}

/* Rotate-half RoPE in place, as Hugging Face in 16 bits: the float32 tables rounded to the
 * dtype, then 16-bit(16-bit(x * cos) + 16-bit(rotate_half(x) * sin)). x: rows of `heads`
 * heads of head_dim (a multiple of 16) at row_stride elements; cos, sin: [rows][head_dim]. */
void molink_rotary(uint16_t* x, int64_t rows, int64_t heads, int64_t head_dim,
                   int64_t row_stride, const float* cos, const float* sin, int f16) {
    const int64_t half = head_dim / 2;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < half; i += 8) { /* the tables rounded once for all heads */
            const float *c = cos + r * head_dim, *s = sin + r * head_dim;
            const __m256 c_low = round16(_mm256_loadu_ps(c + i), f16);
            const __m256 c_high = round16(_mm256_loadu_ps(c + half + i), f16);
            const __m256 s_low = round16(_mm256_loadu_ps(s + i), f16);
            const __m256 s_high = round16(_mm256_loadu_ps(s + half + i), f16);
            for (int64_t h = 0; h < heads; ++h) {
                uint16_t* v = x + r * row_stride + h * head_dim;
                const __m256 low = load8(v + i, f16), high = load8(v + half + i, f16);
                const __m256 negated = _mm256_sub_ps(_mm256_setzero_ps(), high);
                const __m256 new_low = _mm256_add_ps(round16(_mm256_mul_ps(low, c_low), f16),
                                                     round16(_mm256_mul_ps(negated, s_low), f16));
                const __m256 new_high = _mm256_add_ps(
                    round16(_mm256_mul_ps(high, c_high), f16),
                    round16(_mm256_mul_ps(low, s_high), f16));
                store8(v + i, new_low, f16);
                store8(v + half + i, new_high, f16);
            }
        }
}

/* SwiGLU: out = 16-bit(16-bit(silu(gate)) * up), silu(g) = g / (1 + e^-g) in float32;
 * gate_up: [rows][2 * n] (gate | up), n a multiple of 8. */
void molink_silu_mul(const uint16_t* gate_up, int64_t rows, int64_t n, int f16,
                     uint16_t* out) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* gate = gate_up + r * 2 * n;
        for (int64_t i = 0; i < n; i += 8) {
            const __m256 g = load8(gate + i, f16);
            const __m256 e = exp8_any(_mm256_sub_ps(_mm256_setzero_ps(), g));
            const __m256 silu = round16(_mm256_div_ps(g, _mm256_add_ps(one, e)), f16);
            store8(out + r * n + i, _mm256_mul_ps(silu, load8(gate + n + i, f16)), f16);
        }
    }
}

/* Residual add: h = 16-bit(h + x), n values (a multiple of 8), as PyTorch's 16-bit add. */
void molink_add16(uint16_t* h, const uint16_t* x, int64_t n, int f16) {
    for (int64_t i = 0; i < n; i += 8)
        store8(h + i, _mm256_add_ps(load8(h + i, f16), load8(x + i, f16)), f16);
}

/* TiledCpuLinear's product for 16-bit activations (rows <= fused16.MAX_ROWS), as
 * fused16.matmul and CpuLinear._finish compute it from PyTorch: x widened to float32, the
 * float32 product, + bias (float32, [out8] or NULL), rounded once to x's dtype. x:
 * [rows][in16], y: [rows][out8] (padding outputs included); scratch: rows * (2 * in16 +
 * out8) floats. */
void molink_linear16(const uint16_t* x, int64_t rows, const uint16_t* tiles, int64_t in16,
                     int64_t out8, const float* bias, uint16_t* y, float* scratch, int threads,
                     int f16) {
    float* wide = scratch;
    float* split = wide + rows * in16;
    float* product = split + rows * in16;
    for (int64_t i = 0; i < rows * in16; i += 8) _mm256_storeu_ps(wide + i, load8(x + i, f16));
    gemm16(wide, rows, tiles, in16, out8, product, split, threads, f16);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < out8; j += 8) {
            __m256 v = _mm256_loadu_ps(product + r * out8 + j);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
            store8(y + r * out8 + j, v, f16);
        }
}

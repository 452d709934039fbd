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
 * Results equal float32 products of the widened weights up to summation order. */
#include <immintrin.h>
#include <stdint.h>

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

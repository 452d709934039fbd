/* y = x @ W.T for bf16 activations and 4-, 8- or 16-bit weights, on x86 CPUs with AMX-BF16
 * (Sapphire Rapids and later); compiled on first use by molink/model/layers/int_amx.py.
 *
 * PyTorch's int8 and int4 weight-only kernels compute one activation row at a time: at 16
 * rows they take 2-3x longer than a bf16 product of the same weights. Here the weight is
 * read once per call for up to 64 rows: each 16 x 32 block of codes is widened to bf16 in
 * registers into a 1 KB buffer that stays in L1, and AMX multiplies it with up to four
 * 16-row blocks of x; the codes are the only stream from memory.
 *
 * Layout (int_amx.pack): codes [n16 / 16][k32 / 32][16][32 * bits / 8], one AMX B tile per
 * block in its pair-interleaved form: row p of a block holds, for each of its 16 outputs n,
 * the codes of inputs 2p and 2p + 1 at positions 2n and 2n + 1 (4-bit: byte j holds the
 * code at position j plus 8 in its low nibble, the one at position j + 16 plus 8 in its
 * high nibble). x: bf16 [rows][k32], rows <= 64; y: bf16 [rows][n16].
 *
 * Scales (weight_format): int8 with one scale per output widens codes exactly and scales
 * the float32 sums (PyTorch's int8 kernel's arithmetic up to summation order); grouped
 * codes keep their scales and zeros in bf16 (2 bytes a group and output, as int_linear
 * keeps them) and widen to code * scale + zero in float32 (exact products, one rounding)
 * and then bf16: the weight int_linear dequantizes to. Products of bf16 values
 * are exact in AMX, sums float32, one rounding of y to bf16.
 *
 * bf16 weights (molink_gemm_amx16) are stored in the same tile layout and loaded straight
 * into B tiles, two 16-output blocks at a time against 32 rows of x (all 8 tiles), for any
 * number of rows: the weights of a pair of blocks stream from memory for the first 32 rows
 * and stay in L2 for the rest. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define MAX_ROWS 64      /* four C tiles of 16 rows */
#define PREFETCH_AHEAD 2048 /* bytes of codes: measured best of 512/1024/2048/4096 */
#define PREFETCH_AHEAD_16 1024 /* bytes of bf16 weights: best of 1024/2048/4096 */

/* tile registers (literals: the intrinsics paste them into instructions) */
#define TILE_A_FULL 4
#define TILE_A_TAIL 5
#define TILE_B 6

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Ask Linux for AMX tile state (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once per
 * process; 1 when granted. */
int molink_amx_init(void) {
#ifdef SYS_arch_prctl
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* C tiles 0..blocks-1 (the last one `tail` rows), A tiles for full and tail blocks, B. */
AMX static void configure(int blocks, int tail) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < blocks; ++t) {
        config.rows[t] = (uint8_t)(t == blocks - 1 ? tail : 16);
        config.colsb[t] = 64;
    }
    config.rows[TILE_A_FULL] = 16;
    config.colsb[TILE_A_FULL] = 64;
    config.rows[TILE_A_TAIL] = (uint8_t)tail;
    config.colsb[TILE_A_TAIL] = 64;
    config.rows[TILE_B] = 16;
    config.colsb[TILE_B] = 64;
    _tile_loadconfig(&config);
}

/* How the codes of one call are stored and scaled. */
typedef struct {
    int bits;             /* 8: one code a byte; 4: two a byte (see int_amx.pack) */
    int64_t group_blocks; /* 32-input blocks per scale group; 0: one scale per output,
                             applied to the sums */
    const float* scales;  /* group_blocks 0: [n16] float32 */
    const uint16_t* group_scales; /* group_blocks > 0: bf16 [groups][n16] */
    const uint16_t* group_zeros;  /* NULL (symmetric) or like group_scales */
    const float* xsums;   /* 4-bit with zeros: [rows][groups], each row's sum over a group */
    int64_t groups;
} weight_format;

/* 16 bf16 values -> float32 (exact: bf16 is float32's upper half) */
AMX static inline __m512 bf16x16(const uint16_t* values) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)values)), 16));
}

AMX static inline void zero_tile(int t) { /* tile numbers must be literals */
    switch (t) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
    }
}

AMX static inline void store_tile(int t, float* sums) {
    switch (t) {
    case 0: _tile_stored(0, sums, 64); break;
    case 1: _tile_stored(1, sums, 64); break;
    case 2: _tile_stored(2, sums, 64); break;
    default: _tile_stored(3, sums, 64); break;
    }
}

/* one B tile: 16 rows of 32 codes -> 32 bf16 each. 4-bit codes stay codes (exact; their
 * scales and zeros apply to each group's sums, flush_group); 8-bit grouped codes become
 * code * scale + zero in float32 (exact products, one rounding), then bf16, as int_linear's
 * dequantization; 8-bit codes with a scale per output stay codes. */
AMX static inline void widen(const weight_format* format, const int8_t* codes, int64_t n,
                             int64_t k, int64_t n16, uint16_t* tile) {
    if (format->bits == 4) { /* the codes themselves, exact: bf16 of u - 8 looked up */
        const __m512i table = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,  /* 7 .. 0 */
            0xBF80, 0xC000, 0xC040, 0xC080, 0xC0A0, 0xC0C0, 0xC0E0, 0xC100); /* -1 .. -8 */
        const __m256i nibble = _mm256_set1_epi16(0x0F);
        for (int r = 0; r < 16; ++r) {
            const __m256i w = _mm256_cvtepu8_epi16(
                _mm_loadu_si128((const __m128i*)(codes + r * 16)));
            const __m512i index = _mm512_inserti64x4(_mm512_castsi256_si512(
                _mm256_and_si256(w, nibble)), _mm256_srli_epi16(w, 4), 1);
            _mm512_storeu_si512((void*)(tile + r * 32), _mm512_permutexvar_epi16(index, table));
        }
        return;
    }
    __m512 scale_low = _mm512_set1_ps(1.0f), scale_high = scale_low;
    __m512 zero_low = _mm512_setzero_ps(), zero_high = zero_low;
    if (format->group_blocks) { /* each output's value twice: the B tile's pair order */
        const __m512i pairs_low = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512i pairs_high = _mm512_add_epi32(pairs_low, _mm512_set1_epi32(8));
        const int64_t at = k / format->group_blocks * n16 + n * 16;
        const __m512 scale = bf16x16(format->group_scales + at);
        scale_low = _mm512_permutexvar_ps(pairs_low, scale);
        scale_high = _mm512_permutexvar_ps(pairs_high, scale);
        if (format->group_zeros) {
            const __m512 zero = bf16x16(format->group_zeros + at);
            zero_low = _mm512_permutexvar_ps(pairs_low, zero);
            zero_high = _mm512_permutexvar_ps(pairs_high, zero);
        }
    }
    for (int r = 0; r < 16; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + r * 32));
        __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
        if (format->group_blocks) {
            low = _mm512_fmadd_ps(low, scale_low, zero_low);
            high = _mm512_fmadd_ps(high, scale_high, zero_high);
        }
        _mm512_storeu_si512((void*)(tile + r * 32), (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}

/* 4-bit: after the last block of group g, acc += sums * scale + xsum * zero; tiles zeroed */
AMX static void flush_group(const weight_format* format, int64_t g, int64_t rows, int64_t n,
                            int64_t n16, int blocks, float* acc) {
    float sums[16 * 16];
    const __m512 scale = bf16x16(format->group_scales + g * n16 + n * 16);
    const __m512 zero = format->group_zeros ? bf16x16(format->group_zeros + g * n16 + n * 16)
                                            : _mm512_setzero_ps();
    for (int t = 0; t < blocks; ++t) {
        store_tile(t, sums);
        zero_tile(t);
        const int64_t first = (int64_t)t * 16, count = rows - first < 16 ? rows - first : 16;
        for (int64_t r = 0; r < count; ++r) {
            float* row = acc + (first + r) * 16;
            __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(sums + r * 16), scale,
                                       _mm512_loadu_ps(row));
            if (format->group_zeros)
                v = _mm512_fmadd_ps(
                    _mm512_set1_ps(format->xsums[(first + r) * format->groups + g]), zero, v);
            _mm512_storeu_ps(row, v);
        }
    }
}

/* the 16 outputs of one column block: C tile t holds rows 16t.. of y */
AMX static void column_block(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                             int64_t n16, int64_t n, const weight_format* format, uint16_t* y,
                             uint16_t* buffer, int blocks) {
    const int64_t kb = k32 / 32, tile_bytes = 16 * 32 * format->bits / 8;
    const int exact_codes = format->bits == 4;
    const int8_t* block_codes = codes + n * kb * tile_bytes;
    float acc[MAX_ROWS * 16];
    if (exact_codes) memset(acc, 0, (size_t)rows * 16 * sizeof(float));
    for (int t = 0; t < blocks; ++t) zero_tile(t);
    /* block k + 1 is widened while block k multiplies: AMX loads block k from a buffer
     * whose stores have had an iteration to retire */
    widen(format, block_codes, n, 0, n16, buffer);
    for (int64_t k = 0; k < kb; ++k) {
        const int8_t* next = block_codes + k * tile_bytes + PREFETCH_AHEAD;
        for (int line = 0; line < tile_bytes; line += 64)
            _mm_prefetch((const char*)next + line, _MM_HINT_T0);
        if (k + 1 < kb)
            widen(format, block_codes + (k + 1) * tile_bytes, n, k + 1, n16,
                  buffer + ((k + 1) & 1) * 512);
        _tile_loadd(TILE_B, buffer + (k & 1) * 512, 64);
        const uint16_t* a = x + k * 32;
        const int64_t stride = k32 * 2;
        /* blocks - 1 full row blocks, then the last (full or tail) */
        if (blocks > 1) { _tile_loadd(TILE_A_FULL, a, stride); _tile_dpbf16ps(0, TILE_A_FULL, TILE_B); }
        if (blocks > 2) { _tile_loadd(TILE_A_FULL, a + 16 * k32, stride); _tile_dpbf16ps(1, TILE_A_FULL, TILE_B); }
        if (blocks > 3) { _tile_loadd(TILE_A_FULL, a + 32 * k32, stride); _tile_dpbf16ps(2, TILE_A_FULL, TILE_B); }
        _tile_loadd(TILE_A_TAIL, a + (int64_t)(blocks - 1) * 16 * k32, stride);
        switch (blocks) {
        case 1: _tile_dpbf16ps(0, TILE_A_TAIL, TILE_B); break;
        case 2: _tile_dpbf16ps(1, TILE_A_TAIL, TILE_B); break;
        case 3: _tile_dpbf16ps(2, TILE_A_TAIL, TILE_B); break;
        default: _tile_dpbf16ps(3, TILE_A_TAIL, TILE_B); break;
        }
        if (exact_codes && (k + 1) % format->group_blocks == 0)
            flush_group(format, k / format->group_blocks, rows, n, n16, blocks, acc);
    }
    float sums[16 * 16];
    const __m512 scale = format->group_blocks ? _mm512_set1_ps(1.0f)
                                              : _mm512_loadu_ps(format->scales + n * 16);
    for (int t = 0; t < blocks; ++t) {
        if (!exact_codes) store_tile(t, sums);
        const int64_t first = (int64_t)t * 16, count = rows - first < 16 ? rows - first : 16;
        for (int64_t r = 0; r < count; ++r) {
            const __m512 v = exact_codes ? _mm512_loadu_ps(acc + (first + r) * 16)
                                         : _mm512_mul_ps(_mm512_loadu_ps(sums + r * 16), scale);
            _mm256_storeu_si256((__m256i*)(y + (first + r) * n16 + n * 16),
                                (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

AMX static void gemm(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                     int64_t n16, const weight_format* format, uint16_t* y, int thread,
                     int threads) {
    const int blocks = (int)((rows + 15) / 16);
    const int tail = (int)(rows - (int64_t)(blocks - 1) * 16);
    uint16_t buffer[2 * 512] __attribute__((aligned(64)));
    configure(blocks, tail);
    const int64_t nb = n16 / 16, per = (nb + threads - 1) / threads;
    const int64_t first = thread * per, last = first + per < nb ? first + per : nb;
    for (int64_t n = first; n < last; ++n)
        column_block(x, rows, codes, k32, n16, n, format, y, buffer, blocks);
    _tile_release();
}

/* y[rows, n16] = x[rows, k32] @ W.T for W packed by int_amx.pack; 1 <= rows <= 64.
 * bits: 8 or 4; group_size: inputs per scale group (a multiple of 32), 0 for int8 with one
 * scale per output applied to the sums; scales (float32 [n16] for group_size 0, else bf16
 * [groups][n16]), zeros (NULL: symmetric; bf16 like grouped scales) and xsums (4-bit with
 * zeros) as in weight_format. Call molink_amx_init first (once per process). */
void molink_gemm_amx(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                     int64_t n16, int bits, int64_t group_size, const void* scales,
                     const uint16_t* zeros, const float* xsums, uint16_t* y, int threads) {
    if (rows < 1 || rows > MAX_ROWS || (bits != 8 && bits != 4) || group_size % 32
        || (group_size == 0 && bits != 8))
        return;
    const weight_format format = {bits, group_size / 32,
                                  group_size ? NULL : (const float*)scales,
                                  group_size ? (const uint16_t*)scales : NULL, zeros, xsums,
                                  group_size ? k32 / group_size : 1};
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
    {
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        gemm(x, rows, codes, k32, n16, &format, y, omp_get_thread_num(), omp_get_num_threads());
    }
#else
    (void)threads;
    gemm(x, rows, codes, k32, n16, &format, y, 0, 1);
#endif
}

/* out[rows][k32 / group_size] = each row's sum over each group of x[rows][k32] (bf16), in
 * float32: 16-wide partial sums in input order, then added lane by lane from 0 to 15 (the
 * xsums of 4-bit codes with zeros; int_amx.py and decode_layers.c both take them from
 * here, so their products agree bit for bit). group_size: a multiple of 32. */
AMX void molink_group_sums(const uint16_t* x, int64_t rows, int64_t k32, int64_t group_size,
                           float* out) {
    const int64_t groups = k32 / group_size;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < groups; ++g) {
            const uint16_t* at = x + r * k32 + g * group_size;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < group_size; i += 16)
                acc = _mm512_add_ps(acc, bf16x16(at + i));
            float lanes[16], sum = 0.0f;
            _mm512_storeu_ps(lanes, acc);
            for (int j = 0; j < 16; ++j) sum += lanes[j];
            out[r * groups + g] = sum;
        }
}

/* ---- bf16 weights: C tiles 0 (rows 0-15, block 0), 1 (rows 0-15, block 1), 2 and 3 (rows
 * 16-31); A tiles 4 (rows 0-15) and 5 (rows 16-31); B tiles 6 (block 0) and 7 (block 1) */

AMX static void configure_pairs(int first_rows, int second_rows) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64;
    config.rows[0] = config.rows[1] = config.rows[4] = (uint8_t)first_rows;
    config.rows[2] = config.rows[3] = config.rows[5] = (uint8_t)second_rows;
    config.rows[6] = config.rows[7] = 16;
    _tile_loadconfig(&config);
}

/* C tile t's first `count` rows plus the bias (NULL: none) -> y rows first.., block n */
AMX static void store_rows(int t, int64_t count, int64_t first, const float* bias, int64_t n,
                           uint16_t* y, int64_t n32) {
    float sums[16 * 16];
    store_tile(t, sums);
    const __m512 add = bias ? _mm512_loadu_ps(bias + n * 16) : _mm512_setzero_ps();
    for (int64_t r = 0; r < count; ++r)
        _mm256_storeu_si256((__m256i*)(y + (first + r) * n32 + n * 16),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(
                                _mm512_loadu_ps(sums + r * 16), add)));
}

/* rows first .. first + count (count <= 32) of y for the blocks 2p and 2p + 1 */
AMX static void block_pair(const uint16_t* x, int64_t first, int64_t count, const uint16_t* w,
                           int64_t k32, int64_t n32, int64_t p, const float* bias, uint16_t* y,
                           int prefetch) {
    const int64_t kb = k32 / 32, stride = k32 * 2;
    const uint16_t* w0 = w + 2 * p * kb * 512;
    const uint16_t* w1 = w0 + kb * 512;
    const uint16_t* a = x + first * k32;
    const int two = count > 16;
    _tile_zero(0);
    _tile_zero(1);
    if (two) { _tile_zero(2); _tile_zero(3); }
    for (int64_t k = 0; k < kb; ++k) {
        if (prefetch) { /* the first rows of a pair read its weights from memory */
            const char* next0 = (const char*)(w0 + k * 512) + PREFETCH_AHEAD_16;
            const char* next1 = (const char*)(w1 + k * 512) + PREFETCH_AHEAD_16;
            for (int line = 0; line < 1024; line += 64) {
                _mm_prefetch(next0 + line, _MM_HINT_T0);
                _mm_prefetch(next1 + line, _MM_HINT_T0);
            }
        }
        _tile_loadd(4, a + k * 32, stride);
        _tile_loadd(6, w0 + k * 512, 64);
        _tile_loadd(7, w1 + k * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, a + 16 * k32 + k * 32, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    const int64_t upper = count < 16 ? count : 16;
    store_rows(0, upper, first, bias, 2 * p, y, n32);
    store_rows(1, upper, first, bias, 2 * p + 1, y, n32);
    if (two) {
        store_rows(2, count - 16, first + 16, bias, 2 * p, y, n32);
        store_rows(3, count - 16, first + 16, bias, 2 * p + 1, y, n32);
    }
}

AMX static void gemm16(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t k32,
                       int64_t n32, const float* bias, uint16_t* y, int thread, int threads) {
    const int64_t pairs = n32 / 32, per = (pairs + threads - 1) / threads;
    const int64_t first = thread * per, last = first + per < pairs ? first + per : pairs;
    const int64_t full = rows / 32 * 32, tail = rows - full;
    const int tail_first = tail < 16 ? (int)tail : 16, tail_second = tail > 16 ? (int)tail - 16 : 1;
    if (!full) configure_pairs(tail_first, tail_second);
    for (int64_t p = first; p < last; ++p) { /* the tail right after its pair's full rows,
                                                 while the pair's weights are in L2 */
        if (full) {
            configure_pairs(16, 16);
            for (int64_t r = 0; r < full; r += 32)
                block_pair(x, r, 32, w, k32, n32, p, bias, y, r == 0);
            if (tail) configure_pairs(tail_first, tail_second);
        }
        if (tail) block_pair(x, full, tail, w, k32, n32, p, bias, y, !full);
    }
    _tile_release();
}

/* y[rows, n32] = x[rows, k32] @ W.T (+ bias, float32 [n32] or NULL) for bf16 W packed by
 * int_amx.pack16 (outputs padded to whole pairs of blocks); any rows >= 1. */
void molink_gemm_amx16(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t k32,
                       int64_t n32, const float* bias, uint16_t* y, int threads) {
    if (rows < 1 || n32 % 32 || k32 % 32)
        return;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
    {
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        gemm16(x, rows, w, k32, n32, bias, y, omp_get_thread_num(), omp_get_num_threads());
    }
#else
    (void)threads;
    gemm16(x, rows, w, k32, n32, bias, y, 0, 1);
#endif
}

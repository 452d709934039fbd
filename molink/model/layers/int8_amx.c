/* y = (x @ codes.T) * scales for int8 weights (symmetric, one scale per output) and bf16
 * activations, on x86 CPUs with AMX-BF16 (Sapphire Rapids and later); compiled on first use
 * by molink/model/layers/int8_amx.py.
 *
 * PyTorch's int8 weight-only kernel computes one activation row at a time: at 16 rows it
 * takes 3x longer than a bf16 product of the same weights. Here the weight is read once per
 * call for up to 64 rows: each 16 x 32 block of codes is widened to bf16 in registers
 * (exact: every int8 is a bf16) into a 1 KB buffer that stays in L1, and AMX multiplies it
 * with up to four 16-row blocks of x; the 1-byte codes are the only stream from memory.
 *
 * Layout (int8_amx.pack): codes [n16 / 16][k32 / 32][16][32], one AMX B tile per block in
 * its pair-interleaved form: row p of a block holds, for each of its 16 outputs n, the
 * codes of inputs 2p and 2p + 1. x: bf16 [rows][k32], rows <= 64; y: bf16 [rows][n16];
 * scales: float32 [n16]. Products are exact in float32, sums in float32 (AMX's order), one
 * rounding to bf16 at the end: the int8 kernel's arithmetic up to summation order. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define MAX_ROWS 64      /* four C tiles of 16 rows */
#define PREFETCH_AHEAD 2048 /* bytes of codes: measured best of 512/1024/2048/4096 */

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

/* one B tile: 16 rows of 32 int8 -> 32 bf16 each */
AMX static inline void widen(const int8_t* codes, uint16_t* tile) {
    for (int r = 0; r < 16; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + r * 32));
        const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm256_extracti128_si256(v, 1)));
        _mm512_storeu_si512((void*)(tile + r * 32), (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
}

/* the 16 outputs of one column block: C tile t holds rows 16t.. of y */
AMX static void column_block(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                             int64_t n16, int64_t n, const float* scales, uint16_t* y,
                             uint16_t* buffer, int blocks) {
    const int64_t kb = k32 / 32;
    const int8_t* block_codes = codes + n * kb * 512;
    for (int t = 0; t < blocks; ++t) {
        switch (t) { /* tile numbers must be constants */
        case 0: _tile_zero(0); break;
        case 1: _tile_zero(1); break;
        case 2: _tile_zero(2); break;
        default: _tile_zero(3); break;
        }
    }
    for (int64_t k = 0; k < kb; ++k) {
        const int8_t* next = block_codes + k * 512 + PREFETCH_AHEAD;
        for (int line = 0; line < 512; line += 64) _mm_prefetch((const char*)next + line, _MM_HINT_T0);
        uint16_t* tile = buffer + (k & 1) * 512;
        widen(block_codes + k * 512, tile);
        _tile_loadd(TILE_B, tile, 64);
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
    }
    float sums[16 * 16];
    const __m512 scale = _mm512_loadu_ps(scales + n * 16);
    for (int t = 0; t < blocks; ++t) {
        switch (t) {
        case 0: _tile_stored(0, sums, 64); break;
        case 1: _tile_stored(1, sums, 64); break;
        case 2: _tile_stored(2, sums, 64); break;
        default: _tile_stored(3, sums, 64); break;
        }
        const int64_t first = (int64_t)t * 16, count = rows - first < 16 ? rows - first : 16;
        for (int64_t r = 0; r < count; ++r) {
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sums + r * 16), scale);
            _mm256_storeu_si256((__m256i*)(y + (first + r) * n16 + n * 16),
                                (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

AMX static void gemm(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                     int64_t n16, const float* scales, uint16_t* y, int thread, int threads) {
    const int blocks = (int)((rows + 15) / 16);
    const int tail = (int)(rows - (int64_t)(blocks - 1) * 16);
    uint16_t buffer[2 * 512] __attribute__((aligned(64)));
    configure(blocks, tail);
    const int64_t nb = n16 / 16, per = (nb + threads - 1) / threads;
    const int64_t first = thread * per, last = first + per < nb ? first + per : nb;
    for (int64_t n = first; n < last; ++n)
        column_block(x, rows, codes, k32, n16, n, scales, y, buffer, blocks);
    _tile_release();
}

/* y[rows, n16] = x[rows, k32] @ W.T * scales for W packed by int8_amx.pack; 1 <= rows <= 64.
 * Call molink_amx_init first (once per process). */
void molink_gemm_i8_amx(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                        int64_t n16, const float* scales, uint16_t* y, int threads) {
    if (rows < 1 || rows > MAX_ROWS) return;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
    {
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        gemm(x, rows, codes, k32, n16, scales, y, omp_get_thread_num(), omp_get_num_threads());
    }
#else
    (void)threads;
    gemm(x, rows, codes, k32, n16, scales, y, 0, 1);
#endif
}

/* A decode step's decoder layers in one call: the Llama-shaped layer (RMSNorm, q|k|v
 * product, optional per-head q/k RMSNorm, rotate-half RoPE, KV written to the paged cache,
 * attention, output product, residual add; RMSNorm, gate|up product, SwiGLU, down product,
 * residual add) for every layer of a stage, 16-bit activations. Compiled on first use by
 * molink/model/layers/decode_layers.py.
 *
 * Nothing here computes but KV copies into the cache: every operation is one of the kernels
 * the module path calls one by one from Python (the products: int_amx.c's AMX products of
 * bf16 weights or of 8- or 4-bit codes, or gemm16.c's widened-weight product for CPUs
 * without AMX;
 * gemm16.c's attention, norm, RoPE, SwiGLU and add), handed over as function pointers and
 * called with the same arguments, in the same order, so a step's result is the module
 * path's bit for bit. What goes is the Python between them (~13 module calls, views,
 * checks and allocations a layer: ~3 ms of a 12-layer step). */
#include <stdint.h>
#include <string.h>

typedef void (*amx_fn)(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t k32,
                       int64_t n32, const float* bias, uint16_t* y, int threads);
typedef void (*amx_int_fn)(const uint16_t* x, int64_t rows, const int8_t* codes, int64_t k32,
                           int64_t n16, int bits, int64_t group_size, const void* scales,
                           const uint16_t* zeros, const float* xsums, uint16_t* y, int threads);
typedef void (*group_sums_fn)(const uint16_t* x, int64_t rows, int64_t k32, int64_t group_size,
                              float* out);
typedef void (*linear_fn)(const uint16_t* x, int64_t rows, const uint16_t* tiles, int64_t in16,
                          int64_t out8, const float* bias, uint16_t* y, float* scratch,
                          int threads, int f16);
typedef int (*attention_fn)(const uint16_t* q, int64_t q_count, int64_t q_stride,
                            const int64_t* q_rows, const int64_t* positions,
                            const int64_t* tables, int64_t max_blocks, int64_t seqs,
                            const uint16_t* k_cache, const uint16_t* v_cache,
                            int64_t num_blocks, int64_t block_size, int64_t heads,
                            int64_t kv_heads, int64_t head_dim, float scale, int64_t window,
                            int f16, uint16_t* out, int threads);
typedef void (*rms_norm_fn)(const uint16_t* x, int64_t rows, int64_t n, int64_t x_stride,
                            const uint16_t* weight, float eps, int f16, uint16_t* out);
typedef void (*rotary_fn)(uint16_t* x, int64_t rows, int64_t heads, int64_t head_dim,
                          int64_t row_stride, const float* cos, const float* sin, int f16);
typedef void (*silu_mul_fn)(const uint16_t* gate_up, int64_t rows, int64_t n, int f16,
                            uint16_t* out);
typedef void (*add_fn)(uint16_t* h, const uint16_t* x, int64_t n, int f16);

typedef struct {
    amx_fn amx; /* the products: one of these three, the others NULL */
    amx_int_fn amx_int;
    linear_fn linear;
    attention_fn attention;
    rms_norm_fn rms_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    add_fn add;
    group_sums_fn group_sums; /* with amx_int: 4-bit codes with zeros need each row's sums */
} kernels;

/* Sizes shared by the layers; hidden, heads * head_dim and inter multiples of 32 (whole AMX
 * input blocks: the products' inputs need no padding), head_dim of 16 (RoPE). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    int64_t qkv_width; /* the q|k|v product's outputs, padded to its tiles */
    int64_t block_size;
    int64_t f16; /* activations, weights and cache: float16 (1) or bfloat16 (0) */
} dims;

/* A product's weights: bf16 tiles (int_amx.pack16), integer codes (int_amx.pack: 8-bit
 * with one float32 scale per output, int_amx.pad_scales, group_size 0; or 8- or 4-bit
 * codes with bf16 scales and zeros per group, int_amx.group_values) or 16-bit tiles
 * (fused16.pack); the bias: for bf16 and 16-bit tiles, float32 padded to the tiles' outputs
 * and added before the rounding; for codes, in the activations' dtype and added after it
 * (IntLinear's order); or NULL. */
typedef struct {
    const void* weights;
    const void* scales;
    const void* bias;
    const uint16_t* zeros; /* codes in groups: NULL (symmetric) or the groups' zeros */
    int64_t bits, group_size; /* codes: 8 or 4, and 0 or inputs per group */
} weights;

/* One layer: RMSNorm weights (q_norm and k_norm NULL without per-head norms), the four
 * products, the layer's KV cache ([num_blocks][block_size][kv_heads][head_dim], k and v) */
typedef struct {
    const uint16_t *input_norm, *post_norm, *q_norm, *k_norm;
    weights qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;
    int64_t num_blocks, window;
    float input_eps, post_eps, q_eps, k_eps, scale;
} layer;

#define AMX_INT_ROWS 64 /* rows per AMX call on codes (int_amx.MAX_ROWS) */

/* y[rows][width] = x[rows][in] @ W.T (+ bias); width: the outputs padded to the weights'
 * blocks, outputs: the layer's; scratch: fused16's float32 scratch, or the group sums of
 * 4-bit codes with zeros (AMX_INT_ROWS * in / group_size floats) */
static void product(const kernels* k, const uint16_t* x, int64_t rows, const weights* p,
                    int64_t in, int64_t width, int64_t outputs, uint16_t* y, float* scratch,
                    int threads, int f16) {
    if (k->amx) {
        k->amx(x, rows, p->weights, in, width, p->bias, y, threads);
    } else if (k->linear) {
        k->linear(x, rows, p->weights, in, width, p->bias, y, scratch, threads, f16);
    } else {
        const int sums = p->bits == 4 && p->zeros != NULL;
        for (int64_t r = 0; r < rows; r += AMX_INT_ROWS) {
            const int64_t n = rows - r < AMX_INT_ROWS ? rows - r : AMX_INT_ROWS;
            if (sums) k->group_sums(x + r * in, n, in, p->group_size, scratch);
            k->amx_int(x + r * in, n, p->weights, in, width, (int)p->bits, p->group_size,
                       p->scales, p->zeros, sums ? scratch : NULL, y + r * width, threads);
        }
        for (int64_t r = 0; r < rows && p->bias; ++r)
            k->add(y + r * width, p->bias, outputs, f16);
    }
}

/* The step: h [rows][hidden], updated in place through every layer; token t's key and
 * value go to cache slot slots[t]; sequence b's query is row q_rows[b] at positions[b],
 * its blocks tables[b][0 .. max_blocks); cos, sin [rows][head_dim] float32. scratch:
 * rows * (max(hidden, heads * head_dim, inter) + qkv_width + hidden + 2 * inter) 16-bit
 * values; scratch32: the products' float32 scratch (fused16's: rows * (2 * max(hidden,
 * heads * head_dim, inter) + max(qkv_width, 2 * inter)) floats; codes in groups:
 * min(rows, 64) * max(hidden, heads * head_dim, inter) / 32; unused by bf16 tiles).
 * Returns 0; -2 for a slot, query row, position or block outside the tensors or the cache
 * (checked before each layer's writes); -1 for shapes the kernels do not take. */
int molink_decode_layers(const kernels* k, const dims* d, const layer* layers, int64_t count,
                         uint16_t* h, int64_t rows, const float* cos, const float* sin,
                         const int64_t* slots, const int64_t* q_rows, const int64_t* positions,
                         const int64_t* tables, int64_t max_blocks, int64_t seqs,
                         uint16_t* scratch, float* scratch32, int threads) {
    const int64_t hidden = d->hidden, D = d->head_dim, inter = d->inter;
    const int64_t q_size = d->heads * D, kv_size = d->kv_heads * D, width = d->qkv_width;
    if (hidden % 32 || q_size % 32 || inter % 32 || D % 16 || width < q_size + 2 * kv_size
        || !(k->amx || k->amx_int || k->linear))
        return -1;
    int64_t widest = hidden > q_size ? hidden : q_size;
    widest = widest > inter ? widest : inter;
    uint16_t* x = scratch;            /* a product's input: normed h, attention, SwiGLU */
    uint16_t* qkv = x + rows * widest; /* [rows][width] */
    uint16_t* y = qkv + rows * width;  /* [rows][hidden]: o and down products */
    uint16_t* gate_up = y + rows * hidden;
    const int f16 = (int)d->f16;
    for (int64_t i = 0; i < count; ++i) {
        const layer* l = layers + i;
        for (int64_t t = 0; t < rows; ++t)
            if (slots[t] < 0 || slots[t] >= l->num_blocks * d->block_size) return -2;
        k->rms_norm(h, rows, hidden, hidden, l->input_norm, l->input_eps, f16, x);
        product(k, x, rows, &l->qkv, hidden, width, q_size + 2 * kv_size, qkv, scratch32,
                threads, f16);
        for (int64_t t = 0; t < rows && l->q_norm; ++t) { /* in place: each row read first */
            uint16_t* row = qkv + t * width;
            k->rms_norm(row, d->heads, D, D, l->q_norm, l->q_eps, f16, row);
            k->rms_norm(row + q_size, d->kv_heads, D, D, l->k_norm, l->k_eps, f16, row + q_size);
        }
        k->rotary(qkv, rows, d->heads, D, width, cos, sin, f16);
        k->rotary(qkv + q_size, rows, d->kv_heads, D, width, cos, sin, f16);
        for (int64_t t = 0; t < rows; ++t) {
            const uint16_t* row = qkv + t * width + q_size;
            memcpy(l->k_cache + slots[t] * kv_size, row, (size_t)kv_size * 2);
            memcpy(l->v_cache + slots[t] * kv_size, row + kv_size, (size_t)kv_size * 2);
        }
        const int status = k->attention(qkv, rows, width, q_rows, positions, tables, max_blocks,
                                        seqs, l->k_cache, l->v_cache, l->num_blocks,
                                        d->block_size, d->heads, d->kv_heads, D, l->scale,
                                        l->window, f16, x, threads);
        if (status) return status;
        product(k, x, rows, &l->o, q_size, hidden, hidden, y, scratch32, threads, f16);
        k->add(h, y, rows * hidden, f16);
        k->rms_norm(h, rows, hidden, hidden, l->post_norm, l->post_eps, f16, x);
        product(k, x, rows, &l->gate_up, hidden, 2 * inter, 2 * inter, gate_up, scratch32,
                threads, f16);
        k->silu_mul(gate_up, rows, inter, f16, x);
        product(k, x, rows, &l->down, inter, hidden, hidden, y, scratch32, threads, f16);
        k->add(h, y, rows * hidden, f16);
    }
    return 0;
}

"""Decode attention over the paged cache in place (``fused16.decode_attention``, in
``gemm16.c``): against float64 attention for every shape it takes, inside
``PagedAttention`` next to PyTorch's path for the other groups of a step, and where the
loader turns it on."""

from __future__ import annotations

import pytest
import torch

from molink.model.layers import fused16
from molink.model.layers.attention import (
    AttentionGroup,
    AttentionMetadata,
    PagedAttention,
    use_decode_kernel,
)

KERNELS = fused16.kernels()
needs_kernel = pytest.mark.skipif(KERNELS is None,
                                  reason=f"no fused kernels: {fused16.unsupported_reason()}")


@pytest.fixture(params=["avx2", "avx512"])
def loops(request):
    """The kernel's AVX2 loops, then its AVX-512 ones (where the CPU has AVX-512: head sizes
    of 16 take them by default); the default restored after."""
    wide = request.param == "avx512"
    if KERNELS.attention_avx512(wide) != wide:
        KERNELS.attention_avx512(True)
        pytest.skip("no AVX-512 on this CPU")
    yield request.param
    KERNELS.attention_avx512(True)


def _reference(q, cache, tables, positions, scale, window):
    """float64 attention of each sequence's one query over its keys, [B, H, D]."""
    num_heads, (block_size, kv_heads, head_dim) = q.shape[1], cache.shape[2:]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, position in enumerate(positions.tolist()):
        first = max(0, position - window + 1) if window else 0
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size
                 for p in range(first, position + 1)]
        keys = cache[0].reshape(-1, kv_heads, head_dim)[slots].double()  # [L, Hkv, D]
        values = cache[1].reshape(-1, kv_heads, head_dim)[slots].double()
        group = num_heads // kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), keys) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
    return out


def _within_bound(got, exact, values):
    """One rounding of the result to the 16-bit dtype, plus float32 sums over a few hundred
    terms (~1e-5 of the largest value)."""
    unit = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -11
    bound = exact.abs() * unit + 3e-5 * values.abs().max().double()
    return bool(((got.double() - exact).abs() <= bound).all())


def _case(dtype, heads, kv_heads, head_dim, block_size, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lengths)
    num_blocks = len(lengths) * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = (torch.randperm(num_blocks - 1, generator=gen)[:len(lengths) * max_blocks]
              .view(len(lengths), max_blocks) + 1)  # scattered blocks, block 0 unused
    positions = torch.tensor([n - 1 for n in lengths])
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    return q, cache, tables, positions


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 4, 64), (8, 8, 128), (10, 2, 80),
                                                     (12, 3, 72), (32, 4, 64), (4, 1, 256)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_is_float64_attention_rounded_once(dtype, heads, kv_heads, head_dim,
                                                            window, loops):
    """GQA groups of 1 to 8 (whole and partial fours), head sizes with and without a 16-wide
    tail (and, for the AVX-512 loops, a 64-wide one; 72 takes the AVX2 loops), one key to
    several chunks of 64, a sliding window, scattered blocks."""
    lengths = [1, 9, 64, 65, 200, 17]
    q, cache, tables, positions = _case(dtype, heads, kv_heads, head_dim, 16, lengths)
    rows = torch.tensor([3, 0, 5, 1, 2, 4])  # each sequence's query somewhere in the step
    shuffled = torch.empty_like(q)
    shuffled[rows] = q
    out = torch.full((len(lengths) + 1, heads, head_dim), float("nan"), dtype=dtype)
    scale = head_dim ** -0.5
    KERNELS.decode_attention(shuffled, cache[0], cache[1], rows, positions, tables, scale,
                             window, out)
    exact = _reference(q, cache, tables, positions, scale, window or 0)
    assert _within_bound(out[rows], exact, cache[1])
    assert out[-1].isnan().all()  # rows of no sequence untouched


def _metadata(positions, tables, block_size, prefill_length):
    """A step: one prefill chunk of ``prefill_length`` tokens (rows 0..) for sequence 0, then
    one decode token each for the others."""
    decode = len(positions) - 1
    rows = torch.arange(prefill_length, prefill_length + decode)
    prefill_positions = torch.arange(positions[0] - prefill_length + 1, positions[0] + 1)
    groups = [
        AttentionGroup(torch.arange(prefill_length)[None], torch.ones(1, prefill_length,
                                                                      dtype=torch.bool),
                       prefill_positions[None], tables[:1],
                       tables.shape[1] * block_size),
        AttentionGroup(rows[:, None], torch.ones(decode, 1, dtype=torch.bool),
                       positions[1:, None], tables[1:], tables.shape[1] * block_size),
    ]
    slots = torch.cat([prefill_positions, positions[1:]])
    owners = torch.cat([torch.zeros(prefill_length, dtype=torch.long), torch.arange(1, 1 + decode)])
    slot_mapping = tables[owners, slots // block_size] * block_size + slots % block_size
    return AttentionMetadata(slot_mapping=slot_mapping, groups=groups)


@needs_kernel
def test_a_mixed_step_attends_decode_rows_through_the_kernel_the_rest_through_pytorch():
    dtype, heads, kv_heads, head_dim, block_size = torch.bfloat16, 8, 2, 64, 4
    lengths = [12, 30, 5, 41]
    _, cache, tables, positions = _case(dtype, heads, kv_heads, head_dim, block_size, lengths)
    gen = torch.Generator().manual_seed(1)
    tokens = 3 + len(lengths) - 1  # 3 prefill tokens, then one per decoding sequence
    q, k, v = (torch.randn(tokens, n, head_dim, generator=gen).to(dtype)
               for n in (heads, kv_heads, kv_heads))
    results = {}
    for name, kernel in (("pytorch", None), ("kernel", KERNELS)):
        layer = PagedAttention(heads, kv_heads, head_dim, scale=head_dim ** -0.5)
        layer.kv_cache, layer.decode_kernel = cache.clone(), kernel
        results[name] = layer(q, k, v, _metadata(positions, tables, block_size, 3))
        written = layer.kv_cache
    # the prefill rows are PyTorch's in both; the decode rows agree within the bound
    assert torch.equal(results["kernel"][:3], results["pytorch"][:3])
    exact = _reference(q[3:], written, tables[1:], positions[1:], head_dim ** -0.5, 0)
    got = results["kernel"][3:].view(-1, heads, head_dim)
    assert _within_bound(got, exact, written[1])
    assert (got.float() - results["pytorch"][3:].view_as(got).float()).abs().max() < 2e-2


def test_the_kernel_is_used_only_where_it_computes_the_same_attention():
    plain = PagedAttention(8, 2, 64, scale=0.125)
    capped = PagedAttention(8, 2, 64, scale=0.125, softcap=50.0)
    alibi = PagedAttention(8, 8, 64, scale=0.125, alibi_slopes=torch.ones(8))
    odd = PagedAttention(4, 4, 36, scale=0.125)
    model = torch.nn.ModuleList([plain, capped, alibi, odd])
    marker = object()
    assert use_decode_kernel(model, marker) == 1
    assert plain.decode_kernel is marker
    assert capped.decode_kernel is alibi.decode_kernel is odd.decode_kernel is None


@needs_kernel
@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, True), (torch.float32, False)])
def test_the_loader_turns_it_on_for_16_bit_models_on_a_cpu(tiny_model_dir, dtype, expected):
    from molink.model import loader

    model, _ = loader.load_model(str(tiny_model_dir("llama")), 0, 2, str(dtype).split(".")[1],
                                 torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert layers and all((m.decode_kernel is fused16.kernels()) == expected for m in layers)


@needs_kernel
@pytest.mark.parametrize("fault", ["block past the cache", "position past the table",
                                   "negative block", "query row past q"])
def test_indices_out_of_bounds_raise_instead_of_reading_past_the_cache(fault):
    """A scheduler bug must surface as an error of that step, as PyTorch's indexing would
    raise, never as a read outside the cache (a crashed stage)."""
    q, cache, tables, positions = _case(torch.bfloat16, 4, 2, 64, 16, [20, 5])
    rows = torch.tensor([0, 1])
    if fault == "block past the cache":
        tables[0, 1] = cache.shape[1]
    elif fault == "position past the table":
        positions[1] = tables.shape[1] * 16
    elif fault == "negative block":
        tables[1, 0] = -1
    else:
        rows[1] = 2
    out = torch.empty(3, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="outside"):
        KERNELS.decode_attention(q, cache[0], cache[1], rows, positions, tables, 0.125, None,
                                 out)


@needs_kernel
def test_tasks_by_sequence_or_by_head_give_the_same_bits(loops):
    """One thread takes a sequence's heads in one task (6 sequences >= 2 threads' worth),
    four take a head each: the same arithmetic per head either way."""
    q, cache, tables, positions = _case(torch.bfloat16, 16, 4, 64, 16, [3, 40, 70, 9, 120, 33])
    rows = torch.arange(6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            out = torch.empty(7, 16, 64, dtype=torch.bfloat16)
            KERNELS.decode_attention(q, cache[0], cache[1], rows, positions, tables, 0.125, None,
                                     out)
            results.append(out[:6])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])

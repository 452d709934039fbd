"""Activation compression on the wire: error bounds that follow from the arithmetic, sizes,
and the codec's checks on row scales.

Bounds used below (``u`` is the unit roundoff of the narrower format):

- float16 / bfloat16: round to nearest, so ``|x - x'| <= u * |x|`` (u = 2^-11 and 2^-8) for
  values in the normal range, plus half the subnormal spacing (2^-25) for float16.
- int8, per row: ``s = max|row| / 127`` and ``q = round(x / s)``, so ``|x - q * s| <= s / 2``
  = ``max|row| / 254``; float32 division, multiplication and the scale itself add a few
  roundings of at most ``2^-24 * max|row|`` each, covered by ``8 * 2^-24 * max|row|``.
"""

from __future__ import annotations

import pytest
import torch

from molink.messages import WIRE_COMPRESSIONS
from molink.runtime.wire_tensor import from_raw, to_raw
from molink.transport import molink_pb2 as pb
from molink.transport.codec import WireFormatError, decode_tensor, encode_tensor

CPU = torch.device("cpu")
F32_ROUNDING = 8 * 2.0**-24  # a few float32 roundings, relative to max|row|


def _activations(num_rows: int = 16, hidden: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, hidden, generator=gen) * 3.0  # [num_rows, hidden]


def _int8_bound(x: torch.Tensor) -> torch.Tensor:
    """Largest error each row may have after int8 quantization: [num_rows, 1]."""
    row_max = x.abs().amax(dim=1, keepdim=True)
    return row_max / 254.0 + F32_ROUNDING * row_max


# ---- round trips ----------------------------------------------------------------------------

def test_none_is_exact():
    x = _activations()
    raw = to_raw(x, "none")
    assert raw.dtype == "float32" and raw.row_scales == b""
    assert torch.equal(from_raw(raw, CPU), x)


@pytest.mark.parametrize("compression,unit_roundoff,subnormal_half_step", [
    ("float16", 2.0**-11, 2.0**-25),
    ("bfloat16", 2.0**-8, 0.0),
])
def test_16_bit_casts_round_to_nearest(compression, unit_roundoff, subnormal_half_step):
    x = _activations()
    raw = to_raw(x, compression)
    assert raw.dtype == compression and raw.row_scales == b""
    y = from_raw(raw, CPU, dtype=torch.float32)
    assert y.dtype == torch.float32 and y.shape == x.shape
    error = (y - x).abs()
    assert (error <= unit_roundoff * x.abs() + subnormal_half_step).all()
    assert error.max().item() > 0  # really narrowed: 3 * randn is not exact in 16 bits


def test_int8_error_is_at_most_half_a_step_per_row():
    x = _activations()
    raw = to_raw(x, "int8")
    assert raw.dtype == "int8" and raw.shape == tuple(x.shape)
    scales = torch.frombuffer(bytearray(raw.row_scales), dtype=torch.float32)
    row_max = x.abs().amax(dim=1)
    assert torch.allclose(scales, row_max / 127.0, rtol=2.0**-22, atol=0.0)
    y = from_raw(raw, CPU)
    assert y.dtype == torch.float32 and y.shape == x.shape
    error = (y - x).abs()
    assert (error <= _int8_bound(x)).all()
    # The largest element of each row lands exactly on +-127 steps.
    q = torch.frombuffer(bytearray(raw.data), dtype=torch.int8).view(x.shape)
    assert (q.abs().amax(dim=1) == 127).all()


def test_int8_scales_are_per_row():
    """A token with huge activations does not coarsen a token with small ones."""
    gen = torch.Generator().manual_seed(1)
    small = torch.randn(1, 64, generator=gen) * 1e-2
    huge = torch.randn(1, 64, generator=gen) * 1e4
    x = torch.cat([small, huge])  # [2, 64]
    y = from_raw(to_raw(x, "int8"), CPU)
    small_error = (y[0] - x[0]).abs().max().item()
    assert small_error <= _int8_bound(x[:1]).item()
    # One scale for the whole tensor would have been 1e4-sized steps: every small value
    # would round to 0 and the error would be the values themselves.
    assert small_error < x[0].abs().max().item() / 100


def test_int8_all_zero_rows_come_back_as_exact_zeros():
    x = _activations(num_rows=4)
    x[1] = 0.0
    x[3] = 0.0
    y = from_raw(to_raw(x, "int8"), CPU)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[3], torch.zeros_like(y[3]))
    assert (((y - x).abs()) <= _int8_bound(x)).all()


@pytest.mark.parametrize("compression", WIRE_COMPRESSIONS)
def test_empty_tensor_round_trips(compression):
    x = torch.empty(0, 32)  # a step with no rows: [0, hidden]
    raw = to_raw(x, compression)
    assert raw.data == b"" and raw.row_scales == b"" and raw.shape == (0, 32)
    y = from_raw(raw, CPU, dtype=torch.float32)
    assert y.shape == (0, 32) and y.dtype == torch.float32


def test_int8_on_bfloat16_activations():
    x = _activations().to(torch.bfloat16)
    raw = to_raw(x, "int8")
    assert raw.dtype == "int8"
    y = from_raw(raw, CPU, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    x32, y32 = x.float(), y.float()
    # Half an int8 step, then the cast back to bfloat16 rounds once more.
    assert ((y32 - x32).abs() <= _int8_bound(x32) + 2.0**-8 * x32.abs().amax(1, keepdim=True)).all()


def test_16_bit_casts_of_bfloat16_activations():
    x = _activations().to(torch.bfloat16)
    same = to_raw(x, "bfloat16")
    assert same.dtype == "bfloat16" and len(same.data) == 2 * x.numel()
    assert torch.equal(from_raw(same, CPU), x)
    # bfloat16 has 8 significant bits, float16 11: values in float16's normal range pass
    # through float16 exactly (3 * randn stays within it).
    assert x.float().abs().max().item() < 65504 and x.float().abs().min().item() > 2.0**-14
    half = to_raw(x, "float16")
    assert half.dtype == "float16"
    assert torch.equal(from_raw(half, CPU, dtype=torch.bfloat16), x)


def test_none_keeps_bfloat16_exactly():
    x = _activations().to(torch.bfloat16)
    raw = to_raw(x, "none")
    assert raw.dtype == "bfloat16"
    assert torch.equal(from_raw(raw, CPU), x)


def test_int8_leaves_non_matrices_and_integers_uncompressed():
    """Per-row scales need rows: only 2-D float tensors are quantized."""
    cube = _activations(num_rows=6).view(2, 3, 96)
    raw = to_raw(cube, "int8")
    assert raw.dtype == "float32" and raw.row_scales == b""
    assert torch.equal(from_raw(raw, CPU), cube)
    ids = torch.arange(12, dtype=torch.int64).view(3, 4)
    raw = to_raw(ids, "int8")
    assert raw.dtype == "int64" and torch.equal(from_raw(raw, CPU), ids)


@pytest.mark.parametrize("compression,bytes_per_element,scale_bytes_per_row", [
    ("none", 4, 0), ("float16", 2, 0), ("bfloat16", 2, 0), ("int8", 1, 4),
])
def test_bytes_on_the_wire(compression, bytes_per_element, scale_bytes_per_row):
    x = _activations(num_rows=10, hidden=96)
    raw = to_raw(x, compression)
    assert len(raw.data) == bytes_per_element * 10 * 96
    assert len(raw.row_scales) == scale_bytes_per_row * 10


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="int8"):
        to_raw(_activations(), "fp8")
    with pytest.raises(ValueError, match="compression"):
        to_raw(_activations(), "")


# ---- codec -----------------------------------------------------------------------------------

def test_codec_round_trips_row_scales():
    x = _activations(num_rows=5)
    raw = to_raw(x, "int8")
    wire = pb.Tensor.FromString(encode_tensor(raw).SerializeToString())
    decoded = decode_tensor(wire)
    assert decoded == raw and decoded.row_scales == raw.row_scales
    assert torch.equal(from_raw(decoded, CPU), from_raw(raw, CPU))


def _int8_message(**changes) -> pb.Tensor:
    fields = {"data": b"\1" * 12, "dtype": "int8", "shape": [3, 4], "row_scales": b"\0" * 12}
    fields.update(changes)
    return pb.Tensor(**fields)


def test_codec_accepts_well_formed_int8():
    decoded = decode_tensor(_int8_message())
    assert decoded.shape == (3, 4) and len(decoded.row_scales) == 12


@pytest.mark.parametrize("message", [
    _int8_message(row_scales=b"\0" * 8),  # one scale short
    _int8_message(row_scales=b"\0" * 16),  # one scale too many
    _int8_message(row_scales=b"\0" * 13),  # not whole float32s
    _int8_message(dtype="float32", data=b"\0" * 48),  # scales on a float tensor
    _int8_message(dtype="uint8"),  # scales on another 1-byte dtype
    _int8_message(shape=[12], row_scales=b"\0" * 48),  # 1-D
    _int8_message(shape=[3, 2, 2]),  # 3-D with 3 "rows"
    _int8_message(data=b"", shape=[0], row_scales=b"\0" * 4),  # scales with no rows
], ids=["short", "long", "ragged", "float32", "uint8", "1-d", "3-d", "no-rows"])
def test_codec_refuses_row_scales_that_do_not_fit(message):
    with pytest.raises(WireFormatError, match="row scales"):
        decode_tensor(message)


"""GGUF layers on the integer kernels: a CPU stage in bf16 keeps Q4_0 / Q4_1 / Q4_K / Q8_0
linears as ``IntLinear`` codes and multiplies them with its kernels (MoLink's AMX kernel, or
PyTorch's int4 kernel), instead of dequantizing every weight in every forward
(``QuantLinear``, which stays for what no kernel takes: Q6_K, float32 compute, GPUs).

What is checked: the integer groups a GGUF tensor becomes are the weight ``dequantize``
gives; a bf16 stage's linears are on kernels where one takes them, each multiplies as its
own dequantized weight within the bf16 bound of ``test_quantize`` (one bf16 step of
``sum_k |x_k w_k|``), and a pipeline of three stages generates the tokens one process does;
a decode step's layers in one call (``decode_layers``) multiply the codes as the modules do;
the planner's bytes for a CPU stage are the bytes it holds, at most 0.35 of bf16 weights; a
4-bit file computes in bf16 on a CPU by default; ``QuantLinear`` multiplies 16-bit
activations in float32 where the CPU has no native bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf")

from molink import LLM
from molink.model import gguf_quants, loader
from molink.model.gguf_quants import Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, dequantize, int_weight
from molink.model.layers import decode_layers, int_amx, quant_linear
from molink.model.layers.int_linear import KERNEL_KINDS, IntLinear
from molink.model.layers.quant_linear import QuantLinear, QuantPart
from molink.model.loader import holds_int4, load_config, load_model
from molink.runtime.kv_cache import allocate_kv_cache
from molink.runtime.model_size import measure_model
from tests.model.arch_checks import greedy_tokens, make_prompts
from tests.model.gguf_factory import random_blocks, resident_weight_bytes
from tests.model.test_decode_layers import BLOCK_SIZE, NUM_BLOCKS, _Requests, _run

CPU = torch.device("cpu")
KERNEL_MODELS = ["llama-q4_0", "llama-q4_1", "llama-q8_0", "llama256-q4_k_m"]


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0, Q4_K, Q6_K])
def test_integer_groups_hold_the_dequantized_weight(ggml_type):
    rows, cols = 6, 512
    raw = torch.from_numpy(random_blocks(ggml_type, rows, cols, np.random.default_rng(0)))
    part = int_weight(raw, ggml_type, cols)
    low, high = {4: (-8, 7), 8: (-128, 127)}[part.bits]
    assert part.codes.shape == (rows, cols) and part.codes.dtype == torch.int8
    assert low <= part.codes.min().item() and part.codes.max().item() <= high
    assert part.scales.shape == (cols // part.group_size, rows)
    want = dequantize(raw, ggml_type, cols)
    got = part.dequantize()
    if not gguf_quants.INT_FORMATS[ggml_type].symmetric:  # u*d + m as (u-8)*d + (m+8d)
        scale = part.scales.t().repeat_interleave(part.group_size, 1)
        assert ((got - want).abs() <= 2.0 ** -21 * (16 * scale.abs() + want.abs())).all()
    else:
        assert part.zeros is None and torch.equal(got, want)


def _linears(model):
    return ([m for m in model.modules() if isinstance(m, IntLinear)],
            [m for m in model.modules() if isinstance(m, QuantLinear)])


@pytest.mark.parametrize("name", KERNEL_MODELS)
def test_a_bf16_cpu_stage_multiplies_gguf_layers_on_integer_kernels(name, gguf_model):
    """Layer linears on a kernel where one takes every part, else dequantized in each step
    (``QuantLinear``); the LM head on a kernel, else dequantized once into a dense bf16
    linear (Q8_0 without AMX, Q6_K)."""
    path = gguf_model(name)
    model, _ = load_model(str(path), 0, None, "bfloat16", CPU)
    ints, quants = _linears(model)
    amx = int_amx.kernels() is not None
    head_on_kernel = not name.endswith("q4_k_m") and (amx or not name.endswith("q8_0"))
    assert isinstance(model.lm_head, IntLinear) is head_on_kernel
    if not head_on_kernel:  # a 16-bit linear: the file's weight, dequantized, in bf16
        assert isinstance(model.lm_head, torch.nn.Linear)
        assert model.lm_head.weight.dtype == torch.bfloat16
    layers = [m for m in (*ints, *quants) if m is not model.lm_head]
    assert len(layers) == 4 * 4  # qkv, o, gate_up, down per layer
    if name.endswith("q8_0") and not amx:  # Q8_0's groups of 32: only the AMX kernel
        assert not ints and len(quants) == 4 * 4
        return
    assert all({b.kind for b in m.blocks} <= KERNEL_KINDS for m in ints)
    if name.endswith("q4_k_m"):  # a layer linear with a Q6_K part (v, down) stays
        assert quants and all(Q6_K in m.part_types for m in quants)
    else:
        assert not quants
    gen = torch.Generator().manual_seed(0)
    for layer in ints:
        weight = layer.weight_as(torch.bfloat16).float()  # what the kernels multiply by
        for rows in (1, 16, 70):
            x = torch.randn(rows, layer.in_features, generator=gen).bfloat16()
            reference = x.float() @ weight.t()
            bound = 2.0 ** -8 * (x.float().abs() @ weight.abs().t())
            assert ((layer(x).float() - reference).abs() <= bound).all(), (rows, layer)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_dense_lm_head_is_the_files_weight_in_the_model_dtype(dtype, gguf_model):
    """Q6_K's LM head (Q4_K_M) on a CPU: in bf16 dequantized once at load, in float32 (no
    16-bit copy there: it would take 4 bytes a weight) kept in blocks."""
    path = gguf_model("llama256-q4_k_m")
    checkpoint = load_config(str(path)).gguf
    stage, _ = load_model(str(path), 3, 4, dtype, CPU)
    expected = checkpoint.read_dense("lm_head.weight", torch.float32)
    if dtype == "float32":
        assert type(stage.lm_head) is QuantLinear
        assert torch.equal(stage.lm_head.weight_as(torch.float32), expected)
    else:
        assert isinstance(stage.lm_head, torch.nn.Linear)  # (packed for this CPU's kernels)
        assert torch.equal(stage.lm_head.weight.float(), expected.bfloat16().float())


@pytest.mark.parametrize("name", ["llama-q4_1", "llama256-q4_k_m"])
def test_the_kernels_weight_is_the_files_with_scales_and_weights_in_bf16(name, gguf_model):
    path = gguf_model(name)
    checkpoint = load_config(str(path)).gguf
    model, _ = load_model(str(path), 0, None, "bfloat16", CPU)
    for module_name, module in model.named_modules():
        if not isinstance(module, IntLinear):
            continue
        parts = [int_weight(checkpoint.read_raw(source), checkpoint.info(source).ggml_type,
                            module.in_features)
                 for source in model.checkpoint_names(f"{module_name}.weight")]
        expected = torch.cat([p._replace(
            scales=p.scales.bfloat16().float(),
            zeros=None if p.zeros is None else p.zeros.bfloat16().float()).dequantize()
            for p in parts])
        assert torch.equal(module.weight_as(torch.bfloat16), expected.bfloat16()), module_name


def test_three_bf16_stages_generate_the_tokens_of_one_process(gguf_model):
    path = gguf_model("llama-q4_1")
    prompts = make_prompts(512, (9, 17, 30))
    runs = [greedy_tokens(LLM(model=str(path), dtype="bfloat16", device="cpu", block_size=4,
                              stage_layers=stage_layers), prompts)
            for stage_layers in (None, [(0, 1), (1, 3), (3, 4)])]
    assert runs[0] == runs[1] and all(runs[0])


@pytest.mark.parametrize("name", KERNEL_MODELS)
def test_planned_bytes_of_a_bf16_cpu_stage_are_the_bytes_it_holds(name, gguf_model):
    path = gguf_model(name)
    footprint = measure_model(str(path), "bfloat16", None, 0, device=CPU).footprint
    n = footprint.num_layers
    for start, end in [(0, 1), (1, n - 1), (n - 1, n), (0, n)]:
        model, _ = load_model(str(path), start, end, "bfloat16", CPU)
        assert footprint.weight_bytes(start, end) == resident_weight_bytes(model), (start, end)


def test_a_four_bit_bf16_cpu_stage_holds_at_most_035_of_its_bf16_size(gguf_model):
    path = gguf_model("llama256-q4_k_m")
    dense = measure_model(str(path.parent / "hf"), "bfloat16", None, 0).footprint
    four_bit = measure_model(str(path), "bfloat16", None, 0, device=CPU).footprint
    for layer in range(dense.num_layers):
        assert four_bit.layer_weight_bytes[layer] <= 0.35 * dense.layer_weight_bytes[layer]


@pytest.mark.parametrize("name,four_bit", [("llama-q4_0", True), ("llama256-q4_k_m", True),
                                           ("llama-q8_0", False)])
def test_a_four_bit_file_computes_in_bf16_on_a_cpu_by_default(name, four_bit, gguf_model):
    loaded = load_config(str(gguf_model(name)))
    assert holds_int4(loaded, None) is four_bit
    chosen = loader.resolve_dtype("auto", loaded.arch, CPU, holds_int4(loaded, None))
    assert chosen == (torch.bfloat16 if four_bit else torch.float32)
    assert loader.resolve_dtype("auto", loaded.arch, torch.device("cuda"),
                                holds_int4(loaded, None)) == torch.float32


@pytest.mark.parametrize("lacks_bf16", [True, False])
def test_quant_linear_multiplies_in_float32_where_the_cpu_lacks_bf16(lacks_bf16, monkeypatch):
    monkeypatch.setattr(quant_linear, "cpu_lacks_native_bf16", lambda: lacks_bf16)
    rng = np.random.default_rng(1)
    layer = QuantLinear(256, [QuantPart(Q6_K, 48)], bias=False)
    layer.part0.copy_(torch.from_numpy(random_blocks(Q6_K, 48, 256, rng)))
    x = torch.randn(5, 256).bfloat16()
    weight = dequantize(layer.part0, Q6_K, 256)
    expected = (F.linear(x.float(), weight).bfloat16() if lacks_bf16
                else F.linear(x, weight.bfloat16()))
    assert torch.equal(layer(x), expected)


@pytest.mark.skipif(int_amx.kernels() is None, reason="no AMX kernel on this CPU")
@pytest.mark.parametrize("name", ["llama-q4_0", "llama-q4_1", "llama-q8_0"])
def test_a_decode_step_of_gguf_codes_runs_in_one_call_as_the_modules(name, gguf_model):
    """4-bit codes without and with zeros and 8-bit codes in groups of 32 (Q4_0, Q4_1,
    Q8_0): ``decode_layers`` multiplies them as ``IntLinear`` does, bit for bit."""
    results = []
    for at_once in (True, False):
        model, _ = load_model(str(gguf_model(name)), 0, None, "bfloat16", CPU)
        assert model.body.decode_layers is not None
        assert model.body.decode_layers.kind == decode_layers.AMX_INT
        if not at_once:
            model.body.decode_layers = None
        allocate_kv_cache(model.attention_layers(), NUM_BLOCKS, BLOCK_SIZE, torch.bfloat16, CPU)
        results.append(_run([model], _Requests([3, 11, 6], vocab=400), steps=3))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_a_tokenizer_the_builders_reject_is_a_value_error(gguf_model, monkeypatch):
    """The tokenizers library raises a bare ``Exception`` for some vocabularies (a GGUF
    without the byte-level alphabet: "Error while initializing BPE"): the CLI's one clear
    line, not a traceback."""
    from transformers import AutoTokenizer

    from molink.model.tokenizer_files import load_tokenizer

    def reject(*args, **kwargs):
        raise Exception("Error while initializing BPE: Token `ð` out of vocabulary")  # noqa: TRY002

    path = str(gguf_model("llama-q4_0"))  # (built with the real tokenizer)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", reject)
    with pytest.raises(ValueError, match="could not load a tokenizer from .*out of vocabulary"):
        load_tokenizer(path)


def test_the_load_log_says_how_gguf_linears_are_held(gguf_model, caplog):
    """float32 keeps 4-bit linears on the dequantize-each-step path: the log says bfloat16
    would put them on integer kernels (where it already does, it says nothing more)."""
    path = str(gguf_model("llama-q4_0"))
    with caplog.at_level("INFO", logger="molink.model.loader"):
        load_model(path, 0, None, "float32", CPU)
        load_model(path, 0, None, "bfloat16", CPU)
    float32, bfloat16 = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert "0 linears on integer kernels, 17 dequantized in each step (--dtype bfloat16 " \
           "would put them on integer kernels)" in float32
    assert "(bfloat16, GGUF weights: 17 linears on integer kernels)" in bfloat16


def test_a_node_offers_a_four_bit_gguf_in_the_dtype_it_loads_it_in(gguf_model, monkeypatch):
    """Automatic placement: the offer's layer timing and sizes in bf16, as the load."""
    from molink.runtime import node_budget

    timed = []
    monkeypatch.setattr(node_budget, "measure_layer_seconds",
                        lambda params, hidden, dtype, device: timed.append(dtype) or 0.001)
    node_budget.measure_offer(str(gguf_model("llama-q4_0")), "auto", CPU, 2**30, None)
    assert timed == [torch.bfloat16]

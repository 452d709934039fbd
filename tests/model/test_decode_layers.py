"""A decode step's layers in one C call (``decode_layers``): the same hidden states and KV
cache as the modules, bit for bit, for the models and stages it covers; the modules for
every step or model it does not."""

from __future__ import annotations

import copy
import pickle
from unittest.mock import patch

import pytest
import torch

from molink import LLM, SamplingParams
from molink.messages import BatchEntry
from molink.model import loader
from molink.model.layers import decode_layers, fused16, int_amx
from molink.model.layers.int_linear import IntLinear
from molink.model.weight_quant import quantize_int8
from molink.runtime.kv_cache import allocate_kv_cache
from molink.runtime.step_inputs import build_step_inputs
from tests.model.arch_checks import NUM_NEW_TOKENS, SCENARIOS, make_prompts

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 128
FUSED = fused16.kernels()
AMX = int_amx.kernels()
pytestmark = pytest.mark.skipif(FUSED is None, reason=f"no fused kernels: "
                                                      f"{fused16.unsupported_reason()}")
# the products' kind, the dtype and the weights' quantization: MoLink's AMX kernel for bf16
# weights or int8 / int4 codes (where the CPU has AMX; int4: groups with zeros), or
# fused16's widened-weight product (what a CPU without native bf16 gets; forced here)
AMX16, AMX_INT, FUSED16 = decode_layers.AMX16, decode_layers.AMX_INT, decode_layers.FUSED16
NEEDS_AMX = pytest.mark.skipif(AMX is None, reason=f"no AMX kernel: {int_amx.unsupported_reason()}")
AMX_FLAVORS = [pytest.param((AMX16, torch.bfloat16, None), id="amx-bf16", marks=NEEDS_AMX),
               pytest.param((AMX_INT, torch.bfloat16, "int8"), id="amx-int8", marks=NEEDS_AMX),
               pytest.param((AMX_INT, torch.bfloat16, "int4"), id="amx-int4", marks=NEEDS_AMX)]
FUSED_BF16 = pytest.param((FUSED16, torch.bfloat16, None), id="fused-bf16")
FLAVORS = [*AMX_FLAVORS, FUSED_BF16,
           pytest.param((FUSED16, torch.float16, None), id="fused-fp16")]
DEFAULT = (AMX16 if AMX is not None else FUSED16, torch.bfloat16, None)


def _stage(directory, start: int, end: int | None, at_once: bool, flavor=DEFAULT):
    kind, dtype, quantization = flavor
    with patch.object(loader, "cpu_lacks_native_bf16", lambda: kind == FUSED16):
        model, _ = loader.load_model(str(directory), start, end, str(dtype).split(".")[1], CPU,
                                     quantization=quantization)
    assert model.body.decode_layers is not None
    assert model.body.decode_layers.kind == kind
    if not at_once:
        model.body.decode_layers = None
    allocate_kv_cache(model.attention_layers(), NUM_BLOCKS, BLOCK_SIZE, dtype, CPU)
    return model


class _Requests:
    """Prompts of different lengths over scattered blocks, prefilled, then decoded together."""

    def __init__(self, lengths: list[int], vocab: int, seed: int = 0, blocks_each: int = 16):
        gen = torch.Generator().manual_seed(seed)
        self.ids = {f"r{i}": torch.randint(3, vocab, (n,), generator=gen).tolist()
                    for i, n in enumerate(lengths)}
        order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.blocks = {rid: order[i * blocks_each:(i + 1) * blocks_each]
                       for i, rid in enumerate(self.ids)}

    def step(self, entries, stage):
        return build_step_inputs(entries, self.ids, self.blocks, BLOCK_SIZE, CPU,
                                 with_input_ids=stage.is_first)

    def prefill(self):
        return [BatchEntry(rid, 0, len(ids), True) for rid, ids in self.ids.items()]

    def decode(self):
        return [BatchEntry(rid, len(ids) - 1, 1, True) for rid, ids in self.ids.items()]


@torch.no_grad()
def _run(stages, requests: _Requests, steps: int) -> list[torch.Tensor]:
    """Prefill, then ``steps`` decode steps of every request (greedy): each step's last
    hidden states."""
    outputs = []
    for number in range(steps + 1):
        entries = requests.prefill() if number == 0 else requests.decode()
        hidden = None
        for stage in stages:
            inputs = requests.step(entries, stage)
            hidden = stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids,
                           hidden_states=hidden)
        outputs.append(hidden)
        rows = torch.tensor([i for i, _ in enumerate(entries)]) if number else torch.tensor(
            [sum(len(ids) for ids in list(requests.ids.values())[:i + 1]) - 1
             for i in range(len(entries))])
        tokens = stages[-1].compute_logits(hidden[rows]).argmax(-1).tolist()
        for rid, token in zip(requests.ids, tokens):
            requests.ids[rid].append(token)
    return outputs


@torch.no_grad()
def _random_biases(stage) -> None:
    gen = torch.Generator().manual_seed(5)
    for module in stage.modules():
        if isinstance(module, (torch.nn.Linear, IntLinear)) and module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)


def _count_calls(runner, calls: list) -> None:
    original = runner._run
    runner._run = lambda *args: calls.append(1) or original(*args)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral-window"])
def test_a_decode_step_is_the_modules_bit_for_bit(tiny_model_dir, name, flavor):
    """Llama; Qwen2 (biases); Qwen3 (per-head q/k norms); Mistral with a window shorter
    than the contexts; each with either kind of product: hidden states of every step and
    the KV caches identical."""
    directory = tiny_model_dir(name)
    results, calls = {}, []
    for at_once in (True, False):
        stages = [_stage(directory, 0, None, at_once, flavor)]
        _random_biases(stages[0])  # the checkpoint's are zeros
        if at_once:
            _count_calls(stages[0].body.decode_layers, calls)
        requests = _Requests([3, 17, 30, 9], vocab=400)
        results[at_once] = (_run(stages, requests, steps=12), requests.ids,
                            [a.kv_cache for a in stages[0].attention_layers()])
    assert len(calls) == 12  # every decode step in one call
    (ours, ours_ids, ours_caches), (theirs, their_ids, their_caches) = results.values()
    assert ours_ids == their_ids
    for got, expected in zip(ours, theirs):
        assert torch.equal(got, expected)
    for got, expected in zip(ours_caches, their_caches):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("flavor", [*AMX_FLAVORS, FUSED_BF16])
def test_each_stage_of_a_pipeline_runs_its_own_layers(tiny_model_dir, flavor):
    """First, middle and last stages (hidden states in, residual out): the modules' results,
    and the input the previous stage handed over untouched."""
    directory = tiny_model_dir("llama")
    ranges = [(0, 1), (1, 3), (3, None)]
    results = {}
    for at_once in (True, False):
        stages = [_stage(directory, start, end, at_once, flavor) for start, end in ranges]
        results[at_once] = _run(stages, _Requests([5, 22], vocab=400, seed=1), steps=6)
    for got, expected in zip(*results.values()):
        assert torch.equal(got, expected)
    stage = _stage(directory, 1, 3, True, flavor)
    requests = _Requests([5], vocab=400)
    inputs = requests.step(requests.prefill(), stage)
    stage(inputs.positions, inputs.meta, hidden_states=torch.randn(5, 64).bfloat16())
    requests.ids["r0"].append(7)
    inputs = requests.step(requests.decode(), stage)
    handed_over = torch.randn(1, 64).bfloat16()
    before = handed_over.clone()
    stage(inputs.positions, inputs.meta, hidden_states=handed_over)
    assert torch.equal(handed_over, before)


def test_steps_it_does_not_cover_run_the_modules(tiny_model_dir):
    """Prefill and steps mixing prefill and decode go through the modules; a decode step
    through one call."""
    stage = _stage(tiny_model_dir("llama"), 0, None, True)
    calls = []
    _count_calls(stage.body.decode_layers, calls)
    requests = _Requests([6, 11], vocab=400)
    with torch.no_grad():
        inputs = requests.step(requests.prefill(), stage)
        stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids)
        assert not calls
        requests.ids["r0"].append(5)
        requests.ids["r1"] += [5, 6, 7]  # r1: a 3-token chunk beside r0's decode token
        entries = [BatchEntry("r0", 6, 1, True), BatchEntry("r1", 11, 3, True)]
        inputs = requests.step(entries, stage)
        stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids)
        assert not calls
        inputs = requests.step([BatchEntry("r0", 6, 1, True)], stage)
        stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids)
        assert calls == [1]


@pytest.mark.parametrize("sequences", [fused16.MAX_ROWS, fused16.MAX_ROWS + 1])
def test_fused16_products_take_steps_up_to_their_row_limit(tiny_model_dir, sequences):
    """Beyond ``fused16.MAX_ROWS`` rows TiledCpuLinear multiplies otherwise (a widened
    float32 GEMM): such steps run the modules, with the same results."""
    directory = tiny_model_dir("llama")
    results, calls = [], []
    for at_once in (True, False):
        stage = _stage(directory, 0, None, at_once, (FUSED16, torch.bfloat16, None))
        if at_once:
            _count_calls(stage.body.decode_layers, calls)
        requests = _Requests([2] * sequences, vocab=400, seed=3, blocks_each=1)
        results.append(_run([stage], requests, steps=1))
    assert len(calls) == (1 if sequences <= fused16.MAX_ROWS else 0)
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("flavor", AMX_FLAVORS)
def test_steps_of_more_rows_than_one_amx_call_takes(tiny_model_dir, flavor):
    """70 sequences at once: codes multiply in calls of 64 rows and 6 (int4: each call with
    its rows' group sums)."""
    directory = tiny_model_dir("qwen2")
    results = []
    for at_once in (True, False):
        stage = _stage(directory, 0, None, at_once, flavor)
        _random_biases(stage)
        results.append(_run([stage], _Requests([2] * 70, vocab=400, seed=4, blocks_each=1),
                            steps=2))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def _replace_cache(stage):
    allocate_kv_cache(stage.attention_layers(), NUM_BLOCKS, BLOCK_SIZE, torch.bfloat16, CPU)


def _replace_weight(stage):
    linear = stage.body.layer_list[1].mlp._down
    if isinstance(linear, IntLinear):  # new codes and scales (int4: now int8 codes)
        linear.set_weight([quantize_int8(linear.weight * 2, torch.bfloat16)], torch.bfloat16, CPU)
    else:
        linear.set_weight(linear.weight * 2)


def _shift_bias_in_place(stage):
    stage.body.layer_list[0].self_attn._qkv_proj.bias.add_(0.5)


@pytest.mark.parametrize("flavor", [*AMX_FLAVORS, FUSED_BF16])
@pytest.mark.parametrize("change", [_replace_cache, _replace_weight, _shift_bias_in_place])
def test_what_the_layers_point_at_is_followed_when_it_changes(tiny_model_dir, change, flavor):
    """The descriptors follow a newly bound KV cache, a replaced weight and a bias changed
    in place (whose float32 copy is rebuilt), as the modules do."""
    directory = tiny_model_dir("qwen2")  # biases on q, k, v
    results = []
    for at_once in (True, False):
        stage = _stage(directory, 0, None, at_once, flavor)
        first = _run([stage], _Requests([4, 9], vocab=400), steps=2)
        with torch.no_grad():
            change(stage)
        results.append(first + _run([stage], _Requests([7, 3], vocab=400, seed=2), steps=3))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_a_slot_outside_the_cache_raises_instead_of_writing_past_it(tiny_model_dir):
    stage = _stage(tiny_model_dir("llama"), 0, None, True)
    requests = _Requests([5], vocab=400)
    with torch.no_grad():
        inputs = requests.step(requests.prefill(), stage)
        stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids)
        requests.ids["r0"].append(3)
        inputs = requests.step(requests.decode(), stage)
        inputs.meta.slot_mapping[0] = NUM_BLOCKS * BLOCK_SIZE
        with pytest.raises(IndexError):
            stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids)


@pytest.mark.parametrize("name,dtype,reason", [
    ("llama", "float32", ""),  # no 16-bit kernels at all
    ("llama", "float16", "a Linear product"),  # native bf16: float16 stays nn.Linear
    ("gemma2", "bfloat16", "layout"),
    ("glm", "bfloat16", "rotary"),
])
def test_models_it_does_not_cover_keep_the_modules(tiny_model_dir, caplog, name, dtype, reason):
    with caplog.at_level("INFO", logger="molink.model.layers.decode_layers"), patch.object(
            loader, "cpu_lacks_native_bf16", lambda: False):
        model, _ = loader.load_model(str(tiny_model_dir(name)), 0, None, dtype, CPU)
    assert model.body.decode_layers is None
    assert reason in caplog.text


def test_a_copied_or_pickled_model_runs_the_modules(tiny_model_dir):
    model = _stage(tiny_model_dir("llama"), 0, None, True)
    assert copy.deepcopy(model).body.decode_layers is None
    assert pickle.loads(pickle.dumps(model)).body.decode_layers is None
    assert model.body.decode_layers is not None
    assert decode_layers.layer_reason(model.body.layer_list[0]) is None


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_engine_s_answers_are_the_modules_in_every_scheduling_scenario(
        tiny_model_dir, scenario):
    """Continuous batching through the engine (block sizes that do and do not divide the
    prompts, chunked prefill beside decodes, preemption and recompute), bf16: the same
    greedy tokens and logprobs with the layers in one call as with the modules."""
    prompts = make_prompts(400)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                            logprobs=2)
    answers, calls = {}, []
    for at_once in (True, False):
        with patch.object(loader, "use_decode_layers", decode_layers.use_decode_layers
                          if at_once else lambda model, fused: 0):
            llm = LLM(model=str(tiny_model_dir("qwen3")), dtype="bfloat16", device="cpu",
                      **SCENARIOS[scenario])
        if at_once:
            (executor,) = llm.llm_engine.executors
            _count_calls(executor.model.body.decode_layers, calls)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        if scenario.endswith("preempt"):
            assert llm.llm_engine.scheduler.num_preemptions > 0
        answers[at_once] = [(o.outputs[0].token_ids, [sorted(d.items()) for d in
                                                      o.outputs[0].logprobs]) for o in outputs]
    assert calls  # the decode steps went through the one call
    assert answers[True] == answers[False]

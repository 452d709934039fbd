"""GGUF models: weights stay quantized, logits and greedy tokens equal ``transformers``'.

Tiny models are written as GGUF by ``tests.model.gguf_factory`` (the ``gguf`` package's
writer and quantizers) and loaded through the real path (``load_model``, ``LLM``). The
reference is ``transformers`` reading the same file (its GGUF loader dequantizes every
tensor with ``gguf.quants.dequantize``, un-permutes q/k itself) into its own model.

Tolerances: both sides compute in float32 from bit-identical dequantized weights (checked
below), so logits differ only by operation order: ``LOGIT_TOL`` (1e-4), as for every other
architecture against ``transformers``; greedy tokens must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q

from molink.coordinator.tokenizer import load_tokenizer
from molink.model import gguf as gguf_module
from molink.model.gguf_quants import dequantize
from molink.model.layers.quant_linear import QuantEmbedding, QuantLinear
from molink.model.loader import config_fingerprint, load_config
from molink.runtime.model_size import measure_model
from tests.model.arch_checks import LOGIT_TOL, greedy_tokens, make_prompts
from tests.model.gguf_factory import MODELS, random_blocks, resident_weight_bytes, write_gguf
from tests.model.helpers import load_stages, prompt_logits

THREE_STAGES = [(0, 1), (1, 3), (3, None)]


def transformers_logits(path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    names_from = model
    if config.model_type == "mistral":  # its GGUF tensor names are llama's (gguf-py has no
        from transformers import LlamaConfig, LlamaForCausalLM  # "mistral"): same parameters

        values = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        names_from = LlamaForCausalLM(LlamaConfig(**values))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                   model_to_load=names_from)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the embedding
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in prompts], model


# ---------------------------------------------------------------------------------------------
# Dequantization, block by block.


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16])
def test_dequantize_equals_gguf_package(ggml_type):
    """Random blocks (random scales included) dequantize bit-identically to ``gguf``'s."""
    from gguf.quants import dequantize as reference

    rows, cols = 6, 512
    rng = np.random.default_rng(int(ggml_type))
    raw = random_blocks(int(ggml_type), rows, cols, rng)
    if ggml_type == Q.F16:
        raw = rng.normal(size=(rows, cols)).astype(np.float16).view(np.uint8)
    expected = torch.from_numpy(reference(raw, ggml_type).astype(np.float32))
    ours = dequantize(torch.from_numpy(raw), int(ggml_type), cols)
    assert ours.shape == expected.shape == (rows, cols)
    nan = ours.isnan()  # random BF16 bits include NaNs (compared as a pattern)
    assert torch.equal(nan, expected.isnan())
    assert torch.equal(ours[~nan], expected[~nan])


# ---------------------------------------------------------------------------------------------
# Whole models against transformers.


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers_whole_and_split(name, gguf_model):
    path = gguf_model(name)
    prompts = make_prompts(512, (23, 40))
    expected, _ = transformers_logits(path, prompts)
    whole = load_stages(path, [(0, None)])
    split = load_stages(path, THREE_STAGES)
    for prompt, reference in zip(prompts, expected):
        assert (prompt_logits(whole, prompt) - reference).abs().max().item() <= LOGIT_TOL
        chunked = prompt_logits(split, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (chunked - reference).abs().max().item() <= LOGIT_TOL
    quantized = [m for m in whole[0].modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 4 * 4 + 1  # qkv, o, gate_up, down per layer; the LM head
    if name.endswith("q4_k_m"):  # llama.cpp's mix: v_proj in Q6_K next to Q4_K q and k
        assert quantized[0].part_types == [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    if name.startswith("qwen2"):  # tied: the LM head reads the embedding's own bytes
        embedding = whole[0].model.embed_tokens
        assert isinstance(embedding, QuantEmbedding)
        assert whole[0].lm_head.part0.data_ptr() == embedding.part0.data_ptr()


@pytest.mark.parametrize("name", ["llama-q4_0", "llama256-q4_k_m"])
def test_greedy_tokens_match_transformers_single_and_three_stages(name, gguf_model):
    from molink import LLM

    path = gguf_model(name)
    prompts = make_prompts(512, (5, 16, 23))
    _, model = transformers_logits(path, [])
    model.generation_config.eos_token_id = None
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 pad_token_id=3)  # (no mask: HF would infer one from pad ids)
            expected.append(out[0, len(prompt):].tolist())
    for stage_layers in (None, [(0, 1), (1, 3), (3, 4)]):
        llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=4,
                  stage_layers=stage_layers)
        assert greedy_tokens(llm, prompts) == expected, stage_layers


def test_four_bit_stage_holds_at_most_035_of_its_bf16_size(gguf_model):
    """Measured: bytes of the storages behind the stage's parameters and buffers."""
    path = gguf_model("llama256-q4_k")
    for start, end in THREE_STAGES:
        (stage,) = load_stages(path, [(start, end)])
        bf16_bytes = 2 * sum(
            m.in_features * m.out_features for m in stage.modules() if isinstance(m, QuantLinear))
        bf16_bytes += 2 * sum(p.numel() for p in stage.parameters())  # norms (+ embedding)
        for module in stage.modules():
            if isinstance(module, QuantEmbedding):
                bf16_bytes += 2 * module.part0.shape[0] * module.embedding_dim
        resident = resident_weight_bytes(stage)
        assert resident <= 0.35 * bf16_bytes, (start, end, resident, bf16_bytes)


@pytest.mark.parametrize("name", ["llama256-q4_k_m", "llama-q4_0"])
def test_planned_bytes_of_a_gguf_stage_are_the_bytes_it_holds(name, gguf_model):
    """``molink plan`` and automatic placement size a GGUF model by the file's own types."""
    path = gguf_model(name)
    footprint = measure_model(str(path), "float32", None, kv_tokens=0).footprint
    n = footprint.num_layers
    for start, end in [(0, 1), (1, n - 1), (n - 1, n), (0, n)]:
        (stage,) = load_stages(path, [(start, end)])
        assert footprint.weight_bytes(start, end) == resident_weight_bytes(stage), (start, end)


# ---------------------------------------------------------------------------------------------
# Reading: only the stage's tensors; split sets; config, tokenizer, fingerprint.


def test_a_stage_reads_only_its_own_tensors(gguf_model, monkeypatch):
    path = gguf_model("llama-q8_0")
    read = []
    real = gguf_module.GGUFCheckpoint.read_raw
    monkeypatch.setattr(gguf_module.GGUFCheckpoint, "read_raw",
                        lambda self, name: read.append(self.gguf_name(name)) or real(self, name))
    load_stages(path, [(1, 3)])
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")
    assert sorted(read) == sorted(f"blk.{i}.{t}.weight" for i in (1, 2) for t in per_layer)


def test_split_set_loads_like_the_single_file(gguf_model, tmp_path):
    single = gguf_model("llama-q4_0")
    hf_dir = single.parent / "hf"
    write_gguf(hf_dir, tmp_path / "m.gguf", Q.Q4_0, max_tensors_per_file=12)
    files = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert files == [f"m-0000{i}-of-00004.gguf" for i in (1, 2, 3, 4)]
    (prompt,) = make_prompts(512, (23,))
    expected = prompt_logits(load_stages(single, [(0, None)]), prompt)
    for target in (tmp_path, tmp_path / files[0]):  # the directory, or its first file
        got = prompt_logits(load_stages(target, THREE_STAGES), prompt)
        assert torch.equal(got, expected)
    assert config_fingerprint(str(tmp_path)) == config_fingerprint(str(single))
    assert config_fingerprint(str(single)) != config_fingerprint(str(gguf_model("llama-q8_0")))


@pytest.mark.parametrize("name", ["llama-q4_0", "qwen2-q8_0", "mistral-q8_0"])
def test_config_equals_the_one_transformers_reads(name, gguf_model):
    from transformers import AutoConfig

    path = gguf_model(name)
    loaded = load_config(str(path))
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs.architectures = loaded.hf_config.architectures
    assert loaded.model_class.arch_config(theirs) == loaded.arch
    assert loaded.arch.tie_word_embeddings == name.startswith("qwen2")


def test_config_and_tokenizer_come_from_the_metadata(gguf_model):
    from tests.tokenizer_factory import CHAT_TEMPLATE

    path = gguf_model("llama-q4_0")
    arch = load_config(str(path)).arch
    assert (arch.architecture, arch.num_layers, arch.hidden_size, arch.num_kv_heads,
            arch.vocab_size, arch.eos_token_ids) == ("LlamaForCausalLM", 4, 64, 2, 512, (1,))
    tokenizer = load_tokenizer(str(path))
    original = load_tokenizer(str(path.parent / "hf"))
    text = "Hello, world! Ça va? 你好"
    assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token_id == 1


def test_unsupported_inputs_are_value_errors(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF models"):
        load_config(str(tmp_path))
    (tmp_path / "b.gguf").unlink()
    (tmp_path / "m-00001-of-00002.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="lacks m-00002-of-00002.gguf"):
        load_config(str(tmp_path / "m-00001-of-00002.gguf"))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_config(str(tmp_path / "a.gguf"))


def test_an_emulated_gpu_reads_the_bytes_a_quantized_layer_is_stored_in(gguf_model):
    from molink.runtime.device_profile import GPUS
    from molink.runtime.model_size import emulated_profile

    path = gguf_model("llama256-q4_k")
    overhead = GPUS["rtx3090"].step_overhead_ms_per_layer
    quantized = emulated_profile("rtx3090", str(path), "bfloat16").step_ms(1, 1, 0, 0)
    dense = emulated_profile("rtx3090", str(path.parent / "hf"), "bfloat16").step_ms(1, 1, 0, 0)
    stored = measure_model(str(path), "bfloat16", None, 0).footprint.layer_weight_bytes[0]
    bf16 = measure_model(str(path.parent / "hf"), "bfloat16", None, 0).footprint.layer_weight_bytes[0]
    assert stored < 0.35 * bf16
    # A decode step of one token is memory-bound: its time beyond the fixed overhead
    # scales with the bytes read.
    assert (quantized - overhead) / (dense - overhead) == pytest.approx(stored / bf16, rel=1e-6)

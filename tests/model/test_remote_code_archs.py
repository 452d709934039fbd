"""Remote-code checkpoints (Baichuan, ChatGLM2/3, Qwen 1), read natively, equal their references.

No remote code runs anywhere. Where a checkpoint's math equals a native ``transformers``
architecture, a tiny native model is rewritten into the remote-code layout (tensor names,
fused tensors, config keys) and the NATIVE model is the reference:

* Baichuan, rotary (7B layout)  == Llama with q|k|v packed into ``W_pack``; with Baichuan2's
  NormHead == that Llama with its ``lm_head`` rows normalised beforehand;
* Qwen 1                        == Qwen2 without GQA (``c_attn`` = q|k|v, ``w2`` the gate).

Where it does not, the reference is a plain-PyTorch forward written from the original
formulas (one request, no cache, everything recomputed for every generated token):

* ChatGLM2/3 (rotary on half of each head, adjacent dims paired). The reference itself is
  checked against transformers' ``GlmForCausalLM`` (GLM-4's native port of the same math);
* Baichuan with ALiBi (13B layout), Qwen 1 with ``rotary_pct < 1``, and a ChatGLM with every
  non-default layout flag.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from molink import LLM
from molink.model.baichuan import BaichuanForCausalLM
from molink.model.chatglm import ChatGLMForConditionalGeneration
from molink.model.loader import load_config
from molink.model.qwen import QWenLMHeadModel
from tests.model.arch_checks import (LOGIT_TOL, NUM_NEW_TOKENS, SCENARIOS, greedy_tokens,
                                     hf_greedy, make_prompts)
from tests.model.helpers import load_stages, prompt_logits
from tests.model_factory import (VOCAB_SIZE, build_model_from_config, llama_config, load_hf,
                                 qwen2_config)
from tests.tokenizer_factory import build_tokenizer

Logits = Callable[[list[int]], torch.Tensor]  # prompt -> [len(prompt), vocab] fp32
SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=3)


@dataclass
class Case:
    directory: Path  # the remote-code layout MoLink loads
    num_layers: int
    reference: Logits
    greedy: Callable[[], tuple[list[list[int]], list[list[int]]]]  # (prompts, continuations)


# ---------------------------------------------------------------------------------------------
# The checks (arch_checks' checks, with the reference given separately from the model).


def check_prompt_logits(case: Case, lengths=(23, 40)) -> None:
    stages = load_stages(case.directory, [(0, None)])
    for prompt in make_prompts(VOCAB_SIZE, lengths):
        expected = case.reference(prompt)
        whole = prompt_logits(stages, prompt)
        chunked = prompt_logits(stages, prompt, chunks=[3, 9, len(prompt) - 12])
        assert (whole - expected).abs().max().item() <= LOGIT_TOL
        assert (chunked - expected).abs().max().item() <= LOGIT_TOL


def check_layer_split(case: Case, length: int = 40) -> None:
    (prompt,) = make_prompts(VOCAB_SIZE, (length,))
    whole = prompt_logits(load_stages(case.directory, [(0, None)]), prompt)
    n, mid = case.num_layers, case.num_layers // 2
    for ranges in ([(0, mid), (mid, None)], [(0, 1), (1, n - 1), (n - 1, None)]):
        split = prompt_logits(load_stages(case.directory, ranges), prompt)
        assert (split - whole).abs().max().item() <= 1e-5, ranges


def check_greedy(case: Case, scenario: str, **llm_options) -> None:
    prompts, expected = case.greedy()
    options = dict(SCENARIOS[scenario], **llm_options)
    llm = LLM(model=str(case.directory), dtype="float32", device="cpu", **options)
    assert greedy_tokens(llm, prompts) == expected
    if scenario.endswith("preempt"):
        assert llm.llm_engine.scheduler.num_preemptions > 0


def native_reference(directory: Path) -> tuple[Logits, Callable]:
    model = load_hf(directory)

    @torch.no_grad()
    def logits(prompt: list[int]) -> torch.Tensor:
        return model(torch.tensor([prompt])).logits[0].float()

    return logits, lambda: hf_greedy(directory)


def plain_reference(logits: Logits) -> tuple[Logits, Callable]:
    @functools.cache
    def greedy():
        prompts = make_prompts(VOCAB_SIZE)
        return prompts, [_greedy_continuation(logits, p) for p in prompts]

    return logits, greedy


def _greedy_continuation(logits: Logits, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NUM_NEW_TOKENS):
        ids.append(int(logits(ids)[-1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch references, written from the original remote-code formulas.


def _linear(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    out = x @ w[f"{name}.weight"].T
    bias = w.get(f"{name}.bias")
    return out if bias is None else out + bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _causal_attention(q, k, v, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (head h reads k/v head h // (H / Hkv)) -> [T, H * D]."""
    num_tokens, num_heads, head_dim = q.shape
    k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    v = v.repeat_interleave(num_heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(num_tokens, -1)


def _rotate_half_prefix(x: torch.Tensor, positions: torch.Tensor, rot: int, base: float):
    """Llama / Qwen rotary (dim i paired with i + rot/2) on the first ``rot`` dims of [T, H, D]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [T, 1, rot]
    cos, sin = angles.cos(), angles.sin()
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = torch.cat((-x_rot[..., rot // 2:], x_rot[..., :rot // 2]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def chatglm_reference(directory: Path) -> Logits:
    """ChatGLM2/3 forward, from modeling_chatglm.py's formulas."""
    w, c = _tensors(directory), _config(directory)
    num_heads, head_dim = c["num_attention_heads"], c["kv_channels"]
    num_groups = c["multi_query_group_num"] if c["multi_query_attention"] else num_heads
    rot = head_dim // 2  # the rope cache covers half of each head
    theta = 1.0 / ((10000 * c.get("rope_ratio", 1)) ** (torch.arange(0, rot, 2).float() / rot))
    eps = c["layernorm_epsilon"]

    def norm(name, x):
        if c["rmsnorm"]:
            return _rms_norm(x, w[f"{name}.weight"], eps)
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def rope(x, positions):  # one adjacent pair (2i, 2i+1) at a time
        out = x.clone()
        for i in range(rot // 2):
            angle = (positions.float() * theta[i])[:, None]  # [T, 1]
            a, b = x[..., 2 * i], x[..., 2 * i + 1]
            out[..., 2 * i] = a * angle.cos() - b * angle.sin()
            out[..., 2 * i + 1] = b * angle.cos() + a * angle.sin()
        return out

    @torch.no_grad()
    def logits(prompt: list[int]) -> torch.Tensor:
        n = len(prompt)
        positions = torch.arange(n)
        h = w["transformer.embedding.word_embeddings.weight"][torch.tensor(prompt)]
        for layer in range(c["num_layers"]):
            p = f"transformer.encoder.layers.{layer}"
            ln = norm(f"{p}.input_layernorm", h)
            qkv = _linear(w, f"{p}.self_attention.query_key_value", ln)
            if c["multi_query_attention"]:
                q, k, v = qkv.split([num_heads * head_dim] + [num_groups * head_dim] * 2, dim=-1)
                q, k, v = (t.reshape(n, -1, head_dim) for t in (q, k, v))
            else:
                q, k, v = qkv.reshape(n, num_heads, 3 * head_dim).split(head_dim, dim=-1)
            attn = _causal_attention(rope(q, positions), rope(k, positions), v)
            attn = _linear(w, f"{p}.self_attention.dense", attn)
            post_ln = c["apply_residual_connection_post_layernorm"]
            h = (ln if post_ln else h) + attn
            ln = norm(f"{p}.post_attention_layernorm", h)
            a, b = _linear(w, f"{p}.mlp.dense_h_to_4h", ln).chunk(2, dim=-1)
            h = (ln if post_ln else h) + _linear(w, f"{p}.mlp.dense_4h_to_h", F.silu(a) * b)
        if c["post_layer_norm"]:
            h = norm("transformer.encoder.final_layernorm", h)
        return _linear(w, "transformer.output_layer", h)

    return logits


def _baichuan_alibi_slopes(n: int) -> list[float]:
    """The original's ``_get_interleave``."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _baichuan_alibi_slopes(2 * closest)[0::2][: n - closest]


def baichuan_alibi_reference(directory: Path) -> Logits:
    """Baichuan-13B / Baichuan2-13B forward: ALiBi bias slope_h * key_position, no rotary."""
    w, c = _tensors(directory), _config(directory)
    num_heads, eps = c["num_attention_heads"], c["rms_norm_eps"]
    slopes = torch.tensor(_baichuan_alibi_slopes(num_heads))
    head = w["lm_head.weight"]
    if c.get("norm_head"):
        head = F.normalize(head, dim=-1)

    @torch.no_grad()
    def logits(prompt: list[int]) -> torch.Tensor:
        n = len(prompt)
        bias = slopes[:, None, None] * torch.arange(n).float()[None, None, :]  # [H, 1, T]
        h = w["model.embed_tokens.weight"][torch.tensor(prompt)]
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            x = _rms_norm(h, w[f"{p}.input_layernorm.weight"], eps)
            q, k, v = (t.reshape(n, num_heads, -1)
                       for t in _linear(w, f"{p}.self_attn.W_pack", x).chunk(3, dim=-1))
            h = h + _linear(w, f"{p}.self_attn.o_proj", _causal_attention(q, k, v, bias))
            x = _rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
            gated = F.silu(_linear(w, f"{p}.mlp.gate_proj", x)) * _linear(w, f"{p}.mlp.up_proj", x)
            h = h + _linear(w, f"{p}.mlp.down_proj", gated)
        return _rms_norm(h, w["model.norm.weight"], eps) @ head.T

    return logits


def qwen_reference(directory: Path) -> Logits:
    """Qwen 1 forward (modeling_qwen.py), rotary on the first kv_channels * rotary_pct dims."""
    w, c = _tensors(directory), _config(directory)
    num_heads, eps = c["num_attention_heads"], c["layer_norm_epsilon"]
    rot = int(c["kv_channels"] * c["rotary_pct"])

    @torch.no_grad()
    def logits(prompt: list[int]) -> torch.Tensor:
        n = len(prompt)
        positions = torch.arange(n)
        h = w["transformer.wte.weight"][torch.tensor(prompt)]
        for layer in range(c["num_hidden_layers"]):
            p = f"transformer.h.{layer}"
            x = _rms_norm(h, w[f"{p}.ln_1.weight"], eps)
            q, k, v = (t.reshape(n, num_heads, -1)
                       for t in _linear(w, f"{p}.attn.c_attn", x).chunk(3, dim=-1))
            q = _rotate_half_prefix(q, positions, rot, c["rotary_emb_base"])
            k = _rotate_half_prefix(k, positions, rot, c["rotary_emb_base"])
            h = h + _linear(w, f"{p}.attn.c_proj", _causal_attention(q, k, v))
            x = _rms_norm(h, w[f"{p}.ln_2.weight"], eps)
            gated = _linear(w, f"{p}.mlp.w1", x) * F.silu(_linear(w, f"{p}.mlp.w2", x))
            h = h + _linear(w, f"{p}.mlp.c_proj", gated)
        return _linear(w, "lm_head", _rms_norm(h, w["transformer.ln_f.weight"], eps))

    return logits


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints in the remote-code layouts.


def _save(directory: Path, tensors: dict, config: dict, tokenizer_from: Path | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is None:
        build_tokenizer(directory, vocab_size=VOCAB_SIZE)
    else:
        for file in tokenizer_from.iterdir():
            if file.name not in ("config.json", "model.safetensors"):
                shutil.copy(file, directory / file.name)
    return directory


def _remote(architecture: str, model_type: str, **values) -> dict:
    """config.json keys every remote-code checkpoint carries (auto_map is never followed)."""
    return dict(architectures=[architecture], model_type=model_type,
                auto_map={"AutoConfig": f"configuration_{model_type}.Config"},
                torch_dtype="float32", use_cache=True, **SPECIAL_IDS, **values)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _baichuan_from_llama(native: Path, directory: Path, rotary: bool, **config_extra) -> Path:
    t, cfg = _tensors(native), _config(native)
    out = {}
    for name, tensor in t.items():
        if ".self_attn.q_proj." in name:
            parts = [t[name.replace(".q_proj.", f".{x}.")] for x in ("q_proj", "k_proj", "v_proj")]
            out[name.replace(".q_proj.", ".W_pack.")] = torch.cat(parts)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = tensor
    positions = dict(max_position_embeddings=512) if rotary else {}  # 13B configs lack it
    config = _remote("BaichuanForCausalLM", "baichuan", vocab_size=VOCAB_SIZE,
                     hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                     num_hidden_layers=cfg["num_hidden_layers"],
                     num_attention_heads=cfg["num_attention_heads"], hidden_act="silu",
                     model_max_length=512, rms_norm_eps=cfg["rms_norm_eps"],
                     tie_word_embeddings=False, **positions, **config_extra)
    return _save(directory, out, config, tokenizer_from=native)


def build_baichuan(root: Path) -> Case:
    """Baichuan-7B layout (rotary, plain head) == Llama."""
    native = build_model_from_config(llama_config(num_key_value_heads=4), root / "native")
    directory = _baichuan_from_llama(native, root / "baichuan", rotary=True)
    return Case(directory, 4, *native_reference(native))


def build_baichuan2(root: Path) -> Case:
    """Baichuan2-7B layout (rotary, NormHead) == Llama whose lm_head rows were normalised."""
    native = build_model_from_config(llama_config(num_key_value_heads=4), root / "native")
    directory = _baichuan_from_llama(native, root / "baichuan2", rotary=True, norm_head=True)
    reference = root / "reference"
    shutil.copytree(native, reference)
    tensors = _tensors(native)
    tensors["lm_head.weight"] = F.normalize(tensors["lm_head.weight"], dim=-1)
    save_file(tensors, str(reference / "model.safetensors"))
    return Case(directory, 4, *native_reference(reference))


def build_baichuan_alibi(root: Path) -> Case:
    """Baichuan2-13B layout (ALiBi, NormHead); 5 heads: slopes for a non-power-of-two count."""
    native = build_model_from_config(llama_config(hidden_size=80, num_attention_heads=5,
                                        num_key_value_heads=5), root / "native")
    directory = _baichuan_from_llama(native, root / "baichuan_alibi", rotary=False,
                                     position_embedding_type="alibi", norm_head=True)
    return Case(directory, 4, *plain_reference(baichuan_alibi_reference(directory)))


def _qwen_from_qwen2(native: Path, directory: Path, rotary_pct: float) -> Path:
    t, cfg = _tensors(native), _config(native)
    renames = {"model.embed_tokens.": "transformer.wte.", "model.norm.": "transformer.ln_f.",
               "model.layers.": "transformer.h.", ".input_layernorm.": ".ln_1.",
               ".post_attention_layernorm.": ".ln_2.", ".self_attn.o_proj.": ".attn.c_proj.",
               ".mlp.gate_proj.": ".mlp.w2.", ".mlp.up_proj.": ".mlp.w1.",
               ".mlp.down_proj.": ".mlp.c_proj."}
    out = {}
    for name, tensor in t.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            tensor = torch.cat([t[name.replace(".q_proj.", f".{x}.")]
                                for x in ("q_proj", "k_proj", "v_proj")])
            name = name.replace(".self_attn.q_proj.", ".attn.c_attn.")
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    config = _remote("QWenLMHeadModel", "qwen", vocab_size=VOCAB_SIZE,
                     hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
                     num_hidden_layers=cfg["num_hidden_layers"],
                     intermediate_size=2 * cfg["intermediate_size"], kv_channels=head_dim,
                     layer_norm_epsilon=cfg["rms_norm_eps"], rotary_pct=rotary_pct,
                     rotary_emb_base=cfg["rope_parameters"]["rope_theta"], seq_length=512,
                     max_position_embeddings=512, no_bias=True, tie_word_embeddings=False,
                     use_dynamic_ntk=True, use_logn_attn=True, scale_attn_weights=True)
    return _save(directory, out, config, tokenizer_from=native)


def _qwen2_untied_config():
    """Qwen2 without GQA and with its own LM head, as Qwen 1."""
    config = qwen2_config(num_key_value_heads=4)
    config.tie_word_embeddings = False
    return config


def build_qwen(root: Path) -> Case:
    """Qwen 1 == Qwen2 without GQA."""
    native = build_model_from_config(_qwen2_untied_config(), root / "native")
    directory = _qwen_from_qwen2(native, root / "qwen", rotary_pct=1.0)
    return Case(directory, 4, *native_reference(native))


def build_qwen_partial_rotary(root: Path) -> Case:
    native = build_model_from_config(_qwen2_untied_config(), root / "native")
    directory = _qwen_from_qwen2(native, root / "qwen", rotary_pct=0.5)
    return Case(directory, 4, *plain_reference(qwen_reference(directory)))


GLM_HEAD_DIM = 24  # heads * head_dim (96) != hidden (64): projections are not square
GLM_ROPE_RATIO = 2.0


def glm_native_config():
    """transformers' GLM-4 port: ChatGLM's math under Llama-style names."""
    from transformers import GlmConfig

    return GlmConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=GLM_HEAD_DIM, max_position_embeddings=512, initializer_range=0.2,
                     rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=False,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0 * GLM_ROPE_RATIO,
                                          partial_rotary_factor=0.5), **SPECIAL_IDS)


def _chatglm_from_glm(native: Path, directory: Path) -> Path:
    t = _tensors(native)
    renames = {"model.embed_tokens.": "transformer.embedding.word_embeddings.",
               "model.norm.": "transformer.encoder.final_layernorm.",
               "model.layers.": "transformer.encoder.layers.",
               "lm_head.": "transformer.output_layer.",
               ".self_attn.o_proj.": ".self_attention.dense.",
               ".mlp.gate_up_proj.": ".mlp.dense_h_to_4h.",
               ".mlp.down_proj.": ".mlp.dense_4h_to_h."}
    # The real checkpoints also hold the rotary table's inverse frequencies; nothing reads them.
    out = {"transformer.rotary_pos_emb.inv_freq": torch.ones(GLM_HEAD_DIM // 4)}
    for name, tensor in t.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            tensor = torch.cat([t[name.replace(".q_proj.", f".{x}.")]
                                for x in ("q_proj", "k_proj", "v_proj")])
            name = name.replace(".self_attn.q_proj.", ".self_attention.query_key_value.")
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    config = _chatglm_config("ChatGLMModel", hidden_size=64, ffn_hidden_size=128, num_layers=4,
                             num_attention_heads=4, kv_channels=GLM_HEAD_DIM,
                             multi_query_attention=True, multi_query_group_num=2,
                             add_qkv_bias=True, rope_ratio=GLM_ROPE_RATIO)
    return _save(directory, out, config, tokenizer_from=native)


def _chatglm_config(architecture: str, **values) -> dict:
    defaults = dict(padded_vocab_size=VOCAB_SIZE, layernorm_epsilon=1e-6, seq_length=512,
                    rmsnorm=True, apply_residual_connection_post_layernorm=False,
                    add_bias_linear=False, add_qkv_bias=False, post_layer_norm=True,
                    original_rope=True, apply_query_key_layer_scaling=True,
                    attention_softmax_in_fp32=True, fp32_residual_connection=False,
                    hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=True,
                    pre_seq_len=None, prefix_projection=False, quantization_bit=0)
    return _remote(architecture, "chatglm", **dict(defaults, **values))


def build_chatglm(root: Path) -> Case:
    """ChatGLM3-6B layout: multi-query attention, q/k/v bias, RMSNorm, rope_ratio."""
    native = build_model_from_config(glm_native_config(), root / "native")
    directory = _chatglm_from_glm(native, root / "chatglm")
    return Case(directory, 4, *plain_reference(chatglm_reference(directory)))


def build_chatglm_variant(root: Path) -> Case:
    """Every non-default flag: per-head q|k|v rows, LayerNorm, biases everywhere, residuals
    taken after the norms, no final norm."""
    hidden, ffn, heads, head_dim, num_layers = 64, 96, 4, 16, 3
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.12, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    w = {"transformer.embedding.word_embeddings.weight": rnd(VOCAB_SIZE, hidden),
         "transformer.output_layer.weight": rnd(VOCAB_SIZE, hidden)}
    shapes = {"self_attention.query_key_value": (3 * heads * head_dim, hidden),
              "self_attention.dense": (hidden, heads * head_dim),
              "mlp.dense_h_to_4h": (2 * ffn, hidden), "mlp.dense_4h_to_h": (hidden, ffn)}
    for layer in range(num_layers):
        p = f"transformer.encoder.layers.{layer}"
        for name, shape in shapes.items():
            w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"] = rnd(*shape), rnd(shape[0], std=0.1)
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"] = rnd(hidden, mean=1.0), rnd(hidden)
    config = _chatglm_config("ChatGLMForConditionalGeneration", hidden_size=hidden,
                             ffn_hidden_size=ffn, num_layers=num_layers, num_attention_heads=heads,
                             kv_channels=head_dim, multi_query_attention=False,
                             multi_query_group_num=1, rmsnorm=False, add_bias_linear=True,
                             apply_residual_connection_post_layernorm=True, post_layer_norm=False)
    directory = _save(root / "chatglm_variant", w, config, tokenizer_from=None)
    return Case(directory, num_layers, *plain_reference(chatglm_reference(directory)))


BUILDERS = {
    "baichuan": build_baichuan,
    "baichuan2": build_baichuan2,
    "baichuan2-alibi": build_baichuan_alibi,
    "chatglm3": build_chatglm,
    "chatglm-variant": build_chatglm_variant,
    "qwen": build_qwen,
    "qwen-partial-rotary": build_qwen_partial_rotary,
}
FULL_SUITE = ["baichuan2", "baichuan2-alibi", "chatglm3", "qwen"]  # + greedy in every scenario


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``case(name)`` -> the Case ``name`` (built on first use)."""
    cache = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = BUILDERS[name](tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prompt_logits_equal_reference(name, case):
    check_prompt_logits(case(name))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_split_into_layer_ranges_keeps_logits(name, case):
    check_layer_split(case(name))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", FULL_SUITE)
def test_greedy_continuous_batching_equals_reference(name, scenario, case):
    check_greedy(case(name), scenario)


def test_chatglm_reference_equals_transformers_glm(case):
    """The plain ChatGLM reference is itself right: transformers' GLM port, same weights."""
    glm = case("chatglm3")
    native = load_hf(glm.directory.parent / "native")
    for prompt in make_prompts(VOCAB_SIZE, (40,)):
        with torch.no_grad():
            expected = native(torch.tensor([prompt])).logits[0]
        assert (glm.reference(prompt) - expected).abs().max().item() <= LOGIT_TOL


def test_norm_head_changes_the_logits(case):
    """The NormHead check can fail: the plain Llama head gives different logits."""
    baichuan2 = case("baichuan2")
    plain_head, _ = native_reference(baichuan2.directory.parent / "native")
    (prompt,) = make_prompts(VOCAB_SIZE, (23,))
    assert (plain_head(prompt) - baichuan2.reference(prompt)).abs().max().item() > 0.1


def test_alibi_slopes_for_a_non_power_of_two_head_count():
    from molink.model.layers.alibi import alibi_slopes

    for num_heads in (5, 8, 40):
        expected = torch.tensor(_baichuan_alibi_slopes(num_heads))
        assert torch.allclose(alibi_slopes(num_heads), expected, rtol=1e-6)


def _hf(**raw) -> PretrainedConfig:
    return PretrainedConfig(**raw)


BAICHUAN_13B = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan",
                    vocab_size=64000, hidden_size=5120, intermediate_size=13696,
                    num_hidden_layers=40, num_attention_heads=40, model_max_length=4096,
                    rms_norm_eps=1e-6, hidden_act="silu")


def test_baichuan_variant_detection_follows_the_original_code():
    assert BaichuanForCausalLM.arch_config(_hf(**BAICHUAN_13B)).extra == dict(
        use_alibi=True, norm_head=False)
    baichuan2_7b = dict(BAICHUAN_13B, vocab_size=125696, num_hidden_layers=32,
                        max_position_embeddings=4096)
    arch = BaichuanForCausalLM.arch_config(_hf(**baichuan2_7b))
    assert arch.extra == dict(use_alibi=False, norm_head=True)
    assert arch.max_position_embeddings == 4096 and arch.num_kv_heads == 40
    # Explicit config fields win over the size heuristics.
    explicit = dict(BAICHUAN_13B, position_embedding_type="ROPE", norm_head=True)
    assert BaichuanForCausalLM.arch_config(_hf(**explicit)).extra == dict(
        use_alibi=False, norm_head=True)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BaichuanForCausalLM.arch_config(_hf(**dict(BAICHUAN_13B, position_embedding_type="xpos")))


def test_remote_code_configs_normalise(case):
    glm = load_config(str(case("chatglm3").directory)).arch
    assert (glm.vocab_size, glm.num_kv_heads, glm.head_dim, glm.intermediate_size) == (
        VOCAB_SIZE, 2, GLM_HEAD_DIM, 128)
    assert glm.rope_theta == 10000.0 * GLM_ROPE_RATIO and glm.max_position_embeddings == 512
    qwen = load_config(str(case("qwen").directory)).arch
    assert qwen.intermediate_size == 128 and qwen.max_position_embeddings == 512


def test_unsupported_remote_code_options_are_refused():
    chatglm = dict(architectures=["ChatGLMModel"], model_type="chatglm", num_layers=2,
                   hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
                   padded_vocab_size=512, multi_query_attention=True, multi_query_group_num=2)
    with pytest.raises(ValueError, match="pre_seq_len"):
        ChatGLMForConditionalGeneration.arch_config(_hf(**chatglm, pre_seq_len=8))
    with pytest.raises(ValueError, match="quantization_bit"):
        ChatGLMForConditionalGeneration.arch_config(_hf(**chatglm, quantization_bit=4))
    qwen = dict(architectures=["QWenLMHeadModel"], model_type="qwen", hidden_size=64,
                num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
                vocab_size=512, kv_channels=32)
    with pytest.raises(ValueError, match="kv_channels"):
        QWenLMHeadModel.arch_config(_hf(**qwen))

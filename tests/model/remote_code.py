"""Remote-code checkpoint layouts (Baichuan, ChatGLM2/3, Qwen 1) and their plain references.

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

``tests/model/tiny_configs.py`` builds the tiny checkpoints from these pieces.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.model.hf_configs import GLM_HEAD_DIM, GLM_ROPE_RATIO
from tests.model_factory import VOCAB_SIZE
from tests.tokenizer_factory import build_tokenizer

Logits = Callable[[list[int]], torch.Tensor]  # prompt -> [len(prompt), vocab] fp32
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}


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


def chatglm_forward(directory: Path) -> Logits:
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


def baichuan_alibi_slopes(n: int) -> list[float]:
    """The original's ``_get_interleave``."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + baichuan_alibi_slopes(2 * closest)[0::2][: n - closest]


def baichuan_alibi_forward(directory: Path) -> Logits:
    """Baichuan-13B / Baichuan2-13B forward: ALiBi bias slope_h * key_position, no rotary."""
    w, c = _tensors(directory), _config(directory)
    num_heads, eps = c["num_attention_heads"], c["rms_norm_eps"]
    slopes = torch.tensor(baichuan_alibi_slopes(num_heads))
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


def qwen_forward(directory: Path) -> Logits:
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


def _fused_qkv_renamed(t: dict, fused: str, renames: dict[str, str]) -> dict:
    """Native tensors with ``self_attn.{q,k,v}_proj`` concatenated (q|k|v rows) into ``fused``
    and every name rewritten by ``renames`` (substring -> replacement, in order)."""
    out = {}
    for name, tensor in t.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            tensor = torch.cat([t[name.replace(".q_proj.", f".{x}.")]
                                for x in ("q_proj", "k_proj", "v_proj")])
            name = name.replace(".self_attn.q_proj.", fused)
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def baichuan_from_llama(native: Path, directory: Path, architecture: str, rotary: bool,
                        **config_extra) -> Path:
    cfg = _config(native)
    out = _fused_qkv_renamed(_tensors(native), ".self_attn.W_pack.", {})
    positions = {"max_position_embeddings": 512} if rotary else {}  # 13B configs lack it
    config = _remote(architecture, "baichuan", vocab_size=VOCAB_SIZE,
                     hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                     num_hidden_layers=cfg["num_hidden_layers"],
                     num_attention_heads=cfg["num_attention_heads"], hidden_act="silu",
                     model_max_length=512, rms_norm_eps=cfg["rms_norm_eps"],
                     tie_word_embeddings=False, **positions, **config_extra)
    return _save(directory, out, config, tokenizer_from=native)


def qwen_from_qwen2(native: Path, directory: Path, rotary_pct: float) -> Path:
    cfg = _config(native)
    renames = {"model.embed_tokens.": "transformer.wte.", "model.norm.": "transformer.ln_f.",
               "model.layers.": "transformer.h.", ".input_layernorm.": ".ln_1.",
               ".post_attention_layernorm.": ".ln_2.", ".self_attn.o_proj.": ".attn.c_proj.",
               ".mlp.gate_proj.": ".mlp.w2.", ".mlp.up_proj.": ".mlp.w1.",
               ".mlp.down_proj.": ".mlp.c_proj."}
    out = _fused_qkv_renamed(_tensors(native), ".attn.c_attn.", renames)
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


def chatglm_from_glm(native: Path, directory: Path) -> Path:
    renames = {"model.embed_tokens.": "transformer.embedding.word_embeddings.",
               "model.norm.": "transformer.encoder.final_layernorm.",
               "model.layers.": "transformer.encoder.layers.",
               "lm_head.": "transformer.output_layer.",
               ".self_attn.o_proj.": ".self_attention.dense.",
               ".mlp.gate_up_proj.": ".mlp.dense_h_to_4h.",
               ".mlp.down_proj.": ".mlp.dense_4h_to_h."}
    # The real checkpoints also hold the rotary table's inverse frequencies; nothing reads them.
    out = {"transformer.rotary_pos_emb.inv_freq": torch.ones(GLM_HEAD_DIM // 4),
           **_fused_qkv_renamed(_tensors(native), ".self_attention.query_key_value.", renames)}
    config = _chatglm_config("ChatGLMModel", hidden_size=64, ffn_hidden_size=128, num_layers=4,
                             num_attention_heads=4, kv_channels=GLM_HEAD_DIM,
                             multi_query_attention=True, multi_query_group_num=2,
                             add_qkv_bias=True, rope_ratio=GLM_ROPE_RATIO)
    return _save(directory, out, config, tokenizer_from=native)


def _chatglm_config(architecture: str, **values) -> dict:
    defaults = {"padded_vocab_size": VOCAB_SIZE, "layernorm_epsilon": 1e-6, "seq_length": 512,
                    "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
                    "add_bias_linear": False, "add_qkv_bias": False, "post_layer_norm": True,
                    "original_rope": True, "apply_query_key_layer_scaling": True,
                    "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
                    "hidden_dropout": 0.0, "attention_dropout": 0.0, "bias_dropout_fusion": True,
                    "pre_seq_len": None, "prefix_projection": False, "quantization_bit": 0}
    return _remote(architecture, "chatglm", **dict(defaults, **values))


def build_chatglm_variant(root: Path) -> Path:
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
    return _save(root / "chatglm_variant", w, config, tokenizer_from=None)

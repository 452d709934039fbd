"""``molink plan``: which layers each node would serve, its memory and the predicted speed.

Needs only the model's ``config.json``: the weights' sizes come from the parameter shapes
of the model built on the meta device (``runtime/model_size.py``; no weights are read). Each
``--node`` is an emulated device, in pipeline order (the first serves layer 0, as the
head does):

- ``rtx3090``, ``rtx4090``, ``a100-80gb`` (``NAME:MEM`` overrides the memory): memory
  from the datasheet, speed from the roofline of ``runtime/device_profile.py`` for one
  layer of this model at the weights' bytes per parameter;
- ``published:MEM``: the measured per-layer profile the original system published;
- ``cpu:MEM``: the same roofline for a desktop CPU (``CPU``: 50 GB/s of memory
  bandwidth, dual-channel DDR5; 0.5 TFLOP/s).

Speeds are for a decode step of ``--max-num-seqs`` requests at full ``--max-model-len``
context (the slowest step). The LM head costs the last stage its bytes' worth of layers
(decode reads every weight once). Memory sizes are binary: ``64GB`` is 64 x 2^30 bytes.

Weight sizes with ``--bits B`` (B < 16): every matrix inside a layer takes ``B / 8`` bytes
per parameter plus one 16-bit scale per group of 128 parameters (GPTQ / AWQ style: 4 bits
-> 0.515625 bytes/param); norms, biases, embeddings and the LM head stay in ``--dtype``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from molink.config import DTYPES
from molink.entrypoints.join import positive_int
from molink.runtime.device_profile import GPUS, DeviceProfile, GpuSpec, published_profile
from molink.scheduler.placement import (
    GB,
    DoesNotFit,
    NodeBudget,
    Placement,
    plan_placement,
)
from molink.transport.link_emulator import LinkSpec

if TYPE_CHECKING:
    from molink.runtime.model_size import ModelSize

GPU_MEMORY_GB = {name: gpu.memory_gib for name, gpu in GPUS.items()}
# A desktop CPU: dual-channel DDR5 bandwidth and a few hundred GFLOP/s of bf16. Eager
# PyTorch pays more per layer than a GPU's kernel launches: a tiny Llama (hidden 256) decodes
# at 1.7 ms per layer per token on one core of the 2-core test machine, so 0.3 ms is a floor.
CPU = GpuSpec("cpu", memory_bandwidth_gbps=50.0, peak_tflops=0.5, step_overhead_ms_per_layer=0.3)
_MEMORY_UNITS = {"gb": GB, "gib": GB, "mb": 2**20, "mib": 2**20, "tb": 2**40, "tib": 2**40}


@dataclass(frozen=True)
class NodeSpec:
    """One ``--node``: a device kind and its memory."""

    label: str  # as the user wrote it
    kind: str  # a GPU name, "published" or "cpu"
    memory_bytes: int

    @classmethod
    def parse(cls, text: str) -> NodeSpec:
        """``rtx3090``, ``rtx3090:20GB``, ``published:24GB`` or ``cpu:64GB``."""
        kind, _, memory = text.strip().lower().partition(":")
        kinds = [*GPU_MEMORY_GB, "published", "cpu"]
        if kind not in kinds:
            raise ValueError(f"{text!r}: the device must be one of {', '.join(kinds)}")
        if memory:
            return cls(text, kind, parse_memory(memory, repr(text)))
        if kind not in GPU_MEMORY_GB:
            raise ValueError(f"{text!r}: give its memory, e.g. {kind}:64GB")
        return cls(text, kind, GPU_MEMORY_GB[kind] * GB)


def parse_memory(text: str, where: str) -> int:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{where}: memory must be a positive number with a unit "
                         "(GB, MB, TB; binary), e.g. 64GB")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face-format model directory (config.json is "
                                      "enough: no weights are read)")
    parser.add_argument("--node", action="append", required=True, metavar="SPEC",
                        type=_argument(NodeSpec.parse), dest="nodes",
                        help="a node, in pipeline order (repeat): rtx3090 | rtx4090 | "
                             "a100-80gb [:MEM] | published:MEM | cpu:MEM (e.g. cpu:64GB)")
    parser.add_argument("--link", type=_argument(LinkSpec.parse), default=None, metavar="SPEC",
                        help="the link between nodes, bandwidth:latency (e.g. 100mbit:20ms) "
                             "(default: none, hops cost nothing)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="precision of activations, KV cache and unquantized weights "
                             "(auto: the checkpoint's)")
    parser.add_argument("--bits", type=int, default=None, choices=[4, 8, 16],
                        help="bits per weight of the layers' matrices, as a quantized "
                             "checkpoint stores them (default: --dtype's size)")
    parser.add_argument("--max-model-len", type=positive_int, default=4096, metavar="N",
                        help="tokens of context per request the KV cache must hold")
    parser.add_argument("--max-num-seqs", type=positive_int, default=1, metavar="N",
                        help="requests decoded together (the batch the KV cache holds)")
    parser.add_argument("--headroom", type=_argument(_headroom), default=0.1, metavar="F",
                        help="fraction of each node's memory left unplanned (CUDA context, "
                             "fragmentation, activations)")


def _argument(parse):
    """An argparse type from a parser that raises ValueError: its message, not argparse's."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _headroom(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(f"must be a fraction in [0, 1), got {text!r}")
    return value


def run(args) -> int:
    """Print the plan; exit code 1 with the reason when the model does not fit."""
    from molink.runtime.model_size import measure_model  # torch: only when planning

    model = measure_model(args.model, args.dtype, args.bits,
                          args.max_model_len * args.max_num_seqs)
    nodes = [node_budget(spec, i, model, args.max_num_seqs, args.max_model_len)
             for i, spec in enumerate(args.nodes)]
    print(describe(model, args), end="\n\n")
    try:
        placement = plan_placement(model.footprint, nodes, args.headroom)
    except DoesNotFit as exc:
        print(f"molink plan: {exc}", file=sys.stderr)
        return 1
    print(render(placement, model, args.link, args.max_num_seqs))
    return 0


def node_budget(spec: NodeSpec, index: int, model: ModelSize, batch: int,
                context: int) -> NodeBudget:
    """The node's memory and its time for one layer of a decode step of ``batch`` requests
    at full context (``context`` tokens each: the slowest step, at the end)."""
    profile = device_profile(spec.kind, model)
    seconds = profile.step_ms(1, batch, 0, batch * context) / 1e3
    return NodeBudget(f"{index + 1}:{spec.label}", spec.memory_bytes, seconds)


def device_profile(kind: str, model: ModelSize) -> DeviceProfile:
    from molink.runtime.model_size import roofline_for  # torch: only when planning

    if kind == "published":
        return published_profile()
    return roofline_for(CPU if kind == "cpu" else GPUS[kind], model)


def describe(model: ModelSize, args) -> str:
    footprint = model.footprint
    # --bits as given, else as held: a quantized checkpoint's (GGUF Q4_1: 5), or the dtype's
    weights = args.bits if args.bits else f"{8 * model.layer_bytes_per_param:.3g}"
    return (f"{model.name}: {footprint.num_layers} layers, {_gb(sum(footprint.layer_weight_bytes))}"
            f" of layer weights at {weights} bits, {_gb(footprint.first_stage_bytes)} embeddings"
            f", {_gb(footprint.last_stage_bytes)} LM head; KV cache {_gb(sum(footprint.layer_kv_bytes))}"
            f" for {args.max_num_seqs} x {args.max_model_len} tokens; "
            f"{args.headroom:.0%} of each node's memory kept free")


def render(placement: Placement, model: ModelSize, link: LinkSpec | None, batch: int) -> str:
    """The table (one row per node) and the predicted decode speed."""
    header = ("node", "layers", "weights GB", "KV GB", "free GB", "ms/step")
    rows = [header]
    for stage in placement.stages:
        layers = f"{stage.start_layer}:{stage.end_layer}" if stage.num_layers else "none"
        rows.append((stage.node.name, layers, _num(stage.weight_bytes), _num(stage.kv_bytes),
                     _num(stage.free_bytes), f"{stage.seconds * 1e3:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([*lines, "", *predict(placement, model, link, batch)])


def predict(placement: Placement, model: ModelSize, link: LinkSpec | None,
            batch: int) -> list[str]:
    """Decode speed, one step of the whole batch at a time: the stages one after another,
    activations over each hop between them, and the sampled tokens back to the first node."""
    used = [s for s in placement.stages if s.num_layers]
    stages_s = sum(s.seconds for s in used)
    num_hops = len(used) if link is not None and len(used) > 1 else 0
    hops_s = 0.0
    if num_hops:
        activation_bytes = batch * model.arch.hidden_size * model.dtype_bytes  # [batch, hidden]
        token_bytes = batch * 4  # int32 token ids back to the first node
        hops_s = (num_hops * link.latency_s
                  + ((num_hops - 1) * activation_bytes + token_bytes) * 8 / link.bandwidth_bps)
    step_s = stages_s + hops_s
    slowest = max(used, key=lambda s: s.seconds)
    speed = (f"predicted decode: {batch / step_s:.1f} tokens/s for a batch of {batch} "
             f"(a step: stages {stages_s * 1e3:.1f} ms + {num_hops} hops {hops_s * 1e3:.1f} ms)")
    bound = (f"ceiling with several such batches in flight as micro-batches: "
             f"{batch / slowest.seconds:.1f} tokens/s (the slowest stage, {slowest.node.name}, "
             f"takes {slowest.seconds * 1e3:.1f} ms a step)")
    return [speed, bound]


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / GB:.1f} GB"


def _num(num_bytes: float) -> str:
    return f"{num_bytes / GB:.1f}"

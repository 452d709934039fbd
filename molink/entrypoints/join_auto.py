"""``molink join`` without ``--layers``: offer this node to the head and load what it assigns.

The stage reads the model's config (a Hub model: config only), measures what it offers
(``runtime/node_budget.py``: memory, and the time of one layer's decode on its device; an
emulated device answers from its profile and the card's memory), and asks the head until
the head's plan gives it a range. Then it proceeds as if started with ``--layers START:END``.
"""

from __future__ import annotations

import argparse

import torch

from molink.entrypoints.plan import GPU_MEMORY_GB
from molink.model.hub import resolve_model
from molink.model.loader import config_fingerprint, holds_int4, load_config, resolve_dtype
from molink.runtime.host import cpu_cores, cpu_set, host_id
from molink.runtime.intra_op import compute_threads, in_own_thread
from molink.runtime.model_size import emulated_profile
from molink.runtime.node_budget import (
    NodeOffer,
    emulated_layer_seconds,
    human_bytes,
    measure_offer,
)
from molink.runtime.stage_executor import resolve_device
from molink.scheduler.placement import GB
from molink.stage.head_client import ask_for_layers
from molink.transport import molink_pb2 as pb
from molink.transport.peers import PeerSecurity

AUTO = "auto"
_EMULATED_CONTEXT = 4096  # context of the decode step an emulated device's speed is read at


def wants_layers_from_head(args) -> bool:
    return args.layers is None or args.layers == AUTO


async def layers_from_head(args, token: str, node_id: str):
    """Offer this node: (the range the head assigns, (head, security, offer) to keep the
    offer alive while loading). Raises StageRefused (a real refusal)."""
    model_dir = resolve_model(args.model, weights=False)
    loaded = load_config(model_dir)
    device = torch.device("cpu") if args.emulate_device else resolve_device(args.device)
    offer = await in_own_thread(node_offer, args, model_dir, device)
    dtype = resolve_dtype(args.dtype, loaded.arch, device, holds_int4(loaded, args.quantization))
    info = pb.StageInfo(model_fingerprint=config_fingerprint(model_dir),
                        dtype=str(dtype).removeprefix("torch."), block_size=args.block_size,
                        num_layers=loaded.arch.num_layers, host_id=host_id(),
                        device="emulated" if args.emulate_device else device.type,
                        cpu_cores=cpu_cores(), cpu_set=cpu_set(), threads=compute_threads(),
                        memory_bytes=offer.memory_bytes,
                        seconds_per_layer=offer.seconds_per_layer, node_id=node_id)
    print(f"offering {human_bytes(offer.memory_bytes)} and "
          f"{offer.seconds_per_layer * 1e3:.2f} ms per layer to the head at {args.head}; "
          "waiting for it to assign layers", flush=True)
    security = PeerSecurity.create(token, insecure=args.insecure_peers)
    start, end = await ask_for_layers(args.head, security, info,
                                      lambda reason: print(f"head: {reason}", flush=True))
    print(f"the head assigned layers {start}:{end}", flush=True)
    return (start, end), (args.head, security, info)


def node_offer(args, model_dir: str, device: torch.device) -> NodeOffer:
    if not args.emulate_device:
        return measure_offer(model_dir, args.dtype, device, args.max_memory,
                             args.gpu_memory_utilization)
    profile = emulated_profile(args.emulate_device, model_dir, args.dtype, args.quantization)
    # the whole card: the planner keeps DEFAULT_HEADROOM (10 %) of an offer unplanned, which
    # leaves exactly GpuSpec.usable_bytes, what the emulated stage lets weights and KV take
    memory = args.max_memory or GPU_MEMORY_GB.get(args.emulate_device, 0) * GB
    if not memory:
        raise ValueError(f"--emulate-device {args.emulate_device} without --layers needs "
                         "--max-memory: the profile does not say how much memory it has")
    return NodeOffer(memory, emulated_layer_seconds(profile, _EMULATED_CONTEXT))


def with_layers(args, start: int, end: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "layers": f"{start}:{end}"})

"""``molink join``: run one stage of a pipeline and join it to the head.

Also the options every node takes (``molink serve`` adds them too), so that one idea has
one flag name and one meaning on every node.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys

from molink.config import DTYPES, QUANTIZATIONS, CacheConfig, ModelConfig, parse_layer_range
from molink.entrypoints.signals import finish_pending_tasks, on_signal
from molink.model.hub import resolve_model
from molink.model.loader import config_fingerprint, holds_int4, load_config, resolve_dtype
from molink.runtime.emulated_executor import EmulatedExecutor
from molink.runtime.host import cpu_cores, cpu_set, host_id
from molink.runtime.intra_op import (
    compute_threads,
    in_own_thread,
    run_in_own_thread,
    serial_here,
    use_threads,
)
from molink.runtime.model_size import emulated_stage
from molink.runtime.node_budget import kv_budget_within
from molink.runtime.stage_executor import StageExecutor, resolve_device
from molink.stage.head_client import StageRefused
from molink.stage.worker import StageWorker
from molink.transport import molink_pb2 as pb
from molink.transport.peers import PeerSecurity

logger = logging.getLogger(__name__)



def add_arguments(parser) -> None:
    parser.add_argument("model", help="the head's model: a Hugging Face-format model directory, "
                             "or a Hub repo id (org/name[@revision]) of which this stage "
                             "downloads only the shards holding its layers")
    parser.add_argument("--head", required=True, type=address, metavar="HOST:PORT",
                        help="the head's peer address: its host and --peer-port")
    parser.add_argument("--layers", default=None, type=_layers_or_auto, metavar="START:END",
                        help="half-open layer range this stage serves (START: = to the last "
                             "layer), or auto: the head assigns a range from this node's "
                             "memory (--max-memory) and measured speed (default: auto)")
    parser.add_argument("--host", default="0.0.0.0", help="interface the peer port listens on")
    parser.add_argument("--standby", action="store_true",
                        help="join as a hot spare for --layers: loaded and health-checked, "
                             "routed through only when those layers are no longer served (a "
                             "stage was lost or left), then its requests are replayed here "
                             "(default: serve the layers; when another stage serves exactly "
                             "them, wait as a standby anyway; an overlap is refused)")
    parser.add_argument("--drain-timeout", type=seconds, default=30.0, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C with no standby for this stage's layers: "
                             "how long running requests may take to finish before the stage "
                             "exits (the rest are replayed on a replacement); a second "
                             "Ctrl-C exits at once (default: 30)")
    add_node_arguments(parser, peer_port=0)
    parser.add_argument("--emulate-device", default=None, metavar="PROFILE",
                        help="run an emulated stage: wait what PROFILE predicts instead of "
                             "computing (published | rtx3090 | rtx4090 | a100-80gb | file.json); "
                             "only config.json is needed (default: compute for real)")


def add_node_arguments(parser, peer_port: int) -> None:
    """The options of every node, head or stage: same name, same meaning."""
    parser.add_argument("--peer-port", type=port, default=peer_port, metavar="PORT",
                        help="port other nodes connect to (0: any free port)")
    parser.add_argument("--advertise", default=None, type=address, metavar="HOST:PORT",
                        help="where other nodes reach this node's peer port, for NAT or port "
                             "forwarding (default: a stage is reached at the IP address the "
                             "head sees its connection come from and its --peer-port; the head "
                             "at the address each stage dialed with --head)")
    parser.add_argument("--cluster-token", default=None, metavar="TOKEN",
                        help="shared cluster secret, the same on every node (default: "
                             "$MOLINK_CLUSTER_TOKEN; when neither is set, serve generates one "
                             "and prints it)")
    parser.add_argument("--insecure-peers", action="store_true",
                        help="plain TCP between nodes (the token still authenticates every "
                             "call): only on a trusted LAN; every node must agree")
    parser.add_argument("--dtype", default="auto",
                        choices=DTYPES,
                        help="precision of weights, KV cache and activations; every node must "
                             "agree (auto: the checkpoint's; on a CPU float16 and int4 weights compute in "
                             "bfloat16; a CPU without native bfloat16 keeps 16-bit weights and "
                             "computes prefill in float32)")
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads the model's operators use (default: "
                             "$OMP_NUM_THREADS, else every core this process may use; nodes "
                             "that share one machine: each its share)")
    add_quantization_argument(parser)
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed of this node (the last stage samples: requests "
                             "without a seed of their own draw from it)")
    add_memory_arguments(parser)


def add_quantization_argument(parser) -> None:
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                        help="keep the layers' linear weights as integers, quantized at load "
                             "from a full-precision checkpoint: int8 (per channel) or int4 "
                             "(groups of 128) (default: none; AWQ, GPTQ and GGUF checkpoints "
                             "are read as stored)")


def add_memory_arguments(parser) -> None:
    parser.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                        help="most tokens (prompt + output) of one request; the KV cache is "
                             "sized for --max-num-seqs such requests (default: the model's "
                             "max_position_embeddings)")
    parser.add_argument("--block-size", type=positive_int, default=16, metavar="N",
                        help="tokens per KV cache block; every node must agree")
    parser.add_argument("--num-kv-blocks", type=positive_int, default=None, metavar="N",
                        help="KV cache blocks this node holds (default: as many as "
                             "--gpu-memory-utilization allows)")
    parser.add_argument("--gpu-memory-utilization", type=fraction, default=None, metavar="F",
                        help="fraction of the CUDA device's total memory this node may use for "
                             "its weights and KV cache, as in vLLM; ignored on CPU, where the KV "
                             "cache takes min(2 GiB, 20%% of RAM) (default: the KV cache takes "
                             "90%% of the memory still free once the weights are loaded)")
    parser.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                        help="memory this node offers for its weights and KV cache, e.g. 20GB: "
                             "it sizes the KV cache (less 10%% headroom) and, under automatic "
                             "placement, how many layers it gets (default: on CUDA "
                             "--gpu-memory-utilization (0.9) x total less what other processes "
                             "use; on CPU what the OS reports available)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=256, metavar="N",
                        help="most requests running at once (the head's batch; a stage keeps "
                             "state for this many)")


def address(text: str) -> str:
    """argparse type: HOST:PORT (IPv6 hosts in brackets)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. 203.0.113.7:50052), "
                                         f"got {text!r}")
    return text


def layer_range(text: str) -> str:
    """argparse type: a well-formed START:END (checked against the model once it is read)."""
    try:
        parse_layer_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _layers_or_auto(text: str) -> str:
    return "auto" if text.lower() == "auto" else layer_range(text)


def memory_size(text: str) -> int:
    """argparse type: a memory size with a unit (20GB, 512MB)."""
    from molink.entrypoints.plan import parse_memory

    try:
        return parse_memory(text, "--max-memory")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative(text: str, what: str = "a number") -> float:
    """argparse type: a finite number >= 0 (``what`` names it in the error)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {what} >= 0, got {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    return non_negative(text, "a number of seconds")


def port(text: str) -> int:
    """argparse type: 0 to 65535 (0: any free port)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def check_layers(text: str, num_layers: int) -> tuple[int, int]:
    """``--layers`` against the model: a ValueError naming the flag when past its end."""
    start, end = parse_layer_range(text)
    end = num_layers if end is None else end
    if end > num_layers or start >= end:
        raise ValueError(f"--layers {text} is outside the model's {num_layers} layers "
                         f"(0:{num_layers})")
    return start, end


def kv_cache_memory_bytes(args, start: int, end: int) -> int | None:
    """The KV budget ``--gpu-memory-utilization`` leaves this node on a CUDA device:
    ``utilization * total - (what others use now) - (this node's weights)``; None: the
    runtime's default budget."""
    if args.max_memory is not None and args.num_kv_blocks is None:
        weights = _weight_bytes(args, start, end, resolve_device(args.device))
        return kv_budget_within(args.max_memory, weights, "--max-memory")
    if args.gpu_memory_utilization is None:
        return None
    device = resolve_device(args.device)
    if device.type != "cuda":
        logger.warning("--gpu-memory-utilization applies to CUDA devices; ignored on %s",
                       device.type)
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    weight_bytes = _weight_bytes(args, start, end, device)
    budget = int(args.gpu_memory_utilization * total) - (total - free) - weight_bytes
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {args.gpu_memory_utilization} leaves no memory for the "
            f"KV cache: of {total / 2**30:.1f} GiB, others use {(total - free) / 2**30:.1f} GiB "
            f"and layers {start}:{end} take {weight_bytes / 2**30:.1f} GiB")
    return budget


def _weight_bytes(args, start: int, end: int, device) -> int:
    """Bytes of layers ``[start, end)`` as they will be held (quantized ones at their
    stored size), with embeddings / LM head where they belong."""
    from molink.runtime.model_size import measure_model  # sizes only: nothing is allocated

    loaded = load_config(args.model)
    dtype = resolve_dtype(args.dtype, loaded.arch, device, holds_int4(loaded, args.quantization))
    sizes = measure_model(args.model, str(dtype).removeprefix("torch."), None, 0,
                          args.quantization, device)
    return sizes.footprint.weight_bytes(start, end)


def stage_model(args) -> tuple[str, int, int]:
    """The local model directory of a stage (a Hub repo id fetched: config only for an
    emulated stage, else the shards of its layers) and its checked layer range."""
    model_dir = resolve_model(args.model, weights=False)
    start, end = check_layers(args.layers, load_config(model_dir).arch.num_layers)
    if not args.emulate_device:
        model_dir = resolve_model(args.model, start, end)
    return model_dir, start, end


def run(args, token: str) -> int:
    from molink.entrypoints.join_auto import wants_layers_from_head

    node_id = secrets.token_hex(8)
    if args.standby and wants_layers_from_head(args):
        raise ValueError("--standby needs --layers START:END: the range this stage stands by "
                         "for (automatic placement assigns only layers no stage serves)")
    use_threads(args.threads)
    if not wants_layers_from_head(args):
        args, executor = run_in_own_thread(build_executor, args)
        return asyncio.run(_serve(args, token, executor, node_id))
    try:
        return asyncio.run(_serve_placed(args, token, node_id))
    except StageRefused as exc:
        print(f"error: the head at {args.head} refused this node: {exc}", file=sys.stderr,
              flush=True)
        return 3


async def _serve_placed(args, token: str, node_id: str) -> int:
    """Without --layers: the range the head assigns, loaded while the offer is kept alive."""
    from molink.entrypoints.join_auto import layers_from_head, with_layers
    from molink.stage.head_client import keep_offering

    (start, end), asking = await layers_from_head(args, token, node_id)
    offering = asyncio.create_task(keep_offering(*asking))
    try:
        args, executor = await in_own_thread(build_executor, with_layers(args, start, end))
    finally:
        offering.cancel()
    return await _serve(args, token, executor, node_id)


def build_executor(args):
    """The stage's executor for ``args.layers`` (a Hub model fetched), and ``args`` with the
    model's local directory."""
    model_dir, start, end = stage_model(args)
    args = argparse.Namespace(**{**vars(args), "model": model_dir})
    if args.emulate_device:
        profile, num_blocks = emulated_stage(
            args.emulate_device, args.model, args.dtype, args.quantization, (start, end),
            args.block_size, args.num_kv_blocks)
        return args, EmulatedExecutor(args.model, start, end, profile, dtype=args.dtype,
                                      block_size=args.block_size, num_blocks=num_blocks)
    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                               start_layer=start, end_layer=end,
                               max_model_len=args.max_model_len, seed=args.seed,
                               quantization=args.quantization)
    cache_config = CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                               kv_cache_memory_bytes=kv_cache_memory_bytes(args, start, end))
    return args, StageExecutor(model_config, cache_config, max_num_seqs=args.max_num_seqs)


async def _serve(args, token: str, executor, node_id: str = "") -> int:
    serial_here()  # the event loop's operators: the compute thread's team stays the only one
    info = pb.StageInfo(start_layer=executor.start_layer, end_layer=executor.end_layer,
                        model_fingerprint=config_fingerprint(args.model),
                        dtype=str(executor.dtype).removeprefix("torch."),
                        block_size=executor.block_size, num_blocks=executor.num_blocks,
                        num_layers=executor.arch.num_layers, host_id=host_id(),
                        device="emulated" if args.emulate_device else executor.device.type,
                        cpu_cores=cpu_cores(), cpu_set=cpu_set(), threads=compute_threads(),
                        node_id=node_id,
                        standby=args.standby)
    security = PeerSecurity.create(token, insecure=args.insecure_peers)
    worker = StageWorker(executor, info, security, args.head)
    port = await worker.start(args.host, args.peer_port)
    info.address, info.port = args.advertise or "", port
    print(f"stage layers {info.start_layer}:{info.end_layer} listening on {args.host}:{port}; "
          f"joining the head at {args.head}", flush=True)

    def joined(w: StageWorker) -> None:
        role = " (standby)" if info.standby else ""
        print(f"joined the head at {args.head} as {w.stage_id}{role}; reached at {w.address}",
              flush=True)

    stop = asyncio.Event()
    on_signal(stop.set)
    membership = asyncio.create_task(worker.keep_joined(joined))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({membership, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if membership.done() and isinstance(membership.exception(), StageRefused):
        print(f"error: the head at {args.head} refused this stage: {membership.exception()}",
              file=sys.stderr, flush=True)
        code = 3
    elif stop.is_set():
        await _leave(worker, args.drain_timeout, stop)
    for task in (membership, stopping):
        task.cancel()
    await worker.stop()
    await finish_pending_tasks()
    return code


async def _leave(worker: StageWorker, drain_timeout_s: float, stop: asyncio.Event) -> None:
    """A stop signal: leave gracefully (the head moves or drains this stage's requests);
    a second signal exits at once."""
    if not worker.stage_id:
        return
    print(f"{worker.label}: leaving; the head moves this stage's requests (draining up to "
          f"{drain_timeout_s:.0f} s); interrupt again to exit at once", flush=True)
    stop.clear()
    leaving = asyncio.create_task(worker.leave(drain_timeout_s))
    again = asyncio.create_task(stop.wait())
    await asyncio.wait({leaving, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    if leaving.done():
        print(f"{worker.label}: left ({leaving.result()})", flush=True)
    else:
        leaving.cancel()
        print(f"{worker.label}: exiting without waiting for the head", flush=True)

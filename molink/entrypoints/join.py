"""``molink join``: run one stage of a pipeline and join it to the head."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from molink.config import CacheConfig, ModelConfig, parse_layer_range
from molink.stage.worker import StageRefused, StageWorker
from molink.model.loader import config_fingerprint, load_config
from molink.runtime.device_profile import DeviceProfile
from molink.runtime.emulated_executor import EmulatedExecutor
from molink.runtime.host import cpu_cores, host_id
from molink.runtime.stage_executor import StageExecutor
from molink.transport import molink_pb2 as pb
from molink.transport.peers import PeerSecurity

logger = logging.getLogger(__name__)

FINISH_TIMEOUT_S = 2.0  # at exit: how long tasks still running may take to end


def add_arguments(parser) -> None:
    parser.add_argument("model", help="Hugging Face-format model directory (same model as the head)")
    parser.add_argument("--head", required=True, help="the head's peer address HOST:PORT")
    parser.add_argument("--layers", required=True, help="half-open layer range START:END (START: = to the end)")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    parser.add_argument("--peer-port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--advertise", default=None, metavar="HOST:PORT",
                        help="address the other nodes reach this stage at, for NAT or port "
                             "forwarding (default: the IP address the head sees this stage's "
                             "connection come from, and --peer-port)")
    parser.add_argument("--cluster-token", default=None,
                        help="shared cluster secret (or set MOLINK_CLUSTER_TOKEN)")
    parser.add_argument("--insecure-peers", action="store_true",
                        help="plain TCP between nodes (the token still authenticates every "
                             "call): only on a trusted LAN; every node must agree")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--emulate-device", default=None, metavar="PROFILE",
                        help="run an emulated stage: wait what PROFILE predicts instead of "
                             "computing (published | rtx3090 | rtx4090 | a100-80gb | file.json); "
                             "only config.json is needed")


def run(args, token: str) -> int:
    start, end = parse_layer_range(args.layers)
    if args.emulate_device:
        arch = load_config(args.model).arch
        executor = EmulatedExecutor(args.model, start, end,
                                    DeviceProfile.load(args.emulate_device, arch),
                                    dtype=args.dtype, block_size=args.block_size,
                                    num_blocks=args.num_kv_blocks or 65536,
                                    eos_token_ids=frozenset(arch.eos_token_ids))
    else:
        model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                                   start_layer=start, end_layer=end)
        executor = StageExecutor(model_config, CacheConfig(block_size=args.block_size,
                                                           num_blocks=args.num_kv_blocks),
                                 max_num_seqs=args.max_num_seqs)
    return asyncio.run(_serve(args, token, executor))


async def _serve(args, token: str, executor) -> int:
    info = pb.StageInfo(start_layer=executor.start_layer, end_layer=executor.end_layer,
                        model_fingerprint=config_fingerprint(args.model),
                        dtype=str(executor.dtype).removeprefix("torch."),
                        block_size=executor.block_size, num_blocks=executor.num_blocks,
                        num_layers=executor.arch.num_layers, host_id=host_id(),
                        device="emulated" if args.emulate_device else executor.device.type,
                        cpu_cores=cpu_cores())
    if args.advertise:
        check_address(args.advertise, "--advertise")
    security = PeerSecurity.create(token, insecure=args.insecure_peers)
    worker = StageWorker(executor, info, security, args.head)
    port = await worker.start(args.host, args.peer_port)
    info.address, info.port = args.advertise or "", port
    print(f"stage layers {info.start_layer}:{info.end_layer} listening on {args.host}:{port}; "
          f"joining the head at {args.head}", flush=True)

    def joined(w: StageWorker) -> None:
        print(f"joined the head at {args.head} as {w.stage_id}; reached at {w.address}",
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
    for task in (membership, stopping):
        task.cancel()
    await worker.stop()
    await finish_pending_tasks()
    return code


async def finish_pending_tasks(timeout_s: float = FINISH_TIMEOUT_S,
                               ignore: frozenset = frozenset()) -> None:
    """Let the tasks still running end on their own before the event loop ends.

    grpc.aio's ``server.stop()`` returns before the tasks that ran the server's RPCs have
    ended: a stream still open at stop is cancelled, and its task then sends the final
    status. If the loop ended now (``asyncio.run`` returning), those tasks would be
    cancelled, and grpc logs each as "Exception not handled by _handle_exceptions in
    servicer method" followed by two ``CancelledError`` tracebacks. They end in a few loop
    iterations; whatever still runs after ``timeout_s`` is left to ``asyncio.run``.
    ``ignore``: tasks that end later on purpose (a web server's own main task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        pending = asyncio.all_tasks() - {asyncio.current_task()} - ignore
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            return
        await asyncio.wait(pending, timeout=remaining)


def check_address(address: str, option: str) -> None:
    """HOST:PORT (IPv6 hosts in brackets), else ValueError naming the option."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{option} must be HOST:PORT (e.g. 203.0.113.7:50052), got {address!r}")


def on_signal(callback) -> None:
    """Call ``callback`` on the event loop at SIGINT / SIGTERM, on every platform."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(callback))

"""``molink join``: run one stage of a pipeline and join it to the head."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from molink.config import CacheConfig, ModelConfig, parse_layer_range
from molink.coordinator.stage_worker import StageRefused, StageWorker
from molink.model.loader import config_fingerprint, load_config
from molink.runtime.device_profile import DeviceProfile
from molink.runtime.host import cpu_cores, host_id
from molink.runtime.emulated_executor import EmulatedExecutor
from molink.runtime.stage_executor import StageExecutor
from molink.transport import molink_pb2 as pb

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="Hugging Face-format model directory (same model as the head)")
    parser.add_argument("--head", required=True, help="the head's peer address HOST:PORT")
    parser.add_argument("--layers", required=True, help="half-open layer range START:END (START: = to the end)")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    parser.add_argument("--peer-port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--advertise", default=None,
                        help="HOST:PORT the previous stage connects to (default: this host and port)")
    parser.add_argument("--cluster-token", default=None,
                        help="shared cluster secret (or set MOLINK_CLUSTER_TOKEN)")
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
    worker = StageWorker(executor, info, token, args.head)
    port = await worker.start(args.host, args.peer_port)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    info.address = args.advertise or f"{host}:{port}"
    print(f"stage layers {info.start_layer}:{info.end_layer} listening on {info.address}", flush=True)
    try:
        stage_id = await worker.join()
    except StageRefused as exc:
        print(f"error: the head at {args.head} refused this stage: {exc}", file=sys.stderr, flush=True)
        await worker.stop()
        return 3
    print(f"joined the head at {args.head} as {stage_id}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await worker.stop()
    return 0

"""``molink serve``: the head of a pipeline, with its HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import secrets
from pathlib import Path

from molink import envs
from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.api_options import add_api_arguments, api_options
from molink.entrypoints.join import (
    add_node_arguments,
    check_layers,
    kv_cache_memory_bytes,
    layer_range,
    non_negative,
    port,
    positive_int,
    seconds,
)
from molink.entrypoints.signals import finish_pending_tasks
from molink.messages import is_lossy
from molink.model.hub import resolve_model
from molink.model.loader import load_config
from molink.runtime.intra_op import run_in_own_thread, serial_here, use_threads
from molink.scheduler.stall_bound import DEFAULT_STALL_FACTOR
from molink.transport.peers import PeerSecurity

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="Hugging Face-format model directory, or a Hub repo id "
                             "(org/name[@revision]): the head downloads config, tokenizer and "
                             "the shards of its own layers")
    parser.add_argument("--layers", default=None, type=_head_layers_arg, metavar="0:END",
                        help="layers the head computes itself (default: all of them; "
                             "'none': the head computes no layers; 'auto': the head takes part "
                             "in automatic placement like a stage joining without --layers, as "
                             "the first node)")
    parser.add_argument("--placement-wait", type=seconds, default=10.0, metavar="SECONDS",
                        help="automatic placement: how long the head waits after the last new "
                             "node offered itself before it places the layers (default: 10)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="interface the HTTP API and the peer port listen on")
    parser.add_argument("--port", type=port, default=8000, metavar="PORT", help="HTTP API port")
    add_node_arguments(parser, peer_port=50051)
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="HTTP clients must send 'Authorization: Bearer <key>' to /v1/* and "
                             "/generate (default: $MOLINK_API_KEY; unset: no key needed)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model name the API answers to (default: the model directory's "
                             "name, or the repo id)")
    parser.add_argument("--ssl-keyfile", default=None, metavar="PATH",
                        help="serve the HTTP API over HTTPS with this private key (PEM; "
                             "default: plain HTTP)")
    parser.add_argument("--ssl-certfile", default=None, metavar="PATH",
                        help="... and this certificate (PEM; default: plain HTTP)")
    parser.add_argument("--uvicorn-log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="log level of the HTTP server (uvicorn)")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="do not log a line per request (logged at INFO by default)")
    add_api_arguments(parser)
    _add_scheduling_arguments(parser)


def _add_scheduling_arguments(parser) -> None:
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, metavar="N",
                        help="most tokens in one step; prefill is cut into chunks to fit")
    parser.add_argument("--max-waiting-requests", type=positive_int, default=None, metavar="N",
                        help="requests (each of a request's n choices counts one) that may wait "
                             "in the head, not yet running, before new ones are answered 503 "
                             "with Retry-After (default: --max-num-seqs: one more full batch "
                             "waits behind the running one)")
    parser.add_argument("--num-microbatches", default="auto", type=_num_microbatches_arg,
                        metavar="N|auto",
                        help="micro-batches in flight: a number, or auto (chosen from measured "
                             "stage compute and link times, re-decided as load changes)")
    parser.add_argument("--link-schedule", default="molink", choices=["molink", "priority", "fifo"],
                        help="how every hop sends: molink = decode activations first, prefill "
                             "cut into just-in-time chunks computed as they arrive; priority = "
                             "decode first, prefill whole; fifo = in order, whole")
    parser.add_argument("--compression", default="auto",
                        choices=["auto", "none", "float16", "bfloat16", "int8"],
                        help="activations on the wire: auto (default) = lossless, the model's "
                             "own dtype; the others are lossy opt-ins that can change answers "
                             "(int8 = per-token scales, about half of 16-bit bytes; accuracy: "
                             "benchmarks/results/compression_accuracy.md)")
    parser.add_argument("--max-chunk-tokens", type=positive_int, default=None, metavar="N",
                        help="cap on a prefill chunk's tokens (default: just in time)")
    parser.add_argument("--decode-stall-factor", type=non_negative,
                        default=DEFAULT_STALL_FACTOR, metavar="F",
                        help="while requests decode, prompts are computed in chunks small "
                             "enough that a step carrying one takes at most (1 + F) decode "
                             "steps, at the head and at every stage, from measured step times "
                             "(where links set the round: F times half a stage's share of it); "
                             "a larger F: faster long prompts, longer inter-token gaps "
                             "meanwhile; 0: no bound")
    parser.add_argument("--failover-timeout", type=seconds, default=60.0, metavar="SECONDS",
                        help="when a stage is lost or leaves: how long its requests (streams "
                             "kept open) wait for a standby or a new join to serve its layers; "
                             "they are then replayed there and go on. 0: fail them at once "
                             "(default: 60)")
    parser.add_argument("--shutdown-timeout", type=seconds, default=30.0, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C: stop taking requests and let running "
                             "streams finish for up to this long, then tell the stages to free "
                             "everything; a second Ctrl-C exits at once (default: 30)")


def _head_layers_arg(text: str) -> str:
    return text.lower() if text.lower() in ("none", "auto") else layer_range(text)


def _num_microbatches_arg(text: str) -> int | None:
    """argparse type: ``auto`` (None: the head chooses) or a positive integer."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text!r}")
    return int(text)


def head_layers(text: str | None, num_layers: int) -> tuple[int, int] | None:
    if text is None:
        return 0, num_layers
    if text.lower() in ("none", "auto"):
        return None
    start, end = check_layers(text, num_layers)
    if start != 0:
        raise ValueError(f"--layers for the head must start at 0 and end by {num_layers}, "
                         f"got {text}")
    return start, end


def run(args, token: str | None) -> int:
    import uvicorn

    from molink.entrypoints.http_server import create_app

    _check_ssl_files(args)
    options = api_options(args)  # a bad --chat-template stops here, before the model loads
    generated = token is None
    token = token or secrets.token_hex(16)
    name = args.served_model_name or served_name(args.model)
    use_threads(args.threads)
    head = run_in_own_thread(_build_head, args, token)  # its own layers loaded on every core
    serial_here()  # the event loop's operators: the compute thread's team stays the only one
    max_waiting = args.max_waiting_requests
    app = create_app(head, name, api_key=args.api_key or envs.api_key(),
                     max_waiting_requests=args.max_num_seqs if max_waiting is None else max_waiting,
                     log_requests=not args.disable_log_requests, options=options)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server_tasks = frozenset(asyncio.all_tasks())  # uvicorn's own: they end after us
        head.ready_callbacks.append(lambda: _print_ready_block(args, head, name))
        peer_port = await head.start(args.host, args.peer_port, args.advertise)
        _print_banner(args, head, peer_port, token if generated else None)
        yield
        head.begin_stop()
        await head.stop()
        await finish_pending_tasks(ignore=server_tasks)

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def served_name(model: str) -> str:
    """A local directory's name, or the repo id (``org/name``, without ``@revision``)."""
    if Path(model).expanduser().exists():
        return Path(model).name
    return model.partition("@")[0]


def head_model(args) -> tuple[str, tuple[int, int] | None]:
    """The head's local model directory and its own layers: a Hub repo id is fetched
    (config and tokenizer; weights only for the layers the head computes itself)."""
    model_dir = resolve_model(args.model, weights=False)
    layers = head_layers(args.layers, load_config(model_dir).arch.num_layers)
    if layers is not None:
        model_dir = resolve_model(args.model, *layers)
    return model_dir, layers


def _layer_fetcher(model: str):
    """For a Hub repo id: fetch a layer range's shards (the head's own, once assigned)."""
    if Path(model).expanduser().exists():
        return None
    return functools.partial(resolve_model, model)


def _check_ssl_files(args) -> None:
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path!r} is not a file")


def _build_head(args, token: str) -> PipelineHead:
    model_dir, layers = head_model(args)
    args = argparse.Namespace(**{**vars(args), "model": model_dir})
    kv_bytes = kv_cache_memory_bytes(args, *layers) if layers else None
    return PipelineHead(
        ModelConfig(model=model_dir, dtype=args.dtype, device=args.device,
                    max_model_len=args.max_model_len, seed=args.seed,
                    quantization=args.quantization),
        CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                    kv_cache_memory_bytes=kv_bytes),
        SchedulerConfig(max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens),
        HeadConfig(head_layers=layers, num_microbatches=args.num_microbatches,
                   link_schedule=args.link_schedule, compression=args.compression,
                   max_chunk_tokens=args.max_chunk_tokens, auto_layers=args.layers == "auto",
                   decode_stall_factor=args.decode_stall_factor,
                   placement_settle_s=args.placement_wait, max_memory=args.max_memory,
                   gpu_memory_utilization=args.gpu_memory_utilization,
                   fetch_layers=_layer_fetcher(args.model),
                   failover_timeout_s=args.failover_timeout),
        security=PeerSecurity.create(token, insecure=args.insecure_peers))


def _print_banner(args, head: PipelineHead, peer_port: int, generated_token: str | None) -> None:
    host = args.advertise.rpartition(":")[0] if args.advertise else (
        "<this-host-ip>" if args.host in ("0.0.0.0", "::") else args.host)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"MoLink head: HTTP API on {scheme}://{args.host}:{args.port}, stages join "
          f"{host}:{peer_port}",
          flush=True)
    if generated_token:
        print(f"cluster token (pass it to every stage): {generated_token}", flush=True)
    if is_lossy(args.compression):
        print(f"wire compression {args.compression} is lossy: the activations between stages "
              "lose precision on the wire, so answers can differ from the model's own (named "
              "per hop in /metrics and molink status)", flush=True)
    ready, detail = head.health()
    if not ready:
        print(f"waiting for stages: {detail}; on each stage machine run", flush=True)
        print(f"  molink join {args.model} --head {host}:{peer_port} --layers START:END "
              "--cluster-token <token>", flush=True)


def _print_ready_block(args, head: PipelineHead, name: str) -> None:
    """Once every layer is served: where to send requests, and how."""
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    url = f"{'https' if args.ssl_certfile else 'http'}://{host}:{args.port}"
    key = "$MOLINK_API_KEY" if (args.api_key or envs.api_key()) else "unused"
    print(f"""
================ MoLink is ready ================
URL:      {url}/v1   (OpenAI-compatible; /health, /metrics)
Model:    {name}
Pipeline: {head.describe()}

curl {url}/v1/completions -H 'Content-Type: application/json' \\
     -H "Authorization: Bearer {key}" \\
     -d '{{"model": "{name}", "prompt": "Hello", "max_tokens": 32}}'

python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key}'); \\
print(c.completions.create(model='{name}', prompt='Hello', max_tokens=32).choices[0].text)"
=================================================""", flush=True)

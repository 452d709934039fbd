"""``molink serve``: the head of a pipeline, with its HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

from molink import envs
from molink.config import CacheConfig, ModelConfig, SchedulerConfig, parse_layer_range
from molink.coordinator.head_config import HeadConfig
from molink.coordinator.pipeline_head import PipelineHead
from molink.entrypoints.join import check_address, finish_pending_tasks
from molink.model.loader import load_config
from molink.transport.peers import PeerSecurity

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="Hugging Face-format model directory")
    parser.add_argument("--layers", default=None,
                        help="layers the head computes itself, START:END (default: all of them; "
                             "'none': the head computes no layers)")
    parser.add_argument("--host", default="0.0.0.0", help="interface for HTTP and peers")
    parser.add_argument("--port", type=int, default=8000, help="HTTP API port")
    parser.add_argument("--peer-port", type=int, default=50051, help="port stages join on")
    parser.add_argument("--advertise", default=None, metavar="HOST:PORT",
                        help="address stages send results to, for NAT or port forwarding "
                             "(default: the address each stage dialed with --head)")
    parser.add_argument("--cluster-token", default=None,
                        help="shared cluster secret (or set MOLINK_CLUSTER_TOKEN; "
                             "a random one is generated and printed when absent)")
    parser.add_argument("--api-key", default=None,
                        help="HTTP clients must send 'Authorization: Bearer <key>' to /v1/* and "
                             "/generate (or set MOLINK_API_KEY; default: no key needed)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--insecure-peers", action="store_true",
                        help="plain TCP between nodes (the token still authenticates every "
                             "call): only on a trusted LAN; every node must agree")
    parser.add_argument("--ssl-keyfile", default=None, help="serve the HTTP API over HTTPS "
                        "with this private key (PEM)")
    parser.add_argument("--ssl-certfile", default=None, help="... and this certificate (PEM)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-microbatches", default="auto",
                        help="micro-batches in flight: a number, or auto (chosen from measured "
                             "stage compute and link times, re-decided as load changes)")
    parser.add_argument("--link-schedule", default="molink", choices=["molink", "priority", "fifo"],
                        help="how every hop sends: molink = decode activations first, prefill "
                             "cut into just-in-time chunks computed as they arrive; priority = "
                             "decode first, prefill whole; fifo = in order, whole")
    parser.add_argument("--compression", default="auto",
                        choices=["auto", "none", "float16", "bfloat16", "int8"],
                        help="activations on the wire: auto chooses per hop from measured "
                             "bandwidth against compute (int8 = per-token scales)")
    parser.add_argument("--max-chunk-tokens", type=int, default=None,
                        help="cap on a prefill chunk's tokens (default: just in time)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-waiting-requests", type=_positive_int, default=None,
                        help="requests (each of a request's n choices counts one) that may wait "
                             "in the head, not yet running, before new ones are answered 503 "
                             "with Retry-After (default: --max-num-seqs, 256 unless set: one "
                             "more full batch waits behind the running one)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def head_layers(text: str | None, num_layers: int) -> tuple[int, int] | None:
    if text is None:
        return 0, num_layers
    if text.lower() == "none":
        return None
    start, end = parse_layer_range(text)
    end = num_layers if end is None else end
    if start != 0 or end > num_layers:
        raise ValueError(f"--layers for the head must start at 0 and end by {num_layers}, got {text}")
    return start, end


def num_microbatches(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--num-microbatches must be 'auto' or a positive integer, got {text!r}")
    return int(text)


def run(args, token: str | None) -> int:
    import uvicorn

    from molink.entrypoints.http_server import create_app

    if args.advertise:
        check_address(args.advertise, "--advertise")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    generated = token is None
    token = token or secrets.token_hex(16)
    arch = load_config(args.model).arch
    head = PipelineHead(
        ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                    max_model_len=args.max_model_len),
        CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks),
        SchedulerConfig(max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens),
        HeadConfig(head_layers=head_layers(args.layers, arch.num_layers),
                   num_microbatches=num_microbatches(args.num_microbatches),
                   link_schedule=args.link_schedule, compression=args.compression,
                   max_chunk_tokens=args.max_chunk_tokens),
        security=PeerSecurity.create(token, insecure=args.insecure_peers))
    name = args.served_model_name or Path(args.model).name
    max_waiting = args.max_waiting_requests
    app = create_app(head, name, api_key=args.api_key or envs.api_key(),
                     max_waiting_requests=args.max_num_seqs if max_waiting is None else max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server_tasks = frozenset(asyncio.all_tasks())  # uvicorn's own: they end after us
        head.ready_callbacks.append(lambda: _print_ready_block(args, head, name))
        port = await head.start(args.host, args.peer_port, args.advertise)
        _print_banner(args, head, port, token if generated else None)
        yield
        head.begin_stop()
        await head.stop()
        await finish_pending_tasks(ignore=server_tasks)

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    return 0


def _print_banner(args, head: PipelineHead, peer_port: int, generated_token: str | None) -> None:
    host = args.advertise.rpartition(":")[0] if args.advertise else (
        "<this-host-ip>" if args.host in ("0.0.0.0", "::") else args.host)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"MoLink head: HTTP API on {scheme}://{args.host}:{args.port}, stages join "
          f"{host}:{peer_port}",
          flush=True)
    if generated_token:
        print(f"cluster token (pass it to every stage): {generated_token}", flush=True)
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

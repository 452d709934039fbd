"""The ``molink`` command line.

    molink generate MODEL --prompt "Hello"      one prompt, streamed to the terminal
    molink demo                                  the bundled model on a local 3-stage pipeline
    molink serve MODEL [--layers 0:K]            the head: HTTP API + the first layers
    molink join MODEL --head H:P --layers A:B    serve layers A:B as a stage of H's pipeline
    molink status --head HOST:HTTP_PORT          the live pipeline and its figures
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from molink import envs
from molink.entrypoints import join as join_cli
from molink.entrypoints import serve as serve_cli
from molink.sampling_params import SamplingParams

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
DEMO_PROMPT = "In Python, a list is"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("info" if args.command in ("serve", "join") else "warning")
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as exc:  # bad user input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info for serve and join, warning otherwise")
    sub = parser.add_subparsers(required=True, dest="command")
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("model", help="Hugging Face-format model directory")
    gen.add_argument("--prompt", required=True)
    _add_generation_options(gen)
    gen.set_defaults(handler=_generate)
    demo = sub.add_parser("demo", help="generate with the bundled default model")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    _add_generation_options(demo)
    demo.set_defaults(handler=_demo, temperature=0.8)
    serve = sub.add_parser("serve", help="run the head of a pipeline with its HTTP API")
    serve_cli.add_arguments(serve)
    serve.set_defaults(handler=_serve)
    status = sub.add_parser("status", help="show a running pipeline and its figures")
    status.add_argument("--head", required=True, help="the head's HTTP address HOST:PORT")
    status.set_defaults(handler=_status)
    join = sub.add_parser("join", help="serve a layer range as a stage of a head's pipeline")
    join_cli.add_arguments(join)
    join.set_defaults(handler=_join)
    return parser


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")


def _cluster_token(args) -> str:
    token = args.cluster_token or envs.cluster_token()
    if not token:
        raise ValueError(f"a cluster token is required: pass --cluster-token or set "
                         f"{envs.CLUSTER_TOKEN_VAR} (the head prints the one it uses)")
    return token


def _serve(args) -> int:
    return serve_cli.run(args, args.cluster_token or envs.cluster_token())


def _status(args) -> int:
    from molink.entrypoints import status

    print(status.render(args.head))
    return 0


def _join(args) -> int:
    return join_cli.run(args, _cluster_token(args))


def _generate(args) -> int:
    return _stream(args.model, args)


def _demo(args) -> int:
    import asyncio

    from molink.entrypoints import demo

    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise ValueError(f"the bundled model is missing from {DEFAULT_MODEL_DIR}")
    try:
        return asyncio.run(demo.run(str(DEFAULT_MODEL_DIR), args.prompt, _sampling(args),
                                    args.dtype, args.device))
    except (demo.StageExited, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _sampling(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def _stream(model: str, args) -> int:
    from molink.entrypoints.llm import LLM

    llm = LLM(model=model, dtype=args.dtype, device=args.device, seed=args.seed)
    params = _sampling(args)
    engine = llm.llm_engine
    request_id = engine.add_request(None, args.prompt, params)
    print(args.prompt, end="", flush=True)
    printed = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id:
                text = output.outputs[0].text
                print(text[printed:], end="", flush=True)
                printed = len(text)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``molink`` command line.

    molink generate MODEL --prompt "Hello"      one prompt, streamed to the terminal
    molink demo                                  the bundled model on a local 3-stage pipeline
    molink serve MODEL [--layers 0:K]            the head: HTTP API + the first layers
    molink join MODEL --head H:P --layers A:B    serve layers A:B as a stage of H's pipeline
    molink status --head HOST:HTTP_PORT          the live pipeline and its figures
    molink plan MODEL --node rtx3090 --node cpu:64GB   which layers each node would serve
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from molink import envs
from molink.config import DTYPES
from molink.entrypoints import join as join_cli
from molink.entrypoints import plan as plan_cli
from molink.entrypoints import serve as serve_cli
from molink.entrypoints.join import positive_int
from molink.sampling_params import SamplingParams

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
DEMO_PROMPT = "In Python, a list is"
LOG_LEVELS = ["debug", "info", "warning", "error"]
SUBCOMMANDS = {  # name -> (one-line summary, default log level)
    "generate": ("generate text for one prompt", "warning"),
    "demo": ("generate with the bundled default model on a local 3-stage pipeline", "warning"),
    "serve": ("run the head of a pipeline with its HTTP API", "info"),
    "join": ("serve a layer range as a stage of a head's pipeline", "info"),
    "status": ("show a running pipeline and its figures", "warning"),
    "plan": ("show which layers each node would serve, its memory and the predicted speed",
             "warning"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default after its help; an option whose
    default is None or off says in its own help what happens when it is not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Bad input: one line naming the command and the problem, exit code 2 (not the whole
    usage, which ``--help`` shows)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or SUBCOMMANDS[args.command][1]
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as exc:  # bad user input: one clear line, no traceback
        print(f"molink {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="molink", description=__doc__,
                            formatter_class=HelpFormatter)
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                        help="also accepted after the subcommand (default: info for serve and "
                             "join, warning otherwise)")
    sub = parser.add_subparsers(required=True, dest="command", metavar="COMMAND",
                                help="one of these; 'molink COMMAND --help' lists its options")
    adders = {"generate": _add_generate, "demo": _add_demo, "serve": serve_cli.add_arguments,
              "join": join_cli.add_arguments, "status": _add_status,
              "plan": plan_cli.add_arguments}
    handlers = {"generate": _generate, "demo": _demo, "serve": _serve, "join": _join,
                "status": _status, "plan": plan_cli.run}
    for name, (summary, level) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary,
                                 formatter_class=HelpFormatter)
        adders[name](command)
        # SUPPRESS: absent after the subcommand, it leaves the value given before it alone
        command.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                             help=f"log level (default: {level})")
        command.set_defaults(handler=handlers[name])
    return parser


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face-format model directory, or a Hub repo "
                                      "id (org/name[@revision])")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt to continue")
    _add_generation_options(parser)


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT",
                        help="the prompt to continue")
    _add_generation_options(parser)
    parser.set_defaults(temperature=0.8)


def _add_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", required=True, metavar="HOST:PORT",
                        help="the head's HTTP API address: its host and --port (or a URL)")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=positive_int, default=64, metavar="N",
                        help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="sample from the smallest set of tokens whose probabilities sum "
                             "to at least this")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, metavar="R",
                        help="penalises tokens already in the text (1: off)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed (same seed, same text)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="precision (auto: the checkpoint's; on a CPU float16 and int4 weights "
                             "compute in bfloat16)")
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    join_cli.add_quantization_argument(parser)


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

    llm = LLM(model=model, dtype=args.dtype, device=args.device, seed=args.seed,
              quantization=args.quantization)
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

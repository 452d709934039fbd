"""The ``molink`` command line explains itself: every option has help and shows its default,
serve and join share one name per idea, bad input is one line and exit code 2.

Everything runs in this process (parsing, and handlers that fail before starting anything),
except one check that the real console entry prints no traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from molink.entrypoints import cli, join, serve
from molink.entrypoints.cli import DEFAULT_MODEL_DIR, HelpFormatter, build_parser, main
from molink.model.loader import load_model

MODEL = str(DEFAULT_MODEL_DIR)  # 6 layers
SUBCOMMANDS = ("generate", "demo", "serve", "join", "status", "plan")


def _subparser(name: str) -> argparse.ArgumentParser:
    subparsers = next(action for action in build_parser()._actions
                      if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[-1]: action for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_option_has_help_and_says_its_default(name):
    parser = _subparser(name)
    formatter = HelpFormatter(prog=parser.prog)
    undocumented = [action.dest for action in parser._actions if not (action.help or "").strip()]
    assert not undocumented, f"molink {name}: no help for {undocumented}"
    for flag, action in _options(parser).items():
        if action.required or action.default is False:  # nothing to default / a plain switch
            continue
        assert "default" in formatter._get_help_string(action), f"molink {name} {flag}"


def test_top_level_options_have_help():
    parser = build_parser()
    assert all(action.help for action in parser._actions)
    assert set(SUBCOMMANDS) <= set(cli.SUBCOMMANDS)


def test_serve_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for shown in ("HTTP API port (default: 8000)", "(default: 50051)", "(default: 16)",
                  "(default: 256)", "(default: 2048)", "(default: warning)", "(default: auto)",
                  "(default: molink)", "(default: 0.0.0.0)", "(default: info)"):
        assert shown in text, shown


def test_serve_and_join_share_one_flag_per_idea():
    serve_options, join_options = _options(_subparser("serve")), _options(_subparser("join"))
    shared = {"--peer-port", "--advertise", "--cluster-token", "--insecure-peers", "--dtype",
              "--device", "--seed", "--max-model-len", "--block-size", "--num-kv-blocks",
              "--gpu-memory-utilization", "--max-num-seqs", "--host", "--layers", "--log-level"}
    assert shared <= serve_options.keys() & join_options.keys()
    for flag in shared - {"--host", "--layers", "--log-level"}:  # same words, same meaning
        assert serve_options[flag].help == join_options[flag].help, flag
        assert serve_options[flag].type == join_options[flag].type, flag
    assert serve_options["--peer-port"].default == 50051
    assert join_options["--peer-port"].default == 0  # any free port


@pytest.mark.parametrize("argv, level", [
    (["--log-level", "debug", "status", "--head", "h:1"], "debug"),
    (["status", "--head", "h:1", "--log-level", "error"], "error"),
    (["--log-level", "debug", "serve", MODEL, "--log-level", "error"], "error"),  # last wins
    (["join", MODEL, "--head", "h:1", "--layers", "2:", "--log-level", "debug"], "debug"),
    (["serve", MODEL], None),  # main picks the command's default
])
def test_log_level_before_or_after_the_subcommand(argv, level):
    assert build_parser().parse_args(argv).log_level == level


def test_vllm_named_flags():
    args = build_parser().parse_args(
        ["serve", MODEL, "--gpu-memory-utilization", "0.8", "--max-model-len", "128",
         "--seed", "7", "--uvicorn-log-level", "info", "--disable-log-requests"])
    assert (args.gpu_memory_utilization, args.max_model_len, args.seed) == (0.8, 128, 7)
    assert (args.uvicorn_log_level, args.disable_log_requests) == ("info", True)
    defaults = build_parser().parse_args(["serve", MODEL])
    assert (defaults.uvicorn_log_level, defaults.disable_log_requests) == ("warning", False)
    assert defaults.gpu_memory_utilization is None  # the runtime's own default budget
    stage = build_parser().parse_args(["join", MODEL, "--head", "h:1", "--layers", "2:",
                                       "--seed", "3", "--max-model-len", "64"])
    assert (stage.seed, stage.max_model_len) == (3, 64)


@pytest.mark.parametrize("argv, message", [
    (["serve", MODEL, "--advertise", "no-port"], "argument --advertise: must be HOST:PORT"),
    (["join", MODEL, "--head", "nohost", "--layers", "0:2"], "argument --head: must be HOST:PORT"),
    (["join", MODEL, "--head", "h:70000", "--layers", "0:2"], "argument --head: must be HOST"),
    (["join", MODEL, "--head", "h:1", "--layers", "x"], "argument --layers: layers must look"),
    (["join", MODEL, "--head", "h:1", "--layers", "3:1"], "argument --layers: layers must be"),
    (["serve", MODEL, "--port", "99999"], "argument --port: must be a port number"),
    (["serve", MODEL, "--num-microbatches", "0"], "argument --num-microbatches: must be 'auto'"),
    (["serve", MODEL, "--gpu-memory-utilization", "1.5"], "must be a fraction in (0, 1]"),
    (["serve", MODEL, "--max-num-seqs", "0"], "argument --max-num-seqs: must be a positive"),
    (["serve", MODEL, "--dtype", "int4"], "argument --dtype: invalid choice"),
    (["serve", MODEL, "--log-level", "loud"], "argument --log-level: invalid choice"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"molink {argv[0]}: error: " in lines[0], lines
    assert message in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["serve", "/no/such/model"], "model '/no/such/model' is not a directory"),
    (["join", "/no/such/model", "--head", "h:1", "--layers", "0:2"], "is not a directory"),
    (["generate", "/no/such/model", "--prompt", "hi"], "is not a directory"),
    (["join", MODEL, "--head", "h:1", "--layers", "2:9"], "--layers 2:9 is outside the model's 6"),
    (["join", MODEL, "--head", "h:1", "--layers", "6:"], "--layers 6: is outside the model's 6"),
    (["join", MODEL, "--head", "h:1", "--standby"], "--standby needs --layers START:END"),
    (["serve", MODEL, "--layers", "0:9"], "--layers 0:9 is outside the model's 6 layers"),
    (["serve", MODEL, "--layers", "2:4"], "--layers for the head must start at 0"),
    (["serve", MODEL, "--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["serve", MODEL, "--ssl-keyfile", "/no/k.pem", "--ssl-certfile", "/no/c.pem"],
     "--ssl-keyfile '/no/k.pem' is not a file"),
    (["status", "--head", "127.0.0.1:1"], "cannot reach the head"),
])
def test_bad_input_found_later_is_one_line_and_exit_2(argv, message, capsys):
    assert main([*argv, "--cluster-token", "t"] if argv[0] == "join" else argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"molink {argv[0]}: error: "), lines
    assert message in lines[0]


def test_console_entry_prints_no_traceback():
    result = subprocess.run([sys.executable, "-m", "molink.entrypoints.cli", "join",
                             "/no/such/model", "--head", "h:1", "--layers", "0:2",
                             "--cluster-token", "t"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("molink join: error: model '/no/such/model'")
    assert "Traceback" not in result.stderr


def test_serve_passes_log_options_to_the_app_and_uvicorn(monkeypatch):
    seen = {}
    monkeypatch.setattr(serve, "_build_head", lambda args, token: SimpleNamespace())
    # (this test's own thread keeps its operators' width; the wiring is checked)
    monkeypatch.setattr(serve, "use_threads", lambda count: seen.update(threads=count))
    monkeypatch.setattr(serve, "serial_here", lambda: seen.update(serial=True))
    monkeypatch.setattr("molink.entrypoints.http_server.create_app",
                        lambda head, name, **kwargs: seen.update(kwargs) or SimpleNamespace(
                            router=SimpleNamespace(lifespan_context=None)))
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: seen.update(uvicorn=kwargs))
    for argv, log_requests, uvicorn_level in ((["serve", MODEL], True, "warning"), (
            ["serve", MODEL, "--disable-log-requests", "--uvicorn-log-level", "debug"],
            False, "debug")):
        seen.clear()
        assert serve.run(build_parser().parse_args(argv), "token") == 0
        assert seen["log_requests"] is log_requests
        assert seen["uvicorn"]["log_level"] == uvicorn_level
        assert seen["serial"] and seen["threads"] is None
    serve.run(build_parser().parse_args(["serve", MODEL, "--threads", "3"]), "token")
    assert seen["threads"] == 3


def _memory_args(**changes) -> SimpleNamespace:
    values = {"model": MODEL, "device": "cuda", "dtype": "float32", "gpu_memory_utilization": 0.5,
              "max_memory": None, "num_kv_blocks": None, "quantization": None}
    return SimpleNamespace(**{**values, **changes})


def test_gpu_memory_utilization_leaves_the_kv_cache_the_rest(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * gib, 8 * gib))
    model, _ = load_model(MODEL, 0, 6, "float32", torch.device("cpu"))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # half of 8 GiB for this node, 2 GiB already used by others, then the weights
    assert join.kv_cache_memory_bytes(_memory_args(), 0, 6) == 4 * gib - 2 * gib - weight_bytes
    assert join.kv_cache_memory_bytes(_memory_args(gpu_memory_utilization=None), 0, 6) is None
    assert join.kv_cache_memory_bytes(_memory_args(device="cpu"), 0, 6) is None  # CUDA only
    with pytest.raises(ValueError, match="leaves no memory for the KV cache"):
        join.kv_cache_memory_bytes(_memory_args(gpu_memory_utilization=0.2), 0, 6)

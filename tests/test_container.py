"""The container files stay true: compose.yaml runs the README's multi-machine commands on
the bundled model, each parsed by MoLink's own CLI parser; the Dockerfiles install what the
README installs and run as a non-root ``molink``. (Building and running the image needs a
docker daemon, which CI lacks: benchmarks/results/container_smoke.md says what ran.)

PyYAML comes with ``transformers`` (one of MoLink's dependencies).
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from molink.entrypoints.cli import DEFAULT_MODEL_DIR, build_parser
from molink.entrypoints.join import check_layers
from molink.model.loader import load_config

ROOT = Path(__file__).resolve().parent.parent
README_MODEL, README_HEAD_HOST = "/models/Qwen3-14B", "HEAD_IP"
IMAGE_MODEL = "/models/default_model"  # where the Dockerfiles link the bundled model
HEAD_SERVICE = "head"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _readme_recipe() -> tuple[list[str], list[list[str]]]:
    """(serve argv, join argvs) of the README's multi-machine block, without ``molink``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- multihost:begin"):text.index("<!-- multihost:end -->")]
    commands = [shlex.split(line)[1:] for line in block.splitlines()
                if line.startswith(("molink serve ", "molink join "))]
    assert commands[0][0] == "serve" and len(commands) == 3, "the README's recipe changed shape"
    return commands[0], commands[1:]


def _options(argv: list[str]) -> list[str]:
    return [word for word in argv if word.startswith("--")]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _services() -> tuple[dict, list[dict]]:
    services = _compose()["services"]
    stages = [s for name, s in services.items() if name != HEAD_SERVICE]
    return services[HEAD_SERVICE], stages


def test_every_service_command_parses_with_molinks_cli():
    parser = build_parser()
    for name, service in _compose()["services"].items():
        args = parser.parse_args(service["command"])
        assert args.command in ("serve", "join"), name
        assert args.model == IMAGE_MODEL, name


def test_compose_runs_the_readme_recipe():
    """Same subcommands, same options in the same order, same ports; only the model path,
    the head's host (its service name) and the layer split of a 6-layer model differ."""
    head, stages = _services()
    serve, joins = _readme_recipe()
    assert head["command"][0] == "serve" and len(stages) == len(joins) == 2
    assert _options(head["command"]) == _options(serve)
    for flag in ("--port", "--peer-port"):
        assert _value(head["command"], flag) == _value(serve, flag), flag
    for stage, join in zip(stages, joins, strict=True):
        command = stage["command"]
        assert command[0] == "join" and _options(command) == _options(join)
        assert _value(command, "--head") == _value(join, "--head").replace(README_HEAD_HOST,
                                                                           HEAD_SERVICE)
        assert _value(command, "--peer-port") == _value(join, "--peer-port")
    assert serve[1] == joins[0][1] == README_MODEL


def test_compose_layers_tile_the_bundled_model_like_the_readme():
    """0:K on the head, then contiguous ranges, the last open-ended (``START:``) as in the
    README; every range inside the model."""
    head, stages = _services()
    num_layers = load_config(str(DEFAULT_MODEL_DIR)).arch.num_layers
    texts = [_value(s["command"], "--layers") for s in (head, *stages)]
    assert texts[-1].endswith(":") and _value(_readme_recipe()[1][-1], "--layers").endswith(":")
    ranges = [check_layers(text, num_layers) for text in texts]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), ranges
    assert all(start < end for start, end in ranges), ranges


def test_cluster_token_comes_from_the_environment_or_compose_stops():
    for name, service in _compose()["services"].items():
        value = service["environment"]["MOLINK_CLUSTER_TOKEN"]
        # ${VAR:?message}: compose refuses to start, printing the message, when VAR is unset
        assert re.fullmatch(r"\$\{MOLINK_CLUSTER_TOKEN:\?[^}]*MOLINK_CLUSTER_TOKEN[^}]+\}",
                            value), name


def test_head_publishes_its_port_and_is_checked_on_health():
    head, stages = _services()
    port = _value(head["command"], "--port")
    assert f"{port}:{port}" in head["ports"]
    probe = " ".join(head["healthcheck"]["test"])
    assert f"http://localhost:{port}/health" in probe
    assert head["healthcheck"]["test"][0] == "CMD"
    assert all("ports" not in stage for stage in stages)  # stages are reached in-network


def _dockerfile(name: str) -> str:
    # join continuation lines, so each instruction is one line
    return (ROOT / name).read_text().replace("\\\n", " ")


def _instructions(name: str, keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in _dockerfile(name).splitlines()
            if line.startswith(keyword + " ")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_and_runs_as_the_readme_says(name):
    readme_torch = re.search(r"torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    text = _dockerfile(name)
    assert f"ARG TORCH_VERSION={readme_torch}" in text
    assert '"torch==${TORCH_VERSION}"' in text and "pip install ." in text
    assert _instructions(name, "ENTRYPOINT") == ['["molink"]']
    assert _instructions(name, "USER") == ["molink"]  # not root
    assert "useradd --create-home --uid 1000 molink" in text
    assert "HF_HOME=/data/huggingface" in text
    assert _instructions(name, "VOLUME") == ['["/data/huggingface"]']
    link = re.search(r'ln -s "\$\(python -c .*?\)" (\S+)', text)
    assert link and link.group(1) == IMAGE_MODEL
    assert '"assets" / "default_model"' in link.group(0)
    assert f"test -f {IMAGE_MODEL}/model.safetensors" in text
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


def test_base_images():
    assert _instructions("Dockerfile", "FROM") == ["python:3.11-slim"]
    assert _instructions("Dockerfile.cuda", "FROM") == ["${CUDA_IMAGE}"]
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", _dockerfile("Dockerfile.cuda"))
    assert "NOT TESTED" in _dockerfile("Dockerfile.cuda")


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "**/__pycache__", ".pytest_cache", ".hypothesis",
            "benchmarks/results", ".git"} <= ignored
    kept = ("pyproject.toml", "README.md", "molink")
    assert not ignored & set(kept), "the image needs these"


def _docker_compose_usable() -> bool:
    import shutil
    import subprocess

    if shutil.which("docker") is None:
        return False
    checks = (["docker", "info"], ["docker", "compose", "version"])
    return all(subprocess.run(c, capture_output=True, timeout=30, check=False).returncode == 0
               for c in checks)


@pytest.mark.skipif(not _docker_compose_usable(), reason="needs a docker daemon with the compose "
                    "plugin (none in this CI: the README says what was verified instead)")
def test_the_compose_stack_answers_a_completion(tmp_path):
    """Where docker runs: build the image, bring the head and two stages up, ask them."""
    import json
    import secrets
    import subprocess
    import urllib.request

    root = Path(__file__).resolve().parent.parent
    env = dict(__import__("os").environ, MOLINK_CLUSTER_TOKEN=secrets.token_hex(16))
    project = ["docker", "compose", "-f", str(root / "compose.yaml"), "-p",
               f"molinktest{secrets.token_hex(3)}"]
    try:
        subprocess.run([*project, "up", "--build", "--wait", "--wait-timeout", "600"],
                       env=env, check=True, timeout=1800)
        body = json.dumps({"model": "default_model", "prompt": "In Python, a list is",
                           "max_tokens": 8}).encode()
        request = urllib.request.Request("http://127.0.0.1:8000/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            choice = json.loads(answer.read())["choices"][0]
        assert choice["text"] and choice["finish_reason"] == "length"
    finally:
        subprocess.run([*project, "down", "--volumes"], env=env, check=False, timeout=300)

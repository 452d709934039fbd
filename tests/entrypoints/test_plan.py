"""``molink plan``: sizes from config.json alone match the real stages' parameters, a 70B
Llama fits two 24 GB GPUs at 4 bits and plainly does not at 16, and the predicted speed
adds up the stages and the hops."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from molink.entrypoints.cli import build_parser, main
from molink.entrypoints.plan import NodeSpec, node_budget, predict
from molink.model.loader import load_model
from molink.runtime.model_size import measure_model
from molink.scheduler.placement import GB, NodeBudget, Placement, StagePlan, plan_placement
from molink.transport.link_emulator import LinkSpec

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-70b")
    (directory / "config.json").write_text(json.dumps(LLAMA_70B))
    return str(directory)


@pytest.mark.parametrize(("text", "kind", "memory_gb"), [
    ("rtx3090", "rtx3090", 24), ("a100-80gb", "a100-80gb", 80), ("rtx4090:20GB", "rtx4090", 20),
    ("cpu:64GB", "cpu", 64), ("published:1.5TB", "published", 1536),
])
def test_node_specs(text, kind, memory_gb):
    spec = NodeSpec.parse(text)
    assert (spec.kind, spec.memory_bytes) == (kind, int(memory_gb * GB))


@pytest.mark.parametrize(("text", "match"), [
    ("h100", "must be one of"), ("cpu", "give its memory"), ("cpu:64", "with a unit"),
    ("cpu:0GB", "positive"), ("cpu:64furlongs", "with a unit"),
])
def test_bad_node_specs_say_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        NodeSpec.parse(text)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_sizes_from_the_config_match_the_loaded_stages(tiny_model_dir, name):
    directory = str(tiny_model_dir(name))
    footprint = measure_model(directory, "float32", None, kv_tokens=10).footprint
    n = footprint.num_layers
    layers = footprint.layer_weight_bytes
    for start, end in [(0, 1), (1, n - 1), (n - 1, n), (0, n)]:
        model, _ = load_model(directory, start, end, "float32", torch.device("cpu"))
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
        expected = (sum(layers[start:end]) + (footprint.first_stage_bytes if start == 0 else 0)
                    + (footprint.last_stage_bytes if end == n else 0))
        assert loaded == expected, (start, end)
        kv_per_token = sum(2 * a.num_kv_heads * a.head_dim * 4 for a in model.attention_layers())
        assert sum(footprint.layer_kv_bytes[start:end]) == 10 * kv_per_token


def test_four_bit_layers_take_half_a_byte_per_parameter_plus_scales(llama_70b):
    matrices = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672  # q, o; k, v; mlp
    norms = 2 * 8192
    size = measure_model(llama_70b, "auto", 4, kv_tokens=4096)
    assert size.dtype_bytes == 2  # the config's bfloat16
    assert set(size.footprint.layer_weight_bytes) == {matrices // 2 + matrices // 128 * 2
                                                      + norms * 2}
    assert size.footprint.first_stage_bytes == 128256 * 8192 * 2  # embeddings stay 16-bit
    assert size.footprint.last_stage_bytes == 128256 * 8192 * 2 + 8192 * 2  # LM head + norm
    assert set(size.footprint.layer_kv_bytes) == {4096 * 2 * 8 * 128 * 2}


def test_a_70b_llama_fits_two_rtx3090_at_4_bits(llama_70b, capsys):
    assert main(["plan", llama_70b, "--node", "rtx3090", "--node", "rtx3090", "--bits", "4",
                 "--link", "100mbit:20ms"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("1:", "2:"))]
    assert [row[1] for row in rows] == ["0:42", "42:80"]  # the last one also reads the LM head
    assert all(float(row[4]) > 0 for row in rows)  # free GB
    assert "tokens/s for a batch of 1" in out and "2 hops" in out


def test_a_70b_llama_at_16_bits_plainly_does_not_fit(llama_70b, capsys):
    assert main(["plan", llama_70b, "--node", "rtx3090", "--node", "rtx3090"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("molink plan: the model does not fit: it needs 132.7 GB")
    assert "offer 43.2 GB after 10% headroom" in err and "89.5 GB short" in err
    assert "Traceback" not in err


def test_a_slow_node_gets_layers_only_when_memory_needs_it(tiny_model_dir, capsys):
    directory = str(tiny_model_dir("llama"))
    assert main(["plan", directory, "--node", "rtx4090", "--node", "cpu:64GB"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("1:", "2:"))]
    assert [row[1] for row in rows] == ["0:4", "none"]
    assert main(["plan", directory, "--node", "rtx4090:1MB", "--node", "cpu:64GB",
                 "--headroom", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("1:", "2:"))]
    assert rows[0][1] != "0:4" and rows[1][1].endswith(":4")


def test_bad_plan_arguments_exit_2_naming_the_option(tiny_model_dir, capsys):
    directory = str(tiny_model_dir("llama"))
    with pytest.raises(SystemExit) as info:
        main(["plan", directory, "--node", "h100"])
    assert info.value.code == 2
    assert "argument --node: 'h100': the device must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", directory, "--node", "cpu:8GB", "--headroom", "1.5"])
    assert "argument --headroom: must be a fraction" in capsys.readouterr().err


def test_the_predicted_step_adds_the_stages_and_the_hops():
    model = SimpleNamespace(arch=SimpleNamespace(hidden_size=1000), dtype_bytes=2)
    a, b = NodeBudget("a", GB, 0.01), NodeBudget("b", GB, 0.02)
    placement = Placement((StagePlan(a, 0, 2, 0, 0, 0.02), StagePlan(b, 2, 3, 0, 0, 0.03)), 0.03)
    link = LinkSpec.parse("8mbit:10ms")  # 1 byte per microsecond
    speed, ceiling = predict(placement, model, link, batch=4)
    # stages 50 ms; hops: 2 x 10 ms latency + 8,000 bytes of activations + 16 bytes of tokens
    step_s = 0.05 + 0.02 + (8000 + 16) / 1e6
    assert f"{4 / step_s:.1f} tokens/s for a batch of 4" in speed
    assert "stages 50.0 ms + 2 hops 28.0 ms" in speed
    assert "133.3 tokens/s" in ceiling and "b, takes 30.0 ms" in ceiling
    no_link, _ = predict(placement, model, None, batch=4)
    assert "80.0 tokens/s" in no_link and "0 hops 0.0 ms" in no_link


def test_plan_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for shown in ("(default: 4096)", "(default: 1)", "(default: 0.1)", "(default: auto)",
                  "default: none, hops cost nothing", "(default: --dtype's size)", "cpu:64GB"):
        assert shown in text, shown


def test_the_faster_gpu_gets_more_layers(llama_70b, capsys):
    assert main(["plan", llama_70b, "--node", "rtx3090", "--node", "a100-80gb", "--bits", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("1:", "2:"))]
    (start, split), (_, end) = (row[1].split(":") for row in rows)
    assert (start, end) == ("0", "80")
    assert int(split) < 30  # the A100 reads its weights over twice as fast ...
    assert float(rows[0][4]) > 5  # ... not memory: the 3090 has room left
    # Balanced within one layer (on the exact times: the table rounds to 0.1 ms): the
    # slowest stage cannot hand a layer to the other without making it the slowest.
    args = build_parser().parse_args(["plan", llama_70b, "--node", "rtx3090", "--node",
                                      "a100-80gb", "--bits", "4"])
    model = measure_model(args.model, args.dtype, args.bits, args.max_model_len * args.max_num_seqs)
    nodes = [node_budget(spec, i, model, args.max_num_seqs, args.max_model_len)
             for i, spec in enumerate(args.nodes)]
    placement = plan_placement(model.footprint, nodes, args.headroom)
    assert placement.ranges == [(0, int(split)), (int(split), 80)]
    times = [stage.seconds for stage in placement.stages]
    assert times == pytest.approx([float(row[5]) / 1e3 for row in rows], abs=0.06e-3)
    assert abs(times[0] - times[1]) <= nodes[0].seconds_per_layer


@pytest.mark.parametrize("name,bits", [("llama-q4_1", "5"), ("llama-q8_0", "8.5")])
def test_a_gguf_plan_names_the_bits_its_layers_are_stored_in(gguf_model, capsys, name, bits):
    """Q4_1: 20 bytes a block of 32 (5 bits), Q8_0: 34 (8.5), not the activations' 32."""
    assert main(["plan", str(gguf_model(name)), "--node", "cpu:1GB"]) == 0
    out = capsys.readouterr().out
    stated = float(out.split(" of layer weights at ")[1].split(" bits")[0])
    assert float(bits) <= stated < float(bits) + 0.1  # (+ the layers' float32 norms)

"""Emulated devices: profiles interpolate as documented, the GPU rooflines reproduce the
measurements they are fitted to, mixed steps read the weights once, the last stage pays for
its LM head, a stage that does not fit its GPU is refused, and emulated stages follow their
profile."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from molink.entrypoints.join_auto import node_offer
from molink.messages import BatchEntry, NewRequest, StepPlan
from molink.runtime.device_profile import GPUS, DeviceProfile, published_profile, roofline
from molink.runtime.emulated_executor import EmulatedExecutor
from molink.runtime.model_size import emulated_stage, kv_blocks_that_fit, measure_model
from molink.sampling_params import SamplingParams
from molink.scheduler.placement import DEFAULT_HEADROOM

LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_heads": 64,
             "num_kv_heads": 8, "head_dim": 128}


def test_published_profile_reproduces_its_points():
    profile = published_profile()
    for tokens, ms in ((1, 12.0), (17, 15.7), (100, 19.1), (200, 32.7)):
        assert profile.step_ms(1, tokens, 0, 0) == pytest.approx(ms)
    assert profile.step_ms(1, 0, 1000, 0) == pytest.approx(136.0)
    assert profile.step_ms(1, 75, 0, 0) == pytest.approx((16.3 + 19.1) / 2)  # interpolated
    assert profile.step_ms(1, 400, 0, 0) == pytest.approx(32.7 * 2)  # compute-bound beyond


def test_roofline_is_memory_bound_for_decode_and_compute_bound_for_long_prefill():
    profile = roofline(GPUS["rtx3090"], **LLAMA_70B)
    one, many = profile.step_ms(1, 1, 0, 0), profile.step_ms(1, 64, 0, 0)
    assert many < 1.1 * one  # decode: reading the weights dominates
    long = profile.step_ms(1, 0, 16384, 0)
    assert long > 10 * profile.step_ms(1, 0, 512, 0)  # prefill: flops dominate
    weights_gb = (8192 * 128 * 80 + 64 * 128 * 8192 + 3 * 8192 * 28672) * 2 / 1e9
    assert one == pytest.approx(1e3 * weights_gb / (936 * 0.83) + 0.10, rel=1e-6)


LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32,
            "num_kv_heads": 32, "head_dim": 128}


@pytest.mark.parametrize(("bytes_per_param", "measured_ms"), [
    (2.0, 1e3 / 48.52),  # F16 tg128
    (18 / 32, 1e3 / 121.82),  # Q4_0 (18 bytes per 32 weights) tg128
])
def test_the_rtx3090_roofline_reproduces_the_decode_steps_it_cites(bytes_per_param, measured_ms):
    """llama.cpp PR #4766 (the profile's source): llama 7B on an RTX 3090, 32 layers, an
    untied 32000 x 4096 LM head in the same format."""
    head_params = 32000 * 4096
    profile = roofline(GPUS["rtx3090"], **LLAMA_7B, bytes_per_param=bytes_per_param,
                       lm_head_params=head_params, lm_head_bytes=head_params * bytes_per_param)
    assert profile.step_ms(32, 1, 0, 64, sampled_tokens=1) == pytest.approx(measured_ms, rel=0.05)


def test_the_rtx3090_roofline_reproduces_the_prefill_it_cites():
    head_params = 32000 * 4096
    profile = roofline(GPUS["rtx3090"], **LLAMA_7B, lm_head_params=head_params,
                       lm_head_bytes=2 * head_params)
    tokens_per_s = 512 / (profile.step_ms(32, 0, 512, 0, sampled_tokens=1) / 1e3)
    assert tokens_per_s == pytest.approx(4184.85, rel=0.10)  # F16 pp512


@pytest.mark.parametrize("profile", [roofline(GPUS["rtx3090"], **LLAMA_70B), published_profile()],
                         ids=["roofline", "published"])
def test_a_mixed_step_reads_the_weights_once(profile):
    for decode, prefill in ((64, 512), (8, 16), (150, 1000)):
        mixed = profile.step_ms(4, decode, prefill, 0)
        assert mixed == pytest.approx(profile.step_ms(4, 0, decode + prefill, 0))
        assert mixed < profile.step_ms(4, decode, 0, 0) + profile.step_ms(4, 0, prefill, 0)
    roof = roofline(GPUS["rtx3090"], **LLAMA_70B)
    # Memory-bound: a few prefill tokens next to decodes cost what the same number of
    # decode tokens do (one read of the weights), not a second read.
    assert roof.step_ms(4, 8, 16, 0) == pytest.approx(roof.step_ms(4, 24, 0, 0))
    assert roof.step_ms(4, 8, 16, 0) < 1.05 * roof.step_ms(4, 8, 0, 0)


def test_only_the_last_stage_pays_for_its_lm_head(tiny_model_dir):
    profile = dataclasses.replace(published_profile(), lm_head_ms=((1, 5.0), (64, 6.0)))
    assert profile.step_ms(2, 3, 0, 0, sampled_tokens=3) == pytest.approx(
        profile.step_ms(2, 3, 0, 0) + 5.0 + 1.0 * 2 / 63)
    directory = str(tiny_model_dir("llama"))  # 4 layers
    plan = _plan(0, 3, 0)
    middle = EmulatedExecutor(directory, 1, 3, profile)
    last = EmulatedExecutor(directory, 3, None, profile)
    assert middle.predicted_ms(plan) == pytest.approx(profile.step_ms(2, 3, 0, 3 * 200))
    assert last.predicted_ms(plan) == pytest.approx(
        profile.step_ms(1, 3, 0, 3 * 200, sampled_tokens=3))
    assert last.predicted_ms(plan) > profile.step_ms(1, 3, 0, 3 * 200) + 5.0


QWEN_32B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
            "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def qwen_32b(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen-32b")
    (directory / "config.json").write_text(json.dumps(QWEN_32B))
    return str(directory)


def test_a_stage_that_does_not_fit_its_gpu_is_refused(qwen_32b):
    gpu = GPUS["rtx3090"]
    bf16 = measure_model(qwen_32b, "bfloat16", None, 1)
    # 23 of 64 layers in bf16 plus the embeddings: 22.4 GiB, past 90 % of 24 GiB.
    with pytest.raises(ValueError, match=r"layers 0:23 of .* rtx3090 .* do not fit.*quantize"):
        kv_blocks_that_fit(gpu, bf16, (0, 23), 16)
    with pytest.raises(ValueError, match="do not fit"):  # the profile a join builds, too
        emulated_stage("rtx3090", qwen_32b, "bfloat16", None, (0, 23), 16, None)
    # 22 layers (21.4 GiB) fit, but not the KV cache of 512 requests of 64 tokens (the weak
    # links benchmark's old setting).
    with pytest.raises(ValueError, match="2,048 KV blocks .* do not fit; at most"):
        kv_blocks_that_fit(gpu, bf16, (0, 22), 16, num_blocks=512 * 64 // 16)
    # The middle third fits, with room for KV that it hands out up to the memory.
    blocks = kv_blocks_that_fit(gpu, bf16, (22, 43), 16)
    weights = bf16.footprint.weight_bytes(22, 43)
    per_block = sum(bf16.footprint.layer_kv_bytes[22:43]) * 16
    assert weights + blocks * per_block <= gpu.usable_bytes < weights + (blocks + 1) * per_block
    with pytest.raises(ValueError, match=f"at most {blocks:,} blocks"):
        kv_blocks_that_fit(gpu, bf16, (22, 43), 16, num_blocks=blocks + 1)
    assert kv_blocks_that_fit(gpu, bf16, (22, 43), 16, num_blocks=100) == 100
    # In 4 bits the first third fits, and the KV cache gets far more room.
    int4 = measure_model(qwen_32b, "bfloat16", None, 1, "int4")
    assert kv_blocks_that_fit(gpu, int4, (0, 22), 16) > 5 * blocks
    profile, num_blocks = emulated_stage("rtx3090", qwen_32b, "bfloat16", "int4", (0, 22), 16,
                                         None)
    assert num_blocks == kv_blocks_that_fit(gpu, int4, (0, 22), 16) and profile.lm_head_ms


def test_what_automatic_placement_plans_on_an_emulated_gpu_is_what_its_stage_allows(qwen_32b):
    """``molink join --emulate-device rtx3090`` without ``--layers`` offers the whole card;
    the planner keeps its headroom of that unplanned, which must leave exactly what the
    emulated stage lets weights and KV take (else placement would plan ranges the stage
    then refuses, or waste memory)."""
    args = argparse.Namespace(emulate_device="rtx3090", max_memory=None, dtype="bfloat16",
                              quantization="int4")
    offer = node_offer(args, qwen_32b, torch.device("cpu"))
    planned = offer.memory_bytes * (1 - DEFAULT_HEADROOM)
    assert planned == pytest.approx(GPUS["rtx3090"].usable_bytes, rel=1e-9)


def test_profile_files_round_trip_and_bad_ones_are_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(published_profile().to_dict()))
    assert DeviceProfile.load(str(path)) == published_profile()
    path.write_text(json.dumps({"decode_ms_per_layer": [[5, 1.0], [1, 2.0]],
                                "prefill_ms_per_layer": [[1, 1.0]]}))
    with pytest.raises(ValueError, match="increasing tokens"):
        DeviceProfile.load(str(path))
    with pytest.raises(ValueError, match="neither"):
        DeviceProfile.load(str(tmp_path / "missing.json"))


def _plan(step_id: int, decode: int, prefill: int,
          eos_token_ids: tuple[int, ...] = ()) -> StepPlan:
    params = SamplingParams(max_tokens=None)
    batch, new = [], []
    for i in range(decode):
        new.append(NewRequest(f"d{step_id}-{i}", [5] * 200, 200, params, [0],
                              eos_token_ids=eos_token_ids))
        batch.append(BatchEntry(f"d{step_id}-{i}", 199, 1, True))
    if prefill:
        new.append(NewRequest(f"p{step_id}", [5] * prefill, prefill, params, [0]))
        batch.append(BatchEntry(f"p{step_id}", 0, prefill, True))
    return StepPlan(step_id=step_id, batch=batch, new_requests=new)


@pytest.mark.parametrize("decode,prefill", [(1, 0), (50, 0), (150, 0), (0, 1000), (17, 10)])
def test_emulated_stage_follows_its_profile_within_ten_percent(tiny_model_dir, decode, prefill):
    profile = published_profile()
    executor = EmulatedExecutor(str(tiny_model_dir("llama")), 2, None, profile)  # 2 layers
    plan = _plan(0, decode, prefill)
    output = executor.execute(plan)
    expected = profile.step_ms(2, decode, prefill, decode * 200)
    assert executor.last_step_ms == pytest.approx(expected, rel=0.10)
    assert set(output.sampled_token_ids) == {e.request_id for e in plan.batch}


def test_first_stage_emits_real_hidden_size_and_pseudo_tokens_avoid_eos(tiny_model_dir):
    first = EmulatedExecutor(str(tiny_model_dir("llama")), 0, 2, published_profile(),
                             dtype="bfloat16")
    hidden = first.execute(_plan(0, 3, 0))
    assert tuple(hidden.shape) == (3, 64) and str(hidden.dtype) == "torch.bfloat16"
    last = EmulatedExecutor(str(tiny_model_dir("llama")), 2, None, published_profile())
    # Each request's EOS ids come with it (the head sends them): its tokens avoid them.
    tokens = last.execute(_plan(0, 20, 0, tuple(range(500)))).sampled_token_ids.values()
    assert all(t >= 500 for t in tokens)


def test_join_refuses_an_emulated_stage_that_does_not_fit(qwen_32b, capsys):
    from molink.entrypoints.cli import main

    code = main(["join", qwen_32b, "--layers", "0:23", "--emulate-device", "rtx3090",
                 "--head", "127.0.0.1:1", "--cluster-token", "t"])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit: 22.3 GiB of weights" in err and "Traceback" not in err

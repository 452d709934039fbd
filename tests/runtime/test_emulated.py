"""Emulated devices: profiles interpolate as documented and emulated stages follow them."""

from __future__ import annotations

import json

import pytest

from molink.messages import BatchEntry, NewRequest, StepPlan
from molink.runtime.device_profile import GPUS, DeviceProfile, published_profile, roofline
from molink.runtime.emulated_executor import EmulatedExecutor
from molink.sampling_params import SamplingParams

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
                 head_dim=128)


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
    assert one == pytest.approx(1e3 * weights_gb / 936 + 0.02, rel=1e-6)


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

"""Faults in checkpoints, weights and inputs: each one a clear error of its kind naming the file or field,
never wrong actions without one."""
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bac
from bac.policies.config import PolicyConfig
from bac.policies.policy import EXTREME, DiffusionPolicy

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "policies" / "checkpoints" / "dpt-metaworld"
TASKS = ["reach", "push"]
SMALL = {"dpt": {"width": 32, "num_layers": 2, "heads": 2}, "dit": {"width": 32, "num_layers": 2, "heads": 2}}


def tiny_policy(architecture="dpt", tasks=TASKS, **settings):
    torch.manual_seed(0)
    config = PolicyConfig.build(architecture, SMALL[architecture], state_dim=39, action_dim=4, tasks=tasks, **settings)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 39))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    return policy.eval().with_sampler("ddim", 4)


def batch(obs, task="push"):
    return {"observation.state": obs, "task": task}


def chunk(policy, obs, seed=0, task="push"):
    return policy.predict_action_chunk(batch(obs, task), generator=torch.Generator().manual_seed(seed))


def raises(kind, call, *names):
    """``call()`` raises exactly ``kind``, and the message contains every one of ``names``."""
    with pytest.raises(kind) as err:
        call()
    assert type(err.value) is kind, f"{type(err.value).__name__}: {err.value}"
    for name in names:
        assert str(name) in str(err.value), f"{name!r} not in: {err.value}"
    return err.value


@pytest.fixture
def saved(tmp_path):
    """A tiny DP-T checkpoint: (directory, policy)."""
    policy = tiny_policy()
    return policy.save(tmp_path / "ckpt"), policy


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ the weights file
def test_a_flipped_byte_in_the_tensor_payload_is_refused(saved):
    directory, policy = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    offset = 8 + header + (len(data) - 8 - header) // 2  # inside the tensors, past the JSON header
    data[offset] ^= 0x01  # one mantissa bit: safetensors itself reads this file without complaint
    weights.write_bytes(bytes(data))
    state = load_file(str(weights))
    assert any(not torch.equal(state[k], v) for k, v in policy.state_dict().items())
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), weights, "weights file changed or corrupt")


def test_truncated_empty_and_garbled_weights_files(saved):
    directory, _ = saved
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), weights, "truncated")
    weights.write_bytes(data[:5])
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), weights, "5 bytes")
    weights.write_bytes(b"")
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), weights, "empty")
    weights.write_bytes(data[:8] + b"\xff" * (len(data) - 8))  # the header is no longer JSON
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), weights, "header is not JSON")


def test_nan_in_a_saved_weights_file_is_refused_at_load(saved):
    directory, policy = saved
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    state["model.head.weight"][0, 0] = float("nan")
    save_file(state, str(directory / "model.safetensors"))  # a plain file: no sha or fingerprint to mismatch
    _edit_config(directory, lambda c: c.pop("weights"))
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), directory / "model.safetensors",
           "model.head.weight", "NaN or inf")


def test_missing_files_are_checkpoint_errors_and_file_not_found(saved, tmp_path):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    err = raises(bac.policies.checkpointing.CheckpointNotFoundError, lambda: DiffusionPolicy.load(directory),
                 directory, "model.safetensors")
    assert isinstance(err, bac.CheckpointError) and isinstance(err, FileNotFoundError)


# ------------------------------------------------------------------ config.json against the weights
def test_a_config_with_another_head_count_is_refused(saved):
    directory, policy = saved
    _edit_config(directory, lambda c: c["model"].update(heads=4))  # same tensor shapes, other attention
    # without the fingerprint this loads and gives other actions: the fault the fingerprint exists for
    changed = DiffusionPolicy(PolicyConfig.load(directory / "config.json"))
    changed.load_weights(load_file(str(directory / "model.safetensors")))
    changed = changed.eval().with_sampler("ddim", 4)
    obs = torch.randn(2, 2, 39)
    assert not torch.allclose(chunk(changed, obs), chunk(policy, obs), atol=1e-3)
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), directory / "model.safetensors",
           "model.heads: weights saved with 2, config has 4")


def test_reordered_tasks_are_refused(saved):
    """The task one-hot follows the order of ``tasks``: swapping them would swap what the policy does."""
    directory, _ = saved
    _edit_config(directory, lambda c: c.update(tasks=["push", "reach"]))
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), "tasks: weights saved with ['reach', 'push']")


def test_n_action_steps_and_provenance_may_change(saved):
    directory, policy = saved
    _edit_config(directory, lambda c: c.update(n_action_steps=4, provenance={"note": "edited"}))
    loaded = DiffusionPolicy.load(directory).with_sampler("ddim", 4)
    obs = torch.randn(1, 2, 39)
    assert loaded.n_action_steps == 4 and torch.equal(chunk(loaded, obs), chunk(policy, obs)[:, :4])


def test_a_config_of_another_architecture(saved, tmp_path):
    directory, _ = saved
    config_path = directory / "config.json"
    _edit_config(directory, lambda c: c.update(architecture="dit"))  # DP-T's model fields under a DiT
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), config_path,
           "unknown field(s) ['causal_attn']")
    _edit_config(directory, lambda c: c["model"].pop("causal_attn"))  # a valid DiT config over DP-T weights
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), directory / "model.safetensors",
           "does not fit this dit policy", "missing model.")


def test_another_checkpoints_weights_with_the_same_shapes_are_refused(saved, tmp_path):
    directory, _ = saved
    other = tiny_policy(tasks=["door-open", "push"]).save(tmp_path / "other")  # same shapes, other tasks
    (directory / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), "tasks: weights saved with ['door-open'")


@pytest.mark.parametrize("path, message", [
    ("model.heads", "model: missing field 'heads'"),
    ("model.causal_attn", "model: missing field 'causal_attn'"),
    ("noise_scheduler.clip_sample", "noise_scheduler: missing field 'clip_sample'"),
    ("model", "missing field(s) ['model']"),
    ("weights.sha256", "weights: missing field 'sha256'"),
])
def test_missing_config_fields_are_refused_not_defaulted(saved, path, message):
    directory, _ = saved
    section, _, key = path.partition(".")
    _edit_config(directory, lambda c: c[section].pop(key) if key else c.pop(section))
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), directory / "config.json", message)


def test_a_malformed_weights_record_is_refused(saved):
    directory, _ = saved
    _edit_config(directory, lambda c: c["weights"].update(sha256="abc"))
    raises(bac.CheckpointError, lambda: DiffusionPolicy.load(directory), directory / "config.json",
           "weights.sha256 must be 64 lower-case hex digits")


def test_checkpoints_without_sha_or_fingerprint_still_load_and_resave_adds_them(saved):
    directory, policy = saved
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(directory / "model.safetensors"))
    _edit_config(directory, lambda c: c.pop("weights"))  # as written before either existed
    loaded = DiffusionPolicy.load(directory).with_sampler("ddim", 4)
    obs = torch.randn(1, 2, 39)
    assert torch.equal(chunk(loaded, obs), chunk(policy, obs))
    loaded.save(directory)
    stored = json.loads((directory / "config.json").read_text())["weights"]
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["bac"])["fingerprint"] == policy.config.fingerprint()
    assert stored["bytes"] == (directory / "model.safetensors").stat().st_size
    _edit_config(directory, lambda c: c["model"].update(heads=4))
    with pytest.raises(bac.CheckpointError, match="model.heads"):
        DiffusionPolicy.load(directory)


def test_saving_is_deterministic(saved, tmp_path):
    directory, policy = saved
    again = policy.save(tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (directory / name).read_bytes()
    assert not list(directory.glob("*.tmp"))


def test_the_shipped_checkpoint_carries_its_sha_and_fingerprint():
    import hashlib

    stored = json.loads((SHIPPED / "config.json").read_text())
    data = (SHIPPED / "model.safetensors").read_bytes()
    assert stored["weights"] == {"file": "model.safetensors", "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        entry = json.loads(f.metadata()["bac"])
    config = PolicyConfig.load(SHIPPED / "config.json")
    assert entry["fingerprint"] == config.fingerprint() and entry["identity"] == config.identity()
    assert stored["provenance"]["step"] == 25000 and stored["provenance"]["converted_from"] == "bac-policy/1"


# ------------------------------------------------------------------ the output guard
def _nan_weights(policy):
    with torch.no_grad():
        policy.model.head.weight[0, 0] = float("nan")


def test_nan_weights_raise_non_finite_naming_the_weights():
    policy = tiny_policy()
    obs = torch.randn(2, 2, 39)
    assert torch.isfinite(chunk(policy, obs)).all()
    _nan_weights(policy)
    err = raises(bac.NonFiniteError, lambda: chunk(policy, obs), "non-finite actions", "sample(s) [0, 1] of 2",
                 "model.head.weight", "inputs are finite")
    assert err.samples == [0, 1] and not torch.isfinite(err.actions).all()
    policy.on_nonfinite = "hold"  # predict_action_chunk has no action to hold: it raises whatever the setting
    raises(bac.NonFiniteError, lambda: chunk(policy, obs), "model.head.weight")


def test_hold_repeats_the_last_finite_action_and_records_the_event():
    policy = tiny_policy()
    policy.on_nonfinite = "hold"
    n = policy.n_action_steps
    observations = torch.randn(2 * n, 2, 39)
    generator = torch.Generator().manual_seed(0)
    first = [policy.select_action(batch(o), generator=generator) for o in observations[:n]]
    assert policy.nonfinite_events == []
    _nan_weights(policy)
    held = [policy.select_action(batch(o), generator=generator) for o in observations[n:]]
    assert all(torch.equal(a, first[-1]) for a in held)  # the last finite action, for the whole chunk
    assert len(policy.nonfinite_events) == 1 and policy.nonfinite_events[0]["samples"] == [0, 1]
    assert "model.head.weight" in policy.nonfinite_events[0]["message"]
    policy.reset()  # a new episode has no action to hold
    raises(bac.NonFiniteError, lambda: policy.select_action(batch(observations[0])), "no finite action to hold",
           "model.head.weight")
    assert len(policy.nonfinite_events) == 1
    policy.on_nonfinite = "raise"
    policy.reset()
    raises(bac.NonFiniteError, lambda: policy.select_action(batch(observations[0])), "model.head.weight")


def test_hold_keeps_the_finite_samples_of_a_chunk():
    policy = tiny_policy()
    policy.on_nonfinite = "hold"
    generator = torch.Generator().manual_seed(0)
    obs = torch.randn(2, 39)
    for _ in range(policy.n_action_steps):
        last = policy.select_action(batch(obs), generator=generator)
    extreme = obs.clone()
    extreme[1, 5] = 1e30  # only sample 1 is broken
    action = policy.select_action(batch(extreme), generator=torch.Generator().manual_seed(3))
    assert torch.equal(action[1], last[1]) and not torch.equal(action[0], last[0]) and torch.isfinite(action).all()
    assert policy.nonfinite_events[-1]["samples"] == [1]
    assert "far outside the training range in sample(s) [1], dims [5]" in policy.nonfinite_events[-1]["message"]


def test_extreme_observations_are_named_unusual_ones_are_not_refused():
    policy = tiny_policy()
    obs = torch.zeros(2, 2, 39)
    obs[1, :, 5] = 1e30
    err = raises(bac.NonFiniteError, lambda: chunk(policy, obs), "'observation.state' is far outside the training range",
                 "sample(s) [1], dims [5]", "every weight is finite")
    assert err.samples == [1]
    unusual = torch.zeros(2, 2, 39)
    unusual[:, :, 5] = 100.0  # far beyond the training data (about [-3, 3]) but finite in, finite out
    assert torch.isfinite(chunk(policy, unusual)).all()
    assert EXTREME == 1e6


def test_on_nonfinite_is_validated():
    policy = tiny_policy()
    with pytest.raises(bac.ConfigError, match="on_nonfinite must be one of"):
        policy.on_nonfinite = "ignore"
    with pytest.raises(bac.ConfigError, match="on_nonfinite must be one of"):
        DiffusionPolicy(policy.config, on_nonfinite="zero")
    assert DiffusionPolicy(policy.config, on_nonfinite="hold").on_nonfinite == "hold"


# ------------------------------------------------------------------ inputs
def test_batch_size_zero_is_a_data_error():
    policy = tiny_policy()
    raises(bac.DataError, lambda: chunk(policy, torch.zeros(0, 2, 39)), "'observation.state'", "batch size 0")
    policy.reset()
    raises(bac.DataError, lambda: policy.select_action(batch(torch.zeros(0, 39))), "batch size 0")
    with pytest.raises(bac.DataError, match="batch size 0"):
        policy.compute_loss({**batch(torch.zeros(0, 2, 39)), "action": torch.zeros(0, 16, 4)})


@pytest.mark.parametrize("bad, names", [
    ({"observation.state": torch.zeros(1, 2, 38), "task": "push"}, ["'observation.state'", "[1, 2, 38]"]),
    ({"observation.state": torch.zeros(1, 39), "task": "push"}, ["'observation.state'", "[1, 39]"]),
    ({"observation.state": torch.zeros(2, 1, 2, 39), "task": "push"}, ["'observation.state'", "[2, 1, 2, 39]"]),
    ({"observation.state": torch.full((1, 2, 39), float("inf")), "task": "push"}, ["'observation.state'", "NaN or inf"]),
    ({"observation.state": [["a"]], "task": "push"}, ["'observation.state'", "not a numeric array"]),
    ({"task": "push"}, ["missing feature(s) ['observation.state']"]),
    ({"observation.state": torch.zeros(1, 2, 39)}, ["missing feature(s) ['task']"]),
    ({"observation.state": torch.zeros(1, 2, 39), "task": "fly"}, ["'task'", "unknown task(s) ['fly']"]),
    ({"observation.state": torch.zeros(1, 2, 39), "task": ["push", "push"]}, ["'task'", "2 task names"]),
    ({"observation.state": torch.zeros(1, 2, 39), "task": 3}, ["'task'", "must be a task name"]),
    ({"observation.state": torch.zeros(1, 2, 39), "task": "push", "observation.images.top": 0},
     ["observation.images.top"]),
], ids=["width", "no-history", "rank", "inf", "strings", "no-state", "no-task", "unknown-task", "task-count",
        "task-type", "extra-feature"])
def test_wrong_features_are_data_errors_naming_the_feature(bad, names):
    raises(bac.DataError, lambda: tiny_policy().predict_action_chunk(bad), *names)


def test_a_batch_change_without_reset_is_a_data_error():
    policy = tiny_policy()
    policy.reset()
    policy.select_action(batch(torch.zeros(2, 39)))
    raises(bac.DataError, lambda: policy.select_action(batch(torch.zeros(3, 39))), "call reset()")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from Linux's /proc")
def test_a_thousand_cached_policy_calls_keep_memory_flat():
    """Cached features are replaced, not accumulated, across calls (no growth per trajectory)."""
    policy = tiny_policy()
    handle = policy.accelerate(bac.build_method("uniform", policy.model, num_steps=4, scheduler=policy.sampler, M=2))
    obs = torch.randn(1, policy.n_obs_steps, 39)
    with torch.no_grad():
        for seed in range(100):  # warm-up: allocator pools and lazy state reach their steady size
            chunk(policy, obs, seed)
        before = _rss_bytes()
        for seed in range(1000):
            chunk(policy, obs, seed)
        after = _rss_bytes()
    handle.remove()
    assert after - before < 5 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over 1000 cached calls"


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "4"])
def test_sampler_step_counts_that_are_not_positive_integers_are_refused(steps):
    with pytest.raises(bac.ConfigError, match="sampler steps must be"):
        tiny_policy().with_sampler("ddim", steps)

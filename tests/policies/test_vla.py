"""Vision-language-action heads (GR00T-, RDT- and pi0-style): caching equivalence, the prefix, language and
image inputs, checkpoints, clear errors, training, closed-loop episodes."""
import numpy as np
import pytest
import torch

import bac
from bac.errors import CheckpointError, ConfigError, DataError
from bac.policies.config import PolicyConfig
from bac.policies.language import LanguageCache, SentenceEncoder, TOKEN_DIM
from bac.policies.policy import DiffusionPolicy
from bac.policies.vla import frames_to_images, random_shift

HEADS = ["gr00t", "rdt", "pi0"]
SIZE = 32
NOISE = {"gr00t": {"kind": "flow_matching"}, "pi0": {"kind": "flow_matching"},
         "rdt": {"num_train_timesteps": 1000, "prediction_type": "sample", "clip_sample": False}}
KINDS = {"gr00t": {"sa", "ca", "ffn"}, "rdt": {"sa", "ca", "ffn"}, "pi0": {"sa", "ffn"}}
INSTRUCTIONS = ["open the faucet", "close the faucet", "pull the handle up"]


def fake_language(seed=0):
    """Token embeddings of a few instructions (random, different lengths): no language model needed."""
    g = torch.Generator().manual_seed(seed)
    return LanguageCache({text: torch.randn(3 + i, TOKEN_DIM, generator=g) for i, text in enumerate(INSTRUCTIONS)})


def tiny_head(architecture, steps=None, **model):
    torch.manual_seed(0)
    settings = {"width": 32, "num_layers": 2, "heads": 2, "image_size": SIZE, "crop_pad": 2} | model
    config = PolicyConfig.build(architecture, settings, state_dim=4, action_dim=4, tasks=["faucet-open", "faucet-close"],
                                noise_scheduler=NOISE[architecture], state_keys=["hand_pos", "gripper"], horizon=8,
                                n_obs_steps=1, n_action_steps=4)
    policy = DiffusionPolicy(config)
    for p in policy.model.parameters():  # adaLN-Zero and zero heads start at the identity: give every branch signal
        p.data.add_(0.05 * torch.randn_like(p))
    policy.obs_normalizer.fit(torch.randn(100, 4))
    policy.action_normalizer.fit(torch.rand(100, 4) * 2 - 1)
    policy.language = fake_language()
    if steps is not None:
        policy = policy.with_sampler(policy.sampler.kind, steps)
    return policy.eval()


def observation(batch=2, seed=0, instructions=None):
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn(batch, 1, 4, generator=g),
            "observation.images.corner3": torch.rand(batch, 3, SIZE, SIZE, generator=g),
            "task": instructions or [INSTRUCTIONS[i % 2] for i in range(batch)]}


def chunk(policy, obs, seed=0):
    return policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- caching
@pytest.mark.parametrize("architecture", HEADS)
def test_every_step_plan_gives_bit_identical_actions(architecture):
    policy = tiny_head(architecture, steps=6)
    obs = observation(3)
    reference = chunk(policy, obs)
    assert {b.kind for b in bac.describe(policy.model).blocks} == KINDS[architecture]
    plan = bac.make_plan(policy.model, "every-step", num_steps=6, scheduler=policy.sampler)
    with policy.accelerate(plan) as handle:
        assert torch.equal(chunk(policy, obs), reference)
        assert torch.equal(chunk(policy, obs), reference)
        assert handle.stats()["sampling_calls"] == 2
    uniform = bac.make_plan(policy.model, "uniform", num_steps=6, M=2, scheduler=policy.sampler)
    with policy.accelerate(uniform) as handle:
        cached = chunk(policy, obs)
        assert handle.stats()["last_call"]["skipped"] == uniform.skipped_count() > 0
    assert not torch.equal(cached, reference)
    assert torch.equal(chunk(policy, obs), reference)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("architecture", HEADS)
def test_every_head_accepts_every_method(architecture, skipping_settings, exhaustive_settings):
    policy = tiny_head(architecture, steps=6)
    obs = observation(2)
    reference = chunk(policy, obs)
    calibration = bac.calibrate(policy.model, lambda o: chunk(policy, o), [obs], scheduler=policy.sampler,
                                attention=True)
    for name in bac.available_methods():
        params = {k: min(v, 6) if k == "M" else v for k, v in skipping_settings.get(name, {}).items()}
        with policy.accelerate(bac.build_method(name, calibration, **params)) as handle:
            actions = chunk(policy, obs)
            stats = handle.stats()
        assert actions.shape == reference.shape and torch.isfinite(actions).all(), name
        assert (stats["skipped"] > 0) == (name != "every-step"), name
        if name in ("ertacache", "profiling-dit"):  # their every-step settings give the plain call bit for bit
            with policy.accelerate(bac.build_method(name, calibration, **exhaustive_settings(6)[name])):
                assert torch.equal(chunk(policy, obs), reference), name
    assert torch.equal(chunk(policy, obs), reference)


@pytest.mark.parametrize("architecture", HEADS)
def test_prepared_prefix_is_the_per_step_computation(architecture):
    """prepare() does the step-independent work (context keys/values, timestep tables) once per call."""
    policy = tiny_head(architecture, steps=5)
    prefix = policy.condition(observation(3))
    timesteps = policy.sampler.fused.timesteps
    prepared = policy.model.prepare(prefix, timesteps)
    x = torch.randn(3, 8, 4)
    for i, t in enumerate(timesteps):
        direct = policy.model(x, t, prefix)
        assert (policy.model(x, t, prefix, prepared=prepared[i]) - direct).abs().max() <= 1e-5 * direct.abs().max()


def test_default_samplers_are_the_published_ones():
    assert (tiny_head("gr00t").sampler.kind, tiny_head("gr00t").sampler.steps) == ("flow", 4)
    assert (tiny_head("pi0").sampler.kind, tiny_head("pi0").sampler.steps) == ("flow", 10)
    assert (tiny_head("rdt").sampler.kind, tiny_head("rdt").sampler.steps) == ("dpm", 20)


def test_samplers_must_fit_the_training_objective():
    with pytest.raises(ConfigError, match="flow matching"):
        tiny_head("gr00t").with_sampler("ddim", 4)
    with pytest.raises(ConfigError, match="needs its number of steps"):
        tiny_head("pi0").with_sampler("flow")
    with pytest.raises(ConfigError, match="DDPM"):
        tiny_head("rdt").with_sampler("flow", 4)
    tiny_head("rdt").with_sampler("ddpm", 100)  # RDT's 100-step DDPM


# ------------------------------------------------------------------------------- language
@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_language_cache_round_trip(tmp_path, encoder):
    cache = LanguageCache()
    cache._encoder = encoder
    texts = ["open the faucet", "swing the faucet handle to the closed side"]
    tokens, mask = cache(texts)
    fresh = [encoder.encode(t) for t in texts]
    assert tokens.shape == (2, max(f.shape[0] for f in fresh), TOKEN_DIM)
    assert mask.sum(1).tolist() == [f.shape[0] for f in fresh]  # [CLS] + word pieces + [SEP]
    assert torch.equal(tokens[0, : fresh[0].shape[0]], fresh[0]) and not tokens[0, fresh[0].shape[0]:].any()
    loaded = LanguageCache.load(cache.save(tmp_path / "cache.safetensors"))
    assert sorted(loaded.entries) == sorted(texts)
    again, again_mask = loaded(texts)
    assert torch.equal(again, tokens) and torch.equal(again_mask, mask)
    assert loaded._encoder is None  # cached sentences need no language model
    other = encoder.encode("close the faucet")
    assert not torch.equal(other[: fresh[0].shape[0]], fresh[0])  # different words, different tokens


def test_language_errors_are_clear(tmp_path, encoder):
    cache = LanguageCache()
    cache._encoder = encoder
    with pytest.raises(DataError, match="word pieces"):
        cache.tokens("open " * 40)
    with pytest.raises(DataError, match="non-empty string"):
        cache.tokens("  ")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable language cache"):
        LanguageCache.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------- images
def test_image_pipeline_on_a_known_frame():
    frame = np.zeros((2, 6, 5, 3), dtype=np.uint8)
    frame[0, 1, 2] = [255, 0, 51]
    frame[1, :, 0, 1] = 102
    images = frames_to_images(frame)
    assert images.shape == (2, 3, 6, 5) and images.dtype == torch.float32
    assert images[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert torch.all(images[1, 1, :, 0] == 0.4) and images[1, 1, :, 1:].sum() == 0
    with pytest.raises(ValueError, match="uint8"):
        frames_to_images(frame.astype(np.float32))
    # random shift: a crop of the replicate-padded image at a random offset, per sample
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).reshape(2, 3, 6, 5)
    g = torch.Generator().manual_seed(3)
    shifted = random_shift(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(3))
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(shifted[i], padded[i, :, r : r + 6, c : c + 5])
    assert torch.equal(random_shift(x, 0), x)


def test_rendered_observations_are_the_cameras_frames():
    """The runtime's images are the env's right-side-up frames, converted once (corner3 is mounted upside down)."""
    from bac.envs.metaworld_env import make_vector_env
    from bac.runtime import observation_batch

    policy = tiny_head("gr00t")
    venv = make_vector_env("faucet-open", 2, width=SIZE, height=SIZE)
    try:
        obs, _ = venv.reset(seed=[1, 2])
        batch = observation_batch(obs, ["open the faucet"] * 2, policy, venv)
        frames = np.stack(venv.call("render_camera", "corner3"))
        assert torch.equal(batch["observation.images.corner3"], frames_to_images(frames))
        assert torch.equal(batch["observation.state"], torch.as_tensor(obs[:, :4], dtype=torch.float32))
        cam = venv.envs[0].unwrapped_metaworld.data.cam("corner3")
        assert cam.xmat.reshape(3, 3)[2, 1] < 0  # mounted upside down; the renderer turns it
        # the table (brown, lower part of a right-side-up view) is below the sky-grey background
        image = batch["observation.images.corner3"][0]
        assert image[:, -SIZE // 4 :].mean() < image[:, : SIZE // 8].mean()
    finally:
        venv.close()


def test_finished_episodes_are_not_rendered_and_active_actions_do_not_change():
    """The runtime renders only the envs whose episode is still running; the others get black frames. Every
    sample of a batch is computed on its own, so the running episodes' chunks are bit-identical."""
    from bac.envs.metaworld_env import make_vector_env
    from bac.runtime import observation_batch

    policy = tiny_head("gr00t")
    venv = make_vector_env("faucet-open", 3, width=SIZE, height=SIZE)
    try:
        obs, _ = venv.reset(seed=[1, 2, 3])
        texts = ["open the faucet"] * 3
        every = observation_batch(obs, texts, policy, venv)
        calls = []
        original = type(venv.envs[0]).render_camera
        for env in venv.envs:
            env.render_camera = lambda camera, env=env: calls.append(env) or original(env, camera)
        active = np.array([True, False, True])
        masked = observation_batch(obs, texts, policy, venv, active=active)
        assert calls == [venv.envs[0], venv.envs[2]]  # the finished episode's env rendered nothing
        images = masked["observation.images.corner3"]
        assert torch.equal(images[active], every["observation.images.corner3"][active]) and images[1].eq(0).all()
        assert torch.equal(chunk(policy, {**masked, "observation.state": masked["observation.state"][:, None]})[active],
                           chunk(policy, {**every, "observation.state": every["observation.state"][:, None]})[active])
    finally:
        venv.close()


# ------------------------------------------------------------------------------- errors and checkpoints
def test_bad_observations_are_clear_errors():
    policy = tiny_head("gr00t")
    good = observation(2)
    cases = [
        ({k: v for k, v in good.items() if k != "observation.images.corner3"}, "missing feature"),
        (good | {"observation.images.corner3": (good["observation.images.corner3"] * 255).to(torch.uint8)}, "uint8"),
        (good | {"observation.images.corner3": torch.rand(2, 3, SIZE + 1, SIZE)}, "shape"),
        (good | {"observation.images.corner3": good["observation.images.corner3"] * float("nan")}, "NaN"),
        (good | {"observation.images.corner3": good["observation.images.corner3"] * 255}, r"in \[0, 1\]"),
        (good | {"task": ["open the faucet"]}, "1 instructions for a batch of 2"),
        (good | {"task": None}, "instruction"),
    ]
    for batch, message in cases:
        with pytest.raises(DataError, match=message):
            policy.predict_action_chunk(batch)


def test_checkpoints_of_another_head_or_feature_spec_are_refused(tmp_path):
    policy = tiny_head("gr00t")
    obs = observation(2)
    expected = chunk(policy, obs)
    loaded = DiffusionPolicy.load(policy.save(tmp_path / "gr00t"), expect={"architecture": "gr00t"})
    assert sorted(loaded.language.entries) == sorted(INSTRUCTIONS)  # the language cache travels with the weights
    assert torch.equal(chunk(loaded, obs), expected)
    with pytest.raises(CheckpointError, match="architecture='gr00t', expected 'rdt'"):
        DiffusionPolicy.load(tmp_path / "gr00t", expect={"architecture": "rdt"})
    # another head's weights under this config
    tiny_head("pi0").save(tmp_path / "pi0")
    (tmp_path / "pi0" / "config.json").write_text((tmp_path / "gr00t" / "config.json").read_text())
    with pytest.raises(CheckpointError):
        DiffusionPolicy.load(tmp_path / "pi0")
    # another feature spec: a second camera, a larger image
    for change, message in ((dict(cameras=["corner3", "topview"]), "does not fit"),
                            (dict(image_size=48), "does not fit")):
        other = tiny_head("gr00t", **change)
        other.save(tmp_path / "other")
        (tmp_path / "other" / "model.safetensors").write_bytes((tmp_path / "gr00t" / "model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=message):
            DiffusionPolicy.load(tmp_path / "other")


def test_image_features_need_a_vision_head():
    with pytest.raises(ConfigError, match="has no image encoder"):
        PolicyConfig(architecture="dpt", model=PolicyConfig.build("dpt", state_dim=4, action_dim=4).model,
                     input_features=tiny_head("gr00t").config.input_features,
                     output_features=tiny_head("gr00t").config.output_features)
    config = tiny_head("gr00t").config
    with pytest.raises(ConfigError, match="reads image features"):
        config.replace(input_features={k: v for k, v in config.input_features.items() if "images" not in k})


# ------------------------------------------------------------------------------- training and episodes
def test_training_on_image_language_demos_lowers_the_loss(tmp_path):
    from bac.envs.windows import load_image_windows

    windows = load_image_windows(["faucet-close"], 3, tmp_path, 8, 1, 0.0, ["hand_pos", "gripper"], ("corner3",), SIZE)
    state, actions, frames, index = windows.state, windows.actions, windows.frames, windows.task_index
    instructions, sources = windows.instructions, windows.sources
    n = sources["faucet-close"]["windows"]
    assert state.shape == (n, 1, 4) and actions.shape == (n, 8, 4)
    assert frames["corner3"].shape == (n, SIZE, SIZE, 3) and frames["corner3"].dtype == torch.uint8
    assert set(instructions) <= {"close the faucet", "turn the faucet off", "rotate the faucet handle to close it"}
    assert len(set(instructions)) == sources["faucet-close"]["train_demos"] == 2  # training paraphrases in turn
    policy = tiny_head("gr00t").train()
    policy.obs_normalizer.fit(state)
    policy.action_normalizer.fit(actions)
    policy.language.entries.update({t: torch.randn(4, TOKEN_DIM) for t in instructions})
    batch = {"observation.state": state, "action": actions, "task": [instructions[i] for i in index],
             "observation.images.corner3": frames_to_images(frames["corner3"])}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = policy.compute_loss(batch, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_closed_loop_episodes_render_only_when_a_chunk_is_due(monkeypatch):
    from bac.envs import metaworld_env
    from bac.runtime import run_episodes

    policy = tiny_head("gr00t")
    renders = []
    original = metaworld_env.MetaWorldStateEnv.render_camera
    monkeypatch.setattr(metaworld_env.MetaWorldStateEnv, "render_camera",
                        lambda self, camera: renders.append(camera) or original(self, camera))
    [result] = run_episodes(policy, "faucet-open", [5], num_envs=1, max_episode_steps=9,
                            instructions=lambda seed: "open the faucet", make_env=metaworld_env.make_vector_env)
    assert result["steps"] == 9 and not result["success"]
    assert renders == ["corner3"] * 3  # chunks of 4 actions: at steps 0, 4 and 8
    with pytest.raises(ValueError, match="instructions"):
        list(run_episodes(policy, "faucet-open", [5], num_envs=1, max_episode_steps=2,
                          make_env=metaworld_env.make_vector_env))


def test_half_precision_storage_loads_as_float32(tmp_path):
    policy = tiny_head("rdt", steps=5)
    obs = observation(2)
    full = DiffusionPolicy.load(policy.save(tmp_path / "fp32"))
    half = DiffusionPolicy.load(policy.save(tmp_path / "fp16", half=True))
    weights = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    assert weights < 0.6 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert torch.equal(half.obs_normalizer.scale, policy.obs_normalizer.scale)  # normalisers stay float32
    expected, rounded = chunk(full, obs), chunk(half, obs)
    assert not torch.equal(rounded, expected) and (rounded - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.parametrize("head", HEADS)
def test_shipped_heads_load_and_hold_every_evaluated_instruction(head):
    """The shipped checkpoints: float16 storage loading as float32, the suite's eight tasks, and the tokens of
    every instruction the evaluator gives them (train, held-out, swapped), so evaluation loads no language model."""
    from pathlib import Path

    from bac.envs.instructions import INSTRUCTIONS

    directory = Path(__file__).resolve().parents[2] / "policies" / "checkpoints" / f"{head}-metaworld"
    policy = DiffusionPolicy.load(directory)
    assert policy.architecture == head and len(policy.tasks) == 8 and policy.cameras == ("corner3",)
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert set(policy.language.entries) >= {text for task in policy.tasks for text in INSTRUCTIONS[task]}
    assert (directory / "model.safetensors").stat().st_size < 6e6

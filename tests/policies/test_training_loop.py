"""The training loop (bac.policies.train.train) called as a library, with its closed-loop check."""
import json

from hydra import compose, initialize_config_dir

from bac.configs import CONFIG_DIR
from bac.envs.windows import load_windows
from bac.policies.policy import DiffusionPolicy
from bac.policies.train import train


def test_success_check_gets_the_exported_policy_every_eval_every_steps(tmp_path):
    overrides = [
        "task=reach", f"run_dir={tmp_path / 'run'}", "steps=10", "batch_size=8", "warmup_steps=2",
        "checkpoint_every=5", "log_every=5", "eval_every=5", "progress=false", "threads=1",
        "policy.model.width=32", "policy.model.num_layers=1",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    checked = []

    def success_check(policy):  # the documented contract: the policy only (apps.train binds tasks and episodes)
        checked.append(policy)
        return {"reach": len(checked) / 4}

    windows = load_windows(["reach"], 2, tmp_path / "data", cfg.horizon, cfg.n_obs_steps)
    train(cfg, windows, ["reach"], success_check=success_check)
    assert [type(p) for p in checked] == [DiffusionPolicy, DiffusionPolicy]
    assert [p.provenance["step"] for p in checked] == [5, 10]  # each sees the checkpoint just exported
    assert not any(p.training for p in checked)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if "success" in r] == [{"step": 5, "success": {"reach": 0.25}},
                                                 {"step": 10, "success": {"reach": 0.5}}]

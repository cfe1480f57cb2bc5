"""A small class-conditional DiT trained here on scikit-learn's digits: real weights for the diffusers benchmark.

    python -m benchmarks.digits_dit train [--steps 4000] [--out benchmarks/checkpoints/dit-digits]
    python -m benchmarks.digits_dit check [--checkpoint benchmarks/checkpoints/dit-digits] [--samples 100]

Random-weight transformers change far more between denoising steps than trained ones, so caching methods
and their thresholds behave differently on them. This trains diffusers' own ``DiTTransformer2DModel`` on the
digits bundled with scikit-learn (resumable; the EMA model exported as safetensors + JSON), and ``check``
measures its samples with a support-vector classifier fitted on the same digits. The model, the recipe and
the shipped checkpoint: docs/guide/diffusers.md ("A DiT with real weights").
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from diffusers.models.cache_utils import CacheMixin
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import bac
from bac.policies.checkpointing import TrainingState, check_state_fits

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "dit-digits"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # DiT's label table has one extra row, used when a label is dropped
MODEL_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, sample_size=16,
                    patch_size=2, num_layers=6, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1)
GUIDANCE = 1.5  # classifier-free guidance scale used for sampling
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        prediction_type="epsilon")


def digits(side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``[N, 1, side, side]`` pixels in [-1, 1] (bilinear upsampling) and labels ``[N]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> -1..1
    images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    return images, torch.as_tensor(data.target, dtype=torch.long)


class CachingDiT(CacheMixin, DiTTransformer2DModel):
    """DiT with diffusers' cache mix-in, which the released class lacks (diffusers 0.42)."""


def build_model(model_class: type[DiTTransformer2DModel] = DiTTransformer2DModel) -> DiTTransformer2DModel:
    return model_class(**MODEL_CONFIG)


def save(model: DiTTransformer2DModel, directory: Path, info: dict) -> None:
    """Weights stored as float16 (half the committed bytes; :func:`load` computes in float32)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(
        {"model": MODEL_CONFIG, "scheduler": SCHEDULER_CONFIG, "training": info}, indent=1) + "\n")


def load(directory: Path | str = DEFAULT_CHECKPOINT, device: str | torch.device = "cpu",
         model_class: type[DiTTransformer2DModel] = DiTTransformer2DModel) -> DiTTransformer2DModel:
    """The exported EMA model (as ``model_class``, a subclass such as one with diffusers' cache mix-in);
    a checkpoint of another shape or configuration is a clear error."""
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; train with `python -m benchmarks.digits_dit train`")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model") != MODEL_CONFIG:
        raise ValueError(f"{directory} holds a DiT with config {config.get('model')}, this code builds {MODEL_CONFIG}")
    model = build_model(model_class)
    stored = load_file(directory / "model.safetensors")  # float16 since 2026-12-04; older files float32
    state = {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}
    check_state_fits(model, state, f"the digits DiT ({directory})")
    model.load_state_dict(state)
    return model.to(device).eval()


def guided_noise(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    """Epsilon with classifier-free guidance batched into one call, as ``DiTPipeline`` does it."""
    if guidance == 1.0:
        return model(x, timestep=t.expand(len(x)).to(x.device), class_labels=labels).sample
    both = model(torch.cat([x, x]), timestep=t.expand(2 * len(x)).to(x.device),
                 class_labels=torch.cat([labels, torch.full_like(labels, NULL_CLASS)])).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def scheduler_for_sampling() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


@torch.no_grad()
def sample(model, labels: torch.Tensor, steps: int = 50, guidance: float = GUIDANCE, seed: int = 0) -> torch.Tensor:
    """DDIM samples ``[B, 1, 16, 16]`` for ``labels``, from seeded noise."""
    device = next(model.parameters()).device
    x = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(seed)).to(device)
    scheduler = scheduler_for_sampling()
    scheduler.set_timesteps(steps, device=device)
    labels = labels.to(device)
    bac.new_trajectory(model)  # a new sampling call for the cache, if one is enabled
    for t in scheduler.timesteps:
        x = scheduler.step(guided_noise(model, x, t, labels, guidance), t, x).prev_sample
    return x


class DigitClassifier:
    """scikit-learn's SVC on the 8x8 digits; classifies 16x16 samples after 2x2 average pooling."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        data = load_digits()
        train_x, test_x, train_y, test_y = train_test_split(data.data, data.target, test_size=0.25,
                                                            random_state=seed, stratify=data.target)
        self.svc = SVC(gamma=0.001, C=10.0).fit(train_x, train_y)
        self.held_out_accuracy = float(self.svc.score(test_x, test_y))

    def predict(self, images: torch.Tensor) -> np.ndarray:
        pooled = F.avg_pool2d(images.detach().float().cpu().clamp(-1, 1), 2)  # [B, 1, 8, 8]
        return self.svc.predict(((pooled + 1.0) * 8.0).flatten(1).numpy())

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels.cpu().numpy()).mean())


def train(out: Path, run_dir: Path, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
          checkpoint_every: int, device: str, progress: bool = True, log_every: int = 100) -> Path:
    torch.manual_seed(seed)
    images, labels = digits()
    images, labels = images.to(device), labels.to(device)
    model = build_model().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed)
    step, elapsed, smoothed = 0, 0.0, math.nan

    run_dir.mkdir(parents=True, exist_ok=True)
    training_state = TrainingState(model, optimizer, lr_schedule, ema, generator)
    state_path = run_dir / "train_state.pt"
    if state_path.exists():
        def same_run(state: dict) -> None:
            if state["settings"] != settings or state["model_config"] != MODEL_CONFIG:
                raise ValueError(f"{state_path} was made with other settings ({state['settings']}); "
                                 "use another --run-dir to start over")

        state = training_state.restore(state_path, same_run)
        step, elapsed, smoothed = int(state["step"]), float(state["elapsed"]), float(state["loss"])
        print(f"resumed {state_path} at step {step}")

    log = open(run_dir / "log.jsonl", "a")
    bar = tqdm(total=steps, initial=step, disable=not progress, desc="train dit-digits")
    while step < steps:
        started = time.perf_counter()
        batch = torch.randint(0, len(images), (batch_size,), generator=generator, device=device)
        x0 = images[batch]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                          device=device)
        predicted = model(noise_scheduler.add_noise(x0, noise, t), timestep=t, class_labels=labels[batch]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(model.parameters())
        step += 1
        elapsed += time.perf_counter() - started
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if step % log_every == 0:
            log.write(json.dumps({"step": step, "loss": smoothed, "batch_loss": value,
                                  "elapsed": round(elapsed, 1)}) + "\n")
            log.flush()
        if step % checkpoint_every == 0 or step == steps:
            training_state.save(state_path, step=step, elapsed=elapsed, loss=smoothed, settings=settings,
                                model_config=MODEL_CONFIG)
            exported = copy.deepcopy(model).eval()
            ema.copy_to(exported.parameters())
            save(exported, out, {"command": "python -m benchmarks.digits_dit " + " ".join(sys.argv[1:]),
                                 "settings": settings, "step": step, "loss": smoothed,
                                 "train_seconds": round(elapsed, 1), "torch": torch.__version__,
                                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    bar.close()
    log.close()
    return out


def check(checkpoint: Path, samples: int, steps: int, guidance: float, seed: int) -> dict:
    """Classifier accuracy of DDIM samples, ``samples // 10`` per class."""
    model = load(checkpoint)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(max(1, samples // NUM_CLASSES))
    classifier = DigitClassifier()
    images = sample(model, labels, steps=steps, guidance=guidance, seed=seed)
    return {"samples": len(labels), "steps": steps, "guidance": guidance,
            "sample_accuracy": classifier.accuracy(images, labels),
            "classifier_held_out_accuracy": classifier.held_out_accuracy}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digits_dit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train (resumes from --run-dir) and export the EMA model to --out")
    t.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    t.add_argument("--run-dir", type=Path, default=Path("outputs/train/dit-digits"))
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c = commands.add_parser("check", help="classifier accuracy of the checkpoint's DDIM samples")
    c.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    c.add_argument("--samples", type=int, default=100)
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--guidance", type=float, default=GUIDANCE)
    c.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        path = train(args.out, args.run_dir, args.steps, args.batch_size, args.lr, args.warmup, args.seed,
                     args.checkpoint_every, args.device)
        print(f"digits DiT checkpoint: {path}")
    else:
        print(json.dumps(check(args.checkpoint, args.samples, args.steps, args.guidance, args.seed), indent=1))


if __name__ == "__main__":
    main()

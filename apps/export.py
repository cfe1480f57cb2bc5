"""``bac-export``: write one configuration's sampling call as an ONNX model (docs/guide/export.md).

    bac-export dpt-metaworld --sampler ddim --steps 4 --method uniform M=2 --out dpt-ddim4-uniform.onnx
    bac-export dpt-metaworld --plan outputs/plans/plan.json --sampler ddim --steps 10 --out model.onnx
    bac-export pi0-metaworld --instruction "open the drawer" --out pi0.onnx

The policy is loaded and accelerated as ``bac-serve`` does (a plan made for another sampler, step count or
weights is refused), its call traced with the sampler and plan baked in and exported with their
description in the model's metadata; the file is then read back, its metadata checked against the policy,
and its output compared with the eager call on one random observation (fixed seed). A bad setting, a plan
that does not fit or a runtime rule is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path
from typing import Any

import torch

from bac.apps.common import report_errors
from bac.errors import ConfigError
from bac.policies.constants import STATE
from bac.policies.graph_call import example_observation
from bac.runtime.loading import load_policy

SEED = 0  # the comparison's observation and noise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bac-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder or a shipped checkpoint's name (dpt-metaworld)")
    parser.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    parser.add_argument("--sampler", help="sampler kind (ddim, ddpm, dpm, flow); default: the policy's own")
    parser.add_argument("--steps", type=int, help="sampler steps; default: the sampler's own")
    caching = parser.add_mutually_exclusive_group()
    caching.add_argument("--plan", type=Path, help="a plan file (bac-plan, python -m bac.tune) for this sampler")
    caching.add_argument("--method", nargs="+", metavar="NAME [KEY=VALUE ...]",
                         help="an uncalibrated method by name with its parameters, e.g. --method uniform M=2")
    caching.add_argument("--tuned", type=Path, help="a python -m bac.tune result: its sampler and plan")
    parser.add_argument("--batch", type=int, default=1, help="the batch size the model is made for (default 1)")
    parser.add_argument("--instruction", default="pick up the object",
                        help="VLA heads: the example instruction; the file serves instructions of its token length")
    parser.add_argument("--device", default="cpu")
    return parser


def _method(words: list[str] | None) -> tuple[str | None, dict[str, Any]]:
    """``["uniform", "M=2"]`` -> ``("uniform", {"M": 2})``; values are Python literals, else strings."""
    if not words:
        return None, {}
    params = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ConfigError(f"--method parameters are KEY=VALUE, got {word!r} (e.g. --method uniform M=2)")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return words[0], params


def _observation(policy: Any, batch: int, instruction: str) -> dict[str, Any]:
    """A random observation (seeded): states drawn around the training range, zero images, a known task
    (a VLA head: ``instruction``)."""
    obs = example_observation(policy, batch, instruction if policy.reads_instructions else None)
    state = torch.randn(batch, policy.n_obs_steps, policy.state_dim, generator=torch.Generator().manual_seed(SEED))
    obs[STATE] = policy.obs_normalizer.inverse(state.to(policy.device))
    return obs


def _plan(plan: Any) -> str:
    if plan is None:
        return "no plan"
    params = ", ".join(f"{key}={value}" for key, value in plan.params.items())
    evaluations = plan.skipped_count() + plan.computed_count()
    return f"plan {plan.method} ({params}; {plan.skipped_count()} of {evaluations} block evaluations skipped)"


def export(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder: name the .onnx file to write")
    method, params = _method(args.method)
    served = load_policy(args.checkpoint, device=args.device, sampler=args.sampler, steps=args.steps,
                         tuned=args.tuned, plan=args.plan, method=method, method_params=params)
    policy = served.policy.eval()
    obs = _observation(policy, args.batch, args.instruction)
    started = time.perf_counter()
    try:
        policy.export_onnx(args.out, args.batch, instruction=args.instruction if policy.reads_instructions else None)
    except OSError as err:
        raise ConfigError(f"cannot write --out {args.out}: {err}") from err
    seconds = time.perf_counter() - started
    exported = policy.compile_call(args.batch, backend="onnxruntime", onnx=args.out)  # checks its metadata

    def chunk(view: Any) -> torch.Tensor:
        return view.predict_action_chunk(obs, generator=torch.Generator(policy.device).manual_seed(SEED))

    eager = chunk(policy)
    deviation = (chunk(exported) - eager).abs().max().item()
    scale = eager.abs().max().item()
    plan = _plan(served.handle.plan if served.handle is not None else None)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB) in {seconds:.1f} s: "
          f"{policy.architecture}, {policy.sampler.kind}-{policy.sampler.steps}, {plan}, batch {args.batch}")
    print(f"max deviation from the eager call: {deviation:.3g} ({deviation / max(scale, 1e-12):.2g} of the "
          f"chunk's largest magnitude; one random observation, seed {SEED})")


def main(argv: list[str] | None = None) -> None:
    """``bac-export``: see the module docstring (``bac-export --help``)."""
    report_errors(export)(_parser().parse_args(argv))


if __name__ == "__main__":
    main()

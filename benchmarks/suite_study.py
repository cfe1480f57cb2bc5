"""The harder suite's study, from evaluator runs (``python -m bac.eval``): how the suite was chosen, the
paper's ablation with paired statistics, and the spread over training seeds. It only gathers; the
episodes come from the runs' logs (every shard's).

    python -m benchmarks.suite_study sweep --runs benchmarks/results/sweep-dpt benchmarks/results/sweep-dit
    python -m benchmarks.suite_study ablation --runs benchmarks/results/ablation-dpt benchmarks/results/ablation-dit
    python -m benchmarks.suite_study seeds --runs benchmarks/results/ablation-dpt benchmarks/results/seeds-dpt-1 ...

``sweep``: success per candidate task and method, and the rule that picks the suite (:func:`choose_suite`);
``ablation``: the paper's orderings and ACS + BUA against matched DDIM and matched-FLOP caching, as paired
differences; ``seeds``: the headline methods per training seed; ``blocks``: ``benchmarks.block_errors`` runs
summarised per method. Each writes ``<out>.json`` and ``<out>.md``; what they found: docs/results/harder-suite.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bac.evaluation import report as reporting
from bac.evaluation.shards import logged_episodes

# DDIM-1 is swept but not in the sensitivity: it fails (nearly) every episode of every candidate task on both
# architectures (docs/results/harder-suite.md), so it says nothing about which tasks need denoising quality.
FEW_STEPS = ("ddim-2", "ddim-3")
MIN_FULL = 0.7   # learnable: at least this success at full computation, on every architecture swept
SUITE_SIZE = 8
#: (better, worse): the paper's claimed orderings, and ACS + BUA against fewer steps at its FLOPs.
ORDERINGS = (("acs", "uniform"), ("unified-acs", "acs"), ("bac", "unified-acs"), ("bac", "acs"),
             ("bac", "uniform"), ("bac", "ddim"))


def _load(run: Path) -> tuple[dict, list[dict]]:
    return json.loads((run / "report.json").read_text()), logged_episodes(run)


def _rate(episodes: list[dict]) -> float | None:
    return sum(e["success"] for e in episodes) / len(episodes) if episodes else None


def _label(report: dict) -> str:
    return f"{report['policy']['architecture']} ({Path(report['policy']['checkpoint']).name})"


# ------------------------------------------------------------------------------------------- sweep
def choose_suite(per_task: dict[str, dict[str, dict[str, float]]], size: int = SUITE_SIZE,
                 min_full: float = MIN_FULL) -> dict:
    """The suite from a sweep: ``per_task[run][task][method]`` success rates.

    A task is *learnable* when full computation reaches ``min_full`` on every run; its *sensitivity* is
    full computation's success minus the mean of DDIM-2, DDIM-3 and the caching budget (``bac``),
    averaged over the runs. The suite is the ``size`` most sensitive learnable tasks (ties: candidate
    order), or every learnable task if fewer.
    """
    runs = list(per_task)
    tasks = list(per_task[runs[0]])
    degraded = FEW_STEPS + ("bac",)
    sensitivity, learnable = {}, []
    for task in tasks:
        rates = [per_task[r][task] for r in runs]
        sensitivity[task] = sum(r["full"] - sum(r[m] for m in degraded) / len(degraded) for r in rates) / len(runs)
        if all(r["full"] >= min_full for r in rates):
            learnable.append(task)
    ranked = sorted(learnable, key=lambda t: -sensitivity[t])
    suite = ranked[:size]
    return {"suite": [t for t in tasks if t in suite], "learnable": learnable, "sensitivity": sensitivity,
            "rule": f"full >= {min_full:.0%} on every swept architecture; the {size} with the largest drop from "
                    f"full to the mean of {', '.join(degraded)}"}


def sweep(runs: list[Path]) -> tuple[dict, str]:
    per_task, labels, methods = {}, [], None
    for run in runs:
        report, episodes = _load(run)
        label = _label(report)
        labels.append(label)
        methods = list(report["methods"])
        tasks = report["environment"]["tasks"]
        per_task[label] = {t: {m: _rate([e for e in episodes if e["task"] == t and e["method"] == m])
                               for m in methods} for t in tasks}
    choice = choose_suite(per_task)
    lines = [f"Sweep: success % per candidate task ({', '.join(labels)}); suite rule: {choice['rule']}.", "",
             "| task | " + " | ".join(f"{label.split(' ')[0]} {m}" for label in labels for m in methods)
             + " | sensitivity | in suite |", "|---|" + "---|" * (len(labels) * len(methods) + 2)]
    for task in per_task[labels[0]]:
        cells = [f"{100 * per_task[label][task][m]:.0f}" for label in labels for m in methods]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {100 * choice['sensitivity'][task]:+.0f} | "
                     + ("yes" if task in choice["suite"] else "—") + " |")
    lines += ["", f"Suite: {', '.join(choice['suite'])}."]
    return {"per_task": per_task, **choice}, "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- ablation
def _budget_methods(report: dict) -> dict[str, dict[str, str]]:
    """``{"M5": {"uniform": "uniform-M5", ...}, ...}`` from an ``ablation`` run's method names."""
    budgets: dict[str, dict[str, str]] = {}
    for name in report["methods"]:
        base, _, budget = name.rpartition("-")
        if base and budget.startswith("M") and budget[1:].isdigit():
            budgets.setdefault(budget, {})[base] = name
    return dict(sorted(budgets.items(), key=lambda kv: int(kv[0][1:])))


def _verdict(diff: dict) -> str:
    low, high = diff["ci95"]
    return "holds" if low > 0 else "reversed" if high < 0 else "not separable"


def ablation(runs: list[Path]) -> tuple[dict, str]:
    result, lines = {}, []
    for run in runs:
        report, episodes = _load(run)
        label = _label(report)
        by_method = {m: [e for e in episodes if e["method"] == m] for m in report["methods"]}
        budgets = _budget_methods(report)
        tasks = report["environment"]["tasks"]
        entry = {"run": str(run), "full": reporting.success_summary(by_method["full"]), "budgets": {}, "pooled": {},
                 "equal_compute": {},
                 "per_task": {m: {t: reporting.success_summary([e for e in eps if e["task"] == t]) for t in tasks}
                              for m, eps in by_method.items()}}
        for budget, names in budgets.items():
            entry["budgets"][budget] = {
                "methods": {base: {"success": reporting.success_summary(by_method[name]),
                                   "speedup": report["methods"][name]["speedup"],
                                   "skipped": report["methods"][name]["skipped_share"],
                                   "settings": report["methods"][name]["config"]} for base, name in names.items()},
                "orderings": {f"{a} > {b}": reporting.paired_difference(by_method[names[a]], by_method[names[b]])
                              for a, b in ORDERINGS if a in names and b in names}}
        # At equal compute: BUA adds updates, so bac at budget M costs more than the others at M. Pair it with
        # each other caching method at the smallest budget whose FLOPs are at least bac's.
        flops = {name: report["methods"][name]["flops_per_call"] for name in report["methods"]}
        for budget, names in budgets.items():
            if "bac" not in names:
                continue
            for base in ("uniform", "unified-acs", "acs"):
                rivals = [other[base] for other in budgets.values()
                          if base in other and flops[other[base]] >= flops[names["bac"]]]
                if rivals:
                    rival = min(rivals, key=lambda n: flops[n])
                    entry["equal_compute"][f"{names['bac']} > {rival}"] = {
                        "flops_ratio": flops[rival] / flops[names["bac"]],
                        **reporting.paired_difference(by_method[names["bac"]], by_method[rival])}
        for a, b in ORDERINGS:  # pooled: every budget's pairs together
            better = [dict(e, task=f"{e['task']}@{m}") for m, names in budgets.items() if a in names and b in names
                      for e in by_method[names[a]]]
            worse = [dict(e, task=f"{e['task']}@{m}") for m, names in budgets.items() if a in names and b in names
                     for e in by_method[names[b]]]
            if better:
                entry["pooled"][f"{a} > {b}"] = reporting.paired_difference(better, worse)
        result[label] = entry
        lines += _ablation_markdown(label, entry)
    return result, "\n".join(lines) + "\n"


def _diff(d: dict) -> str:
    return (f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}), "
            f"p {d['mcnemar_p']:.2g}, {d['pairs']} pairs: {_verdict(d)}")


def _ablation_markdown(label: str, entry: dict) -> list[str]:
    full = entry["full"]
    lines = [f"**{label}**: full computation {100 * full['rate']:.1f} % ({full['episodes']} episodes).", "",
             "| budget | method | success % (95% CI) | speedup | skipped |", "|---|---|---|---|---|"]
    for budget, b in entry["budgets"].items():
        for base, m in b["methods"].items():
            s = m["success"]
            lines.append(f"| {budget} | {base} | {100 * s['rate']:.1f} ({100 * s['wilson95'][0]:.1f}–"
                         f"{100 * s['wilson95'][1]:.1f}) | {m['speedup']:.2f}x | {100 * m['skipped']:.1f}% |")
    lines += ["", "| ordering | " + " | ".join(entry["budgets"]) + " | pooled |",
              "|---|" + "---|" * (len(entry["budgets"]) + 1)]
    for a, b in ORDERINGS:
        key = f"{a} > {b}"
        if key not in entry["pooled"]:
            continue
        cells = [_diff(bud["orderings"][key]) if key in bud["orderings"] else "—" for bud in entry["budgets"].values()]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {_diff(entry['pooled'][key])} |")
    tasks = list(entry["per_task"]["full"])
    lines += ["", "Success % per task (Wilson 95% interval):", "", "| method | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for method, per in entry["per_task"].items():
        lines.append(f"| {method} | " + " | ".join(
            f"{100 * per[t]['rate']:.0f} ({100 * per[t]['wilson95'][0]:.0f}–{100 * per[t]['wilson95'][1]:.0f})"
            for t in tasks) + " |")
    if entry["equal_compute"]:
        lines += ["", "At equal compute (the rival's FLOPs per call at least bac's):", "",
                  "| comparison | rival FLOPs / bac's | Δ success (paired 95% CI), McNemar p |", "|---|---|---|"]
        for key, d in entry["equal_compute"].items():
            lines.append(f"| {key} | {d['flops_ratio']:.2f} | {_diff(d)} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------- seeds
def seeds(runs: list[Path], methods: list[str]) -> tuple[dict, str]:
    """The headline methods per training seed, on the tasks every run has (a run may cover more)."""
    loaded = [_load(run) for run in runs]
    common = set.intersection(*(set(report["environment"]["tasks"]) for report, _ in loaded))
    tasks = [t for t in loaded[0][0]["environment"]["tasks"] if t in common]
    result, labels = {"tasks": tasks}, []
    for report, episodes in loaded:
        episodes = [e for e in episodes if e["task"] in common]
        name = Path(report["policy"]["checkpoint"]).name
        labels.append(name)
        by_method = {m: [e for e in episodes if e["method"] == m] for m in methods if m in report["methods"]}
        result[name] = {m: {"success": reporting.success_summary(eps),
                            "paired_vs_full": reporting.paired_difference(eps, by_method["full"]),
                            "speedup": report["methods"][m]["speedup"]} for m, eps in by_method.items()}
    lines = [f"Tasks: {', '.join(tasks)}; success % (Δ vs full on the same episodes, McNemar p).", "",
             "| method | " + " | ".join(labels) + " | spread over seeds |", "|---|" + "---|" * (len(labels) + 1)]
    for m in methods:
        rates = [result[n][m]["success"]["rate"] for n in labels if m in result[n]]
        if not rates:
            continue
        cells = []
        for n in labels:
            if m not in result[n]:
                cells.append("—")
                continue
            r, d = result[n][m], result[n][m]["paired_vs_full"]
            cells.append(f"{100 * r['success']['rate']:.1f}" + ("" if m == "full" else
                         f" (Δ {100 * d['mean']:+.1f}, p {d['mcnemar_p']:.2g})"))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * (max(rates) - min(rates)):.1f} pts |")
    return result, "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ blocks
def blocks(runs: list[Path]) -> tuple[dict, str]:
    """Per method, averaged over tasks, from ``python -m benchmarks.block_errors`` runs: mean error,
    mean error over the last fifth of the steps, the worst block (highest mean over tasks of its
    largest error) and the action chunk's deviation from full computation."""
    import numpy as np

    result, lines = {}, []
    for run in runs:
        data = json.loads((run / "block_errors.json").read_text())
        label = f"{Path(data['policy']['checkpoint']).name}"
        tasks = list(data["tasks"])
        methods = list(data["tasks"][tasks[0]]["methods"])
        entry = {}
        for m in methods:
            per = [data["tasks"][t]["methods"][m] for t in tasks]
            errors = np.stack([np.asarray(p["errors"]) for p in per])  # [tasks, blocks, steps]
            tail = errors.shape[-1] - errors.shape[-1] // 5
            block_max = np.mean([p["block_max"] for p in per], axis=0)
            worst = int(np.argmax(block_max))
            name = per[0]["blocks"][worst]
            entry[m] = {"mean_error": float(errors.mean()), "mean_error_last_fifth": float(errors[..., tail:].mean()),
                        "worst_block": name if isinstance(name, str) else name.get("name"),
                        "worst_block_max": float(block_max[worst]), "updates": int(np.asarray(per[0]["mask"]).sum()),
                        "action_deviation": float(np.mean([p["action_deviation"]["mean"] for p in per]))}
        result[label] = entry
        lines += [f"**{label}** ({len(tasks)} tasks, {data['settings']['samples']} observations each):", "",
                  "| method | block updates | mean error | last fifth of steps | worst block (its max) | action deviation |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {e['updates']} | {e['mean_error']:.3f} | {e['mean_error_last_fifth']:.3f} | "
                  f"{e['worst_block']} ({e['worst_block_max']:.2f}) | {e['action_deviation']:.3f} |" for m, e in entry.items()]
        lines.append("")
    return result, "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("sweep", "ablation", "seeds", "blocks"))
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="evaluator output folders")
    parser.add_argument("--methods", nargs="+", default=["full", "uniform-M10", "acs-M10", "bac-M10", "ddim-M10"],
                        help="seeds: the methods of the headline table")
    parser.add_argument("--out", type=Path, help="output path without suffix (default outputs/suite-<study>)")
    args = parser.parse_args(argv)
    studies = {"sweep": sweep, "ablation": ablation, "blocks": blocks,
               "seeds": lambda runs: seeds(runs, args.methods)}
    data, text = studies[args.study](args.runs)
    out = args.out or Path("outputs") / f"suite-{args.study}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""One table across the vision-language-action heads, from their evaluator runs (``python -m bac.eval``).

    python -m benchmarks.vla_summary            # reads benchmarks/results/vla-<head>[-swapped]/, writes vla-summary.*

For every head: its training (steps, loss, measured time, from the checkpoint's provenance), closed-loop
success at full computation per task (Wilson intervals; held-out seeds and held-out paraphrases), the
same episodes with the instruction of the other task of the shared-scene pair (paired by task, seed and
sampling noise: does the head follow the words or the scene?), and the vision-language prefix's share of
a policy call. The method comparisons are in each run's own ``report.md``; this only gathers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bac.evaluation import report as reporting

HEADS = ("gr00t", "rdt", "pi0")


def _episodes(run: Path, method: str = "full") -> list[dict]:
    lines = (run / "episodes.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["method"] == method]


def _checkpoint_facts(report: dict) -> dict:
    import bac.policies

    name = Path(report["policy"]["checkpoint"]).name
    config = Path(bac.policies.__file__).resolve().parent / "checkpoints" / name / "config.json"
    provenance = json.loads(config.read_text())["provenance"] if config.exists() else {}
    return {"checkpoint": name, "training_steps": provenance.get("step"), "loss": provenance.get("loss"),
            "train_minutes": round(provenance["train_seconds"] / 60, 1) if "train_seconds" in provenance else None}


def summarize_head(results: Path, head: str) -> dict | None:
    run = results / f"vla-{head}"
    if not (run / "report.json").exists():
        return None
    report = json.loads((run / "report.json").read_text())
    full = _episodes(run)
    tasks = report["environment"]["tasks"]
    entry = {
        **_checkpoint_facts(report),
        "sampler": report["sampler"],
        "prefix_share_of_full": report["prefix"]["share_of_reference"] if report.get("prefix") else None,
        "full_p50_ms": report["methods"]["full"]["latency"]["p50_ms"],
        "success": reporting.success_summary(full),
        "mean_over_tasks": sum(reporting.success_summary([e for e in full if e["task"] == t])["rate"]
                               for t in tasks) / len(tasks),
        "per_task": {t: reporting.success_summary([e for e in full if e["task"] == t]) for t in tasks},
    }
    swapped_run = results / f"vla-{head}-swapped"
    if (swapped_run / "episodes.jsonl").exists():
        swapped = _episodes(swapped_run)
        entry["swapped"] = {
            "success": reporting.success_summary(swapped),
            "per_task": {t: reporting.success_summary([e for e in swapped if e["task"] == t]) for t in tasks},
            "paired_vs_right_instruction": reporting.paired_difference(swapped, full),
        }
    return entry


def _cell(summary: dict) -> str:
    if not summary["episodes"]:  # a run still going
        return "—"
    low, high = summary["wilson95"]
    return f"{100 * summary['rate']:.0f} ({100 * low:.0f}–{100 * high:.0f})"


def markdown(summary: dict) -> str:
    heads = [h for h in summary if summary[h] is not None]
    if not heads:
        return "no VLA runs found\n"
    tasks = list(summary[heads[0]]["per_task"])
    lines = ["| head | sampler | training | full: success % (95% CI) | mean over tasks | prefix share | "
             "swapped instruction: success % | Δ swapped − right (paired 95% CI), McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for h in heads:
        s = summary[h]
        training = f"{s['training_steps']} steps, {s['train_minutes']} min, loss {s['loss']:.3f}" if s["loss"] else "—"
        swapped, paired = "—", "—"
        if "swapped" in s:
            swapped = _cell(s["swapped"]["success"])
            p = s["swapped"]["paired_vs_right_instruction"]
            paired = f"{100 * p['mean']:+.1f} ({100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}), p {p['mcnemar_p']:.2g}"
        lines.append(f"| {h} | {s['sampler']['kind']}-{s['sampler']['steps']} | {training} | {_cell(s['success'])} | "
                     f"{100 * s['mean_over_tasks']:.1f} | {100 * s['prefix_share_of_full']:.0f}% | {swapped} | {paired} |")
    lines += ["", "Success % per task at full computation (held-out paraphrases), and with the swapped instruction:", "",
              "| head | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for h in heads:
        s = summary[h]
        lines.append(f"| {h} | " + " | ".join(_cell(s["per_task"][t]) for t in tasks) + " |")
        if "swapped" in s:
            lines.append(f"| {h}, swapped | " + " | ".join(_cell(s["swapped"]["per_task"][t]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    args = parser.parse_args(argv)
    summary = {head: summarize_head(args.results, head) for head in args.heads}
    (args.results / "vla-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (args.results / "vla-summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Evaluation report: statistics, JSON (SPEC section 5), a Markdown table and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REPORT_SCHEMA = "bac-eval-report/1"


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a binomial proportion.

    The interval always contains the observed rate and lies in [0, 1]: at 0% or 100% the closed form
    misses the bound by one ulp (wilson(6, 6) upper = 0.9999999999999999), which made error bars negative.
    """
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    if successes == 0:
        return [0.0, min(1.0, centre + half)]
    if successes == n:
        return [max(0.0, centre - half), 1.0]
    return [max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))]


def success_summary(episodes: list[dict]) -> dict:
    n, k = len(episodes), sum(e["success"] for e in episodes)
    return {"episodes": n, "successes": k, "rate": k / n if n else None, "wilson95": wilson(k, n)}


def paired_difference(method: list[dict], reference: list[dict]) -> dict:
    """Success difference to the reference on the same (task, seed) episodes, with a normal 95% interval."""
    ref = {(e["task"], e["seed"]): e["success"] for e in reference}
    diffs = np.array([float(e["success"]) - float(ref[(e["task"], e["seed"])])
                      for e in method if (e["task"], e["seed"]) in ref])
    if diffs.size == 0:
        return {"pairs": 0}
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(diffs.size) if diffs.size > 1 else math.inf
    return {
        "pairs": int(diffs.size),
        "mean": float(diffs.mean()),
        "ci95": [float(diffs.mean() - half), float(diffs.mean() + half)],
        "only_method_succeeded": int((diffs > 0).sum()),
        "only_reference_succeeded": int((diffs < 0).sum()),
    }


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    methods = report["methods"]
    tasks = report["environment"]["tasks"]
    seeds = report["environment"]["seeds"]
    episodes = (f"{report['environment']['episodes_per_task']} episodes per task (seeds {seeds[0]}–{seeds[1]})"
                if seeds else "no episodes (latency only)")
    lines = [
        f"# bac evaluation: {report['policy']['checkpoint']}",
        "",
        f"Tasks: {', '.join(tasks)}; {episodes}; "
        f"latency at batch 1, {report['latency_settings']['threads']} thread(s), "
        f"{report['latency_settings']['repeats']} interleaved repeats.",
        "",
        "| method | settings | success % (95% CI) | Δ vs full (paired) | p50 ms | p99 ms | Hz | speedup | GFLOPs/call | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        s = m.get("success") or {}
        ci = s.get("wilson95")
        d = m.get("paired_vs_full") or {}
        settings = ", ".join(f"{k}={v}" for k, v in m["config"].items() if v is not None)
        lat = m["latency"]
        lines.append(
            f"| {name} | {settings} | "
            + (f"{_pct(s.get('rate'))} ({_pct(ci[0])}–{_pct(ci[1])})" if s.get("episodes") else "—")
            + " | "
            + (f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f})" if d.get("pairs") else "—")
            + f" | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['hz']:.1f} | {m['speedup']:.2f}x"
            f" | {m['flops_per_call'] / 1e9:.3f} | {_pct(m['skipped_share'])}% |"
        )
    if any(m.get("per_task") for m in methods.values()):
        lines += ["", "Success % per task:", "", "| method | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for name, m in methods.items():
            per = m.get("per_task") or {}
            lines.append(f"| {name} | " + " | ".join(_pct(per.get(t, {}).get("rate")) for t in tasks) + " |")
    lines += ["", f"Machine: {report['machine']['platform']}; torch {report['packages']['torch']}."]
    return "\n".join(lines) + "\n"


def plots(report: dict, latencies: dict[str, list[float]], out_dir: Path, bac_plan=None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = report["methods"]
    if any((m.get("success") or {}).get("episodes") for m in methods.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, m in methods.items():
            s = m["success"]
            lo, hi = s["wilson95"]
            ax.errorbar(m["speedup"], s["rate"], yerr=[[s["rate"] - lo], [hi - s["rate"]]], fmt="o", capsize=3)
            ax.annotate(name, (m["speedup"], s["rate"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("batch-1 latency speedup over full (x)")
        ax.set_ylabel("success rate (Wilson 95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "success_vs_speedup.png", dpi=150)
        plt.close(fig)
        written.append("success_vs_speedup.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    names = list(latencies)
    ax.boxplot([np.asarray(latencies[n]) * 1e3 for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=8)
    ax.set_ylabel("policy call latency, batch 1 (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=150)
    plt.close(fig)
    written.append("latency.png")
    if bac_plan is not None:
        bac_plan.heatmap(out_dir / "bac_plan.png")
        written.append("bac_plan.png")
    return written

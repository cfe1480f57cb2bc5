"""Evaluation report: statistics, JSON (SPEC section 5), a Markdown table and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REPORT_SCHEMA = "bac-eval-report/2"  # 2: a calibration per sampler; exact paired statistics


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


def mcnemar_exact(only_method: int, only_reference: int) -> float:
    """Two-sided exact McNemar test: the discordant pairs under H0 are Binomial(b + c, 1/2)."""
    from scipy.stats import binomtest

    discordant = only_method + only_reference
    return 1.0 if discordant == 0 else float(binomtest(only_method, discordant, 0.5).pvalue)


def _hybrid_score(p1: float, wilson1: list[float], p2: float, wilson2: list[float], phi: float) -> list[float]:
    """Newcombe's square-and-add of Wilson limits for p1 - p2, with correlation ``phi`` (0: independent)."""
    (l1, u1), (l2, u2) = wilson1, wilson2
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return [max(-1.0, min(d, lower)), min(1.0, max(d, upper))]


def newcombe_paired(both: int, only_method: int, only_reference: int, neither: int, z: float = 1.96) -> list[float]:
    """95% interval for the paired difference of success rates (method - reference), Newcombe (1998,
    Stat Med 17:2635) method 10: Wilson intervals of both marginal rates combined with the pairs'
    correlation. Unlike the normal approximation it never collapses to [0, 0] when every pair agrees.
    """
    a, b, c, d = both, only_method, only_reference, neither
    n = a + b + c + d
    if n == 0:
        return [-1.0, 1.0]
    p1, p2 = (a + b) / n, (a + c) / n
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    numerator = a * d - b * c
    if numerator > 0:  # Newcombe's continuity adjustment of phi
        numerator = max(numerator - n / 2, 0.0)
    phi = numerator / math.sqrt(denominator) if denominator else 0.0
    return _hybrid_score(p1, wilson(a + b, n, z), p2, wilson(a + c, n, z), phi)


def paired_difference(method: list[dict], reference: list[dict]) -> dict:
    """Success difference to the reference on the same (task, seed) episodes: the 2x2 table of paired
    outcomes, Newcombe's paired 95% interval (method 10) and the exact McNemar p-value."""
    ref = {(e["task"], e["seed"]): bool(e["success"]) for e in reference}
    pairs = [(bool(e["success"]), ref[(e["task"], e["seed"])]) for e in method if (e["task"], e["seed"]) in ref]
    if not pairs:
        return {"pairs": 0}
    both = sum(m and r for m, r in pairs)
    only_method = sum(m and not r for m, r in pairs)
    only_reference = sum(r and not m for m, r in pairs)
    neither = len(pairs) - both - only_method - only_reference
    return {
        "pairs": len(pairs),
        "mean": (only_method - only_reference) / len(pairs),
        "ci95": newcombe_paired(both, only_method, only_reference, neither),
        "ci_method": "newcombe-10",
        "mcnemar_p": mcnemar_exact(only_method, only_reference),
        "both_succeeded": both,
        "only_method_succeeded": only_method,
        "only_reference_succeeded": only_reference,
        "both_failed": neither,
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
        "| method | settings | success % (95% CI) | Δ vs full (paired 95% CI) | McNemar p | p50 ms | p99 ms | Hz "
        "| speedup | GFLOPs/call | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
            + (f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}) | {d['mcnemar_p']:.2f}"
               if d.get("pairs") else "— | —")
            + f" | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['hz']:.1f} | {m['speedup']:.2f}x"
            f" | {m['flops_per_call'] / 1e9:.3f} | {_pct(m['skipped_share'])}% |"
        )
    if any(m.get("per_task") for m in methods.values()):
        lines += ["", "Success % per task:", "", "| method | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for name, m in methods.items():
            per = m.get("per_task") or {}
            lines.append(f"| {name} | " + " | ".join(_pct(per.get(t, {}).get("rate")) for t in tasks) + " |")
    prefix = report.get("prefix")
    if prefix:
        lines += ["", f"Vision-language prefix (encoded once per call, never cached): p50 "
                      f"{prefix['latency']['p50_ms']:.1f} ms, {_pct(prefix['share_of_reference'])}% of a "
                      f"{report['reference_method']} call; speedups above are end to end."]
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

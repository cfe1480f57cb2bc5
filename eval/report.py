"""Evaluation report: statistics, JSON (docs/guide/evaluation.md, "The report"), a Markdown table and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .timing import summarize

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


def call_counts(episodes: list[dict]) -> dict | None:
    """What a warm-started method's calls did over ``episodes`` (each wave's counts are on every line of the
    wave, ``"warm"``: counted once): calls, warm calls, denoiser evaluations, evaluations per call and the share
    of warm calls; None when no episode carries counts."""
    waves = {(e["task"], e["warm"]["wave"]): e["warm"] for e in episodes if "warm" in e}
    if not waves:
        return None
    total = {key: sum(wave[key] for wave in waves.values()) for key in ("calls", "warm_calls", "evaluations")}
    return {**total, "evaluations_per_call": total["evaluations"] / total["calls"],
            "warm_share": total["warm_calls"] / total["calls"]}


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


def significant(paired: dict) -> bool:
    """Whether a paired difference is significant at 5%: by the exact McNemar test, the one test every
    report's "significant" refers to (a "lossless" verdict is a different question, answered by the paired
    interval against the tolerance)."""
    return paired["mcnemar_p"] < 0.05


def interval_disagrees(paired: dict) -> bool:
    """Whether Newcombe's paired 95% interval excluding 0 and McNemar's p < 0.05 disagree. They can at small n:
    5 pairs all won by the reference give the interval (-100, -38.6) points but p = 0.0625."""
    low, high = paired["ci95"]
    return (low > 0 or high < 0) != significant(paired)


def pairs_needed(both: int, only_method: int, only_reference: int, neither: int, tolerance: float,
                 limit: int = 1 << 20) -> int | None:
    """Paired episodes a lossless verdict needs (the paired 95% interval's lower end above ``-tolerance``)
    if the method were exactly as good as the reference, at the reference's success rate and the share of
    discordant pairs seen here; None beyond ``limit``. No discordant pairs seen: the fewest with none."""
    n = both + only_method + only_reference + neither
    if n == 0:
        return None
    reference = (both + only_reference) / n
    half = (only_method + only_reference) / n / 2  # each kind of disagreement, equally often

    def clears(pairs: int) -> bool:
        counts = [pairs * x for x in (reference - half, half, half, 1 - reference - half)]
        return newcombe_paired(*counts)[0] >= -tolerance

    low, high = 1, 2
    while not clears(high):
        low, high = high, 2 * high
        if high > limit:
            return None
    while high - low > 1:  # the smallest count in (low, high] that clears
        mid = (low + high) // 2
        low, high = (low, mid) if clears(mid) else (mid, high)
    return high


def verdict(methods: dict, reference: str, tolerance_points: float) -> dict:
    """The fastest configuration whose success is within ``tolerance_points`` of the reference's on the
    paired episodes, and whether the data support that: lossless at 95% when the paired interval of its
    difference lies above ``-tolerance_points``. Faster configurations are listed with their losses,
    significant or not by the exact McNemar test (:func:`significant`), and whether the paired interval
    disagrees (:func:`interval_disagrees`). Methods without episodes give no verdict."""
    tolerance = tolerance_points / 100
    ref = methods.get(reference) or {}
    if not (ref.get("success") or {}).get("episodes"):
        return {"reference": reference, "tolerance_points": tolerance_points, "pick": None,
                "reason": "no episodes (latency only)"}
    scored = {name: m for name, m in methods.items() if (m.get("paired_vs_full") or {}).get("pairs")}
    within = [name for name, m in scored.items() if m["paired_vs_full"]["mean"] >= -tolerance - 1e-12]
    pick = max(within, key=lambda name: (scored[name]["speedup"], name == reference))
    paired = scored[pick]["paired_vs_full"]
    lossless = pick == reference or paired["ci95"][0] >= -tolerance
    counts = (paired["both_succeeded"], paired["only_method_succeeded"], paired["only_reference_succeeded"],
              paired["both_failed"])
    faster = sorted((name for name in scored if scored[name]["speedup"] > scored[pick]["speedup"]),
                    key=lambda name: -scored[name]["speedup"])
    return {
        "reference": reference, "tolerance_points": tolerance_points, "pick": pick,
        "speedup": scored[pick]["speedup"], "pairs": paired["pairs"], "delta_points": 100 * paired["mean"],
        "ci95_points": [100 * paired["ci95"][0], 100 * paired["ci95"][1]], "mcnemar_p": paired["mcnemar_p"],
        "significant_loss": significant(paired) and paired["mean"] < 0,
        "interval_disagrees": interval_disagrees(paired), "lossless_at_95": lossless,
        "pairs_needed": None if pick == reference else pairs_needed(*counts, tolerance),
        "faster": [_loss(name, scored[name]) for name in faster],
    }


def capable_user(methods: dict, compiled: dict[str, list[float]], reference: str, tolerance_points: float) -> dict | None:
    """The capable user's configuration, what a robot engineer runs without bac: the whole denoiser under
    ``torch.compile`` with the fewest steps that keep success (the fastest uncached method within
    ``tolerance_points`` of the reference, :func:`verdict` over the uncached methods), timed in the same
    rotation (``compiled``: each uncached method's seconds so compiled). Each method in ``methods`` gets
    ``vs_capable_user``, that configuration's p50 over its own. Without episodes the baseline is the
    reference; ``None`` when nothing was timed compiled."""
    if not compiled:
        return None
    rows = {name: summarize(times) for name, times in compiled.items()}
    uncached = {name: m for name, m in methods.items() if name in compiled}
    chosen = verdict(uncached, reference, tolerance_points) if reference in uncached else {"pick": None}
    pick = chosen["pick"] or (reference if reference in rows else min(rows, key=lambda n: rows[n]["p50_ms"]))
    base = rows[pick]["p50_ms"]
    for name, m in methods.items():
        m["vs_capable_user"] = base / m["latency"]["p50_ms"]
    return {"method": pick, "configuration": f"torch.compile(model), {pick}", "latency": rows[pick],
            "chosen_by": "fewest steps within the tolerance" if chosen["pick"] else "the reference (no episodes)",
            "lossless_at_95": chosen.get("lossless_at_95"), "compiled": rows}


def _loss(name: str, method: dict) -> dict:
    """A faster configuration outside the tolerance, as the verdict lists it."""
    paired = method["paired_vs_full"]
    return {"method": name, "speedup": method["speedup"], "delta_points": 100 * paired["mean"],
            "ci95_points": [100 * paired["ci95"][0], 100 * paired["ci95"][1]], "mcnemar_p": paired["mcnemar_p"],
            "significant_loss": significant(paired) and paired["mean"] < 0,
            "interval_disagrees": interval_disagrees(paired)}


def _disagreement(entry: dict) -> str:
    """What to add where a McNemar verdict is printed beside a paired interval that reads otherwise."""
    if not entry.get("interval_disagrees"):
        return ""
    lo, hi = entry["ci95_points"]
    reads = "excludes 0" if lo > 0 or hi < 0 else "reaches 0"
    return (f"; its paired interval ({lo:+.1f}, {hi:+.1f}) {reads}: at this sample size the exact test and "
            "Newcombe's interval disagree, and significance here follows the exact test")


def verdict_line(v: dict) -> str:
    """``verdict`` in one line of Markdown."""
    tol, ref = f"{v['tolerance_points']:g}", v["reference"]
    if v["pick"] is None:
        return f"**Verdict:** none: {v['reason']}."
    episodes = f"{v['pairs']} paired episode" + ("" if v["pairs"] == 1 else "s")
    faster = v["faster"]
    if faster:
        losses = "; ".join(f"{f['method']} ({f['speedup']:.1f}x) {f['delta_points']:+.1f} points, McNemar p "
                           f"{f['mcnemar_p']:.2g} ("
                           + ("a significant loss" if f["significant_loss"] else "not significant")
                           + _disagreement(f) + ")" for f in faster[:2])
        more = f"; {len(faster) - 2} more" if len(faster) > 2 else ""
        beyond = f" Faster but outside the tolerance: {losses}{more}."
    else:
        beyond = ""
    if v["pick"] == ref:
        return (f"**Verdict:** nothing faster than the reference {ref} is within {tol} points of its success over "
                f"{episodes}.{beyond}")
    lo, hi = v["ci95_points"]
    head = (f"**Verdict:** the fastest configuration within {tol} points of {ref} is **{v['pick']}**, "
            f"{v['speedup']:.1f}x faster: {v['delta_points']:+.1f} points (paired 95% CI {lo:+.1f} to {hi:+.1f}, "
            f"McNemar p {v['mcnemar_p']:.2g}) over {episodes}")
    if v["lossless_at_95"]:
        return f"{head}: lossless at 95% (the interval lies above -{tol} points).{beyond}"
    needed = (f"; a lossless verdict needs about {v['pairs_needed']} paired episodes or more (if both succeed "
              f"equally often, at this rate of disagreement)" if v["pairs_needed"] else "")
    if v.get("significant_loss"):  # within the tolerance, yet a loss by the exact test: never "not significant"
        return (f"{head}: a **significant loss** within the tolerance, not lossless at {episodes} (the interval "
                f"reaches {lo:+.1f} points).{beyond}")
    return (f"{head}: **not significant** at {episodes} (the interval reaches "
            f"{lo:+.1f} points{_disagreement(v)}){needed}.{beyond}")


def _setting(value) -> str:
    """A setting's value in the table: a warm start's as ``start=2 variant=plain ...``."""
    return " ".join(f"{k}={v}" for k, v in value.items() if v is not None) if isinstance(value, dict) else str(value)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    methods = report["methods"]
    tasks = report["environment"]["tasks"]
    seeds = report["environment"]["seeds"]
    episodes = (f"{report['environment']['episodes_per_task']} episodes per task (seeds {seeds[0]}–{seeds[1]})"
                if seeds else "no episodes (latency only)")
    compiled = report.get("compile") or {"mode": "none"}  # reports made before the setting have none
    capable = report.get("capable_user")
    calls = "" if compiled["mode"] == "none" else \
        f" Calls compiled (compile={compiled['mode']}, backend={compiled['backend']}), in the episodes and timed."
    warm = any("warm" in m for m in methods.values())  # the evaluations per call shown only beside warm starts
    lines = [
        f"# bac evaluation: {report['policy']['checkpoint']}",
        "",
        f"Tasks: {', '.join(tasks)}; {episodes}; "
        f"latency at batch 1, {report['latency_settings']['threads']} thread(s), "
        f"{report['latency_settings']['repeats']} interleaved repeats.{calls}",
        "",
        f"| method | settings | success % (95% CI) | Δ vs {report.get('reference_method', 'full')} (paired 95% CI) "
        "| McNemar p | p50 ms | p99 ms | Hz "
        "| speedup | GFLOPs/call | skipped |" + (" evals/call | warm % |" if warm else "")
        + (" vs capable user |" if capable else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if warm else "") + ("---|" if capable else ""),
    ]
    for name, m in methods.items():
        s = m.get("success") or {}
        ci = s.get("wilson95")
        d = m.get("paired_vs_full") or {}
        settings = ", ".join(f"{k}={_setting(v)}" for k, v in m["config"].items() if v is not None)
        lat = m["latency"]
        lines.append(
            f"| {name} | {settings} | "
            + (f"{_pct(s.get('rate'))} ({_pct(ci[0])}–{_pct(ci[1])})" if s.get("episodes") else "—")
            + " | "
            + (f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}) | {d['mcnemar_p']:.2f}"
               if d.get("pairs") else "— | —")
            + f" | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | {lat['hz']:.1f} | {m['speedup']:.2f}x"
            f" | {m['flops_per_call'] / 1e9:.3f} | {_pct(m['skipped_share'])}% |"
            + (f" {m['evaluations_per_call']:.2f} | {_pct(m['warm_share'])} |" if warm else "")
            + (f" {m['vs_capable_user']:.2f}x |" if capable else "")
        )
    disagree = [name for name, m in methods.items()
                if (m.get("paired_vs_full") or {}).get("pairs") and interval_disagrees(m["paired_vs_full"])]
    if disagree:
        lines += ["", f"{', '.join(disagree)}: the paired interval and the McNemar p-value disagree on whether the "
                      "difference is 0, as the exact test and Newcombe's interval can at small n; "
                      "\"significant\" in this report follows the exact McNemar test."]
    if any(m.get("per_task") for m in methods.values()):
        lines += ["", "Success % per task:", "", "| method | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for name, m in methods.items():
            per = m.get("per_task") or {}
            lines.append(f"| {name} | " + " | ".join(_pct(per.get(t, {}).get("rate")) for t in tasks) + " |")
    if warm:
        lines += ["", "Warm-started methods: latency, speedup and FLOPs are per call, linear in denoiser evaluations "
                      "between the cold call and the warm call measured at batch 1 (p50 ms):"]
        lines += [f"- {name} ({m['warm']['setting']['variant']} from step {m['warm']['setting']['start']}): cold "
                  f"{m['warm']['cold_call']['p50_ms']:.1f} ms ({m['warm']['cold_call']['evaluations']} evaluations), "
                  f"warm {m['warm']['warm_call']['p50_ms']:.1f} ms ({m['warm']['warm_call']['evaluations']:.2f}); "
                  f"at {m['evaluations_per_call']:.2f} per call ({_pct(m['warm_share'])}% of calls warm)"
                  for name, m in methods.items() if "warm" in m]
    prefix = report.get("prefix")
    if prefix:
        lines += ["", f"Vision-language prefix (encoded once per call, never cached): p50 "
                      f"{prefix['latency']['p50_ms']:.1f} ms, {_pct(prefix['share_of_reference'])}% of a "
                      f"{report['reference_method']} call; speedups above are end to end."]
    wall = report.get("wall_seconds") or {}
    phases = (("calibration inputs", "calibration_inputs"), ("calibration and plans", "calibration_and_plans"),
              ("rollouts", "rollouts"), ("latency", "latency"))
    timing = ", ".join(f"{label} {wall[key]:.{0 if wall[key] >= 10 else 1}f} s" for label, key in phases
                       if key in wall)
    lines += ["", f"Machine: {report['machine']['platform']}; torch {report['packages']['torch']}"
              + (f", {report['threads']} thread(s)" if "threads" in report else "")
              + (f"; wall time: {timing}" if timing else "") + "."]
    if capable:
        base = capable["latency"]
        others = ", ".join(f"{name} {row['p50_ms']:.1f} ms" for name, row in capable["compiled"].items()
                           if name != capable["method"])
        lines += ["", f"The capable user's configuration, {capable['configuration']} ({capable['chosen_by']}; no "
                      f"bac): p50 {base['p50_ms']:.1f} ms, {base['hz']:.1f} Hz, timed in the same rotation; "
                      "\"vs capable user\" is its p50 over each method's"
                      + (f". Other uncached methods so compiled: {others}." if others else ".")]
    if report.get("capable_user_not_timed"):
        lines += ["", f"The capable user's configuration (torch.compile(model)) was not timed: "
                      f"{report['capable_user_not_timed']}."]
    if report.get("verdict"):
        lines += ["", verdict_line(report["verdict"])]
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
        ax.set_xlabel(f"batch-1 latency speedup over {report.get('reference_method', 'full')} (x)")
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

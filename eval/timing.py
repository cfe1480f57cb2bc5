"""Latency summaries: one set of keys for every benchmark and report."""
from __future__ import annotations

import numpy as np
import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures it (nothing to do on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds) -> dict:
    """Mean, p50/p95/p99 and max in milliseconds, the repeat count, and Hz (1 / median)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "repeats": int(ms.size),
        "hz": float(1e3 / np.median(ms)),
    }

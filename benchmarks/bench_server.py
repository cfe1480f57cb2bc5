"""Policy server under load: latency, throughput and a contamination check with concurrent client processes.

    python -m benchmarks.bench_server [--clients 4] [--requests 50] [--sampler ddim --steps 10]
                                          [--method uniform --method-params '{"interval": 2}' | --plan F | --tuned F]

Serves the shipped DP-T from this process (one inference thread, one torch thread) to client *processes*
(the robots), one alone (``solo``) and then ``--clients`` at once (``concurrent``), each with its own seed
and observations: round-trip and server ``infer_ms`` / ``queue_ms`` percentiles, throughput, and a check that
every client's actions equal, bit for bit, what an in-process policy gives that client alone. Writes
``benchmarks/results/server-load.json``; compare phases within one run. docs/guide/server.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bac.evaluation.timing import summarize

DEFAULT_OUT = Path("outputs") / "server-load.json"


def _client(port: int, seed: int, task: str, observations: np.ndarray, go, results) -> None:
    """One robot, in its own process: reset with its seed, then one request per observation, timed."""
    from bac.runtime.client import PolicyClient

    try:
        with PolicyClient(port=port, timeout=120) as client:
            client.reset(seed)
            go.wait()
            start = time.time()
            actions, round_trip, infer, queue = [], [], [], []
            for state in observations:
                sent = time.perf_counter()
                reply = client.infer({"observation.state": state, "task": task})
                round_trip.append(time.perf_counter() - sent)
                actions.append(reply["actions"])
                infer.append(reply["server_timing"]["infer_ms"] / 1e3)
                queue.append(reply["server_timing"]["queue_ms"] / 1e3)
            results.put({"seed": seed, "start": start, "end": time.time(), "actions": np.stack(actions),
                         "round_trip": round_trip, "infer": infer, "queue": queue})
    except BaseException as err:  # noqa: BLE001 -- reported by the parent
        results.put({"seed": seed, "error": f"{type(err).__name__}: {err}"})


def _stats(seconds: list[float]) -> dict:
    """:func:`summarize`, plus how many samples lie at or above each tail percentile (what it rests on)."""
    summary = summarize(seconds)
    ms = np.asarray(seconds) * 1e3
    summary["samples_at_or_above"] = {p: int((ms >= summary[f"{p}_ms"]).sum()) for p in ("p95", "p99", "max")}
    return summary


def _phase(port: int, clients: list[tuple[int, np.ndarray]], task: str) -> dict:
    context = multiprocessing.get_context("spawn")
    go, results = context.Event(), context.Queue()
    processes = [context.Process(target=_client, args=(port, seed, task, obs, go, results), daemon=True)
                 for seed, obs in clients]
    for process in processes:
        process.start()
    time.sleep(0.5)
    go.set()  # the clients connect and reset first (imports take seconds), then start together
    outcome = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(30)
    errors = [o["error"] for o in outcome if "error" in o]
    if errors:
        raise RuntimeError(f"client(s) failed: {errors}")
    outcome.sort(key=lambda o: o["seed"])
    wall = max(o["end"] for o in outcome) - min(o["start"] for o in outcome)
    requests = sum(len(o["round_trip"]) for o in outcome)
    return {
        "clients": len(outcome),
        "requests": requests,
        "wall_s": wall,
        "throughput_rps": requests / wall,
        "round_trip": _stats([t for o in outcome for t in o["round_trip"]]),
        "server_infer": _stats([t for o in outcome for t in o["infer"]]),
        "server_queue": _stats([t for o in outcome for t in o["queue"]]),
        "_actions": {o["seed"]: o["actions"] for o in outcome},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_server", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="dpt-metaworld")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--method", default=None, help="an uncalibrated caching method by name (e.g. uniform)")
    parser.add_argument("--method-params", default="{}", help="its parameters as JSON")
    parser.add_argument("--plan", default=None)
    parser.add_argument("--tuned", default=None, help="a tuned.json (sets the sampler; --sampler/--steps ignored)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--task", default=None, help="default: the policy's first task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from bac.runtime.loading import load_policy
    from bac.runtime.server import PolicyServer

    torch.set_num_threads(args.threads)
    how = {"tuned": args.tuned} if args.tuned else {"sampler": args.sampler, "steps": args.steps, "plan": args.plan,
                                                     "method": args.method,
                                                     "method_params": json.loads(args.method_params)}
    served = load_policy(args.checkpoint, **how)
    policy = served.policy
    reference = load_policy(args.checkpoint, **how).policy  # the solo reference, in this process
    task = args.task or policy.tasks[0]

    def observations(seed: int) -> np.ndarray:
        """Current observations inside the training range (the normaliser's [-1, 1] mapped back)."""
        unit = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (args.requests, policy.state_dim)))
        return policy.obs_normalizer.inverse(unit.float()).numpy().astype(np.float32)

    seeds = [args.seed + 1000 * (i + 1) for i in range(args.clients)]
    inputs = {seed: observations(seed) for seed in seeds}
    server = PolicyServer(policy, port=0, warmup=3, checkpoint=args.checkpoint, source=served.source,
                          handle=served.handle).start()
    try:
        solo = _phase(server.port, [(seeds[0], inputs[seeds[0]])], task)
        concurrent = _phase(server.port, [(seed, inputs[seed]) for seed in seeds], task)
        served = server.requests_served
    finally:
        server.stop()

    # Contamination: each client's actions against the in-process policy alone, with its seed and observations.
    mismatches, max_difference = [], 0.0
    for seed in seeds:
        generator, history = torch.Generator().manual_seed(seed), None
        for i, state in enumerate(inputs[seed]):
            history = np.repeat(state[None], policy.n_obs_steps, 0) if history is None else \
                np.concatenate([history[1:], state[None]])
            expected = reference.predict_action_chunk({"observation.state": torch.from_numpy(history)[None],
                                                       "task": task}, generator=generator)[0].numpy()
            got = concurrent["_actions"][seed][i]
            if not np.array_equal(got, expected):
                mismatches.append({"seed": seed, "request": i})
                max_difference = max(max_difference, float(np.abs(got - expected).max()))
    solo_identical = np.array_equal(solo["_actions"][seeds[0]], concurrent["_actions"][seeds[0]])
    for phase in (solo, concurrent):
        del phase["_actions"]

    meta = server.metadata
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench_server", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "cpu_count": multiprocessing.cpu_count()},
        "policy": {"checkpoint": args.checkpoint, "sampler": meta["sampler"], "acceleration": meta["acceleration"],
                   "task": task, "n_obs_steps": meta["n_obs_steps"], "n_action_steps": meta["n_action_steps"]},
        "settings": {"clients": args.clients, "requests_per_client": args.requests, "seeds": seeds},
        "phases": {"solo": solo, "concurrent": concurrent},
        "requests_served": served,
        "contamination": {
            "checked": f"{len(seeds)} clients x {args.requests} requests against the in-process policy alone",
            "mismatches": len(mismatches), "first_mismatches": mismatches[:5], "max_abs_difference": max_difference,
            "solo_client_equals_its_concurrent_run": bool(solo_identical),
        },
        "notes": [
            "round_trip: client send to reply decoded (msgpack both ways, loopback websocket, queueing, inference)",
            "server_infer: the policy call on the inference thread; server_queue: waiting behind other clients",
            "samples_at_or_above: how many samples each tail percentile rests on",
            "one inference thread serves every client in turn: concurrent round trips include the others' calls",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, phase in report["phases"].items():
        rt, inf = phase["round_trip"], phase["server_infer"]
        print(f"{name:>10}: {phase['clients']} client(s) x {phase['requests'] // phase['clients']} requests, "
              f"{phase['throughput_rps']:.1f} req/s; round trip p50/p95/p99/max {rt['p50_ms']:.1f}/{rt['p95_ms']:.1f}/"
              f"{rt['p99_ms']:.1f}/{rt['max_ms']:.1f} ms (p99 rests on {rt['samples_at_or_above']['p99']} of "
              f"{rt['repeats']}); server infer p50/p95/p99/max {inf['p50_ms']:.1f}/{inf['p95_ms']:.1f}/"
              f"{inf['p99_ms']:.1f}/{inf['max_ms']:.1f} ms")
    c = report["contamination"]
    print(f"contamination: {c['mismatches']} mismatching chunks ({c['checked']}); report: {args.out}")
    if mismatches:
        raise SystemExit(f"contamination: {len(mismatches)} chunks differ from the solo reference")
    return report


if __name__ == "__main__":
    main()

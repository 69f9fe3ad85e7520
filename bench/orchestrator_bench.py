"""The orchestrator's own overhead and how fully it keeps its workers busy, with simulated workers
(each job sleeps for its simulated cost) on a real local Ray.

    .venv/bin/python bench/orchestrator_bench.py                  # both tables (~15 min on 2 cores)
    .venv/bin/python bench/orchestrator_bench.py --workers 1 4    # quicker
    .venv/bin/python bench/orchestrator_bench.py --skip-even      # only the uneven-candidates table

Even candidates: for W workers the population is 2W (at least 4), every candidate sleeps the same
time, so an ideal generation takes ceil(pop / W) x sleep; reported: wall time per generation
(dispatch through the driver's own loop + CMA-ES ask/tell on the paper's 4,172 parameters with full
covariance) over the ideal, and the ask+tell share.

Uneven candidates: every candidate is evaluated on the same 16 prompts of 1k, 2k, 3k and 4k tokens
(four of each) and costs a factor drawn from [1, spread] on top (a NAMM that keeps more tokens
costs more), so candidates differ by up to `spread` times and prompts by 4 times. The jobs are the
driver's own (`orchestrator.driver.candidate_jobs`): one per candidate, or one per
`prompts_per_job` prompts of it, started longest first. Utilisation: the seconds the workers spent
in jobs over workers x the generation's dispatch time (CMA-ES ask/tell left out: it is the same for
every row of a worker count, and shown beside).
Writes bench/results/orchestrator.md.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from bench.tables import markdown_table, write_result  # noqa: E402
from orchestrator.config import ESConfig  # noqa: E402
from orchestrator.dispatch import ActorPool, Job  # noqa: E402
from orchestrator.driver import candidate_jobs  # noqa: E402
from orchestrator.es import EvolutionStrategy  # noqa: E402

LENGTHS = (1024, 2048, 3072, 4096)
PROMPTS_PER_LENGTH = 4


@ray.remote(num_cpus=0, max_restarts=-1)
class SimulatedWorker:
    """Sleeps for a job's simulated cost: `seconds` for a whole candidate at factor 1."""

    def __init__(self, seconds: float, spread: float = 1.0):
        self.seconds, self.spread = seconds, spread

    def location(self) -> dict:
        import os

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def evaluate(self, vector, norm, requests, tasks=None):
        if tasks is None:                      # even candidates: every job the same
            seconds = self.seconds
        else:
            tokens = {t["key"]: t["context_length"] for t in tasks}
            share = sum(tokens[k] for k, _ in requests) / (PROMPTS_PER_LENGTH * sum(LENGTHS))
            seconds = self.seconds * candidate_factor(vector, self.spread) * share
        time.sleep(seconds)
        return {"scores": [float(-np.sum(np.asarray(vector) ** 2))] * len(requests), "retention": [1.0],
                "retention_per_layer": [], "seconds": seconds, "pid": 0}


def candidate_factor(vector, spread: float) -> float:
    """A cost factor in [1, spread] fixed by the candidate's parameters (uniform over candidates)."""
    u = int.from_bytes(hashlib.sha256(np.asarray(vector, np.float32).tobytes()).digest()[:8], "little") / 2 ** 64
    return 1.0 + (spread - 1.0) * u


def even_rows(pool, w: int, args) -> tuple:
    population = max(4, 2 * w)
    es = EvolutionStrategy(args.params, ESConfig(population=population, seed=0))
    requests = [("sim", i) for i in range(4)]
    walls, es_times = [], []
    for g in range(args.generations + 1):  # the first generation warms up
        t0 = time.perf_counter()
        xs = es.ask()
        t_ask = time.perf_counter() - t0
        results = pool.run([Job("evaluate", (x.astype(np.float32), None, requests), f"c{i}")
                            for i, x in enumerate(xs)])
        t1 = time.perf_counter()
        es.tell([r["scores"][0] for r in results])
        t_tell = time.perf_counter() - t1
        if g:
            walls.append(time.perf_counter() - t0)
            es_times.append(t_ask + t_tell)
    ideal = -(-population // w) * args.sleep
    wall, es_s = float(np.mean(walls)), float(np.mean(es_times))
    return (w, population, f"{ideal:.2f}", f"{wall:.2f}", f"{100 * ideal / wall:.1f}%",
            f"{100 * ideal / (wall - es_s):.1f}%", f"{es_s:.3f}", f"{100 * es_s / wall:.1f}%")


def uneven_row(pool, w: int, prompts_per_job, args) -> tuple:
    population = max(4, 2 * w)
    es = EvolutionStrategy(args.params, ESConfig(population=population, seed=0))
    tasks = [{"key": f"sim{n}", "context_length": n} for n in LENGTHS]
    requests = [(t["key"], i) for t in tasks for i in range(PROMPTS_PER_LENGTH)]
    utilisation, walls, es_times, spreads = [], [], [], []
    for g in range(args.generations + 1):
        t0 = time.perf_counter()
        xs = es.ask()
        t_ask = time.perf_counter() - t0
        jobs, sizes = candidate_jobs(xs, None, requests, tasks, prompts_per_job)
        t_run = time.perf_counter()
        results = pool.run(jobs)
        dispatch = time.perf_counter() - t_run
        per_candidate = np.add.reduceat([r["seconds"] for r in results], np.arange(0, len(jobs), len(sizes)))
        t1 = time.perf_counter()
        es.tell([-float(s) for s in per_candidate])
        t_tell = time.perf_counter() - t1
        if g:
            busy = sum(r["seconds"] for r in results)
            utilisation.append(busy / (w * dispatch))
            walls.append(dispatch)
            es_times.append(t_ask + t_tell)
            spreads.append(per_candidate.max() / per_candidate.min())
    jobs_per_gen = population * -(-len(requests) // (prompts_per_job or len(requests)))
    return (w, population, args.spread, prompts_per_job or "whole candidate", jobs_per_gen,
            f"{np.mean(spreads):.2f}x", f"{np.mean(walls):.2f}", f"{100 * np.mean(utilisation):.1f}%",
            f"{100 * min(utilisation):.1f}%", f"{np.mean(es_times):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16, 64], help="even-candidate worker counts")
    p.add_argument("--sleep", type=float, default=2.0, help="seconds per simulated candidate (factor 1)")
    p.add_argument("--generations", type=int, default=3, help="measured generations per row (after a warm-up)")
    p.add_argument("--params", type=int, default=4172)
    p.add_argument("--uneven-workers", type=int, default=64)
    p.add_argument("--spread", type=float, default=4.0, help="candidate cost factors drawn from [1, spread]")
    p.add_argument("--prompts-per-job", type=int, nargs="+", default=[0, 8, 4, 2],
                   help="job sizes for the uneven rows (0: the whole candidate)")
    p.add_argument("--skip-even", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orchestrator.md")
    args = p.parse_args(argv)

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2)
    even, uneven = [], []
    for w in [] if args.skip_even else args.workers:
        pool = ActorPool(lambda i: SimulatedWorker.remote(args.sleep), w, max_retries=1, timeout_seconds=600)
        pool.wait_ready()
        even.append(even_rows(pool, w, args))
        print(even[-1], flush=True)
        pool.shutdown()
    w = args.uneven_workers
    pool = ActorPool(lambda i: SimulatedWorker.remote(args.sleep, args.spread), w, max_retries=1, timeout_seconds=600)
    pool.wait_ready()
    for k in args.prompts_per_job:
        uneven.append(uneven_row(pool, w, k or None, args))
        print(uneven[-1], flush=True)
    pool.shutdown()
    ray.shutdown()

    parts = []
    if even:
        parts.append(
            f"## Even candidates\n\nSimulated workers sleeping {args.sleep:g} s per candidate on this machine "
            f"(2 cores); CMA-ES with full covariance over {args.params} parameters; mean of {args.generations} "
            "generations after a warm-up. `dispatch efficiency` leaves out the CMA-ES ask+tell time.\n\n"
            + markdown_table(("workers", "population", "ideal s/gen", "measured s/gen", "efficiency",
                              "dispatch efficiency", "ask+tell s", "ask+tell share"), even))
    parts.append(
        f"## Uneven candidates\n\n{w} simulated workers; every candidate on the same 16 prompts "
        f"({PROMPTS_PER_LENGTH} each of {', '.join(str(n) for n in LENGTHS)} tokens), at a cost factor drawn "
        f"from [1, {args.spread:g}] per candidate; a whole candidate at factor 1 sleeps {args.sleep:g} s. Jobs from "
        "`orchestrator.driver.candidate_jobs` (`workers.prompts_per_job`), longest first. Utilisation = seconds "
        "in jobs / (workers x dispatch seconds), mean and worst of "
        f"{args.generations} generations after a warm-up; ask+tell is CMA-ES's own time per generation.\n\n"
        + markdown_table(("workers", "population", "spread", "prompts per job", "jobs per generation",
                          "slowest / fastest candidate", "dispatch s/gen", "utilisation", "worst generation",
                          "ask+tell s"), uneven))
    write_result(args.out, "\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

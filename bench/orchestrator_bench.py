"""The orchestrator's own overhead, with simulated workers (a fixed sleep per candidate).

    .venv/bin/python bench/orchestrator_bench.py                  # 1, 4, 16, 64 workers
    .venv/bin/python bench/orchestrator_bench.py --workers 1 4    # quicker

For W workers the population is 2W (at least 4), so an ideal generation takes ceil(pop / W) x sleep. Reported:
wall time per generation (dispatch through the driver's own ray.wait loop + CMA-ES ask/tell on
the paper's 4,172 parameters with full covariance) over the ideal, and the ask+tell share.
Writes bench/results/orchestrator.md.
"""
from __future__ import annotations

import argparse
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
from orchestrator.es import EvolutionStrategy  # noqa: E402


@ray.remote(num_cpus=0, max_restarts=-1)
class SimulatedWorker:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def pid(self) -> int:
        import os

        return os.getpid()

    def evaluate(self, vector, norm, requests, tasks=None):
        time.sleep(self.seconds)
        return {"scores": [float(-np.sum(np.asarray(vector) ** 2))] * len(requests), "retention": [1.0],
                "retention_per_layer": [], "seconds": self.seconds, "pid": 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--sleep", type=float, default=2.0, help="seconds per simulated candidate")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--params", type=int, default=4172)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orchestrator.md")
    args = p.parse_args(argv)

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2)
    rows = []
    for w in args.workers:
        pool = ActorPool(lambda i: SimulatedWorker.remote(args.sleep), w, max_retries=1, timeout_seconds=600)
        pool.wait_ready()
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
        pool.shutdown()
        ideal = -(-population // w) * args.sleep
        wall = float(np.mean(walls))
        es_s = float(np.mean(es_times))
        rows.append((w, population, f"{ideal:.2f}", f"{wall:.2f}", f"{100 * ideal / wall:.1f}%",
                     f"{100 * ideal / (wall - es_s):.1f}%", f"{es_s:.3f}", f"{100 * es_s / wall:.1f}%"))
        print(rows[-1], flush=True)
    ray.shutdown()
    header = ("workers", "population", "ideal s/gen", "measured s/gen", "efficiency", "dispatch efficiency",
              "ask+tell s", "ask+tell share")
    text = (f"Simulated workers sleeping {args.sleep:g} s per candidate on this machine (2 cores); CMA-ES with "
            f"full covariance over {args.params} parameters; mean of {args.generations} generations after a "
            "warm-up. `dispatch efficiency` leaves out the CMA-ES ask+tell time.\n\n" + markdown_table(header, rows) + "\n")
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

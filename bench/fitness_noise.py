"""How much of what CMA-ES ranks is the candidates, and how much is the prompts they ran on.

A generation ranks its candidates by a fitness measured on a few prompts (all candidates on the
same ones). If two draws of prompts rank the same candidates differently, selection follows the
prompts, not the candidates. This bench measures that on the run a config describes:

1. the first generation CMA-ES would ask for (the config's start, subspace, seed; sigma0, or each
   `--sigma`), evaluated on the real Ray actors of the run (`workers:`), with the run's fitness;
2. every candidate, and the start itself, on S disjoint prompt sets the size of one generation's
   (`prompts_per_task` of every task of the first stage, drawn from the task pools);
3. per sigma: the spread of the candidates within a set (what selection sees), the spread of the
   set means (how much a generation's prompts move every candidate), the share of a set's variance
   that is the candidate (ICC: the reliability of one generation's ranking), the mean Spearman
   correlation between sets, how many prompts one generation would need for a reliability of 0.8
   (from the per-prompt variance components), and whether selection finds anything: the best
   candidate of each set, measured on the other sets, against the start.

    .venv/bin/python bench/fitness_noise.py jobs/levers/per_prompt_rank.yaml --sigma 0.03 --sigma 0.1 --kinds loglik
    .venv/bin/python bench/fitness_noise.py jobs/levers/per_prompt_rank.yaml --sigma 0.03 --kinds loglik,task_score

(the second reuses the first's log-likelihood rows; ~20 and ~30 minutes on 2 cores)

Writes bench/results/fitness_noise.md and fitness_noise.parquet (one row per candidate and prompt).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tables import markdown_table, write_result  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.driver import _merge_parts, candidate_jobs, default_pool_factory, init_ray, split_by_model, stage_tasks  # noqa: E402
from orchestrator.es import EvolutionStrategy  # noqa: E402
from orchestrator.pool import Job  # noqa: E402
from orchestrator.subspace import build_subspace  # noqa: E402
from workers.fitness import per_prompt_fitness, task_fitness  # noqa: E402

log = logging.getLogger("fitness_noise")


def prompt_sets(tasks: list[dict], per_task: int, sets: int, seed: int) -> list[list[tuple[str, int]]]:
    """`sets` disjoint draws of `per_task` prompts from every task's pool."""
    rng = np.random.default_rng(seed)
    order = {t["key"]: rng.permutation(t["pool_size"]) for t in tasks}
    for t in tasks:
        if per_task * sets > t["pool_size"]:
            raise SystemExit(f"task {t['key']}: {sets} sets of {per_task} prompts need a pool of "
                             f"{per_task * sets}; its pool_size is {t['pool_size']}")
    return [[(t["key"], int(i)) for t in tasks for i in sorted(order[t["key"]][s * per_task:(s + 1) * per_task])]
            for s in range(sets)]


def set_fitness(kind: str, scores: list[float], refs: list[float], requests) -> float:
    per_task: dict[str, tuple[list, list]] = {}
    for (key, _), s, r in zip(requests, scores, refs):
        per_task.setdefault(key, ([], []))[0].append(s)
        per_task[key][1].append(r)
    return task_fitness(kind, per_task)


def variance_components(x: np.ndarray) -> tuple[float, float, float]:
    """Two-way layout without replication, rows = candidates: (candidate variance, column
    variance, residual variance), method-of-moments estimates (negative ones clipped to 0)."""
    r, c = x.shape
    grand = x.mean()
    row, col = x.mean(axis=1), x.mean(axis=0)
    resid = x - row[:, None] - col[None, :] + grand
    ms_e = float((resid ** 2).sum() / max(1, (r - 1) * (c - 1)))
    ms_r = float(c * ((row - grand) ** 2).sum() / max(1, r - 1))
    ms_c = float(r * ((col - grand) ** 2).sum() / max(1, c - 1))
    return max(0.0, (ms_r - ms_e) / c), max(0.0, (ms_c - ms_e) / r), ms_e


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def bootstrap_mean(values: np.ndarray, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def analyse(kind: str, sigma: float, values: np.ndarray, refs: np.ndarray, sets: list[list], start: np.ndarray
            ) -> dict:
    """values [candidates, prompts] (prompts in set order), start [prompts]: one table row."""
    sizes = [len(s) for s in sets]
    bounds = np.cumsum([0] + sizes)
    cols = [slice(bounds[i], bounds[i + 1]) for i in range(len(sets))]
    fit = np.array([[set_fitness(kind, v[c].tolist(), refs[c].tolist(), s) for c, s in zip(cols, sets)]
                    for v in values])                              # [candidates, sets]
    start_fit = np.array([set_fitness(kind, start[c].tolist(), refs[c].tolist(), s) for c, s in zip(cols, sets)])
    ranked = np.array([per_prompt_fitness(values[:, c], "rank") for c in cols]).T
    cand_var, set_var, resid_var = variance_components(fit)
    icc = cand_var / (cand_var + resid_var) if cand_var + resid_var > 0 else 0.0
    rank_cand, _, rank_resid = variance_components(ranked)
    rank_icc = rank_cand / (rank_cand + rank_resid) if rank_cand + rank_resid > 0 else 0.0
    pairs = list(itertools.combinations(range(len(sets)), 2))
    rho = float(np.mean([spearman(fit[:, i], fit[:, j]) for i, j in pairs]))
    # per prompt: the candidate's value minus the full cache's (log-likelihood or score difference)
    delta = values - refs[None, :]
    p_cand, _, p_resid = variance_components(delta)
    prompts_for_08 = (0.8 / 0.2) * p_resid / p_cand if p_cand > 0 else float("inf")
    # selection: the best of each set, judged on the others, against the start there
    gains = []
    for s in range(len(sets)):
        best = int(np.argmax(fit[:, s]))
        others = [o for o in range(len(sets)) if o != s]
        gains.append(float(fit[best, others].mean() - start_fit[others].mean()))
    typical = fit.mean(axis=0) - start_fit
    return {
        "fitness": kind, "sigma": sigma, "candidates": values.shape[0], "sets": f"{len(sets)} x {sizes[0]}",
        "start fitness": f"{start_fit.mean():.3f} ({start_fit.min():.3f}-{start_fit.max():.3f})",
        "candidate SD in a set": f"{fit.std(axis=0, ddof=1).mean():.4f}",
        "SD of set means": f"{np.sqrt(set_var):.4f}",
        "residual SD": f"{np.sqrt(resid_var):.4f}",
        "ICC (one set)": f"{icc:.2f}",
        "ICC, per-prompt ranks": f"{rank_icc:.2f}",
        "Spearman between sets": f"{rho:+.2f}",
        "prompts for 0.8": "inf" if not np.isfinite(prompts_for_08) else f"{prompts_for_08:.0f}",
        "typical candidate - start": "{:+.4f} [{:+.4f}, {:+.4f}]".format(*bootstrap_mean(typical)),
        "set's best, other sets - start": f"{np.mean(gains):+.4f} (each: {', '.join(f'{g:+.3f}' for g in gains)})",
    }


def measure(cfg, x0, norm, vectors: dict, tasks, requests) -> dict:
    """The full cache's values, the start's and every candidate's on `requests`, on the run's Ray actors."""
    init_ray(num_cpus=cfg.workers.num_actors * cfg.workers.cpus_per_actor)
    pool = default_pool_factory(cfg)
    try:
        chunks, models = split_by_model(requests, tasks, pool)
        ref_parts = pool.run([Job("reference", (c, tasks), "reference", model=m) for c, m in zip(chunks, models)])
        if any(p is None for p in ref_parts):
            raise RuntimeError("a full-cache reference failed on every retry: " + "; ".join(pool.failures[-3:]))
        ref_of = {r: s for c, part in zip(chunks, ref_parts) for r, s in zip(c, part)}

        def evaluate(batch) -> np.ndarray:
            jobs, sizes = candidate_jobs(batch, norm, requests, tasks, cfg.workers.prompts_per_job)
            results = pool.run(jobs)
            merged = [_merge_parts(results[i * len(sizes):(i + 1) * len(sizes)], sizes) for i in range(len(batch))]
            if any(m is None for m in merged):
                raise RuntimeError("an evaluation failed on every retry: " + "; ".join(pool.failures[-3:]))
            return np.array([m["scores"] for m in merged])

        log.info("%s: the start on %d prompts", cfg.fitness.kind, len(requests))
        out = {"refs": np.array([ref_of[r] for r in requests]), "start": evaluate([x0])[0], "values": {}}
        for sigma, batch in vectors.items():
            log.info("%s, sigma %g: %d candidates on %d prompts", cfg.fitness.kind, sigma, len(batch), len(requests))
            out["values"][sigma] = evaluate(batch)
        return out
    finally:
        pool.shutdown()


def cross_kinds(measured: dict, sigmas, requests) -> list[list]:
    """With two fitness kinds: do they rank the same candidates alike (all prompts pooled)?"""
    kinds = list(measured)
    if len(kinds) < 2:
        return []
    a, b = kinds[:2]
    rows = []
    for sigma in sigmas:
        fa = [set_fitness(a, v.tolist(), measured[a]["refs"].tolist(), requests) for v in measured[a]["values"][sigma]]
        fb = [set_fitness(b, v.tolist(), measured[b]["refs"].tolist(), requests) for v in measured[b]["values"][sigma]]
        sa = set_fitness(a, measured[a]["start"].tolist(), measured[a]["refs"].tolist(), requests)
        sb = set_fitness(b, measured[b]["start"].tolist(), measured[b]["refs"].tolist(), requests)
        above_a, above_b = np.array(fa) > sa, np.array(fb) > sb
        rows.append([sigma, len(fa), f"{spearman(fa, fb):+.2f}", f"{int(above_a.sum())} / {len(fa)}",
                     f"{int(above_b.sum())} / {len(fb)}", f"{int((above_a == above_b).sum())} / {len(fa)}",
                     f"rank {int(np.argsort(np.argsort(-np.array(fb)))[int(np.argmax(fa))]) + 1} of {len(fb)}"])
    return rows


def repo_path(path) -> str:
    """A path as the tables and raw rows name it: relative to the repo when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def save_raw(out: Path, config: str, measured: dict, requests, sets) -> None:
    """One row per fitness kind, sigma, candidate and prompt (the start's and the full cache's value beside it)."""
    import pandas as pd

    set_of = [i for i, st in enumerate(sets) for _ in st]
    rows = [{"config": config, "kind": kind, "sigma": sigma, "candidate": c, "set": set_of[j], "task": key, "prompt": idx,
             "value": float(x), "reference": float(m["refs"][j]), "start": float(m["start"][j])}
            for kind, m in measured.items() for sigma, values in m["values"].items() for c, v in enumerate(values)
            for j, (x, (key, idx)) in enumerate(zip(v, requests))]
    pd.DataFrame(rows).to_parquet(out.with_suffix(".parquet"), index=False)


def load_raw(out: Path, config: str, requests, candidates: int) -> dict:
    """The values an earlier run of this bench saved for the same run config and prompts (kind ->
    refs, start, values per sigma); a run of another config, on other prompts or with fewer
    candidates is not reused."""
    path = out.with_suffix(".parquet")
    if not path.exists():
        return {}
    import pandas as pd

    raw = pd.read_parquet(path)
    measured: dict = {}
    for (kind, sigma), rows in raw.groupby(["kind", "sigma"]):
        first = rows[rows.candidate == 0]
        if list(zip(first.task, first.prompt)) != [tuple(r) for r in requests] or rows.candidate.nunique() < candidates \
                or set(rows.config) != {config}:
            log.info("%s: %s sigma %g was measured for another run config, other prompts or fewer candidates; "
                     "not reused", path, kind, sigma)
            continue
        m = measured.setdefault(kind, {"refs": first.reference.to_numpy(), "start": first.start.to_numpy(),
                                       "values": {}})
        m["values"][float(sigma)] = np.stack([rows[rows.candidate == c].value.to_numpy() for c in range(candidates)])
    return measured


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="an evolution run config (its start, search, fitness, first stage, workers)")
    p.add_argument("--sigma", type=float, action="append", help="step sizes to test (repeatable; default: es.sigma0)")
    p.add_argument("--candidates", type=int, default=8, help="candidates per sigma (the first of the generation)")
    p.add_argument("--sets", type=int, default=4, help="disjoint prompt sets, each the size of one generation's")
    p.add_argument("--kinds", type=lambda v: v.split(","), help="fitness kinds to measure, comma-separated "
                   "(default: the config's); with two, also how alike they rank the same candidates")
    p.add_argument("--seed", type=int, default=2026, help="draws the prompt sets")
    p.add_argument("--out", default=str(ROOT / "bench/results/fitness_noise.md"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    if cfg.es.start is None:
        raise SystemExit(f"{args.config}: es.start is not set; this bench samples around a saved NAMM")
    if len(cfg.models) > 1:
        raise SystemExit(f"{args.config}: transfer_models are not supported here (one model's fitness)")
    from namm_core import NAMM, NAMMConfig

    start_namm = NAMM.from_pretrained(cfg.es.start)
    x0 = start_namm.get_params().double().numpy()
    norm = {"mean": start_namm.norm_mean.float().numpy(), "var": start_namm.norm_var.float().numpy(),
            "count": float(start_namm.norm_count)}
    slices = NAMM(NAMMConfig.from_spec(cfg.namm_spec())).param_slices()
    stage = cfg.stages[0]
    tasks = stage_tasks(cfg, stage)
    sets = prompt_sets(tasks, stage.prompts_per_task, args.sets, args.seed)
    requests = [r for s in sets for r in s]
    subspace = build_subspace(cfg.es.subspace, slices, len(x0), seed=cfg.es.seed)
    out = Path(args.out)

    sigmas = args.sigma or [cfg.es.sigma0]
    vectors = {sigma: EvolutionStrategy(len(x0), replace(cfg.es, sigma0=sigma), x0=x0, subspace=subspace).ask()
               [:args.candidates] for sigma in sigmas}
    config_name = repo_path(args.config)
    measured = load_raw(out, config_name, requests, args.candidates)   # what an earlier run measured on these prompts
    for kind in args.kinds or [cfg.fitness.kind]:
        todo = {sigma: v for sigma, v in vectors.items() if sigma not in measured.get(kind, {}).get("values", {})}
        if not todo:
            log.info("%s: every sigma already measured in %s", kind, out.with_suffix(".parquet"))
            continue
        run_cfg = replace(cfg, fitness=replace(cfg.fitness, kind=kind))
        done = measure(run_cfg, x0, norm, todo, tasks, requests)
        if kind in measured:
            measured[kind]["values"].update(done["values"])
        else:
            measured[kind] = done
        save_raw(out, config_name, measured, requests, sets)   # kept even if a later fitness kind fails

    all_sigmas = sorted({sigma for m in measured.values() for sigma in m["values"]})
    rows = [analyse(kind, sigma, m["values"][sigma], m["refs"], sets, m["start"])
            for kind, m in measured.items() for sigma in sorted(m["values"])]
    cross = cross_kinds(measured, [s for s in all_sigmas if all(s in m["values"] for m in measured.values())],
                        requests)
    search = subspace.describe() if subspace is not None else f"every parameter ({len(x0)} dims)"
    kinds = ", ".join(measured)
    start_name = repo_path(cfg.es.start)
    notes = (f"Run config `{args.config}`: start `{start_name}`, search {search}, fitness {kinds}, "
             f"first stage `{stage.name}` ({len(tasks)} tasks x {stage.prompts_per_task} prompts per generation), "
             f"model {cfg.model.label}, {cfg.workers.num_actors} Ray actors. Candidates: the first of generation "
             f"0's draw (es.seed {cfg.es.seed}) at each sigma; prompt sets: disjoint draws from the task pools "
             f"(seed {args.seed}); every candidate and the start on every prompt. Rows measured by an earlier "
             f"run on the same prompts are read back from `{out.with_suffix('.parquet').name}` (every sigma and "
             "fitness kind found there is shown).\n\n"
             "Columns: the start's fitness per set (mean, range); the candidates' standard deviation within a "
             "set (what one generation ranks), of the set means (how much a generation's prompts move every "
             "candidate alike) and the residual (candidate x prompt set); ICC: the share of a set's fitness "
             "variance that belongs to the candidate, i.e. the reliability of one generation's ranking (0: "
             "noise, 1: prompts do not matter), also for the per-prompt rank fitness; the mean Spearman "
             "correlation of the candidates' fitness between sets; the prompts one generation would need for a "
             "reliability of 0.8 (Spearman-Brown, from per-prompt variance components); the mean over sets "
             "of the mean candidate minus the start, with a bootstrap interval over sets; and selection: the "
             "best candidate of each set, measured on the other sets, minus the start there.")
    text = notes + "\n\n" + markdown_table(list(rows[0]), [list(r.values()) for r in rows]) + "\n"
    if cross:
        a, b = list(measured)[:2]
        text += (f"\nThe same candidates under both fitness kinds, on all {len(requests)} prompts pooled: the "
                 f"Spearman correlation of their fitness, how many beat the start under each, how many "
                 f"both kinds put on the same side of the start, and where {b} ranks {a}'s best.\n\n")
        text += markdown_table(["sigma", "candidates", "Spearman", f"above the start ({a})",
                                f"above the start ({b})", "same side", f"{a}'s best"], cross) + "\n"
    write_result(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

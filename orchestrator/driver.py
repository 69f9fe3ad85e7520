"""The evolution driver: owns the CMA-ES state and the incremental schedule, dispatches
candidates to worker actors, computes fitness, logs to MLflow and checkpoints after every tell.

It never loads a model. Per generation:
  sample prompts (seeded) -> full-cache references for new prompts (once, cached)
  -> es.ask() -> one job per candidate on the actor pool -> fitness -> es.tell()
  -> checkpoint (atomic) -> MLflow metrics + parquet history -> every k: validate the mean.
Fitness of a candidate: the mean over the stage's tasks of
  (mean score + eps) / (mean full-cache score + eps)      on the same prompts,
so 1.0 means "as good as the full cache", and a task on which the full cache scores 0 stays
defined (1.0 for a candidate that also scores 0, more if it does better).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from namm_core.namm import FIELDS_ADDED_LATER as NAMM_FIELDS_ADDED_LATER
from workers.fitness import memory_charge, per_prompt_fitness, task_fitness

from . import checkpoint as ckpt
from .artifacts import export_artifacts
from .config import RunConfig
from .es import EvolutionStrategy
from .pool import Job, actors_of, in_process_pool
from .runlock import RunLock
from .state import EvolutionState
from .subspace import build_subspace
from .tracking import Tracker, check_tracking_uri, resolve_tracking_uri

log = logging.getLogger(__name__)
VALIDATION_SEED_OFFSET = 1_000_003


class Interrupted(RuntimeError):
    """The run was stopped by Ctrl-C or SIGTERM; the message says where it resumes."""



# how jobs reach the workers, not what they compute (tested equal): a run may resume under another
# setting, and runs made before these settings existed keep their hash
RESULT_NEUTRAL_WORKER_FIELDS = ("pool", "prompts_per_job")
# settings added after runs were made (section -> field -> default): at their default they leave
# a run's hash as it was
FIELDS_ADDED_LATER = {"namm": NAMM_FIELDS_ADDED_LATER,
                      "es": {"subspace": None, "start": None, "validate_start": True},
                      "fitness": {"per_prompt": "none"}}


def config_hash(cfg: RunConfig) -> str:
    data = cfg.to_dict()
    data["stages"] = [{k: v for k, v in s.items()} for s in data["stages"]]
    for name in RESULT_NEUTRAL_WORKER_FIELDS:
        data["workers"].pop(name)
    if not data.get("transfer_models"):   # added later: a run without them keeps its hash
        data.pop("transfer_models", None)
    for section, fields in FIELDS_ADDED_LATER.items():
        for name, default in fields.items():
            if data[section].get(name) == default:
                data[section].pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_payload(task, stage, validation: bool = False, model: int = 0, model_label: str = "") -> dict:
    """What a worker needs to build a task's prompt pool.

    Synthetic tasks: validation prompts are generated from another seed. Task files: the records
    are shuffled with the task's seed and split into disjoint sets, the first
    `stage.validation_prompts` for validation and the next `pool_size` for training.
    `model`: the index of the model whose actors run it; the key of a transfer model's task ends
    in `@<its label>` (its prompts are its own tokenizer's, its references its own)."""
    d = asdict(task)
    d["split"] = "validation" if validation else "train"
    d["holdout"] = stage.validation_prompts if task.file else 0
    d["key"] = task.key + (f"~{d['holdout']}" if task.file else "") + ("#val" if validation else "") + \
        (f"@{model_label}" if model else "")
    d["model"] = model
    if validation:
        d["pool_size"] = stage.validation_prompts
        if not task.file:
            d["seed"] = task.seed + VALIDATION_SEED_OFFSET
    return d


def models_of_tasks(tasks: list[dict]) -> dict[str, int]:
    """Task key -> the index of the model whose actors run it (payloads without one: the first)."""
    return {t["key"]: t.get("model", 0) for t in tasks}


def stage_tasks(cfg: RunConfig, stage, validation: bool = False) -> list[dict]:
    """The stage's task payloads for every model of the run, model by model."""
    return [task_payload(t, stage, validation, model=m, model_label=model.label)
            for m, model in enumerate(cfg.models) for t in stage.tasks]


class EvolutionRun:
    def __init__(self, cfg: RunConfig, pool_factory=None, stop_after: Optional[int] = None,
                 allow_config_change: bool = False):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.pool_factory = pool_factory or (in_process_pool if cfg.workers.pool == "in_process"
                                             else default_pool_factory)
        self.stop_after = stop_after
        self.allow_config_change = allow_config_change
        self.state: Optional[EvolutionState] = None
        self.prepared = False

    # ------------------------------------------------------------------------------------
    def prepare(self, require_checkpoint: bool = False) -> "EvolutionRun":
        """Everything that can refuse a run, before Ray starts or a model loads: the run
        directory (writable, locked against a second driver), the checkpoints (corrupt ones moved
        aside, never overwritten; the config they were made with), the tracking URI. Idempotent."""
        if self.prepared:
            return self
        cfg = self.cfg
        root = Path(cfg.checkpoint.root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"checkpoint.root: {root} is a file, not a directory")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"checkpoint.root: cannot create the run directory {self.run_dir}: {e.strerror}") from None
        if not os.access(self.run_dir, os.W_OK):
            raise ValueError(f"checkpoint.root: the run directory {self.run_dir} is not writable")
        self.lock = RunLock(self.run_dir).acquire()
        try:
            self._load_or_init(require_checkpoint)
            self.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, self.run_dir)
            check_tracking_uri(self.tracking_uri)
        except BaseException:
            self.lock.release()
            raise
        self.prepared = True
        return self

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state.stage >= len(self.cfg.stages)

    def run(self) -> dict:
        cfg = self.cfg
        self.prepare()
        try:
            if self.complete:
                log.info("%s is already complete (%d generations); nothing to do", cfg.name,
                         self.state.global_generation)
                return self._summary(stopped=False, already_complete=True)
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        cfg, st = self.cfg, self.state
        self.tracker = Tracker(self.tracking_uri, cfg.tracking.experiment)
        self._open_tracking()
        pool = self.pool_factory(cfg)
        bar = None
        try:
            start = self._saved_start() if st.norm is None or st.es is None else None   # not on resume
            if st.norm is None:
                st.norm = start[1] if start else self._collect_statistics(pool)
            if st.es is None:
                x0 = start[0] if start else self._warm_start(pool)
                st.es = EvolutionStrategy(st.num_params, cfg.es, x0=x0, subspace=self._subspace())
                if st.es.subspace is not None:
                    log.info("CMA-ES searches %d of %d dimensions: %s", st.es.search_dim, st.num_params,
                             st.es.subspace.describe())
                self._checkpoint()   # generation 0's starting point: statistics and the ES's mean
            if cfg.es.validate_start and st.global_generation == 0 and not st.validation:
                self._validate_start(pool)
            self._relog_start_validation()
            bar = tqdm(total=cfg.total_generations, initial=st.global_generation, desc=f"evolve {cfg.name}",
                       unit="gen", dynamic_ncols=True)
            while st.stage < len(cfg.stages):
                stage = cfg.stages[st.stage]
                stage_key = str(st.stage)
                if self._stop_requested():
                    return self._stop(bar)
                st.mlflow.stages[stage_key] = self.tracker.stage_run(
                    st.mlflow.stages.get(stage_key), st.mlflow.parent,
                    f"stage {st.stage}: {stage.name}", asdict(stage))
                while st.stage_generation < stage.generations:
                    if self._stop_requested():
                        return self._stop(bar)
                    metrics = self._generation(pool, stage)
                    bar.update(1)
                    bar.set_postfix_str(f"best {metrics['fitness_best']:.3f} mean {metrics['fitness_mean']:.3f} "
                                        f"sigma {metrics['sigma']:.4f} {metrics['generation_seconds']:.1f}s/gen")
                self.tracker.finish(st.mlflow.stages[stage_key])
                st.stage += 1
                st.stage_generation = 0
                self._checkpoint()
            bar.close()
            self._export_artifacts(final=True)
            self.tracker.finish(st.mlflow.parent)
            return self._summary(stopped=False)
        except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (`ray job stop`) turned into one by the CLI
            if bar is not None:
                bar.close()
            self._mark_runs("KILLED")
            log.warning("interrupted: %s", self._resume_point())
            raise Interrupted(self._resume_point()) from None
        except BaseException:
            self._mark_runs("FAILED")
            raise
        finally:
            pool.shutdown()

    def _stop_requested(self) -> bool:
        return self.stop_after is not None and self.state.global_generation >= self.stop_after

    def _stop(self, bar) -> dict:
        bar.close()
        self._mark_runs("KILLED")
        log.info("stopped after %d generations (--stop-after): %s", self.state.global_generation,
                 self._resume_point())
        return self._summary(stopped=True)

    def _resume_point(self) -> str:
        found = ckpt.list_checkpoints(self.ckpt_dir)
        where = found[-1].name if found else "the start (no checkpoint yet)"
        return f"the run resumes from {where} (generation {self.state.global_generation}) when started again"

    def _mark_runs(self, status: str) -> None:
        """End the MLflow runs this driver has open (the stage and the parent)."""
        tracker = getattr(self, "tracker", None)
        if tracker is None:
            return
        ids = [self.state.mlflow.stages.get(str(self.state.stage)), self.state.mlflow.parent]
        for run_id in ids:
            if run_id:
                try:
                    tracker.finish(run_id, status=status)
                except Exception as e:  # the tracking server may be what failed
                    log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)

    def _open_tracking(self) -> None:
        """Continue the run's MLflow runs; when metrics were logged past the checkpoint being
        resumed (the newest checkpoint was corrupt), start clean runs instead, re-log the
        checkpointed history into them, and end the old ones KILLED: steps stay unique."""
        st, cfg = self.state, self.cfg
        mlf = st.mlflow
        old_parent = mlf.parent
        done = st.global_generation
        if old_parent and self.tracker.last_step(old_parent, "fitness_best") >= done:
            old_stages = dict(mlf.stages)
            log.warning("MLflow run %s holds metrics past generation %d, the checkpoint this run resumes from; "
                        "continuing in a new MLflow run (the old one is marked KILLED)", old_parent, done)
            self.tracker.supersede([old_parent, *old_stages.values()], reason=f"resumed from generation {done}")
            mlf.parent, mlf.stages = None, {}
            mlf.parent = self.tracker.parent_run(None, cfg.name, cfg.to_dict(), tags={"namm.resumed_from": old_parent})
            for entry in st.metrics_log:
                key = str(entry["stage"])
                if key not in mlf.stages:
                    stage = cfg.stages[entry["stage"]]
                    mlf.stages[key] = self.tracker.stage_run(None, mlf.parent, f"stage {key}: {stage.name}",
                                                                asdict(stage))
                self.tracker.log_metrics([mlf.parent, mlf.stages[key]], entry["metrics"], entry["step"])
            for key, run_id in mlf.stages.items():
                if int(key) < st.stage:
                    self.tracker.finish(run_id)
        else:
            mlf.parent = self.tracker.parent_run(old_parent, cfg.name, cfg.to_dict())
            self._relog_last_generation()
        self.tracker.end_orphans(mlf.parent, keep=set(mlf.stages.values()))

    # ------------------------------------------------------------------------------------
    def _load_or_init(self, require_checkpoint: bool = False) -> None:
        files = ckpt.list_checkpoints(self.ckpt_dir)
        found = ckpt.load_latest(self.ckpt_dir)
        digest = config_hash(self.cfg)
        if files and found is None and require_checkpoint:
            raise ValueError(f"--resume: every checkpoint in {self.ckpt_dir} is corrupt "
                             f"({', '.join(p.name for p in files)}); nothing to resume from")
        newer = [p for p in files if found is None or ckpt.generation_of(p) > ckpt.generation_of(found[0])]
        if newer:   # corrupt checkpoints are kept for inspection, out of the way of new ones
            aside = self.run_dir / f"corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(parents=True, exist_ok=True)
            for p in newer:
                os.replace(p, aside / p.name)
            log.warning("moved %d corrupt checkpoint(s) to %s", len(newer), aside)
        if found is None and require_checkpoint:
            raise ValueError(f"--resume: no checkpoint in {self.ckpt_dir}")
        if found is not None:
            path, payload = found
            state = EvolutionState.from_payload(payload, where=str(path))
            if state.config_hash != digest and not self.allow_config_change:
                raise ValueError(
                    f"{self.run_dir} holds a run with a different config; resume it with the same config, "
                    f"pass --allow-config-change, or choose another run name")
            self.state = state
            log.info("resuming %s from %s (generation %d)", self.cfg.name, path.name, state.global_generation)
            return
        from namm_core import NAMM, NAMMConfig

        self.state = EvolutionState(
            config_hash=digest, num_params=NAMM(NAMMConfig.from_spec(self.cfg.namm_spec())).num_params,
            namm_spec=self.cfg.namm_spec(), model=self.cfg.model.name,
            sampler=np.random.RandomState(self.cfg.es.seed + 17))

    def _saved_start(self) -> Optional[tuple[np.ndarray, dict]]:
        """es.start: the saved NAMM's weights and normalisation statistics (None: not set)."""
        if self.cfg.es.start is None:
            return None
        from namm_core import NAMM

        namm = NAMM.from_pretrained(self.cfg.es.start)
        log.info("starting from %s (its weights and normalisation statistics)", self.cfg.es.start)
        norm = {"mean": namm.norm_mean.float().numpy(), "var": namm.norm_var.float().numpy(),
                "count": float(namm.norm_count)}
        return namm.get_params().double().numpy(), norm

    def _subspace(self):
        """The part of the parameter vector `es.subspace` asks CMA-ES to search (None: all of it)."""
        from namm_core import NAMM, NAMMConfig

        slices = NAMM(NAMMConfig.from_spec(self.cfg.namm_spec())).param_slices()
        return build_subspace(self.cfg.es.subspace, slices, self.state.num_params, seed=self.cfg.es.seed)

    def _checkpoint(self) -> Path:
        return ckpt.write_checkpoint(self.ckpt_dir, self.state.global_generation, self.state.to_payload(),
                                     keep=self.cfg.checkpoint.keep)

    # ------------------------------------------------------------------------------------
    def _collect_statistics(self, pool) -> dict:
        """Normalisation moments of the zero NAMM on the first stage's prompts, merged over actors."""
        stage = self.cfg.stages[0]
        tasks = [task_payload(t, stage) for t in stage.tasks]
        n = self.cfg.namm.stats_prompts
        requests = [(t["key"], i) for t in tasks for i in range(min(n, t["pool_size"]))]
        chunks = _split(requests, actors_of(pool, 0))
        failures_before = len(pool.failures)
        results = pool.run([Job("collect_statistics", (c, tasks), "statistics") for c in chunks])
        from namm_core.features import RunningMoments

        merged = None
        self.tracker.log_metrics([self.state.mlflow.parent],
                                 {"statistics_failures": len(pool.failures) - failures_before}, 0)
        for r in results:
            if r is None:
                raise RuntimeError("collecting normalisation statistics failed on every retry: " +
                                   "; ".join(pool.failures[-3:]))
            moments = RunningMoments.from_stats(**r)
            merged = moments if merged is None else merged.merge(moments)
        log.info("normalisation statistics from %d feature vectors", int(merged.count))
        return merged.stats()

    def _warm_start(self, pool) -> Optional[np.ndarray]:
        """The ES's starting mean: a scorer fitted to imitate a baseline (es.warm_start), else None (zeros)."""
        ws = self.cfg.es.warm_start
        if ws is None:
            return None
        stage = self.cfg.stages[0]
        tasks = [task_payload(t, stage) for t in stage.tasks]
        per_task = max(1, ws.prompts // len(tasks))
        requests = [(t["key"], i) for t in tasks for i in range(min(per_task, t["pool_size"]))]
        job = Job("warm_start", (ws.imitate, self.state.norm, requests, ws.steps, ws.lr, self.cfg.es.seed, ws.rounds,
                                 tasks, ws.threads), "warm start")
        result = pool.run([job])[0]
        if result is None:
            raise RuntimeError("warm start failed on every retry: " + "; ".join(pool.failures[-3:]))
        report = result["report"]
        self.state.warm_start = {"imitate": ws.imitate, **report}
        self.tracker.log_metrics([self.state.mlflow.parent],
                                 {f"warm_start/{k}": v for k, v in report.items() if isinstance(v, (int, float))}, 0)
        if ws.imitate in ("hindsight", "kvzip"):
            log.info(f"warm start by {ws.imitate} distillation: the fit keeps %.3f of the held-out importance "
                     "(%.3f after round 0; %d updates recorded, %.1f s)", report["kept_share_heldout"],
                     report["kept_share_round0"], report["rows"], report["total_seconds"])
        else:
            log.info("warm start imitating %s: sign agreement %.3f, rank agreement %.3f (%d rows, %.1f s fit)",
                     ws.imitate, report["sign_agreement"], report["rank_agreement"], report["rows"], report["seconds"])
        return np.asarray(result["vector"], dtype=float)

    def _ensure_references(self, pool, requests, tasks) -> None:
        refs = self.state.references
        missing = [r for r in dict.fromkeys(requests) if f"{r[0]}|{r[1]}" not in refs]
        if not missing:
            return
        chunks, models = split_by_model(missing, tasks, pool)
        results = pool.run([Job("reference", (c, tasks), "reference", model=m) for c, m in zip(chunks, models)])
        for chunk, scores in zip(chunks, results):
            if scores is None:
                raise RuntimeError("full-cache reference failed on every retry: " + "; ".join(pool.failures[-3:]))
            for r, s in zip(chunk, scores):
                refs[f"{r[0]}|{r[1]}"] = float(s)

    def _sample_prompts(self, stage) -> tuple[list, list]:
        tasks = stage_tasks(self.cfg, stage)
        rng = self.state.sampler
        requests = []
        for t in tasks:
            idx = rng.choice(t["pool_size"], size=stage.prompts_per_task, replace=False)
            requests += [(t["key"], int(i)) for i in sorted(idx)]
        return requests, tasks

    def _fitness(self, result: Optional[dict], requests, tasks) -> tuple[float, dict, dict]:
        """A candidate's fitness, its mean score per task, and (with transfer models) its fitness
        on each model. Several models: the mean over models of the fitness on each."""
        if result is None:
            return math.nan, {}, {}
        refs = self.state.references
        model_of = models_of_tasks(tasks)
        per_model: dict[int, dict[str, tuple[list, list]]] = {}
        for (key, idx), score in zip(requests, result["scores"]):
            s, r = per_model.setdefault(model_of[key], {}).setdefault(key, ([], []))
            s.append(score)
            r.append(refs[f"{key}|{idx}"])
        fc = self.cfg.fitness
        on_model = {m: task_fitness(fc.kind, per_task) for m, per_task in sorted(per_model.items())}
        fitness = float(np.mean(list(on_model.values()))) - memory_charge(
            result["retention"], fc.retention_target, fc.retention_weight)
        task_means = {k: float(np.mean(s)) for per_task in per_model.values() for k, (s, _) in per_task.items()}
        labels = [m.label for m in self.cfg.models]
        return fitness, task_means, ({labels[m]: f for m, f in on_model.items()} if len(labels) > 1 else {})

    def _told(self, fitness: list[float], results: list[Optional[dict]], num_prompts: int) -> list[float]:
        """What CMA-ES ranks: the fitness, or (fitness.per_prompt) the candidates compared prompt by prompt."""
        how = self.cfg.fitness.per_prompt
        if how == "none":
            return fitness
        table = [r["scores"] if r is not None else [math.nan] * num_prompts for r in results]
        return [float(v) for v in per_prompt_fitness(table, how)]

    def _generation(self, pool, stage) -> dict:
        st = self.state
        t0 = time.perf_counter()
        requests, tasks = self._sample_prompts(stage)
        self._ensure_references(pool, requests, tasks)
        es: EvolutionStrategy = st.es
        t_ask = time.perf_counter()
        candidates = es.ask()
        ask_seconds = time.perf_counter() - t_ask
        failures_before = len(pool.failures)
        t_eval = time.perf_counter()
        results = self._evaluate_candidates(pool, candidates, requests, tasks)
        eval_seconds = time.perf_counter() - t_eval
        scored = [self._fitness(r, requests, tasks) for r in results]
        fitness = [f for f, _, _ in scored]   # logged, and what the best candidate is chosen by
        t_tell = time.perf_counter()
        es.tell(self._told(fitness, results, len(requests)))
        tell_seconds = time.perf_counter() - t_tell

        g = st.global_generation
        finite = [f for f in fitness if math.isfinite(f)]
        if not finite:
            raise RuntimeError(f"generation {g}: every candidate failed: " + "; ".join(pool.failures[-3:]))
        best_i = int(np.nanargmax(fitness))
        if st.best is None or fitness[best_i] > st.best["fitness"]:
            st.best = {"fitness": fitness[best_i], "vector": candidates[best_i].copy(), "generation": g}
        task_means, model_fitness = {}, {}
        for _, per_task, per_model in scored:
            for k, v in per_task.items():
                task_means.setdefault(k, []).append(v)
            for k, v in per_model.items():
                model_fitness.setdefault(k, []).append(v)
        ok_results = [r for r in results if r is not None]
        metrics = {
            "fitness_best": max(finite), "fitness_mean": float(np.mean(finite)),
            "fitness_median": float(np.median(finite)), "fitness_worst": min(finite),
            "sigma": es.sigma, "mean_retention": float(np.mean([np.mean(r["retention"]) for r in ok_results])),
            "eval_seconds": eval_seconds, "generation_seconds": time.perf_counter() - t0,
            "es_seconds": ask_seconds + tell_seconds, "failures": len(pool.failures) - failures_before,
            "failed_candidates": sum(1 for r in results if r is None), "stage": st.stage, **_node_metrics(pool),
            **{f"score/{_metric_key(k)}": float(np.mean(v)) for k, v in task_means.items()},
            # with transfer models: each model's fitness, mean over the candidates and of the best one
            **{f"fitness_mean/{_metric_key(k)}": float(np.mean(v)) for k, v in model_fitness.items()},
            **{f"fitness_best_candidate/{_metric_key(k)}": v[best_i] for k, v in model_fitness.items()
               if len(v) == len(fitness)},
        }
        for i, (x, f, r) in enumerate(zip(candidates, fitness, results)):
            st.history.append({
                "generation": g, "stage": st.stage, "candidate": i, "fitness": f,
                "retention": float(np.mean(r["retention"])) if r else math.nan,
                "seconds": r["seconds"] if r else math.nan, "worker_pid": r["pid"] if r else -1,
                "worker_node": (r.get("node") or "") if r else "",
                "param_norm": float(np.linalg.norm(x)),
            })
        st.global_generation = g + 1
        st.stage_generation += 1
        st.last_metrics = {"step": g, "metrics": metrics,
                              "retention_per_layer": results[best_i]["retention_per_layer"]}
        st.metrics_log.append({"step": g, "stage": st.stage, "metrics": metrics})
        stage_done = st.stage_generation >= stage.generations
        if st.stage_generation % stage.validation_every == 0 or stage_done:
            metrics["validation_fitness"] = self._validate(pool, stage)
            metrics.update({f"validation_fitness/{_metric_key(k[len('fitness@'):])}": v
                            for k, v in st.validation[-1].items() if k.startswith("fitness@")})
            metrics["failures"] = len(pool.failures) - failures_before   # the validation's too
        self._checkpoint()            # the run is safe from here on
        self._log(g, metrics)
        if len(pool.failures) > failures_before:   # what failed and where (actor, node), for the dashboard
            self.tracker.log_text(st.mlflow.parent, "\n".join(pool.failures[failures_before:]) + "\n",
                                  f"failures/generation-{g:06d}.txt")
        self._export_artifacts(final=False)
        return metrics

    def _evaluate_candidates(self, pool, candidates, requests, tasks) -> list[Optional[dict]]:
        """Every candidate on the same prompts: one job each, or jobs of `workers.prompts_per_job`
        prompts whose results are put back together in prompt order (None if any part failed)."""
        jobs, sizes = candidate_jobs(candidates, self.state.norm, requests, tasks, self.cfg.workers.prompts_per_job)
        results = pool.run(jobs)
        models = [j.model for j in jobs[:len(sizes)]]
        return [_merge_parts(results[i * len(sizes):(i + 1) * len(sizes)], sizes, models)
                for i in range(len(candidates))]

    def _validate_start(self, pool) -> None:
        """The starting mean on the first stage's validation set, as generation -1."""
        self._validate(pool, self.cfg.stages[0])
        self._checkpoint()

    def _relog_start_validation(self) -> None:
        """MLflow's `validation_fitness_start`, once (also after a crash between its checkpoint and its logging)."""
        start = next((v for v in self.state.validation if v["generation"] == -1), None)
        parent = self.state.mlflow.parent
        if start is not None and math.isfinite(start["fitness"]) and \
                self.tracker.last_step(parent, "validation_fitness_start") < 0:
            self.tracker.log_metrics([parent], {"validation_fitness_start": start["fitness"]}, 0)

    def _validate(self, pool, stage) -> float:
        """Fitness of the CMA mean on a fixed validation set; export it when it is the best."""
        st = self.state
        tasks = stage_tasks(self.cfg, stage, validation=True)
        requests = [(t["key"], i) for t in tasks for i in range(stage.validation_prompts)]
        self._ensure_references(pool, requests, tasks)
        mean = st.es.mean.astype(np.float32)
        chunks, models = split_by_model(requests, tasks, pool)
        results = pool.run([Job("evaluate", (mean, st.norm, c, tasks), "validation", model=m)
                            for c, m in zip(chunks, models)])
        if any(r is None for r in results):
            log.error("validation failed on every retry; skipped")
            return math.nan
        merged = {"scores": [s for r in results for s in r["scores"]],
                  "retention": [x for r in results for x in r["retention"]]}
        fitness, _, per_model = self._fitness(merged, [r for c in chunks for r in c], tasks)
        g = st.global_generation - 1
        stage_index = st.stage     # the start is validated before stage 0's first generation
        st.validation.append({"generation": g, "fitness": fitness, "stage": stage_index,
                              "retention": float(np.mean(merged["retention"])),
                              **{f"fitness@{k}": v for k, v in per_model.items()}})
        if st.best_validation is None or fitness > st.best_validation["fitness"]:
            st.best_validation = {"fitness": fitness, "vector": mean.copy(), "generation": g, "stage": stage_index,
                                  "retention": float(np.mean(merged["retention"])),
                                  **{f"fitness@{k}": v for k, v in per_model.items()}}
        on_models = "".join(f", {k} {v:.4f}" for k, v in per_model.items())
        log.info("generation %d: validation fitness of the mean %.4f (retention %.3f%s)", g, fitness,
                 float(np.mean(merged["retention"])), on_models)
        return fitness

    # ------------------------------------------------------------------------------------
    def _log(self, step: int, metrics: dict) -> None:
        st = self.state
        runs = [st.mlflow.parent, st.mlflow.stages[str(st.stage)]]
        self.tracker.log_metrics(runs, metrics, step)

    def _relog_last_generation(self) -> None:
        """After a crash between a checkpoint and its MLflow logging, log that generation once."""
        last = self.state.last_metrics
        if not last:
            return
        parent = self.state.mlflow.parent
        if self.tracker.last_step(parent, "fitness_best") < last["step"]:
            stage_key = str(last["metrics"]["stage"])
            runs = [parent] + ([self.state.mlflow.stages[stage_key]]
                               if stage_key in self.state.mlflow.stages else [])
            self.tracker.log_metrics(runs, last["metrics"], last["step"])

    def _export_artifacts(self, final: bool) -> None:
        export_artifacts(self.state, self.cfg, self.run_dir / "artifacts", self.tracker, final)

    def _summary(self, stopped: bool, already_complete: bool = False) -> dict:
        st = self.state
        return {"generations": st.global_generation, "stopped": stopped, "already_complete": already_complete,
                "mean": None if st.es is None else st.es.mean,
                "best": st.best, "best_validation": st.best_validation, "run_dir": str(self.run_dir),
                "start_validation": next((v for v in st.validation if v["generation"] == -1), None),
                "evolved_validations": sum(1 for v in st.validation if v["generation"] >= 0),
                "mlflow_parent": st.mlflow.parent, "tracking_uri": self.tracking_uri}


# ----------------------------------------------------------------------------------------
def default_pool_factory(cfg: RunConfig, actor_class=None):
    """The run's Ray actors (one per GPU, or `workers.num_actors` CPU actors), ready to work.
    `actor_class` replaces the worker class (tests inject faults with a subclass)."""
    import ray

    from workers.actor import EvolutionActor, remote_actor

    from .dispatch import ActorPool

    actor = remote_actor(actor_class) if actor_class is not None else EvolutionActor
    gpus = cfg.workers.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    per_model = cfg.workers.num_actors
    actor_models = [m for m in range(len(cfg.models)) for _ in range(per_model)]

    def make(i):
        init = dict(model=asdict(cfg.models[actor_models[i]]), memory=asdict(cfg.memory), namm=cfg.namm_spec(),
                    torch_threads=cfg.workers.torch_threads, fitness=asdict(cfg.fitness))
        # spread over the nodes: a lost node takes as few actors with it as it can
        options = dict(num_cpus=cfg.workers.cpus_per_actor, num_gpus=gpus, scheduling_strategy="SPREAD")
        return actor.options(**options).remote(**init)

    pool = ActorPool(make, len(actor_models), cfg.workers.max_retries, cfg.workers.timeout_seconds,
                     actor_models=actor_models)
    pids = pool.wait_ready()
    each = f" ({per_model} per model: {', '.join(m.label for m in cfg.models)})" if len(cfg.models) > 1 else ""
    log.info("%d actors ready (pids %s)%s, %s GPU each", len(pids), pids, each, gpus)
    return pool


def candidate_jobs(candidates, norm, requests, tasks, prompts_per_job: Optional[int] = None
                   ) -> tuple[list[Job], list[int]]:
    """The jobs that evaluate every candidate on the same prompts: per candidate, one job per model
    (its prompts on that model's actors), or one per `prompts_per_job` prompts of it, candidate-major,
    and the number of prompts in each part (the parts cover `requests` in order). A job's cost is
    its prompts' tokens, so the pool starts the longest parts first."""
    model_of = models_of_tasks(tasks)
    parts = []
    for run in _runs_of_one_model(requests, model_of):
        size = prompts_per_job or len(run)
        parts += [run[i:i + size] for i in range(0, len(run), size)]
    tokens = {t["key"]: t.get("context_length") or 1 for t in tasks}
    starts = np.cumsum([0] + [len(p) for p in parts])
    jobs = [Job("evaluate", (x.astype(np.float32), norm, part, tasks),
                f"candidate {i}" + (f" prompts {starts[p]}-{starts[p] + len(part) - 1}" if len(parts) > 1 else ""),
                cost=sum(tokens.get(key, 1) for key, _ in part), model=model_of[part[0][0]])
            for i, x in enumerate(candidates) for p, part in enumerate(parts)]
    return jobs, [len(part) for part in parts]


def _runs_of_one_model(requests, model_of: dict) -> list[list]:
    """`requests` cut where the model changes (a job runs on one model's actors)."""
    runs: list[list] = []
    for r in requests:
        if runs and model_of[runs[-1][-1][0]] == model_of[r[0]]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def split_by_model(requests, tasks, pool) -> tuple[list[list], list[int]]:
    """Requests in chunks, each for one model and spread over that model's actors; and the model of each."""
    model_of = models_of_tasks(tasks)
    chunks, models = [], []
    for m in sorted(set(model_of[key] for key, _ in requests)):
        mine = [r for r in requests if model_of[r[0]] == m]
        for chunk in _split(mine, actors_of(pool, m)):
            chunks.append(chunk)
            models.append(m)
    return chunks, models


def _node_metrics(pool) -> dict:
    """Cluster nodes alive, in use by the run's actors, and lost with actors on them (Ray pools)."""
    if not hasattr(pool, "node_report"):
        return {}
    report = pool.node_report()
    return {"nodes_alive": report["nodes_alive"], "nodes_in_use": report["nodes_in_use"],
            "nodes_lost": len(report["nodes_lost"])}


def _merge_parts(results: list[Optional[dict]], sizes: list[int], models: Optional[list[int]] = None
                 ) -> Optional[dict]:
    """One candidate's results from the jobs of its prompts, in prompt order. The retention per
    layer is the first model's (models differ in their layers)."""
    if len(results) == 1:
        return results[0]
    if any(r is None for r in results):
        return None
    first = [i for i, m in enumerate(models or [0] * len(results)) if m == (models or [0])[0]]
    per_layer = np.average([results[i]["retention_per_layer"] for i in first], axis=0,
                           weights=[sizes[i] for i in first])
    return {"scores": [s for r in results for s in r["scores"]],
            "retention": [x for r in results for x in r["retention"]],
            "retention_per_layer": per_layer.tolist(), "seconds": sum(r["seconds"] for r in results),
            "pid": results[0]["pid"], "node": results[0].get("node")}


def _split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def _metric_key(task_key: str) -> str:
    return task_key.replace("@", ":").replace("#", ":")


def init_ray(num_cpus: Optional[int] = None) -> None:
    """Join RAY_ADDRESS when set (a cluster, or inside `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # actors import the project from the driver's checkout (a job's working_dir does the same)
    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}}
    if address:
        ray.init(address=address)
    else:
        # a private cluster on loopback: never joins (or disturbs) another Ray on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 _node_ip_address="127.0.0.1")

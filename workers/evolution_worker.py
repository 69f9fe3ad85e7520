"""What an evolution actor does, as a plain class (the Ray actor in workers/actor.py wraps it).

It loads the model once and keeps it across generations, materialises each task's prompt pool
deterministically (the driver only ever sends (task key, prompt index) pairs), and evaluates
candidate NAMM parameter vectors on requested prompts.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch

from namm_core import NAMM, NAMMConfig, load_model
from namm_eval.evaluator import Evaluator

from .fitness import fitness_kind

Request = tuple[str, int]  # (task key, prompt index in the task's pool)


def ray_node_id() -> Optional[str]:
    """The Ray node this process runs on, or None outside Ray (the in-process pool)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class EvolutionWorker:
    def __init__(self, model: dict, memory: dict, namm: dict, torch_threads: int = 1,
                 fitness: Optional[dict] = None):
        torch.set_num_threads(max(1, int(torch_threads)))
        self.model, self.tokenizer = load_model(model["name"], **{k: v for k, v in model.items() if k != "name"})
        self.evaluator = Evaluator(self.model, self.tokenizer, update_every=memory["update_every"],
                                   chunk_size=memory["chunk_size"], fidelity_kl=False,
                                   share_prefixes=memory.get("shared_prefixes", 0))
        self.namm_config = NAMMConfig.from_spec(namm)   # the run's NAMM spec (RunConfig.namm_spec)
        fitness = fitness or {}
        self.fitness = fitness_kind(fitness.get("kind", "task_score"))
        self.loglik_target = fitness.get("loglik_target", "reference")
        self.pools: dict[str, list] = {}

    def pid(self) -> int:
        return os.getpid()

    def location(self) -> dict:
        """Where this worker runs: its process and, under Ray, its node (the pool tracks node losses)."""
        return {"pid": os.getpid(), "node": ray_node_id()}

    def num_params(self) -> int:
        return NAMM(self.namm_config).num_params

    def prepare(self, tasks: list[dict]) -> dict[str, int]:
        """Build the prompt pools of these task specs (TaskSpec fields); returns their sizes."""
        from namm_eval.tasks import load_tasks, split_task_file

        for spec in tasks:
            key = spec["key"]
            if key in self.pools:
                continue
            if spec["file"]:
                samples = split_task_file(spec["file"], spec["seed"], spec["holdout"], spec["pool_size"],
                                          spec.get("split", "train"))
            else:
                samples = load_tasks([spec["task"]], self.tokenizer, num_prompts=spec["pool_size"],
                                     context_length=spec["context_length"], seed=spec["seed"])
            if not samples:
                raise ValueError(f"task {key}: no prompts")
            self.pools[key] = samples
        return {spec["key"]: len(self.pools[spec["key"]]) for spec in tasks}

    def _samples(self, requests: list[Request], tasks: Optional[list[dict]] = None):
        """The requested prompts, building the pools of `tasks` first (the driver sends the task
        specs with every job, so a restarted worker rebuilds what it needs)."""
        if tasks:
            self.prepare(tasks)
        return [self.pools[key][index % len(self.pools[key])] for key, index in requests]

    def reference(self, requests: list[Request], tasks: Optional[list[dict]] = None) -> list[float]:
        """Full-cache values of these prompts under the run's objective (cached on this worker)."""
        samples = self._samples(requests, tasks)
        results = self.fitness.reference(self.evaluator, samples, self.loglik_target)
        return [results[s.sample_id].score for s in samples]

    def collect_statistics(self, requests: list[Request], tasks: Optional[list[dict]] = None) -> dict:
        """Normalisation moments of a zero NAMM's features over these prompts (Chan merge-able)."""
        from namm_eval.statistics import feature_statistics

        return feature_statistics(self.evaluator, self.namm_config, self._samples(requests, tasks))

    def evaluate(self, vector: np.ndarray, norm: Optional[dict], requests: list[Request],
                 tasks: Optional[list[dict]] = None) -> dict:
        """Scores of one candidate on the requested prompts (under the run's objective)."""
        samples = self._samples(requests, tasks)
        namm = self.make_namm(vector, norm)
        t = time.perf_counter()
        results = [self.fitness.measure(self.evaluator, s, namm, self.loglik_target) for s in samples]
        return {
            "scores": [r.score for r in results],
            "retention": [r.retention for r in results],
            "retention_per_layer": np.mean([r.retention_per_layer for r in results], axis=0).tolist(),
            "seconds": time.perf_counter() - t,
            "pid": os.getpid(),
            "node": ray_node_id(),
        }

    def warm_start(self, imitate: str, norm: Optional[dict], requests: list[Request], steps: int, lr: float,
                   seed: int, rounds: int = 1, tasks: Optional[list[dict]] = None,
                   threads: Optional[int] = None) -> dict:
        """A parameter vector fitted to imitate `imitate` on these prompts: a baseline (see
        namm_core.imitation), or "hindsight" or "kvzip" (see namm_core.distill). `threads`: torch threads for
        this job only (the warm start runs on one actor while the others idle)."""
        if tasks:
            self.prepare(tasks)
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            return self._warm_start(imitate, norm, requests, steps, lr, seed, rounds)
        finally:
            torch.set_num_threads(before)

    def _warm_start(self, imitate: str, norm: Optional[dict], requests: list[Request], steps: int, lr: float,
                    seed: int, rounds: int) -> dict:
        from namm_core import parse_policy
        from namm_core.distill import TEACHERS
        from namm_core.imitation import ImitationRecorder, fit_scorer

        namm = self.make_namm(np.zeros(self.num_params(), dtype=np.float32), norm)
        if imitate in TEACHERS:
            return self._distil(namm, requests, steps, lr, seed, rounds, teacher=imitate)
        recorder = ImitationRecorder(namm, parse_policy(imitate))
        t = time.perf_counter()
        for sample in self._samples(requests):
            self.evaluator.run_sample(sample, recorder)
        collect_seconds = time.perf_counter() - t
        report = fit_scorer(namm, recorder.data, steps=steps, lr=lr, seed=seed)
        report.update(collect_seconds=collect_seconds, rows=len(recorder.data))
        return {"vector": namm.get_params().numpy(), "report": report}

    def _distil(self, namm: NAMM, requests: list[Request], steps: int, lr: float, seed: int, rounds: int,
                teacher: str = "hindsight") -> dict:
        """Distillation of a teacher's importance: round 0 records under the oracle that keeps the most
        important tokens, each later round under the NAMM fitted so far (DAgger), on its own share
        of the prompts; the scorer is refitted on all. Teachers: "hindsight" (what the full cache's
        question and reply attended to) or "kvzip" (KVzip's reconstruction importance)."""
        from namm_core import MemoryManagedLM
        from namm_core.distill import (
            DistillData,
            DistillRecorder,
            HindsightOracle,
            fit_global_scorer,
            hindsight_importance,
            kvzip_importance,
            question_start,
        )

        ev, data, reports = self.evaluator, DistillData(), []
        samples = self._samples(requests)
        t = time.perf_counter()
        collect_seconds = 0.0
        for r in range(rounds + 1):
            tc = time.perf_counter()
            for sample in samples[r::rounds + 1]:
                ids, _ = ev.encode(sample)
                reply = ev.reply_ids(sample, "reference")
                lm = MemoryManagedLM(self.model, namm, update_every=ev.update_every, chunk_size=ev.chunk_size,
                                     tokenizer=self.tokenizer)
                if teacher == "kvzip":
                    importance = kvzip_importance(lm, ids, reply)
                else:
                    importance = hindsight_importance(lm, ids, reply,
                                                      question_start(self.tokenizer, ids, sample.input))
                acting = (HindsightOracle(importance, namm.config.budget, namm.config.sinks, namm.config.pool)
                          if r == 0 else namm)
                recorder = DistillRecorder(namm, acting, importance, data)
                MemoryManagedLM(self.model, recorder, update_every=lm.update_every,
                                chunk_size=lm.chunk_size).continuation_logprobs(ids, reply)
            collect_seconds += time.perf_counter() - tc
            reports.append(fit_global_scorer(namm, data, steps=steps, lr=lr, seed=seed + r))
        report = dict(reports[-1], rounds=rounds, collect_seconds=collect_seconds,
                      total_seconds=time.perf_counter() - t, rows=len(data),
                      kept_share_round0=reports[0]["kept_share_heldout"])
        return {"vector": namm.get_params().numpy(), "report": report}

    def make_namm(self, vector, norm: Optional[dict]) -> NAMM:
        return NAMM.from_vector(vector, norm, self.namm_config)

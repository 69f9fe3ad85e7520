"""The fitness kinds: how a worker measures a candidate on a prompt, and how the driver turns
those measurements into one number. One entry per kind (`fitness.kind` in a run config) feeds
the config's validation, the worker and the driver; adding a kind is one `register` call.

- "task_score" (the paper's): per task, (mean score + eps) / (mean full-cache score + eps) on
  the same prompts, pooled over the prompts before dividing, so one lucky answer on a prompt
  the full cache misses cannot blow a ratio up; averaged over tasks. 1.0 = the full cache.
- "loglik": per task, exp(mean over prompts of (log p - log p_full)), where log p is the mean
  per-token log-likelihood of the reference reply under the candidate's memory and log p_full
  the same under the full cache: a per-token likelihood ratio, 1.0 = the full cache. Dense (a
  candidate that keeps the answer's evidence slightly better scores slightly higher even when
  neither answers correctly) and cheap (no decoding).
Either can be charged for memory: with a retention target t, a candidate whose mean
retention r exceeds t loses weight * (r - t).

`fitness.per_prompt` ("rank" or "zscore") instead compares the generation's candidates prompt by
prompt: each prompt's values are ranked or z-scored among the candidates, then averaged. Every
candidate of a generation runs the same prompts, so a hard prompt shifts every candidate alike;
normalising per prompt also stops one prompt with a wide spread of values from deciding the
ranking alone. CMA-ES only uses the order of its candidates, so only the ranking is told.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

TASK_SCORE_EPS = 0.05


def task_ratio(scores: Sequence[float], references: Sequence[float]) -> float:
    """Pooled task-score ratio on one task's prompts."""
    return (float(np.mean(scores)) + TASK_SCORE_EPS) / (float(np.mean(references)) + TASK_SCORE_EPS)


def loglik_ratio(logliks: Sequence[float], references: Sequence[float]) -> float:
    """Per-token likelihood ratio to the full cache on one task's prompts (geometric mean)."""
    return math.exp(float(np.mean(np.asarray(logliks, dtype=float) - np.asarray(references, dtype=float))))


@dataclass(frozen=True)
class FitnessKind:
    name: str
    ratio: Callable[[Sequence[float], Sequence[float]], float]   # one task: candidate vs full-cache values
    measure: Callable    # (evaluator, sample, policy, target) -> SampleResult whose .score is the value
    reference: Callable  # (evaluator, samples, target) -> {sample_id: SampleResult} under the full cache
    targets: tuple[str, ...] = ()          # allowed fitness.loglik_target values ((): not used)
    unsupported_tasks: tuple[str, ...] = ()   # synthetic tasks without what this kind measures


FITNESS: dict[str, FitnessKind] = {}


def register(kind: FitnessKind) -> FitnessKind:
    FITNESS[kind.name] = kind
    return kind


register(FitnessKind("task_score", task_ratio,
                     measure=lambda ev, sample, policy, target: ev.run_sample(sample, policy),
                     reference=lambda ev, samples, target: ev.reference(samples)))
register(FitnessKind("loglik", loglik_ratio,
                     measure=lambda ev, sample, policy, target: ev.run_loglik(sample, policy, target),
                     reference=lambda ev, samples, target: ev.reference_loglik(samples, target),
                     targets=("reference", "full_cache"),
                     # its score is already dense and it has no reference reply
                     unsupported_tasks=("fidelity",)))
KINDS = tuple(FITNESS)


def fitness_kind(name: str) -> FitnessKind:
    if name not in FITNESS:
        raise ValueError(f"fitness kind {name!r}: expected one of {', '.join(FITNESS)}")
    return FITNESS[name]


def task_fitness(kind: str, per_task: dict[str, tuple[list[float], list[float]]]) -> float:
    """The mean over tasks of the candidate-to-full-cache ratio; per_task: task -> (candidate values,
    full-cache values), prompt by prompt. No charge for memory (see `memory_charge`)."""
    ratio = fitness_kind(kind).ratio
    return float(np.mean([ratio(s, r) for s, r in per_task.values()]))


def memory_charge(retentions: Sequence[float], retention_target: Optional[float] = None,
                  retention_weight: float = 1.0) -> float:
    """What a candidate loses for keeping more than the target: weight x (mean retention - target), or 0."""
    if retention_target is None:
        return 0.0
    return retention_weight * max(0.0, float(np.mean(retentions)) - retention_target)


def candidate_fitness(kind: str, per_task: dict[str, tuple[list[float], list[float]]],
                      retentions: Sequence[float], retention_target: Optional[float] = None,
                      retention_weight: float = 1.0) -> float:
    """per_task: task -> (candidate values, full-cache values), prompt by prompt."""
    return task_fitness(kind, per_task) - memory_charge(retentions, retention_target, retention_weight)


PER_PROMPT = ("none", "rank", "zscore")


def per_prompt_fitness(values, how: str) -> np.ndarray:
    """values [candidates, prompts] (a failed candidate's row NaN) -> one fitness per candidate:
    each prompt's values ranked among the candidates that ran (ties share their mean rank, scaled
    to 0..1) or z-scored among them (0 where they all agree), then averaged over prompts."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"expected [candidates, prompts] values, got shape {values.shape}")
    ran = np.isfinite(values).all(axis=1)
    out = np.full(values.shape[0], np.nan)
    if ran.sum() == 0:
        return out
    ok = values[ran]
    if how == "rank":
        scaled = (rankdata(ok, axis=0) - 1) / max(1, len(ok) - 1)
    elif how == "zscore":
        spread = ok.std(axis=0)
        scaled = np.where(spread > 0, (ok - ok.mean(axis=0)) / np.where(spread > 0, spread, 1), 0.0)
    else:
        raise ValueError(f"fitness.per_prompt: expected one of {', '.join(PER_PROMPT[1:])}, got {how!r}")
    out[ran] = scaled.mean(axis=1)
    return out

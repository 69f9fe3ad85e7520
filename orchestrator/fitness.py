"""Fitness of a candidate from its per-prompt results: pure functions, no Ray, no state.

Two objectives (`fitness.kind` in a run config):
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
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

TASK_SCORE_EPS = 0.05
KINDS = ("task_score", "loglik")


def task_ratio(scores: Sequence[float], references: Sequence[float]) -> float:
    """Pooled task-score ratio on one task's prompts."""
    return (float(np.mean(scores)) + TASK_SCORE_EPS) / (float(np.mean(references)) + TASK_SCORE_EPS)


def loglik_ratio(logliks: Sequence[float], references: Sequence[float]) -> float:
    """Per-token likelihood ratio to the full cache on one task's prompts (geometric mean)."""
    return math.exp(float(np.mean(np.asarray(logliks, dtype=float) - np.asarray(references, dtype=float))))


def candidate_fitness(kind: str, per_task: dict[str, tuple[list[float], list[float]]],
                      retentions: Sequence[float], retention_target: Optional[float] = None,
                      retention_weight: float = 1.0) -> float:
    """per_task: task -> (candidate values, full-cache values), prompt by prompt."""
    if kind not in KINDS:
        raise ValueError(f"fitness kind {kind!r}: expected one of {', '.join(KINDS)}")
    ratio = task_ratio if kind == "task_score" else loglik_ratio
    fitness = float(np.mean([ratio(s, r) for s, r in per_task.values()]))
    if retention_target is not None:
        fitness -= retention_weight * max(0.0, float(np.mean(retentions)) - retention_target)
    return fitness

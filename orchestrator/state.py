"""The evolution's state: everything a checkpoint holds, as a typed object.

A checkpoint's payload is `EvolutionState.to_payload()`: plain Python values (the ES and the
prompt sampler as their own pickles/states), with a format version that `from_payload` checks.
Version 1 payloads (the same fields, written before this class existed) are read too.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np

from .es import EvolutionStrategy

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class MlflowRuns:
    parent: Optional[str] = None
    stages: dict = field(default_factory=dict)     # stage index (str) -> run id


@dataclass
class EvolutionState:
    config_hash: str
    num_params: int
    namm_spec: dict                                # what rebuilds the evolved NAMM (driver.namm_spec)
    model: str
    sampler: np.random.RandomState                 # draws each generation's prompts
    es: Optional[EvolutionStrategy] = None         # created once statistics (and a warm start) exist
    warm_start: Optional[dict] = None              # the warm-start fit's report
    stage: int = 0
    stage_generation: int = 0
    global_generation: int = 0                     # generations done
    norm: Optional[dict] = None                    # normalisation statistics {"mean", "var", "count"}
    references: dict = field(default_factory=dict)   # "task|index" -> full-cache value
    history: list = field(default_factory=list)      # one row per candidate
    validation: list = field(default_factory=list)   # one row per validation of the CMA mean
    best: Optional[dict] = None                    # best candidate seen
    best_validation: Optional[dict] = None         # best validated CMA mean
    last_metrics: Optional[dict] = None
    metrics_log: list = field(default_factory=list)  # every generation's MLflow metrics
    mlflow: MlflowRuns = field(default_factory=MlflowRuns)

    def to_payload(self) -> dict:
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload["version"] = STATE_VERSION
        payload["es"] = None if self.es is None else self.es.dumps()
        payload["sampler"] = self.sampler.get_state()
        payload["mlflow"] = {"parent": self.mlflow.parent, "stages": dict(self.mlflow.stages)}
        return payload

    @classmethod
    def from_payload(cls, payload: dict, where: str = "checkpoint") -> "EvolutionState":
        version = payload.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{where}: evolution state version {version!r}; this driver reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in payload.items() if k in known}
        values["es"] = None if payload.get("es") is None else EvolutionStrategy.loads(payload["es"])
        sampler = np.random.RandomState()
        sampler.set_state(payload["sampler"])
        values["sampler"] = sampler
        values["mlflow"] = MlflowRuns(**payload.get("mlflow", {}))
        values.setdefault("metrics_log", [])
        return cls(**values)

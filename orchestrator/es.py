"""CMA-ES (pycma) with its own random generator, so a pickled optimiser resumes exactly.

NAMM fitness is maximised; pycma minimises, so the negated fitness is told. Results are
always told in ask order (pycma may assume mirrored pairs in that order). A failed
candidate is told as NaN, which pycma replaces by a value worse than every other.
"""
from __future__ import annotations

import math
import pickle

import cma
import numpy as np

from .config import ESConfig


class EvolutionStrategy:
    def __init__(self, num_params: int, cfg: ESConfig, x0=None):
        self.cfg = cfg
        self.rng = np.random.RandomState(cfg.seed)
        opts = {
            "popsize": cfg.population,
            "CMA_mu": max(1, int(round(cfg.population * cfg.elite_ratio))),
            "seed": cfg.seed + 1,  # pycma seeds numpy's global generator with it; we use our own below
            "randn": self.rng.randn,
            "verbose": -9,
            "CMA_diagonal": cfg.diagonal,
            "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolstagnation": int(1e9), "tolflatfitness": int(1e9),
        }
        x0 = np.zeros(num_params) if x0 is None else np.asarray(x0, dtype=float)
        self.es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
        self._pending = None

    def ask(self) -> list[np.ndarray]:
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell()")
        self._pending = self.es.ask()
        return [np.asarray(x) for x in self._pending]

    def tell(self, fitness: list[float]) -> None:
        if self._pending is None or len(fitness) != len(self._pending):
            raise RuntimeError("tell() needs one fitness per asked candidate, in ask order")
        losses = [(-f if f is not None and math.isfinite(f) else math.nan) for f in fitness]
        self.es.tell(self._pending, losses)
        self._pending = None

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.es.mean).copy()

    @property
    def start(self) -> np.ndarray:
        """The mean the search started from (zeros, or a warm start)."""
        return np.asarray(self.es.x0).copy()

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @property
    def generation(self) -> int:
        return int(self.es.countiter)

    def dumps(self) -> bytes:
        if self._pending is not None:
            raise RuntimeError("checkpoint only between generations (after tell)")
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> "EvolutionStrategy":
        return pickle.loads(data)

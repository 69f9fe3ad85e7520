"""CMA-ES (pycma) with its own random generator, so a pickled optimiser resumes exactly.

NAMM fitness is maximised; pycma minimises, so the negated fitness is told. Results are
always told in ask order (pycma may assume mirrored pairs in that order). A failed
candidate is told as NaN, which pycma replaces by a value worse than every other.
With a subspace (orchestrator.subspace), pycma searches its coordinates z around 0 and every
vector that leaves here is the full one, start + B z.
"""
from __future__ import annotations

import math
import pickle

import cma
import numpy as np

from .config import ESConfig
from .subspace import Subspace


class EvolutionStrategy:
    subspace: Subspace | None = None    # class defaults: checkpoints written before subspaces load as full searches
    origin: np.ndarray | None = None

    def __init__(self, num_params: int, cfg: ESConfig, x0=None, subspace: Subspace | None = None):
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
        if x0.shape != (num_params,):
            raise ValueError(f"the start has shape {x0.shape}; the NAMM has {num_params} parameters")
        if subspace is not None:
            if subspace.num_params != num_params:
                raise ValueError(f"the subspace is for {subspace.num_params} parameters, the NAMM has {num_params}")
            if subspace.dim < 2:
                raise ValueError("pycma needs a search of at least 2 dimensions")
            self.subspace, self.origin = subspace, x0.copy()
            x0 = np.zeros(subspace.dim)
        self.es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
        self._pending = None

    def _full(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return x.copy() if self.subspace is None else self.origin + self.subspace.lift(x)

    def ask(self) -> list[np.ndarray]:
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell()")
        self._pending = self.es.ask()
        return [self._full(x) for x in self._pending]

    def tell(self, fitness: list[float]) -> None:
        if self._pending is None or len(fitness) != len(self._pending):
            raise RuntimeError("tell() needs one fitness per asked candidate, in ask order")
        losses = [(-f if f is not None and math.isfinite(f) else math.nan) for f in fitness]
        self.es.tell(self._pending, losses)
        self._pending = None

    @property
    def mean(self) -> np.ndarray:
        return self._full(self.es.mean)

    @property
    def start(self) -> np.ndarray:
        """The mean the search started from (zeros, or a warm start)."""
        return self._full(self.es.x0)

    @property
    def search_dim(self) -> int:
        """How many coordinates pycma searches (the NAMM's parameters, or the subspace's)."""
        return int(self.es.N)

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

"""Where CMA-ES searches: the whole parameter vector, or a low-dimensional part of it around the start.

With ~150 candidates CMA-ES cannot learn a 4,172-dimensional covariance; searching k << d
directions gives it a chance (`es.subspace` in a run config). A candidate is always handed to
workers as the full vector, start + B z, so `NAMM.from_vector` stays their interface.

- `params`: the coordinates of named parameter groups of the scorer (e.g. the readout and the
  modulation); every other weight stays at the start's value. B selects coordinates, so sigma
  means what it means in the full search.
- `random_dim`: k random orthonormal directions (fixed by the ES seed). A step of sigma per
  direction has norm sigma * sqrt(k) in the full space, against sigma * sqrt(d) for a full search.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class Subspace:
    """z (dim values) -> a step in the full parameter space (num_params values)."""

    def __init__(self, num_params: int, indices: Optional[np.ndarray] = None,
                 random_dim: Optional[int] = None, seed: int = 0, label: str = ""):
        if (indices is None) == (random_dim is None):
            raise ValueError("a subspace is either coordinates (indices) or random directions (random_dim)")
        self.num_params, self.seed, self.label = int(num_params), int(seed), label
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.random_dim = None if random_dim is None else int(random_dim)
        if self.random_dim is not None and not 0 < self.random_dim <= self.num_params:
            raise ValueError(f"random_dim must be in 1..{self.num_params}, got {self.random_dim}")
        self._basis = None

    @property
    def dim(self) -> int:
        return len(self.indices) if self.indices is not None else self.random_dim

    @property
    def basis(self) -> np.ndarray:
        """[num_params, dim] orthonormal columns (random kind), rebuilt from the seed when needed."""
        if self._basis is None:
            gaussian = np.random.RandomState(self.seed).randn(self.num_params, self.random_dim)
            self._basis, _ = np.linalg.qr(gaussian)
        return self._basis

    def lift(self, z) -> np.ndarray:
        """The step in the full space that z stands for."""
        z = np.asarray(z, dtype=float)
        if z.shape != (self.dim,):
            raise ValueError(f"expected {self.dim} subspace coordinates, got shape {z.shape}")
        if self.indices is not None:
            out = np.zeros(self.num_params)
            out[self.indices] = z
            return out
        return self.basis @ z

    def __getstate__(self):   # checkpoints carry the seed, not the basis
        return {k: v for k, v in self.__dict__.items() if k != "_basis"}

    def __setstate__(self, state):
        self.__dict__.update(state, _basis=None)

    def describe(self) -> str:
        return self.label or f"{self.dim} directions"


def param_indices(slices: dict[str, slice], groups: list[str]) -> np.ndarray:
    """The coordinates of the named groups: "readout" is every tensor under it, "readout.bias" one tensor."""
    chosen: list[int] = []
    for group in groups:
        hits = [s for name, s in slices.items() if name == group or name.startswith(group + ".")]
        if not hits:
            tops = dict.fromkeys(name.split(".")[0] for name in slices)   # in vector order
            raise ValueError(f"unknown parameter group {group!r} (the scorer has: {', '.join(tops)}, "
                             f"or one tensor of {', '.join(slices)})")
        for s in hits:
            chosen.extend(range(s.start, s.stop))
    return np.array(sorted(set(chosen)), dtype=np.int64)


def build_subspace(cfg, slices: dict[str, slice], num_params: int, seed: int) -> Optional[Subspace]:
    """The subspace an `es.subspace` config section asks for (None: the whole vector)."""
    if cfg is None:
        return None
    if cfg.params:
        return Subspace(num_params, indices=param_indices(slices, cfg.params), label="+".join(cfg.params))
    return Subspace(num_params, random_dim=cfg.random_dim, seed=seed, label=f"{cfg.random_dim} random directions")

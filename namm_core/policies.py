"""Memory policies: what to keep in each layer's KV cache.

A policy sees one layer at a time. The memory calls
  observe(layer_idx, layer, attn, step)   after every forward chunk, with the attention
                                          the chunk's queries paid to the cached keys
                                          (only when `needs_attention`), and
  select(layer_idx, layer, step)          every `update_every` tokens, returning a
                                          [B, H_kv, S] bool mask of the slots to keep.
Per-token statistics a policy accumulates live in `layer.aux[name]` ([B, H_kv, S, ...]);
the cache appends zeros for new tokens and compacts them together with keys and values,
so they always stay aligned with the slots they describe.

Each baseline is a small class with one scoring rule (the kvpress style):

| policy        | keeps                                                              |
| ------------- | ------------------------------------------------------------------ |
| full          | everything                                                         |
| streamingllm  | the first `sinks` tokens and the most recent ones                  |
| h2o           | a recent window + the largest accumulated attention (heavy hitters)|
| l2            | the keys with the lowest L2 norm                                   |
| snapkv        | the most attended by the last `window` queries, pooled             |
| tova          | the most attended by the newest query                              |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .cache import LayerMemory


@dataclass(frozen=True)
class StepInfo:
    """Where the memory is in the sequence when a policy is called."""
    seen: torch.Tensor            # [B] real (non-pad) tokens processed so far
    processed: int                # columns processed so far (padding included)
    query_positions: torch.Tensor  # [B, Q] absolute positions of this chunk's queries
    query_valid: torch.Tensor      # [B, Q] False for left padding
    next_update: int               # `processed` value at which select() next runs


@dataclass(frozen=True)
class Budget:
    """How many tokens an evicting policy may keep: a fraction of the tokens seen, or a count."""
    value: float
    is_fraction: bool

    @staticmethod
    def parse(spec: Union[str, int, float, "Budget"]) -> "Budget":
        if isinstance(spec, Budget):
            return spec
        text = str(spec).strip()
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"budget {spec!r} is not a number: give a fraction like 0.25 or a token count like 1024") from None
        is_fraction = isinstance(spec, float) or ("." in text) or ("e" in text.lower())
        if not math.isfinite(number):
            raise ValueError(f"budget {spec!r} must be finite")
        if not number > 0:
            raise ValueError(f"budget {spec!r} must be positive")
        if is_fraction and number > 1:
            raise ValueError(f"budget fraction {spec!r} is above 1: give a fraction in (0, 1] or an integer token count")
        if not is_fraction and number != int(number):
            raise ValueError(f"budget {spec!r} must be a whole number of tokens")
        return Budget(number, is_fraction)

    def tokens(self, seen: torch.Tensor) -> torch.Tensor:
        """Budget per sequence, [B] long, given the tokens seen so far."""
        if self.is_fraction:
            # exact ceil(seen * fraction): float products like 0.07 * 100 = 7.000000000000001 overshoot
            f = Fraction(self.value).limit_denominator(10**9)
            return ((seen.long() * f.numerator + f.denominator - 1) // f.denominator).clamp(min=1)
        return torch.full_like(seen, int(self.value), dtype=torch.long)

    def __str__(self) -> str:
        if self.is_fraction:
            text = f"{self.value:g}"
            return text if ("." in text or "e" in text) else text + ".0"  # "1.0" stays a fraction when parsed back
        return str(int(self.value))


def keep_top(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask of the k[b] highest-scoring valid slots of every (batch b, head) row.

    scores, valid: [B, H, S]; k: [B]. Ties are broken towards the newer slot index.
    """
    # a valid slot scored -inf still outranks every invalid slot
    masked = scores.float().nan_to_num(neginf=torch.finfo(torch.float32).min).masked_fill(~valid, float("-inf"))
    S = masked.shape[-1]
    # descending score; a stable sort of the reversed row puts the newer slot first on ties
    order = (S - 1) - torch.argsort(masked.flip(-1), dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(S, device=scores.device).expand_as(order))
    return (ranks < k.view(-1, 1, 1)) & valid


class MemoryPolicy:
    """Base class. Subclasses set `needs_attention` and override what they use."""
    name = "policy"
    needs_attention = False
    aux_shapes: dict[str, tuple[int, ...]] = {}

    def new_sequence(self) -> None:
        """Called before each new batch of prompts."""

    def prefix_key(self) -> Optional[tuple]:
        """Policies with equal keys build identical state before their first update (so
        that state can be computed once and shared); None: no sharing."""
        return None

    def observe(self, layer_idx: int, layer: "LayerMemory", attn: torch.Tensor, step: StepInfo) -> None:
        """attn: [B, H_kv, Q, S] float32 attention of this chunk's queries (GQA-averaged).

        Its storage is reused once observe returns: keep copies, never views."""

    def select(self, layer_idx: int, layer: "LayerMemory", step: StepInfo) -> Optional[torch.Tensor]:
        return None

    def describe(self) -> str:
        return self.name


class FullCache(MemoryPolicy):
    name = "full"


class BudgetPolicy(MemoryPolicy):
    def __init__(self, budget: Union[str, int, float, Budget]):
        self.budget = Budget.parse(budget)

    def describe(self) -> str:
        return f"{self.name}:{self.budget}"

    def score(self, layer_idx: int, layer: "LayerMemory", step: StepInfo) -> torch.Tensor:
        raise NotImplementedError

    def select(self, layer_idx, layer, step):
        k = self.budget.tokens(step.seen)
        return keep_top(self.score(layer_idx, layer, step), layer.valid, k)


def _recency_rank(layer: "LayerMemory") -> torch.Tensor:
    """Larger for newer tokens: the position itself (invalid slots are masked by keep_top)."""
    return layer.positions.float()


class StreamingLLM(BudgetPolicy):
    name = "streamingllm"

    def __init__(self, budget, sinks: int = 4):
        super().__init__(budget)
        self.sinks = sinks

    def score(self, layer_idx, layer, step):
        # the first `sinks` positions of each sequence outrank everything, then recency
        first = layer.positions.masked_fill(~layer.valid, 2**62).amin(-1, keepdim=True)
        is_sink = (layer.positions - first) < self.sinks
        return _recency_rank(layer) + is_sink.float() * 1e15


class L2Norm(BudgetPolicy):
    """Devoto et al. 2024: keys with a low L2 norm draw the most attention."""
    name = "l2"

    def score(self, layer_idx, layer, step):
        return -layer.keys.float().norm(dim=-1)


class H2O(BudgetPolicy):
    """Zhang et al. 2023: recent window + heavy hitters by accumulated attention."""
    name = "h2o"
    needs_attention = True
    aux_shapes = {"h2o_acc": ()}

    def __init__(self, budget, recent_fraction: float = 0.5):
        super().__init__(budget)
        self.recent_fraction = recent_fraction

    def observe(self, layer_idx, layer, attn, step):
        layer.aux["h2o_acc"] += attn.sum(dim=-2)

    def select(self, layer_idx, layer, step):
        k = self.budget.tokens(step.seen)
        n_recent = torch.floor(k.float() * self.recent_fraction).long()
        recent = keep_top(_recency_rank(layer), layer.valid, n_recent)
        heavy_scores = layer.aux["h2o_acc"].masked_fill(recent, float("-inf"))
        heavy = keep_top(heavy_scores, layer.valid & ~recent, k - n_recent)
        return recent | heavy

    def score(self, layer_idx, layer, step):  # pragma: no cover - select is overridden
        return layer.aux["h2o_acc"]


class TOVA(BudgetPolicy):
    """Oren et al. 2024: keep the tokens the newest query attends to most."""
    name = "tova"
    needs_attention = True
    aux_shapes = {"tova_last": ()}

    def observe(self, layer_idx, layer, attn, step):
        # newest real query row of each sequence is the chunk's last row (left padding)
        layer.aux["tova_last"] = attn[:, :, -1, :].clone()

    def score(self, layer_idx, layer, step):
        return layer.aux["tova_last"]


class SnapKV(BudgetPolicy):
    """Li et al. 2024: score by the attention of the last `window` queries before an
    update, max-pooled over neighbouring tokens; the observation window itself is kept."""
    name = "snapkv"
    needs_attention = True
    aux_shapes = {"snap_obs": ()}

    def __init__(self, budget, window: int = 32, kernel: int = 7):
        super().__init__(budget)
        self.window, self.kernel = window, kernel

    def observe(self, layer_idx, layer, attn, step):
        # absolute column index of each query row of this chunk
        Q = attn.shape[-2]
        cols = torch.arange(step.processed - Q, step.processed, device=attn.device)
        in_window = (cols >= step.next_update - self.window).to(attn.dtype)
        layer.aux["snap_obs"] += (attn * in_window.view(1, 1, Q, 1)).sum(dim=-2)

    def score(self, layer_idx, layer, step):
        obs = layer.aux["snap_obs"]
        # pool along positions: slots are kept in position order within each head
        B, H, S = obs.shape
        pooled = F.max_pool1d(obs.reshape(B * H, 1, S), self.kernel, stride=1,
                              padding=self.kernel // 2).reshape(B, H, S)
        newest = layer.positions.masked_fill(~layer.valid, -1).amax(-1, keepdim=True)
        in_window = layer.positions > newest - self.window
        return pooled + in_window.float() * 1e15

    def select(self, layer_idx, layer, step):
        keep = super().select(layer_idx, layer, step)
        layer.aux["snap_obs"].zero_()  # a new observation window for the next update
        return keep


BASELINES = {cls.name: cls for cls in (FullCache, StreamingLLM, L2Norm, H2O, TOVA, SnapKV)}

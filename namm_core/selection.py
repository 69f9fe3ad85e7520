"""Turning per-token scores into kept sets: budgets, top-k, span pooling, and the structure of a
selection (who shares a budget with whom).

Every policy that scores tokens (the hand-designed ones and the NAMM) decides through here, so a
scorer can be run inside any structure:

| scope       | what shares one budget                                                        |
| ----------- | ----------------------------------------------------------------------------- |
| head        | nothing: each layer and KV head keeps its own k best tokens                   |
| adakv       | the KV heads of a layer share H x k slots; each keeps at least safeguard x k  |
|             | (Ada-KV, Feng et al. 2024)                                                    |
| modelwide   | every layer and head share L x H x k slots (KVzip's default selection)        |
| global      | one set of k tokens for the whole model, by each token's score averaged over  |
|             | the layers and heads that hold it (the shipped NAMM's structure)              |

plus `pool` (a token's score is the best of its `pool` neighbours, so spans are kept whole) and
`sinks` (the first tokens of each sequence are always kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .cache import MemoryLayer

SCOPES = ("head", "adakv", "modelwide", "global")
PROTECTED = torch.finfo(torch.float32).max   # the rank of a protected slot: above any score, below a sink
DEFAULT_SAFEGUARD = 0.2


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
            if number != int(number):
                raise ValueError(f"budget {spec!r} is neither a fraction in (0, 1] nor a whole number of tokens")
            is_fraction = False          # '1e3', 1024.0: a token count written as a float
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


@dataclass(frozen=True)
class Structure:
    """Who shares a budget (scope), span pooling and attention sinks; see the module docstring."""
    scope: str = "head"
    pool: int = 1
    sinks: int = 0
    safeguard: float = DEFAULT_SAFEGUARD     # adakv only: each head keeps at least this share of k

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r}: expected one of {', '.join(SCOPES)}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd whole number >= 1, got {self.pool!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be a whole number >= 0, got {self.sinks!r}")
        if not 0 <= float(self.safeguard) <= 1:
            raise ValueError(f"safeguard must be in [0, 1], got {self.safeguard!r}")


def keep_top(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask of the k[b] highest-scoring valid slots of every (batch b, head) row.

    scores, valid: [B, H, S]; k: [B]. Ties are broken towards the newer slot index.
    """
    # a valid slot scored -inf still outranks every invalid slot
    lowest = torch.finfo(torch.float32).min
    masked = scores.float().nan_to_num(posinf=float("inf"), neginf=lowest).masked_fill(~valid, float("-inf"))
    S = masked.shape[-1]
    # descending score; a stable sort of the reversed row puts the newer slot first on ties
    order = (S - 1) - torch.argsort(masked.flip(-1), dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(S, device=scores.device).expand_as(order))
    return (ranks < k.view(-1, 1, 1)) & valid


def pool_over_slots(scores: torch.Tensor, valid: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each valid slot's score becomes the max over the `kernel` valid slots centred on it, in
    position order (slots are kept in position order within each row; invalid slots take no
    part). A token next to a high-scoring one is then kept with it, so a span (a number, a name)
    is kept or evicted as a whole. scores, valid: [..., S]."""
    if kernel <= 1:
        return scores
    shape, S = scores.shape, scores.shape[-1]
    flat_scores, flat_valid = scores.reshape(-1, S).float(), valid.reshape(-1, S)
    # gather the valid slots to the front (stable: position order kept), pool, scatter back
    order = torch.argsort((~flat_valid).to(torch.int8), dim=-1, stable=True)
    packed = flat_scores.gather(-1, order).masked_fill(~flat_valid.gather(-1, order), float("-inf"))
    pooled = F.max_pool1d(packed.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    out = torch.empty_like(pooled).scatter_(-1, order, pooled)
    return torch.where(flat_valid, out, flat_scores).reshape(shape)


@dataclass
class Votes:
    """What the layers of a model-wide selection say about each position [B, span]: the sum of
    each layer's scores over its heads (`totals`, one tensor per layer, None for a layer that
    holds tokens without voting) and how many heads voted (`counts`), which positions are held
    anywhere, protected by some holder, or a sink."""
    totals: list[Optional[torch.Tensor]]
    counts: list[Optional[torch.Tensor]]
    held: torch.Tensor
    guard: torch.Tensor
    sink: torch.Tensor


def collect_votes(layers: list["MemoryLayer"], scores: list[Optional[torch.Tensor]], protected: list[torch.Tensor],
                  first: Optional[list[torch.Tensor]] = None) -> Votes:
    """Every layer's votes by position (see `shared_selection`), kept apart so a subset of the
    layers can decide (bench/score_layers.py). `shared_selection` sums the votes in one pass
    instead: the float order its decisions were made and boarded with."""
    B = layers[0].valid.shape[0]
    device = layers[0].positions.device
    span = 1 + max(int(layer.positions.masked_fill(~layer.valid, -1).max()) for layer in layers)
    holders = torch.zeros(B, span, device=device)
    guard = torch.zeros(B, span, device=device)       # how many holders protect the token
    sink = torch.zeros(B, span, device=device)
    totals: list[Optional[torch.Tensor]] = []
    counts: list[Optional[torch.Tensor]] = []
    first = first if first is not None else [torch.zeros_like(p) for p in protected]
    for layer, s, p, f in zip(layers, scores, protected, first):
        index = layer.positions.clamp(min=0).reshape(B, -1)
        valid = layer.valid.reshape(B, -1).float()
        holders.scatter_add_(1, index, valid)
        if s is None:
            totals.append(None)
            counts.append(None)
        else:
            totals.append(torch.zeros(B, span, device=device).scatter_add_(
                1, index, (s.float().nan_to_num() * layer.valid).reshape(B, -1)))
            counts.append(torch.zeros(B, span, device=device).scatter_add_(1, index, valid))
        guard.scatter_add_(1, index, (p & layer.valid).reshape(B, -1).float())
        sink.scatter_add_(1, index, (f & layer.valid).reshape(B, -1).float())
    return Votes(totals, counts, holders > 0, guard, sink)


def decide_from_votes(votes: Votes, k: torch.Tensor, kernel: int = 1,
                      voters: Optional[list[int]] = None) -> torch.Tensor:
    """[B, span] the positions kept when only the `voters` layers vote (every voting layer when
    None): the decision `shared_selection` makes from their mean vote."""
    chosen = [i for i, t in enumerate(votes.totals) if t is not None and (voters is None or i in voters)]
    total = torch.zeros_like(votes.guard)
    count = torch.zeros_like(votes.guard)
    for i in chosen:
        total += votes.totals[i]
        count += votes.counts[i]
    return _decide(total / count.clamp(min=1), votes.held, votes.guard, votes.sink, k, kernel)


def _decide(mean: torch.Tensor, held: torch.Tensor, guard: torch.Tensor, sink: torch.Tensor, k: torch.Tensor,
            kernel: int) -> torch.Tensor:
    """[B, span] the k[b] best held positions by pooled mean score; sinks first, then protected."""
    mean = pool_over_slots(mean, held, kernel).masked_fill(guard > 0, PROTECTED).masked_fill(sink > 0, float("inf"))
    return keep_top(mean.unsqueeze(1), held.unsqueeze(1), k)[:, 0]


def shared_selection(layers: list["MemoryLayer"], scores: list[Optional[torch.Tensor]], protected: list[torch.Tensor],
                     k: torch.Tensor, kernel: int = 1, first: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """One set of kept tokens for every layer and KV head: each token's score is the mean of
    its scores over the layers and heads that hold it; the `k[b]` best tokens are kept wherever
    they are held, the `first` ones (sinks) before the protected ones before the rest.
    scores, protected, first: per layer [B, H, S]; k: [B]. A layer whose score is None holds
    tokens without voting on them (a NAMM that scores from a subset of layers)."""
    B = k.shape[0]
    device = layers[0].positions.device
    span = 1 + max(int(layer.positions.masked_fill(~layer.valid, -1).max()) for layer in layers)
    total = torch.zeros(B, span, device=device)
    count = torch.zeros(B, span, device=device)       # how many scored holders
    holders = torch.zeros(B, span, device=device)
    guard = torch.zeros(B, span, device=device)       # how many holders protect the token
    sink = torch.zeros(B, span, device=device)
    first = first if first is not None else [torch.zeros_like(p) for p in protected]
    for layer, s, p, f in zip(layers, scores, protected, first):
        index = layer.positions.clamp(min=0).reshape(B, -1)
        valid = layer.valid.reshape(B, -1).float()
        holders.scatter_add_(1, index, valid)
        if s is not None:
            total.scatter_add_(1, index, (s.float().nan_to_num() * layer.valid).reshape(B, -1))
            count.scatter_add_(1, index, valid)
        guard.scatter_add_(1, index, (p & layer.valid).reshape(B, -1).float())
        sink.scatter_add_(1, index, (f & layer.valid).reshape(B, -1).float())
    kept = _decide(total / count.clamp(min=1), holders > 0, guard, sink, k, kernel)
    return kept_in_layers(kept, layers)


def kept_in_layers(kept: torch.Tensor, layers: list["MemoryLayer"]) -> list[torch.Tensor]:
    """Per layer [B, H, S] keep masks from kept positions [B, span]."""
    B = kept.shape[0]
    return [kept.gather(1, layer.positions.clamp(min=0).reshape(B, -1)).view_as(layer.valid) & layer.valid
            for layer in layers]


def sink_mask(layer: "MemoryLayer", sinks: int) -> torch.Tensor:
    """[B, H, S] the first `sinks` positions of each sequence (its oldest valid tokens)."""
    if not sinks:
        return torch.zeros_like(layer.valid)
    first = layer.positions.masked_fill(~layer.valid, 2**62).amin(-1, keepdim=True)
    return (layer.positions - first) < sinks


def shared_top(ranked: list[torch.Tensor], valid: list[torch.Tensor], k_total: torch.Tensor) -> list[torch.Tensor]:
    """The k_total[b] best slots over several [B, H, S] score tensors taken together (a budget
    shared by all their heads); returns their keep masks."""
    B = ranked[0].shape[0]
    flat = torch.cat([r.float().reshape(B, 1, -1) for r in ranked], dim=-1)
    flat_valid = torch.cat([v.reshape(B, 1, -1) for v in valid], dim=-1)
    kept = keep_top(flat, flat_valid, k_total)[:, 0]
    return [part.view_as(v) for part, v in zip(kept.split([v[0].numel() for v in valid], dim=-1), valid)]


def select_with_structure(layers: list["MemoryLayer"], scores: list[torch.Tensor], protected: list[torch.Tensor],
                          k: torch.Tensor, structure: Structure) -> list[torch.Tensor]:
    """Keep masks for every layer from per-layer scores [B, H, S] (higher: keep), the tokens a
    policy protects (kept before any scored one, after the sinks; counted in the budget) and
    the per-(layer, head) budget k [B]."""
    sinks = [sink_mask(layer, structure.sinks) for layer in layers]
    if structure.scope == "global":
        return shared_selection(layers, scores, protected, k, kernel=structure.pool, first=sinks)
    ranked = [pool_over_slots(s.float(), layer.valid, structure.pool).masked_fill(p, PROTECTED).masked_fill(f, float("inf"))
              for layer, s, p, f in zip(layers, scores, protected, sinks)]
    valid = [layer.valid for layer in layers]
    if structure.scope == "head":
        return [keep_top(r, v, k) for r, v in zip(ranked, valid)]
    if structure.scope == "adakv":
        keeps = []
        for r, v in zip(ranked, valid):
            # the safeguard: each head's best floor(safeguard x k) slots rank first
            safe = keep_top(r, v, torch.floor(k.float() * structure.safeguard).long())
            keeps += shared_top([r.masked_fill(safe, float("inf"))], [v], k * r.shape[1])
        return keeps
    heads = sum(r.shape[1] for r in ranked)            # modelwide
    return shared_top(ranked, valid, k * heads)


def parse_structure_options(options: dict, base: Structure) -> Structure:
    """A Structure from spec options {"global": True, "pool": "15", ...} over a policy's default."""
    scope = base.scope
    flags = [name for name in SCOPES if options.get(name)]
    if len(flags) > 1:
        raise ValueError(f"choose one scope of {', '.join(SCOPES)}, not {' and '.join(flags)}")
    if flags:
        scope = flags[0]
    if "safeguard" in options and scope != "adakv":
        raise ValueError("safeguard applies to the adakv scope only")

    def whole(name: str, default: int) -> int:
        if name not in options:
            return default
        text = str(options[name])
        if not text.isdigit():
            raise ValueError(f"{name} must be a whole number, got {text!r}")
        return int(text)

    safeguard = float(options["safeguard"]) if "safeguard" in options else base.safeguard
    return Structure(scope=scope, pool=whole("pool", base.pool), sinks=whole("sinks", base.sinks), safeguard=safeguard)


def structure_suffix(structure: Structure, default: Structure) -> str:
    """The spec options that give `structure` over a policy's `default` ("" when equal)."""
    parts = []
    if structure.scope != default.scope:
        parts.append(structure.scope)
    if structure.pool != default.pool:
        parts.append(f"pool={structure.pool}")
    if structure.sinks != default.sinks:
        parts.append(f"sinks={structure.sinks}")
    if structure.scope == "adakv" and structure.safeguard != DEFAULT_SAFEGUARD:
        parts.append(f"safeguard={structure.safeguard:g}")
    return "".join("/" + p for p in parts)

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
| fastgen       | per head, the cheapest of five hybrid rules that recovers a share  |
|               | of the recent attention (no fixed budget)                          |
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
    query_ids: Optional[torch.Tensor] = None  # [B, Q] token ids of this chunk (in observe)


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


def shared_selection(layers: list["LayerMemory"], scores: list[torch.Tensor], protected: list[torch.Tensor],
                     k: torch.Tensor, kernel: int = 1) -> list[torch.Tensor]:
    """One set of kept tokens for every layer and KV head: each token's score is the mean of
    its scores over the layers and heads that hold it; the `k[b]` best tokens (protected first)
    are kept wherever they are held. scores, protected: per layer [B, H, S]; k: [B]."""
    B = k.shape[0]
    device = scores[0].device
    span = 1 + max(int(layer.positions.masked_fill(~layer.valid, -1).max()) for layer in layers)
    total = torch.zeros(B, span, device=device)
    count = torch.zeros(B, span, device=device)
    guard = torch.zeros(B, span, device=device)       # how many holders protect the token
    for layer, s, p in zip(layers, scores, protected):
        index = layer.positions.clamp(min=0).reshape(B, -1)
        total.scatter_add_(1, index, (s.float() * layer.valid).reshape(B, -1))
        count.scatter_add_(1, index, layer.valid.reshape(B, -1).float())
        guard.scatter_add_(1, index, (p & layer.valid).reshape(B, -1).float())
    held = count > 0
    mean = total / count.clamp(min=1)
    mean = pool_over_slots(mean, held, kernel).masked_fill(guard > 0, float("inf"))
    kept = keep_top(mean.unsqueeze(1), held.unsqueeze(1), k)[:, 0]          # [B, span]
    return [kept.gather(1, layer.positions.clamp(min=0).reshape(B, -1)).view_as(layer.valid) & layer.valid
            for layer in layers]


class MemoryPolicy:
    """Base class. Subclasses set `needs_attention` and override what they use."""
    name = "policy"
    needs_attention = False
    aux_shapes: dict[str, tuple[int, ...]] = {}

    def new_sequence(self) -> None:
        """Called before each new batch of prompts."""

    def bind_tokenizer(self, tokenizer) -> None:
        """Policies that read token identities (FastGen) get the model's tokenizer here."""

    def prefix_key(self) -> Optional[tuple]:
        """Policies with equal keys build identical state before their first update (so
        that state can be computed once and shared); None: no sharing."""
        return None

    def observe(self, layer_idx: int, layer: "LayerMemory", attn: torch.Tensor, step: StepInfo) -> None:
        """attn: [B, H_kv, Q, S] float32 attention of this chunk's queries (GQA-averaged).

        Its storage is reused once observe returns: keep copies, never views."""

    def select(self, layer_idx: int, layer: "LayerMemory", step: StepInfo) -> Optional[torch.Tensor]:
        return None

    def select_all(self, layers: list["LayerMemory"], step: StepInfo) -> list[Optional[torch.Tensor]]:
        """Keep masks of every layer at one update. By default each layer decides alone; a
        policy that chooses one set of tokens for the whole model overrides this."""
        return [self.select(i, layer, step) for i, layer in enumerate(layers)]

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
        newest = layer.newest_positions()
        in_window = layer.positions > newest - self.window
        return pooled + in_window.float() * 1e15

    def select(self, layer_idx, layer, step):
        keep = super().select(layer_idx, layer, step)
        layer.aux["snap_obs"].zero_()  # a new observation window for the next update
        return keep


class FastGen(MemoryPolicy):
    """Ge et al. 2024 (FastGen): each head gets the cheapest rule that keeps enough attention.

    At every update each layer and KV head tries, in order: special tokens; + punctuation;
    + heavy hitters (the `heavy_fraction` of tokens seen with the largest accumulated
    attention); + the most recent `recent_fraction` of tokens seen; everything. It keeps the
    first set that holds at least `recovery` of the attention the queries since the last
    update paid to the cache. FastGen profiles once, on the prompt; here the profile is
    renewed at every update, so heads adapt as the sequence grows. Needs the tokenizer
    (`bind_tokenizer`, or `MemoryManagedLM(..., tokenizer=...)`) to know the special and
    punctuation tokens.
    """
    name = "fastgen"
    needs_attention = True
    aux_shapes = {"fg_acc": (), "fg_recent": (), "fg_special": (), "fg_punct": ()}
    RULES = ("special", "special+punct", "special+punct+heavy", "special+punct+heavy+recent", "full")

    def __init__(self, recovery: float = 0.85, heavy_fraction: float = 0.3, recent_fraction: float = 0.3):
        for label, value in (("recovery", recovery), ("heavy_fraction", heavy_fraction),
                             ("recent_fraction", recent_fraction)):
            if not 0 < float(value) <= 1:
                raise ValueError(f"fastgen {label} must be in (0, 1], got {value}")
        self.recovery = float(recovery)
        self.heavy = Budget(float(heavy_fraction), True)
        self.recent = Budget(float(recent_fraction), True)
        self.special_lut: Optional[torch.Tensor] = None   # [vocab] bool, by token id
        self.punct_lut: Optional[torch.Tensor] = None
        self.rule_counts = torch.zeros(len(self.RULES), dtype=torch.long)  # heads that chose each rule

    def bind_tokenizer(self, tokenizer) -> None:
        import string

        if getattr(self, "_tokenizer", None) is tokenizer:
            return  # decoding the vocabulary once is enough
        self._tokenizer = tokenizer
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        self.special_lut = torch.zeros(vocab, dtype=torch.bool)
        self.special_lut[[i for i in tokenizer.all_special_ids if i < vocab]] = True
        self.punct_lut = torch.zeros(vocab, dtype=torch.bool)
        punctuation = set(string.punctuation)
        for token_id in range(vocab):
            text = tokenizer.decode([token_id]).strip()
            if text and all(ch in punctuation for ch in text):
                self.punct_lut[token_id] = True

    def new_sequence(self) -> None:
        if self.special_lut is None:
            raise ValueError("fastgen needs the tokenizer to find special and punctuation tokens: "
                             "MemoryManagedLM(model, policy, tokenizer=tok) or policy.bind_tokenizer(tok)")

    def observe(self, layer_idx, layer, attn, step):
        received = attn.sum(dim=-2)
        layer.aux["fg_acc"] += received
        layer.aux["fg_recent"] += received
        if step.query_ids is None:
            return
        # mark the chunk's new tokens: slots that arrived at this chunk's columns
        B, H, S = layer.columns.shape
        Q = step.query_ids.shape[1]
        first = step.processed - Q
        new = layer.columns >= first
        index = (layer.columns - first).clamp(0, Q - 1).view(B, H * S)
        ids = step.query_ids.gather(1, index).view(B, H, S).clamp(0, len(self.special_lut) - 1).cpu()
        for name, lut in (("fg_special", self.special_lut), ("fg_punct", self.punct_lut)):
            flags = lut[ids].to(layer.aux[name].device, layer.aux[name].dtype)
            layer.aux[name][new] = flags[new]   # in place: the cache keeps writing decoded tokens in place

    def select(self, layer_idx, layer, step):
        valid = layer.valid
        special = (layer.aux["fg_special"] > 0) & valid
        punct = special | ((layer.aux["fg_punct"] > 0) & valid)
        heavy = punct | keep_top(layer.aux["fg_acc"], valid, self.heavy.tokens(step.seen))
        recent = heavy | keep_top(_recency_rank(layer), valid, self.recent.tokens(step.seen))
        candidates = (special, punct, heavy, recent, valid)
        mass = layer.aux["fg_recent"].float() * valid
        total = mass.sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
        keep, chosen = valid.clone(), torch.full(valid.shape[:2], len(candidates) - 1, dtype=torch.long)
        undecided = torch.ones(valid.shape[:2], dtype=torch.bool, device=valid.device)
        for rule, candidate in enumerate(candidates):
            enough = undecided & ((mass * candidate).sum(-1) / total >= self.recovery)
            keep = torch.where(enough.unsqueeze(-1), candidate, keep)
            chosen[enough.cpu()] = rule
            undecided &= ~enough
        self.rule_counts += torch.bincount(chosen.flatten(), minlength=len(self.RULES))
        layer.aux["fg_recent"].zero_()  # a new profile for the next update
        return keep

    def describe(self) -> str:
        return f"fastgen:{self.recovery:g}"


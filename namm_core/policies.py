"""Memory policies: what to keep in each layer's KV cache.

The memory calls, for every forward chunk and every layer,
  observe(layer_idx, layer, attn, step)        the attention the chunk's queries paid to the
                                               cached keys (when `needs_attention`),
  observe_queries(layer_idx, layer, query, scaling, step)
                                               the chunk's post-RoPE queries (when `needs_queries`),
and every `update_every` tokens
  select_all(layers, step)                     [B, H_kv, S] bool masks of the slots to keep.
A policy that `reconstructs` (KVzip) first gets a side forward that re-reads the tokens since
the last update (`reconstruction_inputs`, then `observe_reconstruction` per layer).
Per-token statistics a policy accumulates live in `layer.aux[name]` ([B, H_kv, S, ...]); the
cache appends zeros for new tokens and compacts them together with keys and values, so they
always stay aligned with the slots they describe.

Policies that score tokens (`BudgetPolicy`) implement one rule, `score()`, in the kvpress
style; the budget and its structure (per head, head-adaptive, model-wide or one global set,
span pooling, sinks: selection.py) are options of every one of them. Spec strings name a
policy, its budget, and options separated by `/`: `tova:0.5/global/pool=15/sinks=4`,
`snapkv:0.25/window=64/kernel=5/adakv`.

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
| expected_attention, kvzip: their own modules                                       |
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from .selection import (  # noqa: F401  (re-exported: the policies' public vocabulary)
    Budget,
    Structure,
    keep_top,
    parse_structure_options,
    pool_over_slots,
    select_with_structure,
    shared_selection,
    structure_suffix,
)

if TYPE_CHECKING:  # pragma: no cover
    from .cache import MemoryLayer


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
class Reconstruction:
    """A side forward that re-reads columns [first_column, end_column) of the sequence after a
    prompt of `prompt_tokens` tokens (KVzip). Its keys are dropped after the forward."""
    first_column: int
    end_column: int
    prompt_tokens: int
    query_valid: torch.Tensor     # [B, P] False for padding re-read from left-padded rows


class MemoryPolicy:
    """Base class. Subclasses set `needs_attention` / `needs_queries` and override what they use."""
    name = "policy"
    needs_attention = False
    needs_queries = False
    reconstructs = False
    aux_shapes: dict[str, tuple[int, ...]] = {}
    # True when observe / observe_queries only prepare later selections: forwards after which no
    # update will run are then not observed (a recorder of attention for analysis sets False)
    observations_feed_updates_only = False
    # the dtype `observe` gets its attention rows in (the NAMM can read them in bfloat16)
    observation_dtype = torch.float32

    def new_sequence(self) -> None:
        """Called before each new batch of prompts."""

    def bind_tokenizer(self, tokenizer) -> None:
        """Policies that read token identities (FastGen, KVzip) get the model's tokenizer here."""

    def bind_model(self, model) -> None:
        """Policies that need the model's own settings (Expected Attention: its RoPE) get it here."""

    def observed_layers(self, num_layers: int) -> Optional[set[int]]:
        """The layers whose attention `observe` needs (None: all of them, when `needs_attention`);
        the others attend with the fused kernel."""
        return None

    def first_observed_column(self, next_update: int) -> Optional[int]:
        """The first column whose attention the update at `next_update` needs (None: every column
        since the last update); the rows before it are not captured."""
        return None

    def prefix_key(self) -> Optional[tuple]:
        """Policies with equal keys build identical state before their first update (so
        that state can be computed once and shared); None: no sharing."""
        return None

    def observe(self, layer_idx: int, layer: "MemoryLayer", attn: torch.Tensor, step: StepInfo) -> None:
        """attn: [B, H_kv, Q, S] float32 attention of this chunk's queries (GQA-averaged).

        Its storage is reused once observe returns: keep copies, never views."""

    def observe_queries(self, layer_idx: int, layer: "MemoryLayer", query: torch.Tensor, scaling: float,
                        step: StepInfo) -> None:
        """query: [B, H_q, Q, D] the chunk's queries after RoPE (the chunk's keys are already in `layer`)."""

    def reconstruction_inputs(self, ids: torch.Tensor, previous: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """For a policy that `reconstructs`: the side forwards that re-read `ids` [B, n] (the
        columns since the last update; `previous` [B, m] the columns before them), as (input ids
        [B, p + n_i], prompt length p) pieces."""
        raise NotImplementedError

    def observe_reconstruction(self, layer_idx: int, layer: "MemoryLayer", query: torch.Tensor, scaling: float,
                               piece: Reconstruction) -> None:
        """query [B, H_q, P, D] of a reconstruction piece, whose P keys are the last slots of `layer`."""

    def select(self, layer_idx: int, layer: "MemoryLayer", step: StepInfo) -> Optional[torch.Tensor]:
        return None

    def select_all(self, layers: list["MemoryLayer"], step: StepInfo) -> list[Optional[torch.Tensor]]:
        """Keep masks of every layer at one update. By default each layer decides alone; a
        policy that chooses one set of tokens for the whole model overrides this."""
        return [self.select(i, layer, step) for i, layer in enumerate(layers)]

    def hyperparameters(self) -> dict:
        """Every setting that changes what the policy keeps (for result keys and reports)."""
        return {"name": self.name}

    def describe(self) -> str:
        return self.name


class FullCache(MemoryPolicy):
    name = "full"


def _options_of(cls) -> dict[str, object]:
    """A policy class's own hyperparameters and their defaults: its __init__ keyword arguments."""
    options = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.default is not inspect.Parameter.empty and p.name != "structure":
                    options[p.name] = p.default
    return options


class BudgetPolicy(MemoryPolicy):
    """Scores tokens (`score`, higher: keep) and keeps the `budget` best, protected ones first,
    in its `structure`. Keyword arguments of a subclass's __init__ are its hyperparameters; a
    spec sets them as `/name=value`."""
    default_structure = Structure()

    def __init__(self, budget: Union[str, int, float, Budget], structure: Optional[Structure] = None):
        self.budget = Budget.parse(budget)
        self.structure = structure or self.default_structure

    @classmethod
    def option_defaults(cls) -> dict[str, object]:
        return _options_of(cls)

    def hyperparameters(self) -> dict:
        return {"name": self.name, "budget": str(self.budget),
                **{name: getattr(self, name) for name in self.option_defaults()},
                "scope": self.structure.scope, "pool": self.structure.pool, "sinks": self.structure.sinks,
                **({"safeguard": self.structure.safeguard} if self.structure.scope == "adakv" else {})}

    def describe(self) -> str:
        options = "".join(f"/{name}={getattr(self, name):g}" if isinstance(default, float) else f"/{name}={getattr(self, name)}"
                          for name, default in self.option_defaults().items() if getattr(self, name) != default)
        return f"{self.name}:{self.budget}{options}{structure_suffix(self.structure, self.default_structure)}"

    # --- the rule --------------------------------------------------------------------
    def score(self, layer_idx: int, layer: "MemoryLayer", step: StepInfo) -> torch.Tensor:
        """[B, H, S] how much each slot is worth keeping."""
        raise NotImplementedError

    def protected(self, layer_idx: int, layer: "MemoryLayer", step: StepInfo, k: torch.Tensor) -> torch.Tensor:
        """[B, H, S] slots kept before any scored one (a recent window, an observation window)."""
        return torch.zeros_like(layer.valid)

    def after_update(self, layer_idx: int, layer: "MemoryLayer") -> None:
        """Called on every layer once its kept set is decided (e.g. to start a new window)."""

    # --- the decision ----------------------------------------------------------------
    def select_all(self, layers, step):
        return self._decide(list(enumerate(layers)), step)

    def select(self, layer_idx, layer, step):
        """One layer alone (its heads share what the structure says; model-wide scopes see one layer)."""
        return self._decide([(layer_idx, layer)], step)[0]

    def _decide(self, indexed: list, step: StepInfo) -> list[torch.Tensor]:
        k = self.budget.tokens(step.seen)
        layers = [layer for _, layer in indexed]
        scores = [self.score(i, layer, step) for i, layer in indexed]
        protected = [self.protected(i, layer, step, k) for i, layer in indexed]
        keeps = select_with_structure(layers, scores, protected, k, self.structure)
        for i, layer in indexed:
            self.after_update(i, layer)
        return keeps


def _recency_rank(layer: "MemoryLayer") -> torch.Tensor:
    """Larger for newer tokens: the position itself (invalid slots are masked by keep_top)."""
    return layer.positions.float()


class StreamingLLM(BudgetPolicy):
    """Xiao et al. 2024: the first tokens (attention sinks) and the most recent ones."""
    name = "streamingllm"
    default_structure = Structure(sinks=4)

    def score(self, layer_idx, layer, step):
        return _recency_rank(layer)


class L2Norm(BudgetPolicy):
    """Devoto et al. 2024: keys with a low L2 norm draw the most attention."""
    name = "l2"

    def score(self, layer_idx, layer, step):
        return -layer.keys.float().norm(dim=-1)


class H2O(BudgetPolicy):
    """Zhang et al. 2023: recent window + heavy hitters by accumulated attention."""
    name = "h2o"
    needs_attention = True
    observations_feed_updates_only = True
    aux_shapes = {"h2o_acc": ()}

    def __init__(self, budget, structure=None, recent_fraction: float = 0.5):
        super().__init__(budget, structure)
        if not 0 <= float(recent_fraction) <= 1:
            raise ValueError(f"h2o recent_fraction must be in [0, 1], got {recent_fraction}")
        self.recent_fraction = float(recent_fraction)

    def observe(self, layer_idx, layer, attn, step):
        layer.aux["h2o_acc"] += attn.sum(dim=-2)

    def score(self, layer_idx, layer, step):
        return layer.aux["h2o_acc"]

    def protected(self, layer_idx, layer, step, k):
        n_recent = torch.floor(k.float() * self.recent_fraction).long()
        return keep_top(_recency_rank(layer), layer.valid, n_recent)


class TOVA(BudgetPolicy):
    """Oren et al. 2024: keep the tokens the newest query attends to most."""
    name = "tova"
    needs_attention = True
    observations_feed_updates_only = True
    aux_shapes = {"tova_last": ()}

    def observe(self, layer_idx, layer, attn, step):
        # newest real query row of each sequence is the chunk's last row (left padding)
        layer.aux["tova_last"] = attn[:, :, -1, :].clone()

    def score(self, layer_idx, layer, step):
        return layer.aux["tova_last"]


class SnapKV(BudgetPolicy):
    """Li et al. 2024: score by the attention of the last `window` queries before an
    update, max-pooled over `kernel` neighbouring tokens; the observation window itself is kept."""
    name = "snapkv"
    needs_attention = True
    observations_feed_updates_only = True
    aux_shapes = {"snap_obs": ()}

    def __init__(self, budget, structure=None, window: int = 32, kernel: int = 7):
        super().__init__(budget, structure)
        for label, value in (("window", window), ("kernel", kernel)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"snapkv {label} must be a whole number >= 1, got {value!r}")
        self.window, self.kernel = int(window), int(kernel)

    def observe(self, layer_idx, layer, attn, step):
        # absolute column index of each query row of this chunk
        Q = attn.shape[-2]
        cols = torch.arange(step.processed - Q, step.processed, device=attn.device)
        in_window = (cols >= step.next_update - self.window).to(attn.dtype)
        layer.aux["snap_obs"] += (attn * in_window.view(1, 1, Q, 1)).sum(dim=-2)

    def score(self, layer_idx, layer, step):
        return pool_over_slots(layer.aux["snap_obs"], layer.valid, self.kernel)

    def protected(self, layer_idx, layer, step, k):
        return layer.valid & (layer.positions > layer.newest_positions() - self.window)

    def after_update(self, layer_idx, layer):
        layer.aux["snap_obs"].zero_()  # a new observation window for the next update


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
    observations_feed_updates_only = True
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

    @classmethod
    def option_defaults(cls) -> dict[str, object]:
        """Hyperparameters a spec may set as /name=value (the threshold T is the argument)."""
        return {k: v for k, v in _options_of(cls).items() if k != "recovery"}

    def hyperparameters(self) -> dict:
        return {"name": self.name, "recovery": self.recovery, "heavy_fraction": self.heavy.value,
                "recent_fraction": self.recent.value}

    def describe(self) -> str:
        options = "".join(f"/{name}={value:g}" for name, value in (("heavy_fraction", self.heavy.value),
                                                                   ("recent_fraction", self.recent.value))
                          if value != self.option_defaults()[name])
        return f"fastgen:{self.recovery:g}{options}"


"""The Neural Attention Memory Model as a memory policy.

observe(): folds the attention each cached token receives into its EMA spectrogram
           (streaming, see features.py).
select():  features = [recency embedding (8), normalised EMA spectrogram (17)] per token,
           scored by one scorer shared by all layers and heads; keep score >= 0.
           The newest token is always kept.

Normalisation statistics (one mean and variance per frequency bin, shared by every layer
and head) are collected while `collecting_statistics()` is on, then frozen and saved
with the parameters. A NAMM whose parameters are all zero scores 0 everywhere and keeps
every token.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .features import RunningMoments, SpectrogramConfig, fold_rows, recency_embedding
from .policies import Budget, MemoryPolicy, StepInfo, keep_top, pool_over_slots, shared_selection
from .scorers import SCORER_KINDS, WINDOW_KEYS, build_scorer

CONFIG_NAME = "namm_config.json"
WEIGHTS_NAME = "namm.safetensors"
# 2: the official code's conventions (normalisation (x - mean) / max(std, 1e-7); recency
#    laid out [sin x 4, cos x 4], computed in float64). 1: the project's first conventions
#    ((x - mean) / sqrt(var + 1e-6); sin/cos interleaved, float32); NAMMs saved under it load
#    and decide exactly as before.
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
NORM_STD_FLOOR = 1e-7
SELECTIONS = ("threshold", "top_k")
SCOPES = ("head", "global")
# config fields added after NAMMs, runs and board rows were recorded, at their defaults: a config
# holding them at these values is the one recorded before (run hashes, board fingerprints)
FIELDS_ADDED_LATER = {"score_layers": None, "bam_window": None, "bam_window_keys": "recent", "observe_rows": None,
                      "observe_dtype": "float32"}
# precisions the attention rows can be read and folded in (NAMMConfig.observe_dtype)
OBSERVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OBSERVE_SPEC_NAMES = {"float32": "fp32", "bfloat16": "bf16"}      # `namm@0.25/obs=bf16`


@dataclass
class NAMMConfig:
    scorer: str = "bam"                  # "bam" (paper) or "mlp"
    head_dim: int = 32                   # BAM attention head size
    mlp_hidden: list[int] = field(default_factory=lambda: [32])
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    norm_eps: float = 1e-6               # format version 1 only: eps inside the square root
    format_version: int = FORMAT_VERSION
    # "threshold": keep score >= 0 (the paper), at most `budget` tokens when one is set;
    # "top_k": keep the `budget` best-scored tokens per layer and KV head (the official
    # TopKSelection), so the memory is fixed and evolution learns a ranking.
    selection: str = "threshold"
    budget: Optional[str] = None         # a fraction of the tokens seen ("0.5") or a count ("1024")
    # attention sinks: the first `sinks` tokens of each sequence are always kept, as the newest is
    # (0 in the paper). The features hold no absolute position, so a scorer cannot single these
    # tokens out where their attention does not; evicting a sink breaks the heads that rely on it.
    sinks: int = 0
    # "head" (the paper): every layer and KV head keeps its own tokens. "global": one set of
    # tokens for the whole model, chosen by each token's score averaged over every layer and KV
    # head that holds it; a token that one head finds important is not lost by the others, and
    # evidence from 90 heads (SmolLM2) is pooled into one decision.
    scope: str = "head"
    # a token's score is the max over `pool` neighbouring tokens (odd; 1: off), so a span the
    # scorer marks (a number, a name) is kept or evicted as a whole
    pool: int = 1
    # model-wide scope only: the layers whose scores decide, as a count (that many layers evenly
    # spaced from the first to the last) or a list of layer indices; None: every layer. The other
    # layers are neither observed nor scored, so they attend with the fused kernel (cheaper)
    score_layers: Optional[Union[int, list[int]]] = None
    # BAM only: each token's backward attention limited to about `bam_window` tokens (None: every
    # newer token, the paper), either the newest of the cache ("recent") or those right after it
    # ("band"); the S^2 cost of an update becomes S x window (scorers.backward_attention)
    bam_window: Optional[int] = None
    bam_window_keys: str = "recent"
    # the attention an update reads: the rows of the last `observe_rows` queries before it (rounded
    # out to whole hops), the earlier rows counting as zero attention; None: every query since the
    # last update (the paper). The queries not read attend with the fused kernel (cheaper)
    observe_rows: Optional[int] = None
    # the precision the attention rows are read and folded in: "float32" (the paper's full-precision
    # attention) or "bfloat16" (the probabilities rounded to bfloat16, as a bf16 model multiplies
    # them with the values; the spectrogram's matmul in bfloat16, its EMA state kept in float32).
    # On a bf16 model the latter writes no float32 copy of the probabilities: 5-10% less time at
    # 4k-16k tokens (bench/results/memory_obs.md)
    observe_dtype: str = "float32"
    # the memory settings the NAMM was evolved with; MemoryManagedLM uses them unless told otherwise
    update_every: Optional[int] = None
    chunk_size: Optional[int] = None

    def __post_init__(self):
        if self.scorer not in SCORER_KINDS:
            raise ValueError(f"NAMM scorer {self.scorer!r}: expected one of {', '.join(SCORER_KINDS)}")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"NAMM head_dim must be a positive integer, got {self.head_dim!r}")
        if not self.mlp_hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                          for h in self.mlp_hidden):
            raise ValueError(f"NAMM mlp_hidden: expected a list of positive layer widths, got {self.mlp_hidden!r}")
        if self.format_version not in (LEGACY_FORMAT_VERSION, FORMAT_VERSION):
            raise ValueError(f"NAMM format_version {self.format_version!r} is not supported "
                             f"(known: {LEGACY_FORMAT_VERSION}, {FORMAT_VERSION})")
        if self.selection not in SELECTIONS:
            raise ValueError(f"NAMM selection {self.selection!r}: expected one of {', '.join(SELECTIONS)}")
        if self.budget is not None:
            self.budget = str(Budget.parse(self.budget))
        elif self.selection == "top_k":
            raise ValueError("NAMM selection 'top_k' needs a budget (a fraction like 0.5 or a token count like 1024)")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"NAMM sinks must be a whole number >= 0, got {self.sinks!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"NAMM scope {self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.scope == "global" and self.selection != "top_k":
            raise ValueError("NAMM scope 'global' needs selection 'top_k' and a budget")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"NAMM pool must be an odd whole number >= 1, got {self.pool!r}")
        if self.score_layers is not None:
            self.score_layers = _checked_score_layers(self.score_layers)
            if self.scope != "global":
                raise ValueError("NAMM score_layers needs the model-wide scope (scope 'global')")
        if self.bam_window is not None:
            if isinstance(self.bam_window, bool) or not isinstance(self.bam_window, int) or self.bam_window < 1:
                raise ValueError(f"NAMM bam_window must be a positive integer or None, got {self.bam_window!r}")
            if self.scorer != "bam":
                raise ValueError(f"NAMM bam_window applies to the BAM scorer only (scorer is {self.scorer!r})")
        if self.bam_window_keys not in WINDOW_KEYS:
            raise ValueError(f"NAMM bam_window_keys {self.bam_window_keys!r}: expected one of {', '.join(WINDOW_KEYS)}")
        if self.observe_rows is not None:
            hop = self.spectrogram.hop
            if isinstance(self.observe_rows, bool) or not isinstance(self.observe_rows, int) \
                    or self.observe_rows < hop or self.observe_rows % hop:
                raise ValueError(f"NAMM observe_rows must be a positive multiple of the spectrogram hop ({hop}), "
                                 f"got {self.observe_rows!r}")
        if self.observe_dtype not in OBSERVE_DTYPES:
            raise ValueError(f"NAMM observe_dtype {self.observe_dtype!r}: expected one of {', '.join(OBSERVE_DTYPES)}")
        for name in ("update_every", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"NAMM {name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "NAMMConfig":
        d = dict(d)
        # a config written before format versions were recorded is version 1
        d.setdefault("format_version", LEGACY_FORMAT_VERSION)
        known = {f.name for f in fields(NAMMConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NAMM config fields: {sorted(unknown)}")
        spec = SpectrogramConfig(**d.pop("spectrogram", {}))
        return NAMMConfig(spectrogram=spec, **d)

    @staticmethod
    def from_spec(spec: dict) -> "NAMMConfig":
        """The config a run's NAMM spec describes (its extra keys, e.g. `stats_prompts`, are
        ignored; a spec recorded before format versions is version 1)."""
        known = {f.name for f in fields(NAMMConfig)}
        return NAMMConfig.from_dict({k: (list(v) if k == "mlp_hidden" else v) for k, v in spec.items() if k in known})

    @property
    def legacy(self) -> bool:
        return self.format_version == LEGACY_FORMAT_VERSION


def _checked_score_layers(value):
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ValueError(f"NAMM score_layers: expected layer indices >= 0, got {value!r}")
        return sorted(set(value))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NAMM score_layers: expected a layer count >= 1 or a list of layer indices, got {value!r}")
    return value


def scored_layer_indices(score_layers, num_layers: int) -> list[int]:
    """The layers a model-wide NAMM scores with: `score_layers` evenly spaced ones (first and
    last included), or the listed ones; every layer when None."""
    if score_layers is None or (isinstance(score_layers, int) and score_layers >= num_layers):
        return list(range(num_layers))
    if isinstance(score_layers, int):
        if score_layers == 1:
            return [num_layers - 1]
        return sorted({round(i * (num_layers - 1) / (score_layers - 1)) for i in range(score_layers)})
    beyond = [i for i in score_layers if i >= num_layers]
    if beyond:
        raise ValueError(f"NAMM score_layers {beyond} beyond the model's {num_layers} layers")
    return list(score_layers)


class NAMM(MemoryPolicy):
    name = "namm"
    needs_attention = True
    observations_feed_updates_only = True

    def __init__(self, config: Optional[NAMMConfig] = None):
        self.config = config or NAMMConfig()
        spec = self.config.spectrogram
        self.spec = spec
        self.scorer = build_scorer(self.config.scorer, spec.feature_dim, head_dim=self.config.head_dim,
                                   hidden=self.config.mlp_hidden).eval()
        self.aux_shapes = {"namm_ema": (spec.n_freq,), "namm_rows": (spec.carry,)}
        self.norm_mean = torch.zeros(spec.n_freq)
        self.norm_var = torch.ones(spec.n_freq)
        self.norm_count = 0.0
        self._moments: Optional[RunningMoments] = None
        self.source = "zero-initialised"

    # --- evolution interface -----------------------------------------------------------
    @classmethod
    def from_vector(cls, vector, norm: Optional[dict] = None, config: Optional[NAMMConfig] = None) -> "NAMM":
        """A NAMM from a flat parameter vector (as CMA-ES proposes them) and normalisation
        statistics {"mean", "var", "count"} (None: unnormalised)."""
        namm = cls(config).set_params(torch.tensor(np.array(vector, dtype=np.float32)))
        if norm is not None:   # copies: arrays from Ray's object store are read-only
            namm.norm_mean = torch.tensor(np.array(norm["mean"], dtype=np.float32))
            namm.norm_var = torch.tensor(np.array(norm["var"], dtype=np.float32))
            namm.norm_count = float(norm["count"])
        return namm

    @property
    def num_params(self) -> int:
        return self.scorer.num_params

    def param_slices(self) -> dict[str, slice]:
        """Where each of the scorer's parameter tensors lies in `get_params()`'s vector."""
        return self.scorer.param_slices()

    def get_params(self) -> torch.Tensor:
        return self.scorer.get_flat()

    def set_params(self, vector) -> "NAMM":
        self.scorer.set_flat(vector)
        return self

    def to(self, device) -> "NAMM":
        self.scorer.to(device)
        return self

    # --- normalisation -----------------------------------------------------------------
    @contextmanager
    def collecting_statistics(self):
        """Collect normalisation statistics over the generations run inside; frozen after."""
        self._moments = RunningMoments(self.spec.n_freq)
        try:
            yield self
        finally:
            moments, self._moments = self._moments, None
            if moments.count > 0:
                self.norm_mean = moments.mean.float()
                self.norm_var = moments.var.float()
                self.norm_count = float(moments.count)

    # --- policy ------------------------------------------------------------------------
    def first_observed_column(self, next_update: int) -> Optional[int]:
        """With `observe_rows`: the first column whose attention row the update at `next_update` reads
        (a whole hop); rows before it are not captured and count as zero attention."""
        if self.config.observe_rows is None:
            return None
        hop = self.spec.hop
        return max(0, (next_update - self.config.observe_rows) // hop * hop)

    def observe(self, layer_idx, layer, attn, step: StepInfo):
        """Fold every complete hop block of attention rows into the keys' EMA spectrogram.

        aux["namm_rows"] [B, H, S, carry + pending] holds the carry rows of the previous
        window and any rows still short of a full hop (decoding adds one row at a time).
        Rows that were not captured (`observe_rows`) count as zero attention.
        """
        first_column = step.processed - attn.shape[-2]
        gap = first_column - layer.rows_read_until
        if gap > 0:
            self._skip_rows(layer, gap, first_column)
        self._fold(layer, attn, step.processed)
        layer.rows_read_until = step.processed

    def _skip_rows(self, layer, gap: int, first_column: int) -> None:
        """Fold `gap` rows of zero attention ending at `first_column`, cheaply: zero rows are
        folded only until the carry holds no captured row; after that every frame is zero, so
        the EMA just decays by one frame per hop."""
        spec = self.spec
        held = layer.aux["namm_rows"]                      # [B, H, S, carry + pending]
        pending = held.shape[-1] - spec.carry
        flush = (spec.hop - pending) % spec.hop + -(-spec.carry // spec.hop) * spec.hop
        lead = min(gap, flush)
        B, H, S = held.shape[:3]
        dtype = self.observation_dtype
        self._fold(layer, held.new_zeros(B, H, lead, S, dtype=dtype), first_column - gap + lead)
        rest = gap - lead
        if rest >= spec.hop:                               # whole zero frames: decay only
            frames = rest // spec.hop
            layer.aux["namm_ema"] = layer.aux["namm_ema"] * spec.frame_decay ** frames
        if rest % spec.hop:                                # the start of a hop: held as pending rows
            self._fold(layer, held.new_zeros(B, H, rest % spec.hop, S, dtype=dtype), first_column)

    def _fold(self, layer, attn, processed: int) -> None:
        spec = self.spec
        held = layer.aux["namm_rows"].to(attn.dtype)   # the carry starts as float32 zeros
        pending = held.shape[-1] - spec.carry
        if pending == 0 and attn.shape[-2] % spec.hop == 0:
            prefix, rows = held.transpose(-1, -2), attn          # fast path: no copy of attn
        else:
            both = torch.cat([held.transpose(-1, -2), attn], dim=-2)
            prefix, rows = both[..., :spec.carry, :], both[..., spec.carry:, :]
        k = rows.shape[-2] // spec.hop
        if k > 0:
            used = k * spec.hop
            first_col = processed - rows.shape[-2]  # column of the first new row
            first_frame = torch.div(layer.columns - first_col, spec.hop, rounding_mode="floor")
            layer.aux["namm_ema"] = fold_rows(layer.aux["namm_ema"], prefix, rows[..., :used, :], first_frame, spec)
            consumed = rows[..., :used, :] if used >= spec.carry else torch.cat([prefix, rows[..., :used, :]], -2)
            prefix = consumed[..., consumed.shape[-2] - spec.carry:, :]
            rows = rows[..., used:, :]
        # stored as a transposed view of row-major rows: the next call reads them as rows again
        layer.aux["namm_rows"] = torch.cat([prefix, rows], dim=-2).transpose(-1, -2)

    def token_features(self, layer) -> torch.Tensor:
        """[B, H, S, 25] = recency embedding and normalised EMA spectrogram."""
        ema = layer.aux["namm_ema"]
        if self._moments is not None:
            self._moments.update(ema[layer.valid])
            mean, var = self._moments.mean.float(), self._moments.var.float()
        else:
            mean, var = self.norm_mean, self.norm_var
        mean, var = mean.to(ema.device), var.to(ema.device)
        if self.config.legacy:
            normed = (ema - mean) / torch.sqrt(var + self.config.norm_eps)
        else:
            normed = (ema - mean) / torch.sqrt(var).clamp(min=NORM_STD_FLOOR)
        newest = layer.newest_positions()
        age = (newest - layer.positions).clamp(min=0)
        return torch.cat([recency_embedding(age, self.spec, interleaved=self.config.legacy), normed], dim=-1)

    def score(self, layer) -> torch.Tensor:
        x = self.token_features(layer)
        B, H, S, D = x.shape
        device = next(self.scorer.parameters()).device
        scores = self.score_features(x.reshape(B * H, S, D).to(device), layer.positions.reshape(B * H, S).to(device),
                                     layer.valid.reshape(B * H, S).to(device))
        return scores.view(B, H, S).to(x.device)

    def score_features(self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The scorer on features [N, S, 25] as this NAMM runs it (its BAM window included): the
        one call the memory, distillation and imitation share, so a fit trains what runs."""
        window = {} if self.config.bam_window is None else {"window": self.config.bam_window,
                                                            "window_keys": self.config.bam_window_keys}
        return self.scorer(x, positions, valid, **window)

    def protected(self, layer) -> torch.Tensor:
        """[B, H, S] the newest token and the first `sinks` tokens: kept whatever their score."""
        protected = layer.positions == layer.newest_positions()
        if self.config.sinks:
            first = layer.positions.masked_fill(~layer.valid, 2**62).amin(-1, keepdim=True)
            protected = protected | ((layer.positions - first) < self.config.sinks)
        return protected

    def observed_layers(self, num_layers: int) -> Optional[set[int]]:
        if self.config.score_layers is None:
            return None
        return set(scored_layer_indices(self.config.score_layers, num_layers))

    def select_all(self, layers, step):
        if self.config.scope == "head":
            return super().select_all(layers, step)
        # one decision per token; the pooling runs over the model-wide scores
        scored = self.observed_layers(len(layers))
        return shared_selection(layers, [self.score(layer) if scored is None or i in scored else None
                                         for i, layer in enumerate(layers)],
                                [self.protected(layer) for layer in layers],
                                self._budget.tokens(step.seen), kernel=self.config.pool)

    def select(self, layer_idx, layer, step):
        scores = pool_over_slots(self.score(layer), layer.valid, self.config.pool)
        protected = self.protected(layer)
        if self._budget is None:
            return ((scores >= 0) | protected) & layer.valid
        # protected tokens rank first; then the best scores, up to the budget
        ranked = scores.float().masked_fill(protected, float("inf"))
        keep = keep_top(ranked, layer.valid, self._budget.tokens(step.seen))
        if self.config.selection == "threshold":
            keep &= (scores >= 0) | protected
        return keep

    @property
    def _budget(self) -> Optional[Budget]:
        return None if self.config.budget is None else Budget.parse(self.config.budget)

    def with_budget(self, budget, selection: str = "top_k") -> "NAMM":
        """This NAMM (same parameters and statistics) keeping at most `budget` tokens per layer and head."""
        other = copy.copy(self)
        scope = self.config.scope if selection == "top_k" else "head"
        other.config = replace(self.config, budget=str(Budget.parse(budget)), selection=selection, scope=scope)
        return other

    def scoring_from(self, score_layers) -> "NAMM":
        """This NAMM deciding from a subset of layers (`NAMMConfig.score_layers`); model-wide only."""
        other = copy.copy(self)
        other.config = replace(self.config, score_layers=score_layers)
        return other

    def with_bam_window(self, window: Optional[int], keys: str = "recent") -> "NAMM":
        """This NAMM with its BAM's backward attention limited to `window` tokens (`NAMMConfig.bam_window`)."""
        other = copy.copy(self)
        other.config = replace(self.config, bam_window=window, bam_window_keys=keys)
        return other

    def reading_rows(self, rows: Optional[int]) -> "NAMM":
        """This NAMM reading only the last `rows` attention rows before each update (`NAMMConfig.observe_rows`)."""
        other = copy.copy(self)
        other.config = replace(self.config, observe_rows=rows)
        return other

    def observing_in(self, dtype: str) -> "NAMM":
        """This NAMM reading and folding the attention rows in `dtype` (`NAMMConfig.observe_dtype`)."""
        other = copy.copy(self)
        other.config = replace(self.config, observe_dtype=dtype)
        return other

    @property
    def observation_dtype(self) -> torch.dtype:
        return OBSERVE_DTYPES[self.config.observe_dtype]

    def memory_settings(self) -> dict:
        """The update interval and chunk size the NAMM was evolved with (those recorded)."""
        return {k: v for k, v in (("update_every", self.config.update_every),
                                  ("chunk_size", self.config.chunk_size)) if v is not None}

    def prefix_key(self) -> tuple:
        # observe() depends only on the spectrogram settings, never on the scorer's parameters
        # which layers are observed matters too: unobserved layers keep no spectrogram
        # and so do the rows it reads (`observe_rows`)
        layers = self.config.score_layers
        key = ("namm", tuple(sorted(asdict(self.spec).items())), tuple(layers) if isinstance(layers, list) else layers)
        for name in ("observe_rows", "observe_dtype"):
            if getattr(self.config, name) != FIELDS_ADDED_LATER[name]:
                key += ((name, getattr(self.config, name)),)
        return key

    def describe(self) -> str:
        budget = "" if self.config.budget is None else f"@{self.config.budget}"
        layers = self.config.score_layers
        if layers is not None:
            budget += "/layers=" + (",".join(map(str, layers)) if isinstance(layers, list) else str(layers))
        if self.config.bam_window is not None:
            budget += f"/window={self.config.bam_window}"
            if self.config.bam_window_keys != "recent":
                budget += f"/keys={self.config.bam_window_keys}"
        if self.config.observe_rows is not None:
            budget += f"/rows={self.config.observe_rows}"
        if self.config.observe_dtype != "float32":
            budget += f"/obs={OBSERVE_SPEC_NAMES[self.config.observe_dtype]}"
        return f"namm:{self.source}{budget}"

    # --- persistence -------------------------------------------------------------------
    def save_pretrained(self, directory, metadata: Optional[dict] = None) -> Path:
        """Write safetensors weights + JSON config atomically (a temp dir, then rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        tensors = {f"scorer.{k}": v.detach().float().cpu().contiguous() for k, v in self.scorer.state_dict().items()}
        tensors["norm.mean"] = self.norm_mean.float().contiguous()
        tensors["norm.var"] = self.norm_var.float().contiguous()
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "namm", "num_params": str(self.num_params)})
        config = self.config.to_dict()
        config["num_params"] = self.num_params
        config["weights_sha256"] = _sha256(tmp / WEIGHTS_NAME)
        config["norm_count"] = self.norm_count
        config["metadata"] = metadata or {}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if directory.exists():
            # keep what else lives in the directory (a model card, plots, the run config)
            for extra in directory.iterdir():
                if extra.name not in (WEIGHTS_NAME, CONFIG_NAME):
                    copy = shutil.copytree if extra.is_dir() else shutil.copy2
                    copy(extra, tmp / extra.name)
            backup = directory.with_name(directory.name + ".old")
            os.replace(directory, backup)
            os.replace(tmp, directory)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory) -> "NAMM":
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        missing = [str(p) for p in (cfg_path, w_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"not a NAMM directory: {', '.join(missing)} missing")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt NAMM config {cfg_path}: {e}") from None
        expected = raw.pop("num_params", None)
        checksum = raw.pop("weights_sha256", None)
        norm_count = float(raw.pop("norm_count", 0.0))
        metadata = raw.pop("metadata", {})
        try:
            config = NAMMConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"NAMM config {cfg_path}: {e}") from None
        namm = cls(config)
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"corrupt NAMM weights {w_path}: {e}") from None
        if checksum is not None and _sha256(w_path) != checksum:
            raise ValueError(f"NAMM weights {w_path} do not match the checksum in {cfg_path}: the file is corrupt "
                             "or was changed after it was saved")
        state = {k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")}
        try:
            namm.scorer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"NAMM weights {w_path} do not match its config: {e}") from None
        if expected is not None and expected != namm.num_params:
            raise ValueError(f"{cfg_path} says {expected} parameters, the weights hold {namm.num_params}")
        if not torch.isfinite(namm.get_params()).all():
            raise ValueError(f"NAMM weights {w_path} contain NaN or inf")
        namm.norm_mean, namm.norm_var = tensors["norm.mean"], tensors["norm.var"]
        namm.norm_count = norm_count
        namm.metadata = metadata
        namm.source = str(directory)
        return namm


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

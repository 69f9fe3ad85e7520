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

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .features import RunningMoments, SpectrogramConfig, fold_rows, recency_embedding
from .policies import MemoryPolicy, StepInfo
from .scorers import build_scorer

CONFIG_NAME = "namm_config.json"
WEIGHTS_NAME = "namm.safetensors"
FORMAT_VERSION = 1


@dataclass
class NAMMConfig:
    scorer: str = "bam"                  # "bam" (paper) or "mlp"
    head_dim: int = 32                   # BAM attention head size
    mlp_hidden: list[int] = field(default_factory=lambda: [32])
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @staticmethod
    def from_dict(d: dict) -> "NAMMConfig":
        d = dict(d)
        d.pop("format_version", None)
        known = {"scorer", "head_dim", "mlp_hidden", "spectrogram", "norm_eps"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NAMM config fields: {sorted(unknown)}")
        spec = SpectrogramConfig(**d.pop("spectrogram", {}))
        return NAMMConfig(spectrogram=spec, **d)


class NAMM(MemoryPolicy):
    name = "namm"
    needs_attention = True

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
    @property
    def num_params(self) -> int:
        return self.scorer.num_params

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
    def observe(self, layer_idx, layer, attn, step: StepInfo):
        """Fold every complete hop block of attention rows into the keys' EMA spectrogram.

        aux["namm_rows"] [B, H, S, carry + pending] holds the carry rows of the previous
        window and any rows still short of a full hop (decoding adds one row at a time).
        """
        spec = self.spec
        held = layer.aux["namm_rows"]
        pending = held.shape[-1] - spec.carry
        if pending == 0 and attn.shape[-2] % spec.hop == 0:
            prefix, rows = held.transpose(-1, -2), attn          # fast path: no copy of attn
        else:
            both = torch.cat([held.transpose(-1, -2), attn], dim=-2)
            prefix, rows = both[..., :spec.carry, :], both[..., spec.carry:, :]
        k = rows.shape[-2] // spec.hop
        if k > 0:
            used = k * spec.hop
            first_col = step.processed - rows.shape[-2]  # column of the first new row
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
        normed = (ema - mean.to(ema.device)) / torch.sqrt(var.to(ema.device) + self.config.norm_eps)
        newest = layer.positions.masked_fill(~layer.valid, -1).amax(-1, keepdim=True)
        age = (newest - layer.positions).clamp(min=0)
        return torch.cat([recency_embedding(age, self.spec), normed], dim=-1)

    def score(self, layer) -> torch.Tensor:
        x = self.token_features(layer)
        B, H, S, D = x.shape
        device = next(self.scorer.parameters()).device
        scores = self.scorer(x.reshape(B * H, S, D).to(device), layer.positions.reshape(B * H, S).to(device),
                             layer.valid.reshape(B * H, S).to(device))
        return scores.view(B, H, S).to(x.device)

    def select(self, layer_idx, layer, step):
        scores = self.score(layer)
        newest = layer.positions.masked_fill(~layer.valid, -1).amax(-1, keepdim=True)
        return ((scores >= 0) | (layer.positions == newest)) & layer.valid

    def prefix_key(self) -> tuple:
        # observe() depends only on the spectrogram settings, never on the scorer's parameters
        return ("namm", tuple(sorted(asdict(self.spec).items())))

    def describe(self) -> str:
        return f"namm:{self.source}"

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
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"not a NAMM directory: {p} is missing")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt NAMM config {cfg_path}: {e}") from None
        expected = raw.pop("num_params", None)
        norm_count = float(raw.pop("norm_count", 0.0))
        metadata = raw.pop("metadata", {})
        namm = cls(NAMMConfig.from_dict(raw))
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"corrupt NAMM weights {w_path}: {e}") from None
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

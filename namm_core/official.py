"""Import NAMMs evolved with the official code (SakanaAI/evo-memory) from their `ckpt.pt`.

An official checkpoint is `{'evolution_state': {'mean', 'best_member', 'stored_buffers_to_save.*',
...}, 'iter_num', 'best_val_loss'}` written by torch.save. It is read with
`torch.load(weights_only=True)`: plain tensors and containers only, never arbitrary objects.

The flat parameter vector stores each linear block as W[in, out] row-major, then its bias:
- BAM (4,172): W_qkv[25, 96], b_qkv[96], W_o[32, 50], b_o[50], W_r[25, 1], b_r[1];
- MLP (865):   W_1[25, 32], b_1[32], W_2[32, 1], b_2[1].
nn.Linear stores W[out, in], so each block is transposed. q, k, v are consecutive 32-wide
blocks and the modulation outputs are (res, mult) on both sides. The features are in the
official order ([sin x 4, cos x 4] recency, then 17 spectrogram bins), which is this project's
NAMM format 2, so no permutation is needed. The normalisation statistics are the buffers whose
names end in `output_mean`, `output_var` and `output_num` (the frozen ones, not `online_new_*`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .namm import NAMM, NAMMConfig

FEATURES, HEAD_DIM, MLP_HIDDEN = 25, 32, 32
BAM_SIZE = FEATURES * 3 * HEAD_DIM + 3 * HEAD_DIM + HEAD_DIM * 2 * FEATURES + 2 * FEATURES + FEATURES + 1
MLP_SIZE = FEATURES * MLP_HIDDEN + MLP_HIDDEN + MLP_HIDDEN + 1
BUFFER_PREFIX = "stored_buffers_to_save."


def load_official_checkpoint(path, which: str = "mean") -> NAMM:
    """A NAMM (format 2, score >= 0) that scores as the official code would with this checkpoint."""
    path = Path(path)
    if which not in ("mean", "best"):
        raise ValueError(f"which={which!r}: expected 'mean' (the CMA mean, as the paper evaluates) or 'best'")
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals and corrupt files come in many types
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        what = f"it holds a {refused.group(1)}, which is not a tensor, a container or a numpy number" if refused \
            else f"{type(e).__name__}: a corrupt file, or objects other than tensors"
        raise ValueError(f"{path}: not a checkpoint of plain tensors that torch.load(weights_only=True) "
                         f"accepts ({what})") from None
    state = ckpt.get("evolution_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no 'evolution_state' dict; an official NAMM checkpoint holds "
                         "{'evolution_state': {'mean', 'best_member', 'stored_buffers_to_save.*', ...}, ...}")
    key = "mean" if which == "mean" else "best_member"
    if key not in state:
        raise ValueError(f"{path}: evolution_state has no {key!r} (keys: {sorted(state)[:12]})")
    theta = torch.as_tensor(state[key]).detach().double().flatten().numpy()
    if theta.size == BAM_SIZE:
        config, vector = NAMMConfig(scorer="bam", head_dim=HEAD_DIM), _bam_vector(theta)
    elif theta.size == MLP_SIZE:
        config, vector = NAMMConfig(scorer="mlp", mlp_hidden=[MLP_HIDDEN]), _mlp_vector(theta)
    else:
        raise ValueError(f"{path}: evolution_state[{key!r}] has {theta.size} parameters; the paper's BAM scorer "
                         f"has {BAM_SIZE} and its MLP scorer {MLP_SIZE} (other scorers are not supported)")
    if not np.isfinite(theta).all():
        raise ValueError(f"{path}: evolution_state[{key!r}] holds NaN or inf")
    mean, var, count = _statistics(state, path)
    namm = NAMM.from_vector(vector, {"mean": mean, "var": var, "count": count}, config)
    namm.source = str(path)
    namm.metadata = {"imported_from": str(path), "which": which, "iter_num": _plain(ckpt.get("iter_num")),
                     "best_val_loss": _plain(ckpt.get("best_val_loss"))}
    return namm


def _numpy_scalar_globals() -> list:
    """What unpickling the official trainer's numpy numbers needs, and nothing more: its
    `best_val_loss` is `np.mean(...) / 100`, a numpy.float64, pickled as
    numpy.core.multiarray.scalar(dtype, bytes) by numpy 1 and numpy._core.multiarray.scalar by numpy 2."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)       # numpy >= 1.25 pickles a dtype through its class
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")]
    return allowed


def _bam_vector(theta: np.ndarray) -> np.ndarray:
    blocks = _split(theta, [(FEATURES, 3 * HEAD_DIM), (3 * HEAD_DIM,), (HEAD_DIM, 2 * FEATURES), (2 * FEATURES,),
                            (FEATURES, 1), (1,)])
    w_qkv, b_qkv, w_o, b_o, w_r, b_r = blocks
    # nn.Linear order: qkv.weight [96, 25], qkv.bias, modulation.weight [50, 32], .bias, readout.weight [1, 25], .bias
    return np.concatenate([w_qkv.T.ravel(), b_qkv, w_o.T.ravel(), b_o, w_r.T.ravel(), b_r]).astype(np.float32)


def _mlp_vector(theta: np.ndarray) -> np.ndarray:
    w_1, b_1, w_2, b_2 = _split(theta, [(FEATURES, MLP_HIDDEN), (MLP_HIDDEN,), (MLP_HIDDEN, 1), (1,)])
    return np.concatenate([w_1.T.ravel(), b_1, w_2.T.ravel(), b_2]).astype(np.float32)


def _split(theta: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    out, i = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(theta[i:i + n].reshape(shape))
        i += n
    assert i == theta.size
    return out


def _statistics(state: dict, path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The frozen normalisation buffers (suffixes output_mean / output_var / output_num)."""
    found = {}
    for suffix in ("output_mean", "output_var", "output_num"):
        keys = [k for k in state if k.startswith(BUFFER_PREFIX) and k.endswith(suffix) and "online_new" not in k]
        values = {k: torch.as_tensor(state[k]).detach().double().flatten() for k in keys}
        distinct = {tuple(v.tolist()) for v in values.values()}
        if not keys:
            raise ValueError(f"{path}: no normalisation buffer '{BUFFER_PREFIX}<module>_{suffix}' in evolution_state")
        if len(distinct) > 1:
            raise ValueError(f"{path}: several different '{suffix}' buffers ({sorted(keys)}): cannot tell which "
                             "the scorer uses")
        found[suffix] = next(iter(values.values())).numpy()
    mean, var = found["output_mean"], found["output_var"]
    if mean.size != 17 or var.size != 17:
        raise ValueError(f"{path}: normalisation buffers hold {mean.size} / {var.size} values; "
                         "the paper's spectrogram has 17 frequency bins")
    return mean.astype(np.float32), var.astype(np.float32), float(found["output_num"].ravel()[0])


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value

"""`namm import-official`: a checkpoint in the official layout, built here, scores as the official
formulas say (re-computed independently in numpy, in the official parameter layout)."""
import math

import numpy as np
import pytest
import torch

from namm_cli.cli import main as cli
from namm_core import NAMM
from namm_core.cache import MemoryLayer
from namm_core.official import load_official_checkpoint

PREFIX = "stored_buffers_to_save."


class ArbitraryObject:
    pass


def _official_checkpoint(path, theta_mean, theta_best, mean, var, num=1000.0, extra_state=None, numpy1=False):
    """Saved as the official trainer saves it: torch.save of tensors, its iteration count, and its
    best validation loss as a numpy.float64 (`np.mean(...) / 100`). numpy1: the pickle a numpy 1
    trainer writes (numpy.core.multiarray.scalar), in torch's legacy file format."""
    state = {"mean": torch.tensor(theta_mean), "best_member": torch.tensor(theta_best),
             PREFIX + "memory_policy.token_embedding_output_mean": torch.tensor(mean).view(1, 1, 17),
             PREFIX + "memory_policy.token_embedding_output_var": torch.tensor(var).view(1, 1, 17),
             PREFIX + "memory_policy.token_embedding_output_num": torch.tensor([num]),
             PREFIX + "memory_policy.token_embedding_online_new_output_mean": torch.zeros(1, 1, 17)}
    state.update(extra_state or {})
    ckpt = {"evolution_state": state, "iter_num": 200, "best_val_loss": np.mean(np.array([-52.0, -48.0])) / 100}
    if not numpy1:
        torch.save(ckpt, path)
        return path
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    return path


def official_bam_scores(theta, x):
    """The paper's BAM in the official layout: x [S, 25] oldest..newest -> scores [S] (numpy, float64)."""
    i = 0

    def take(*shape):
        nonlocal i
        n = int(np.prod(shape))
        out = theta[i:i + n].reshape(shape)
        i += n
        return out
    w_qkv, b_qkv, w_o, b_o, w_r, b_r = take(25, 96), take(96), take(32, 50), take(50), take(25, 1), take(1)
    qkv = x @ w_qkv + b_qkv
    q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
    logits = q @ k.T / math.sqrt(32)
    S = x.shape[0]
    allowed = np.arange(S)[None, :] >= np.arange(S)[:, None]   # token i sees itself and newer tokens
    logits = np.where(allowed, logits, -np.inf)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = (att @ v) @ w_o + b_o
    res, mult = out[:, :25], out[:, 25:]
    return ((x * (1 + mult) + res) @ w_r + b_r)[:, 0]


def official_mlp_scores(theta, x):
    w1, b1 = theta[:800].reshape(25, 32), theta[800:832]
    w2, b2 = theta[832:864].reshape(32, 1), theta[864:]
    return (np.maximum(x @ w1 + b1, 0) @ w2 + b2)[:, 0]


def official_features(ema, age, mean, var):
    """[S, 25]: recency [sin(a w_0..3), cos(a w_0..3)], w_i = 50000**(-i/4); then (ema - mean) / max(std, 1e-7)."""
    freqs = 50000.0 ** (-np.arange(4) / 4)
    angles = age[:, None].astype(np.float64) * freqs
    normed = (ema - mean) / np.maximum(np.sqrt(var), 1e-7)
    return np.concatenate([np.sin(angles), np.cos(angles), normed], axis=1)


def _layer_with(namm, ema):
    S = ema.shape[0]
    layer = MemoryLayer()
    kv = torch.zeros(1, 1, S, 4)
    cols = torch.arange(S).view(1, S)
    layer.append(kv, kv, cols, torch.ones(1, S, dtype=torch.bool), cols, namm.aux_shapes)
    layer.aux["namm_ema"] = torch.tensor(ema, dtype=torch.float32).view(1, 1, S, 17)
    return layer


@pytest.mark.parametrize("which", ["mean", "best"])
def test_imported_bam_scores_as_the_official_formulas(tmp_path, which):
    rng = np.random.default_rng(0)
    theta_mean, theta_best = rng.normal(0, 0.1, 4172), rng.normal(0, 0.1, 4172)
    mean, var = rng.uniform(0, 0.02, 17), rng.uniform(1e-5, 1e-2, 17)
    ckpt = _official_checkpoint(tmp_path / "ckpt.pt", theta_mean, theta_best, mean, var)
    assert cli(["import-official", str(ckpt), str(tmp_path / "namm"), "--which", which]) == 0
    namm = NAMM.from_pretrained(tmp_path / "namm")
    assert namm.config.format_version == 2 and namm.config.scorer == "bam" and namm.norm_count == 1000.0
    theta = theta_mean if which == "mean" else theta_best
    ema = rng.uniform(0, 0.05, (40, 17))
    layer = _layer_with(namm, ema)
    expected_x = official_features(ema, 39 - np.arange(40), mean, var)
    got_x = namm.token_features(layer)[0, 0].double().numpy()
    assert np.allclose(got_x, expected_x, atol=1e-4, rtol=1e-5)
    expected = official_bam_scores(theta, expected_x)
    got = namm.score(layer)[0, 0].detach().double().numpy()
    assert np.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected).max() > 0.05   # a non-trivial comparison
    keep = namm.select(0, layer, None)[0, 0].numpy()
    assert (keep == ((expected >= 0) | (np.arange(40) == 39))).all()
    assert namm.metadata["iter_num"] == 200 and namm.metadata["which"] == which


def test_imported_mlp_scores_as_the_official_formulas(tmp_path):
    rng = np.random.default_rng(1)
    theta = rng.normal(0, 0.3, 865)
    mean, var = rng.uniform(0, 0.02, 17), rng.uniform(1e-5, 1e-2, 17)
    namm = load_official_checkpoint(_official_checkpoint(tmp_path / "c.pt", theta, theta, mean, var))
    assert namm.config.scorer == "mlp"
    ema = rng.uniform(0, 0.05, (30, 17))
    layer = _layer_with(namm, ema)
    x = official_features(ema, 29 - np.arange(30), mean, var)
    assert np.allclose(namm.score(layer)[0, 0].detach().double().numpy(), official_mlp_scores(theta, x), atol=1e-4, rtol=1e-4)


def test_import_refuses_bad_checkpoints(tmp_path):
    rng = np.random.default_rng(2)
    mean, var = rng.uniform(0, 0.02, 17), rng.uniform(1e-5, 1e-2, 17)
    with pytest.raises(ValueError, match="1000 parameters"):
        load_official_checkpoint(_official_checkpoint(tmp_path / "a.pt", np.zeros(1000), np.zeros(1000), mean, var))
    torch.save({"evolution_state": {"best_member": torch.zeros(4172)}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="no 'mean'"):
        load_official_checkpoint(tmp_path / "b.pt")
    torch.save({"something": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="no 'evolution_state'"):
        load_official_checkpoint(tmp_path / "c.pt")
    torch.save({"evolution_state": {"mean": torch.zeros(4172)}}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="output_mean"):
        load_official_checkpoint(tmp_path / "d.pt")
    # an object torch.load(weights_only=True) must refuse to unpickle: named in the error
    torch.save({"evolution_state": {"mean": torch.zeros(4172), "optimizer": ArbitraryObject()}}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="weights_only.*ArbitraryObject, which is not a tensor"):
        load_official_checkpoint(tmp_path / "e.pt")
    # numpy numbers are allowed, numpy arrays (other reconstructors) are not
    torch.save({"evolution_state": {"mean": np.zeros(4172)}}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match=r"holds a numpy\._core\.multiarray\._reconstruct"):
        load_official_checkpoint(tmp_path / "g.pt")
    (tmp_path / "f.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_official_checkpoint(tmp_path / "f.pt")
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pt")
    assert cli(["import-official", str(tmp_path / "c.pt"), str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("numpy1", [False, True])
def test_a_checkpoint_saved_as_the_official_trainer_saves_it_imports(tmp_path, numpy1):
    """Its best_val_loss is a numpy.float64 (numpy 1 or 2 pickle); plain weights_only refuses it."""
    theta = np.random.default_rng(0).normal(size=4172) * 0.1
    path = _official_checkpoint(tmp_path / "ckpt.pt", theta, theta, np.zeros(17), np.ones(17), numpy1=numpy1)
    with pytest.raises(Exception, match="scalar"):
        torch.load(path, weights_only=True)
    namm = load_official_checkpoint(path)
    assert namm.metadata["best_val_loss"] == pytest.approx(-0.5) and namm.metadata["iter_num"] == 200
    assert cli(["import-official", str(path), str(tmp_path / "out")]) == 0
    assert NAMM.from_pretrained(tmp_path / "out").metadata["best_val_loss"] == pytest.approx(-0.5)

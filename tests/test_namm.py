"""The NAMM as published: features, scorer, parameter vector, persistence, bad input."""
import json
import math

import pytest
import torch
from conftest import tiny_model
from reference import bam_reference_forward, reference_ema_features

from namm_core.cache import MemoryLayer
from namm_core.features import SpectrogramConfig, recency_embedding
from namm_core.generation import MemoryManagedLM
from namm_core.namm import NAMM, NAMMConfig
from namm_core.policies import StepInfo
from namm_core.registry import parse_policy
from namm_core.scorers import BAMScorer


def _stream_features(attn, chunks, namm):
    """Feed attention rows [Q, S] (key s arrives at row s) through NAMM.observe in chunks."""
    layer, pos = MemoryLayer(), 0
    for c in chunks:
        kv = torch.zeros(1, 1, c, 4)
        cols = torch.arange(pos, pos + c).view(1, c)
        layer.append(kv, kv, cols, torch.ones(1, c, dtype=torch.bool), cols, namm.aux_shapes)
        rows = attn[pos:pos + c, :pos + c].reshape(1, 1, c, pos + c)
        namm.observe(0, layer, rows, StepInfo(seen=torch.tensor([pos + c]), processed=pos + c,
                                              query_positions=cols, query_valid=torch.ones(1, c, dtype=torch.bool),
                                              next_update=10**9))
        pos += c
    return layer


@pytest.mark.parametrize("chunks", [[64, 64], [16] * 8, [24, 24, 40, 7, 9, 1, 1, 1, 1, 1, 1, 4, 14], [128]])
def test_streaming_spectrogram_ema_equals_plain_stft(chunks):
    torch.manual_seed(0)
    Q = sum(chunks)
    attn = torch.rand(Q, Q).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    namm = NAMM()
    layer = _stream_features(attn, chunks, namm)
    done = (Q // 16) * 16  # rows short of a full hop are still pending
    expected = reference_ema_features(attn[:done, :], torch.arange(Q), namm.spec)
    assert torch.allclose(layer.aux["namm_ema"][0, 0], expected, atol=1e-5)
    assert expected[:done].abs().max() > 1e-3  # non-trivial


def _plain_recency(age: int, d: int = 8, max_freq: float = 50000.0) -> tuple[list[float], list[float]]:
    """sin and cos of age * max_freq**(-2i/d), i < d/2, in Python floats (float64)."""
    freqs = [max_freq ** (-2 * i / d) for i in range(d // 2)]
    return [math.sin(age * w) for w in freqs], [math.cos(age * w) for w in freqs]


def test_recency_embedding_official_layout_in_float64():
    """Format 2 (the official code): [sin x 4, cos x 4], the table computed in float64 then cast."""
    cfg = SpectrogramConfig()
    ages = [0, 7, 1000, 32768]
    emb = recency_embedding(torch.tensor(ages), cfg)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    for row, age in zip(emb, ages):
        sin, cos = _plain_recency(age)
        expected = torch.tensor(sin + cos, dtype=torch.float64).float()
        assert torch.equal(row, expected)   # bit-exact: float64 maths, then one rounding


def test_recency_embedding_legacy_layout_interleaved():
    """Format 1 (NAMMs saved before format 2): sin/cos interleaved, computed in float32."""
    cfg = SpectrogramConfig()
    ages = [0, 7, 1000]
    emb = recency_embedding(torch.tensor(ages), cfg, interleaved=True)
    for row, age in zip(emb, ages):
        sin, cos = _plain_recency(age)
        expected = [v for pair in zip(sin, cos) for v in pair]
        assert torch.allclose(row, torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    # at large ages float32 arithmetic is measurably off the float64 table (the official one)
    far = recency_embedding(torch.tensor([32768]), cfg, interleaved=True)[0]
    sin, cos = _plain_recency(32768)
    assert (far - torch.tensor([v for pair in zip(sin, cos) for v in pair])).abs().max() > 1e-5


def test_normalisation_conventions_by_format_version():
    """Format 2: (x - mean) / max(std, 1e-7); format 1: (x - mean) / sqrt(var + 1e-6)."""
    from namm_core.cache import MemoryLayer

    layer = MemoryLayer()
    kv = torch.zeros(1, 1, 3, 4)
    cols = torch.arange(3).view(1, 3)
    for version in (1, 2):
        namm = NAMM(NAMMConfig(format_version=version))
        layer = MemoryLayer()
        layer.append(kv, kv, cols, torch.ones(1, 3, dtype=torch.bool), cols, namm.aux_shapes)
        ema = torch.rand(1, 1, 3, 17, dtype=torch.float32)
        layer.aux["namm_ema"] = ema.clone()
        namm.norm_mean = torch.full((17,), 0.01)
        namm.norm_var = torch.linspace(1e-16, 1e-2, 17)
        got = namm.token_features(layer)[0, 0, :, 8:]
        for b in range(17):
            var, mean = float(namm.norm_var[b]), float(namm.norm_mean[b])
            denom = max(math.sqrt(var), 1e-7) if version == 2 else math.sqrt(var + 1e-6)
            want = (ema[0, 0, :, b].double() - mean) / denom
            assert torch.allclose(got[:, b].double(), want, rtol=1e-5, atol=1e-6), (version, b)


def test_legacy_namm_config_without_version_loads_as_version_1(tmp_path):
    namm = NAMM(NAMMConfig(format_version=1))
    namm.save_pretrained(tmp_path / "n")
    raw = json.loads((tmp_path / "n" / "namm_config.json").read_text())
    assert raw["format_version"] == 1
    del raw["format_version"]   # written before versions were recorded
    (tmp_path / "n" / "namm_config.json").write_text(json.dumps(raw))
    assert NAMM.from_pretrained(tmp_path / "n").config.format_version == 1
    assert NAMM().config.format_version == 2
    with pytest.raises(ValueError, match="format_version 3"):
        NAMMConfig(format_version=3)


def test_paper_configuration_has_4172_parameters_and_starts_at_zero():
    namm = NAMM()
    assert namm.num_params == 4172
    assert torch.count_nonzero(namm.get_params()) == 0
    assert NAMM(NAMMConfig(scorer="mlp", mlp_hidden=[16])).num_params == 25 * 16 + 16 + 16 + 1


def test_bam_backward_mask_matches_dense_reference():
    torch.manual_seed(1)
    scorer = BAMScorer()
    scorer.set_flat(torch.randn(scorer.num_params) * 0.3)
    x = torch.randn(3, 40, 25)
    positions = torch.arange(40).expand(3, 40)
    valid = torch.rand(3, 40) > 0.3
    fast, ref = scorer(x, positions, valid), bam_reference_forward(scorer, x, positions, valid)
    assert torch.allclose(fast[valid], ref[valid], rtol=1e-4, atol=1e-3)
    # backward mask: changing the oldest token cannot change the newest token's score
    x2 = x.clone()
    x2[:, 0] += 5.0
    valid_all = torch.ones(3, 40, dtype=torch.bool)
    assert torch.allclose(scorer(x, positions, valid_all)[:, -1], scorer(x2, positions, valid_all)[:, -1], atol=1e-5)
    assert not torch.allclose(scorer(x, positions, valid_all)[:, 0], scorer(x2, positions, valid_all)[:, 0])


@pytest.mark.parametrize("keys", ["recent", "band"])
@pytest.mark.parametrize("window", [1, 5, 16, 39])
def test_bam_window_matches_dense_reference(window, keys):
    torch.manual_seed(2)
    scorer = BAMScorer()
    scorer.set_flat(torch.randn(scorer.num_params) * 0.3)
    x = torch.randn(3, 41, 25)
    positions = torch.arange(41).expand(3, 41)
    valid = torch.rand(3, 41) > 0.3
    valid[0] = True   # one row with every slot held
    fast = scorer(x, positions, valid, window=window, window_keys=keys)
    ref = bam_reference_forward(scorer, x, positions, valid, window=window, keys=keys)
    assert torch.allclose(fast[valid], ref[valid], rtol=1e-4, atol=1e-4)
    # the window changes what the oldest tokens see, so it is not the unwindowed BAM
    full = scorer(x, positions, valid)
    assert not torch.allclose(fast[valid], full[valid], atol=1e-4)


def test_attention_with_log_sum_exp_fused_equals_plain():
    from namm_core.scorers import attention_with_lse

    torch.manual_seed(4)
    q, k, v = torch.randn(3, 70, 8), torch.randn(3, 20, 8), torch.randn(3, 20, 8)
    logits = q @ k.transpose(-1, -2) * 0.3
    expected_out, expected_lse = torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)
    for fused in (True, False):
        out, lse = attention_with_lse(q, k, v, 0.3, fused=fused)
        assert torch.allclose(out, expected_out, atol=1e-5) and torch.allclose(lse, expected_lse, atol=1e-5)
    # causal, with two batch dimensions: query i sees keys j <= i
    q4, k4, v4 = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    logits = (q4 @ k4.transpose(-1, -2) * 0.3).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    for fused in (True, False):
        out, lse = attention_with_lse(q4, k4, v4, 0.3, causal=True, fused=fused)
        assert torch.allclose(out, torch.softmax(logits, -1) @ v4, atol=1e-5)
        assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)


def test_bam_window_at_least_the_cache_is_the_paper_bam():
    torch.manual_seed(3)
    scorer = BAMScorer()
    scorer.set_flat(torch.randn(scorer.num_params) * 0.3)
    x, positions, valid = torch.randn(2, 30, 25), torch.arange(30).expand(2, 30), torch.ones(2, 30, dtype=torch.bool)
    for keys in ("recent", "band"):
        assert torch.equal(scorer(x, positions, valid, window=30, window_keys=keys), scorer(x, positions, valid))
    # with "recent", the window's own tokens see exactly what they see without a window
    assert torch.allclose(scorer(x, positions, valid, window=8)[:, -8:], scorer(x, positions, valid)[:, -8:], atol=1e-5)


def test_distillation_scores_with_the_namms_window():
    """A fit trains the scorer as the NAMM runs it: with its BAM window."""
    from namm_core.distill import model_wide_scores

    torch.manual_seed(5)
    namm = NAMM(NAMMConfig(bam_window=4))
    namm.set_params(torch.randn(namm.num_params) * 0.3)
    n, R, S = 2, 3, 20
    x, valid = torch.randn(n, R, S, 25), torch.ones(n, S, dtype=torch.bool)
    positions = torch.arange(S).expand(n, S)
    expected = torch.stack([namm.scorer(x[j], positions[j].expand(R, S), valid[j].expand(R, S), window=4).mean(0)
                            for j in range(n)])
    got = model_wide_scores(namm, x, valid, positions)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, model_wide_scores(namm.with_bam_window(None), x, valid, positions), atol=1e-4)


def test_bam_window_options_in_config_and_policy_specs():
    namm = parse_policy("namm@0.25/window=256/keys=band")
    assert (namm.config.bam_window, namm.config.bam_window_keys) == (256, "band")
    assert namm.describe().endswith("@0.25/window=256/keys=band")
    assert parse_policy("namm@0.5/window=64").config.bam_window_keys == "recent"
    with pytest.raises(ValueError, match="window"):
        parse_policy("namm@0.5/keys=band")
    with pytest.raises(ValueError, match="bam_window_keys"):
        parse_policy("namm@0.5/window=64/keys=sideways")
    with pytest.raises(ValueError, match="bam_window must be a positive integer"):
        NAMMConfig(bam_window=0)
    with pytest.raises(ValueError, match="BAM scorer only"):
        NAMMConfig(scorer="mlp", bam_window=64)


def test_flat_parameter_vector_round_trip_and_errors():
    namm = NAMM()
    vec = torch.randn(namm.num_params)
    namm.set_params(vec)
    assert torch.equal(namm.get_params(), vec)
    with pytest.raises(ValueError, match="4171 values"):
        namm.set_params(torch.zeros(4171))
    bad = vec.clone()
    bad[5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        namm.set_params(bad)


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(2)
    namm = NAMM()
    namm.set_params(torch.randn(namm.num_params))
    namm.norm_mean, namm.norm_var = torch.rand(17), torch.rand(17) + 0.5
    namm.save_pretrained(tmp_path / "n", metadata={"note": "test"})
    assert not list(tmp_path.glob(".n.*")), "no temporary directory left behind"
    loaded = NAMM.from_pretrained(tmp_path / "n")
    assert torch.equal(loaded.get_params(), namm.get_params())
    assert torch.equal(loaded.norm_mean, namm.norm_mean) and torch.equal(loaded.norm_var, namm.norm_var)
    assert loaded.metadata == {"note": "test"}
    # same decisions on a model
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(3))
    a = MemoryManagedLM(model, namm, update_every=16).generate(ids, max_new_tokens=4)
    b = MemoryManagedLM(model, loaded, update_every=16).generate(ids, max_new_tokens=4)
    assert torch.equal(a.stats.kept_per_layer_head, b.stats.kept_per_layer_head)
    assert torch.equal(a.sequences, b.sequences)
    # saving again over an existing directory replaces the NAMM atomically and keeps the rest
    (tmp_path / "n" / "README.md").write_text("model card")
    (tmp_path / "n" / "plots").mkdir()
    (tmp_path / "n" / "plots" / "fitness.png").write_bytes(b"png")
    other = NAMM().set_params(torch.ones(namm.num_params))
    other.save_pretrained(tmp_path / "n")
    assert torch.equal(NAMM.from_pretrained(tmp_path / "n").get_params(), torch.ones(namm.num_params))
    assert (tmp_path / "n" / "README.md").read_text() == "model card"
    assert (tmp_path / "n" / "plots" / "fitness.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n"], "no backup or temporary directory left"


def test_corrupt_namm_directory_errors_name_the_file(tmp_path):
    NAMM().save_pretrained(tmp_path / "n")
    with pytest.raises(FileNotFoundError, match="namm.safetensors"):
        (tmp_path / "n" / "namm.safetensors").rename(tmp_path / "moved")
        NAMM.from_pretrained(tmp_path / "n")
    (tmp_path / "moved").rename(tmp_path / "n" / "namm.safetensors")
    weights = tmp_path / "n" / "namm.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt NAMM weights"):
        NAMM.from_pretrained(tmp_path / "n")
    NAMM().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "namm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt NAMM config"):
        NAMM.from_pretrained(tmp_path / "m")
    NAMM().save_pretrained(tmp_path / "k")
    cfg = json.loads((tmp_path / "k" / "namm_config.json").read_text())
    cfg["head_dim"] = 16
    (tmp_path / "k" / "namm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match its config"):
        NAMM.from_pretrained(tmp_path / "k")


def test_normalisation_statistics_collected_then_frozen():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(4))
    namm = NAMM()
    lm = MemoryManagedLM(model, namm, update_every=32)
    with namm.collecting_statistics():
        lm.generate(ids, max_new_tokens=2)
    assert namm.norm_count > 0 and not torch.equal(namm.norm_mean, torch.zeros(17))
    frozen = namm.norm_mean.clone()
    lm.generate(ids[:, :50], max_new_tokens=2)
    assert torch.equal(namm.norm_mean, frozen)


def test_random_namm_evicts_and_newest_token_is_kept():
    """A NAMM that scores most tokens below zero still keeps the newest token of every head."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 128), generator=torch.Generator().manual_seed(5))
    namm = NAMM()
    namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():
        namm.scorer.readout.bias.fill_(-50.0)          # every score far below zero
    checked = []
    original = namm.select

    def spy(layer_idx, layer, step):
        keep = original(layer_idx, layer, step)
        newest = layer.positions.masked_fill(~layer.valid, -1).amax(-1, keepdim=True)
        assert keep[layer.positions == newest].all()
        assert (keep.sum(-1) == 1).all()                 # nothing else survives these scores
        checked.append(layer_idx)
        return keep

    namm.select = spy
    out = MemoryManagedLM(model, namm, update_every=32).generate(ids, max_new_tokens=1)
    assert checked and out.stats.mean_retention < 0.1


@pytest.mark.parametrize("T,chunk", [(70, 16), (70, 32), (32, 8), (20, 32)])
def test_shared_prefix_gives_the_same_generation_as_a_full_run(T, chunk):
    """Candidates resumed from one stored pre-update state equal runs from scratch."""
    model = tiny_model()
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    source = NAMM()
    prefix = MemoryManagedLM(model, source, update_every=32, chunk_size=chunk).shared_prefix(ids)
    for seed in (4, 6):   # scorers that evict on this prompt
        namm = NAMM().set_params(torch.randn(source.num_params, generator=torch.Generator().manual_seed(seed)))
        lm = MemoryManagedLM(model, namm, update_every=32, chunk_size=chunk)
        plain = lm.generate(ids, max_new_tokens=6)
        shared = lm.generate(ids, max_new_tokens=6, prefix=prefix)
        assert torch.equal(plain.sequences, shared.sequences)
        assert torch.equal(plain.stats.kept_per_layer_head, shared.stats.kept_per_layer_head)
        assert plain.stats.updates == shared.stats.updates
        if T > 32:
            assert plain.stats.mean_retention < 1.0  # the candidates really evict after the prefix
    # the stored state is untouched by the candidates that used it
    again = MemoryManagedLM(model, namm, update_every=32, chunk_size=chunk).generate(ids, max_new_tokens=6, prefix=prefix)
    assert torch.equal(again.sequences, shared.sequences)


def test_shared_prefix_refuses_another_prompt_or_policy():
    from namm_core.policies import H2O

    model = tiny_model()
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    prefix = MemoryManagedLM(model, NAMM(), update_every=16).shared_prefix(ids)
    with pytest.raises(ValueError, match="different prompt"):
        MemoryManagedLM(model, NAMM(), update_every=16).generate(ids.flip(-1), prefix=prefix)
    with pytest.raises(ValueError, match="update_every"):
        MemoryManagedLM(model, NAMM(), update_every=32).generate(ids, prefix=prefix)
    with pytest.raises(ValueError, match="shared prefix was computed for"):
        MemoryManagedLM(model, H2O(0.5), update_every=16).generate(ids, prefix=prefix)
    # the two row captures round the outputs differently: a prefix continues only its own
    with pytest.raises(ValueError, match="row_capture='inline', not 'separate'"):
        MemoryManagedLM(model, NAMM(), update_every=16, row_capture="separate").generate(ids, prefix=prefix)
    with pytest.raises(ValueError, match="does not support"):
        MemoryManagedLM(model, H2O(0.5), update_every=16).shared_prefix(ids)


@pytest.mark.parametrize("n_fft,hop,k", [(32, 16, 7), (32, 16, 1), (64, 16, 7), (64, 16, 2), (16, 8, 5)])
@pytest.mark.parametrize("late_keys", ["none", "random", "appended"])
def test_folding_rows_frame_by_frame_equals_folding_all_frames_at_once(n_fft, hop, k, late_keys):
    from namm_core.features import fold_frames, fold_rows, frame_magnitudes

    cfg = SpectrogramConfig(n_fft=n_fft, hop=hop)
    g = torch.Generator().manual_seed(n_fft + hop + k)
    S = 50
    prefix, rows = torch.rand(2, 3, cfg.carry, S, generator=g), torch.rand(2, 3, k * hop, S, generator=g)
    ema = torch.rand(2, 3, S, cfg.n_freq, generator=g)
    # old keys (first frame <= 0) everywhere, or keys arriving during the rows in the last columns
    first = torch.randint(-3, 1, (2, 3, S), generator=g)
    if late_keys == "random":     # per row, in any order: the general mask
        first[..., S - 12:] = torch.randint(-1, k + 2, (2, 3, 12), generator=g)
    elif late_keys == "appended":  # as the cache appends them: same in every row, ascending
        first[..., S - 12:] = torch.sort(torch.randint(-1, k + 2, (12,), generator=g)).values
    expected = fold_frames(ema, frame_magnitudes(prefix, rows, cfg), first, cfg)
    # the carry rows as a transposed view, the way the NAMM stores them
    prefix_view = prefix.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.allclose(fold_rows(ema, prefix_view, rows, first, cfg), expected, atol=1e-5)
    if late_keys != "none" and k > 1:  # the mask matters: without it the result differs
        assert not torch.allclose(fold_rows(ema, prefix, rows, torch.zeros_like(first), cfg), expected, atol=1e-5)


def test_flipped_weight_bytes_are_refused_by_the_checksum(tmp_path):
    namm = NAMM().set_params(torch.randn(4172, generator=torch.Generator().manual_seed(0)))
    namm.save_pretrained(tmp_path / "n")
    assert "weights_sha256" in json.loads((tmp_path / "n" / "namm_config.json").read_text())
    NAMM.from_pretrained(tmp_path / "n")
    data = bytearray((tmp_path / "n" / "namm.safetensors").read_bytes())
    data[-100] ^= 0x40                      # one bit of one weight: still a valid safetensors file
    (tmp_path / "n" / "namm.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checksum"):
        NAMM.from_pretrained(tmp_path / "n")


def test_a_namm_config_with_an_unknown_field_names_the_file(tmp_path):
    NAMM().save_pretrained(tmp_path / "n")
    path = tmp_path / "n" / "namm_config.json"
    raw = json.loads(path.read_text())
    raw["colour"] = "blue"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{path}.*colour"):
        NAMM.from_pretrained(tmp_path / "n")


def test_format_1_namm_scores_with_the_legacy_formulas():
    """A NAMM saved under format 1 (namms/smollm2-threshold) decides exactly as before format 2 existed:
    interleaved float32 recency, (x - mean) / sqrt(var + 1e-6), re-computed here by hand."""
    from namm_core.cache import MemoryLayer
    from namm_core.registry import DEFAULT_NAMM_DIR

    namm = NAMM.from_pretrained(DEFAULT_NAMM_DIR.parent / "smollm2-threshold")
    assert namm.config.format_version == 1
    S = 48
    g = torch.Generator().manual_seed(3)
    ema = torch.rand(1, 1, S, 17, generator=g) * 0.05
    layer = MemoryLayer()
    kv = torch.zeros(1, 1, S, 4)
    cols = torch.arange(S).view(1, S)
    layer.append(kv, kv, cols, torch.ones(1, S, dtype=torch.bool), cols, namm.aux_shapes)
    layer.aux["namm_ema"] = ema.clone()
    age = (S - 1 - torch.arange(S)).float()
    freqs = 50000.0 ** (-2.0 * torch.arange(4, dtype=torch.float32) / 8)
    angles = age[:, None] * freqs
    recency = torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)          # sin, cos interleaved
    normed = (ema[0, 0] - namm.norm_mean) / torch.sqrt(namm.norm_var + 1e-6)
    x = torch.cat([recency, normed], -1)
    with torch.no_grad():
        expected = bam_reference_forward(namm.scorer, x[None], torch.arange(S)[None],
                                         torch.ones(1, S, dtype=torch.bool))[0]
        got = namm.score(layer)[0, 0]
        # with a window the NAMM passes it to its scorer: the reference with the same window
        windowed = bam_reference_forward(namm.scorer, x[None], torch.arange(S)[None],
                                         torch.ones(1, S, dtype=torch.bool), window=8, keys="band")[0]
        got_windowed = namm.with_bam_window(8, "band").score(layer)[0, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got >= 0).any() and (got < 0).any()
    assert torch.allclose(got_windowed, windowed, atol=1e-5) and not torch.allclose(got_windowed, got, atol=1e-5)


def test_running_moments_merge_equals_one_pass():
    from namm_core.features import RunningMoments

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 17, generator=g) * (i + 1) + i for i, n in enumerate((50, 7, 300))]
    whole = RunningMoments(17)
    whole.update(torch.cat(parts))
    merged = RunningMoments(17)
    for p in parts:
        one = RunningMoments(17)
        one.update(p)
        merged.merge(RunningMoments.from_stats(**one.stats()))
    assert merged.count == whole.count == 357
    assert torch.allclose(merged.mean, whole.mean, atol=1e-5) and torch.allclose(merged.var, whole.var, rtol=1e-5)
    assert merged.merge(RunningMoments(17)).count == 357    # merging nothing changes nothing


def test_a_reset_layer_reads_rows_as_a_fresh_one():
    """Rows not captured before a read count as zero attention; after `reset` a layer must not
    remember how far rows were read in its earlier life (or it would skip that zero fold)."""
    torch.manual_seed(0)
    Q = 128
    attn = torch.rand(Q, Q).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    namm = NAMM()

    def read_last_rows(layer):
        kv = torch.zeros(1, 1, Q, 4)
        cols = torch.arange(Q).view(1, Q)
        layer.append(kv, kv, cols, torch.ones(1, Q, dtype=torch.bool), cols, namm.aux_shapes)
        rows = attn[64:].reshape(1, 1, 64, Q)           # only the last 64 rows were captured
        namm.observe(0, layer, rows, StepInfo(seen=torch.tensor([Q]), processed=Q, query_positions=cols[:, 64:],
                                              query_valid=torch.ones(1, 64, dtype=torch.bool), next_update=10**9))
        return layer.aux["namm_ema"].clone()

    fresh = read_last_rows(MemoryLayer())
    # a layer that read 50 rows before: remembered, a read from column 64 would fold only 14 zero
    # rows, and the frames of the rows read would start mid-hop
    used = _stream_features(attn, [50], namm)
    used.reset()
    assert used.rows_read_until == 0
    assert torch.equal(read_last_rows(used), fresh)

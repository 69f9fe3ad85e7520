"""`observe_dtype: bfloat16` (`namm@B/obs=bf16`): the NAMM reads and folds its attention rows in
bfloat16. The model's own attention must not change at all (same logits, bit for bit); the rows are
the float32 rows rounded; the spectrogram state stays float32 and close to the float32 one."""
import pytest
import torch
from conftest import tiny_model
from test_memory_equivalence import RecordingRandomKeep

from namm_core import NAMM, MemoryManagedLM, NAMMConfig, parse_policy
from namm_core.features import SpectrogramConfig, fold_rows


def recorded_run(model, ids, mask, observe_dtype):
    policy = RecordingRandomKeep(keep_prob=0.7, seed=5)
    policy.observation_dtype = observe_dtype
    out = MemoryManagedLM(model, policy, update_every=16, chunk_size=24).generate(
        ids, attention_mask=mask, max_new_tokens=5, return_logits=True)
    return out, policy


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_bf16_rows_leave_the_model_unchanged_and_are_the_float32_rows_rounded(model_dtype):
    model = tiny_model("llama", seed=2).to(model_dtype)
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    full, p32 = recorded_run(model, ids, mask, torch.float32)
    low, p16 = recorded_run(model, ids, mask, torch.bfloat16)
    assert torch.equal(full.sequences, low.sequences)
    assert torch.equal(full.logits, low.logits)                 # the model's attention is untouched
    assert p32.evicted == p16.evicted and len(p16.evicted) > 0
    assert len(p32.observed) == len(p16.observed) > 0
    for rows32, rows16 in zip(p32.observed, p16.observed):
        assert rows32.dtype == torch.float32 and rows16.dtype == torch.bfloat16
        # the GQA mean of probabilities rounded to bf16, itself rounded: within two bf16 steps
        assert bool(((rows16.float() - rows32).abs() <= 2 ** -7 * rows32.abs() + 1e-30).all())


def test_bf16_fold_keeps_a_float32_state_close_to_the_float32_fold():
    cfg = SpectrogramConfig()
    g = torch.Generator().manual_seed(0)
    S = 300
    rows = torch.softmax(torch.randn(2, 3, 96, S, generator=g) * 3, -1).bfloat16().float()
    prefix = torch.softmax(torch.randn(2, 3, cfg.carry, S, generator=g) * 3, -1).bfloat16().float()
    ema = torch.rand(2, 3, S, cfg.n_freq, generator=g) * 0.01
    first = torch.randint(-2, 6, (2, 3, S), generator=g)
    exact = fold_rows(ema, prefix, rows, first, cfg)
    low = fold_rows(ema, prefix.bfloat16(), rows.bfloat16(), first, cfg)
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() <= 1e-2 * exact.abs().max()
    # the keys masked out of every new frame get exactly the decayed state in both
    untouched = first >= 6
    if bool(untouched.any()):
        assert torch.equal(low[untouched], exact[untouched])


def first_update_spectrograms(model, ids, namm):
    """Every layer's EMA spectrogram at the NAMM's first update (before any eviction)."""
    seen = []
    real = namm.token_features

    def recording(layer):
        if len(seen) < len(model.model.layers):
            seen.append(layer.aux["namm_ema"].clone())
            assert layer.aux["namm_ema"].dtype == torch.float32
            assert layer.aux["namm_rows"].dtype == namm.observation_dtype   # the carry rows: as read
        return real(layer)
    namm.token_features = recording
    MemoryManagedLM(model, namm, update_every=32, chunk_size=16).generate(ids, max_new_tokens=3)
    return seen


@pytest.mark.parametrize("options", [{}, {"observe_rows": 16}])
def test_a_bf16_namm_sees_nearly_the_float32_spectrogram(options):
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(6))
    config = dict(selection="top_k", budget="0.5", scope="global", **options)
    params = torch.randn(NAMM(NAMMConfig(**config)).num_params, generator=torch.Generator().manual_seed(1)) * 0.3
    exact = first_update_spectrograms(model, ids, NAMM(NAMMConfig(**config)).set_params(params))
    low = first_update_spectrograms(model, ids, NAMM(NAMMConfig(observe_dtype="bfloat16", **config)).set_params(params))
    assert len(exact) == len(low) == len(model.model.layers)
    for a, b in zip(exact, low):
        assert a.shape == b.shape and bool(a.abs().max() > 0)
        assert (a - b).abs().max() <= 2e-2 * a.abs().max()


def test_the_obs_option_in_specs_configs_and_shared_prefixes():
    namm = parse_policy("namm@0.25/window=256/obs=bf16")
    assert namm.config.observe_dtype == "bfloat16" and namm.observation_dtype == torch.bfloat16
    assert namm.describe().endswith("@0.25/window=256/obs=bf16")
    assert parse_policy("namm" + namm.describe().removeprefix("namm:smollm2")).config == namm.config
    default = parse_policy("namm@0.25")
    assert default.observation_dtype == torch.float32 and "obs" not in default.describe()
    assert parse_policy("namm@0.25/obs=fp32").config == default.config
    # a float32 NAMM keeps the prefix key it always had; a bf16 one shares no prefix with it
    assert len(default.prefix_key()) == 3 and namm.prefix_key()[:3] == default.prefix_key()
    assert namm.prefix_key() != default.prefix_key()
    assert NAMMConfig.from_dict(namm.config.to_dict()) == namm.config
    with pytest.raises(ValueError, match="observe_dtype 'float16'"):
        NAMMConfig(observe_dtype="float16")
    with pytest.raises(ValueError, match=r"obs='fp16': expected one of fp32, bf16"):
        parse_policy("namm@0.25/obs=fp16")


def test_memory_bench_rounds_rotate_and_report_the_median_run():
    from types import SimpleNamespace

    from bench.memory_bench import median_run, rotated

    runs = ["full", "streamingllm:0.25", "namm@0.25"]
    orders = [rotated(runs, r) for r in range(3)]
    assert orders[0] == runs and orders[1][0] == "streamingllm:0.25" and orders[2][0] == "namm@0.25"
    assert {tuple(sorted(o)) for o in orders} == {tuple(sorted(runs))}
    assert [o.index("full") for o in orders] == [0, 2, 1]        # each policy once in every position
    stats = [SimpleNamespace(seconds=t, tag=i) for i, t in enumerate([9.0, 7.0, 8.0])]
    assert median_run(stats).tag == 2
    assert median_run(stats[:2]).tag == 1                        # even count: the lower middle
    assert median_run(stats[:1]).tag == 0

"""What evolution builds on: the budgeted NAMM, the teacher-forced likelihood, the warm start,
the fitness functions. Tiny random models; no Ray."""
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from namm_core import DEFAULT_NAMM_DIR, NAMM, MemoryManagedLM, NAMMConfig, parse_policy
from namm_core.imitation import ImitationRecorder, agreement, fit_scorer
from namm_core.policies import StreamingLLM, Structure
from workers.fitness import candidate_fitness, loglik_ratio, task_ratio


def _random_namm(seed: int, **config) -> NAMM:
    namm = NAMM(NAMMConfig(**config))
    return namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(seed)))


def _ids(T: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


# --- budgeted NAMM --------------------------------------------------------------------------
@pytest.mark.parametrize("budget,expected", [("0.25", lambda seen: math.ceil(seen * 0.25)), ("20", lambda seen: 20)])
def test_top_k_namm_keeps_exactly_its_budget_of_best_scores(budget, expected):
    """Every layer and KV head keeps exactly the budget: the newest token and the best scores."""
    model = tiny_model()
    namm = _random_namm(4, selection="top_k", budget=budget)
    scores_seen = []
    original_select = namm.select

    def spy(layer_idx, layer, step):
        scores = namm.score(layer)
        keep = original_select(layer_idx, layer, step)
        scores_seen.append((scores, layer.valid.clone(), layer.positions.clone(), keep, int(step.seen[0])))
        return keep

    namm.select = spy
    MemoryManagedLM(model, namm, update_every=32, chunk_size=32).generate(_ids(150), max_new_tokens=1)
    assert scores_seen
    for scores, valid, positions, keep, seen in scores_seen:
        k = min(expected(seen), seen)
        assert (keep.sum(-1) == k).all()
        newest = positions.masked_fill(~valid, -1).amax(-1, keepdim=True)
        assert (keep | (positions != newest)).all()           # the newest token is kept
        # every kept token other than the newest outscores every evicted valid token
        for b in range(keep.shape[0]):
            for h in range(keep.shape[1]):
                kept = keep[b, h] & (positions[b, h] != newest[b, h])
                evicted = valid[b, h] & ~keep[b, h]
                if kept.any() and evicted.any():
                    assert scores[b, h][kept].min() >= scores[b, h][evicted].max()


def test_threshold_namm_with_budget_keeps_at_most_the_budget_and_only_nonnegative_scores():
    model = tiny_model()
    capped = _random_namm(6, selection="threshold", budget="0.3")
    free = _random_namm(6)
    ids = _ids(192, seed=1)   # ends on an update: the kept counts are those the budget allows
    out_capped = MemoryManagedLM(model, capped, update_every=32, chunk_size=32).generate(ids, max_new_tokens=1)
    out_free = MemoryManagedLM(model, free, update_every=32, chunk_size=32).generate(ids, max_new_tokens=1)
    seen = out_capped.stats.tokens_seen[0]
    assert (out_capped.stats.kept_per_layer_head <= math.ceil(0.3 * seen)).all()
    assert out_free.stats.kept_per_layer_head.max() > math.ceil(0.3 * seen)  # the cap really bit
    assert out_capped.stats.mean_retention < out_free.stats.mean_retention


def test_zero_top_k_namm_equals_a_recency_window():
    """All scores tie at zero: ties go to the newer slot, so a zero top-k NAMM keeps the newest tokens."""
    model = tiny_model()
    ids = _ids(128, seed=2)
    namm = NAMM(NAMMConfig(selection="top_k", budget="40"))
    out = MemoryManagedLM(model, namm, update_every=32, chunk_size=32).generate(ids, max_new_tokens=1)
    assert (out.stats.kept_per_layer_head == 40).all()


def test_budget_round_trips_through_save_and_parse_policy(tmp_path):
    namm = _random_namm(1, selection="top_k", budget="0.5", update_every=256, chunk_size=128)
    namm.save_pretrained(tmp_path / "n")
    loaded = NAMM.from_pretrained(tmp_path / "n")
    assert loaded.config.selection == "top_k" and loaded.config.budget == "0.5"
    assert loaded.memory_settings() == {"update_every": 256, "chunk_size": 128}
    assert torch.equal(loaded.get_params(), namm.get_params())
    override = parse_policy(f"namm:{tmp_path / 'n'}@0.25")
    assert override.config.budget == "0.25" and override.config.selection == "top_k"
    assert override.describe().endswith("@0.25")
    assert parse_policy(f"namm:{tmp_path / 'n'}@1024").config.budget == "1024"
    shipped = parse_policy("namm@0.25")
    assert shipped.config.budget == "0.25" and shipped.config.selection == "top_k"
    legacy = parse_policy(f"namm:{DEFAULT_NAMM_DIR.parent / 'smollm2-threshold'}@0.5")
    assert legacy.config.format_version == 1 and legacy.config.budget == "0.5"
    with pytest.raises(ValueError, match="namm@2.5"):
        parse_policy("namm@2.5")
    with pytest.raises(ValueError, match="needs a budget"):
        NAMMConfig(selection="top_k")
    with pytest.raises(ValueError, match="selection 'best'"):
        NAMMConfig(selection="best", budget="0.5")


def test_memory_settings_recorded_in_a_namm_apply_unless_overridden(caplog):
    model = tiny_model()
    namm = NAMM(NAMMConfig(update_every=64, chunk_size=32))
    lm = MemoryManagedLM(model, namm)
    assert (lm.update_every, lm.chunk_size) == (64, 32)
    with caplog.at_level("WARNING"):
        lm = MemoryManagedLM(model, namm, update_every=128)
    assert (lm.update_every, lm.chunk_size) == (128, 32)
    assert "overrides the 64 it was evolved with" in caplog.text
    assert (MemoryManagedLM(model, parse_policy("h2o:0.5")).update_every) == 512


def test_from_vector_builds_the_same_namm_as_set_params():
    vec = np.random.RandomState(0).randn(4172).astype(np.float32)
    norm = {"mean": np.full(17, 0.1, np.float32), "var": np.full(17, 2.0, np.float32), "count": 5.0}
    namm = NAMM.from_vector(vec, norm, NAMMConfig(selection="top_k", budget="0.5"))
    assert torch.equal(namm.get_params(), torch.from_numpy(vec))
    assert torch.equal(namm.norm_var, torch.full((17,), 2.0)) and namm.norm_count == 5.0
    assert namm.config.budget == "0.5"


# --- teacher-forced likelihood -----------------------------------------------------------------
@pytest.mark.parametrize("policy_factory", [lambda: NAMM(), lambda: _random_namm(4), lambda: parse_policy("h2o:0.5"),
                                            lambda: parse_policy("streamingllm:0.4")])
def test_continuation_logprobs_equal_the_decoding_logits(policy_factory):
    """The likelihood of a reply, teacher-forced, equals what greedy decoding of that reply saw,
    step by step, under the same memory (update boundaries inside the reply included)."""
    model = tiny_model()
    ids = _ids(90, seed=3)
    lm = MemoryManagedLM(model, policy_factory(), update_every=32, chunk_size=16)
    out = lm.generate(ids, max_new_tokens=12, return_logits=True)
    reply = out.sequences                                          # [1, 12] greedy tokens
    decode_logits = out.logits[0, ids.shape[1] - 1:]               # the logits each reply token was chosen from
    expected = torch.log_softmax(decode_logits.float(), -1).gather(-1, reply[0, :, None])[:, 0]
    lm2 = MemoryManagedLM(model, policy_factory(), update_every=32, chunk_size=16)
    got, stats = lm2.continuation_logprobs(ids, reply)
    assert got.shape == (12,)
    assert torch.allclose(got, expected, atol=1e-5)
    assert stats.updates >= 3


def test_continuation_logprobs_with_a_shared_prefix_equal_a_run_from_scratch():
    model = tiny_model()
    ids, reply = _ids(80, seed=5), _ids(6, seed=6)
    prefix = MemoryManagedLM(model, NAMM(), update_every=32, chunk_size=32).shared_prefix(ids)
    lm = MemoryManagedLM(model, _random_namm(6), update_every=32, chunk_size=32)
    plain, s1 = lm.continuation_logprobs(ids, reply)
    shared, s2 = lm.continuation_logprobs(ids, reply, prefix=prefix)
    assert torch.equal(plain, shared)
    assert torch.equal(s1.kept_per_layer_head, s2.kept_per_layer_head)
    assert s1.mean_retention < 1.0


def test_full_cache_continuation_equals_the_model_forward():
    model = tiny_model()
    ids, reply = _ids(70, seed=7), _ids(5, seed=8)
    got, _ = MemoryManagedLM(model, None, update_every=32, chunk_size=16).continuation_logprobs(ids, reply)
    with torch.no_grad():
        logits = model(torch.cat([ids, reply], 1)).logits[0, ids.shape[1] - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(-1, reply[0, :, None])[:, 0]
    assert torch.allclose(got, expected, atol=1e-5)


# --- warm start ----------------------------------------------------------------------------------
def test_warm_start_learns_to_imitate_streamingllm():
    """A scorer fitted on recorded features reproduces a recency window's decisions, and the
    recorded run itself was managed by the baseline (its retention is the budget). (Sink tokens
    are told apart by the attention they draw, which a random tiny model does not have: no sinks.)"""
    model = tiny_model()
    namm = NAMM(NAMMConfig(scorer="mlp", mlp_hidden=[16]))
    recorder = ImitationRecorder(namm, StreamingLLM("0.5", Structure(sinks=0)))
    for seed in range(3):
        out = MemoryManagedLM(model, recorder, update_every=32, chunk_size=32).generate(_ids(160, seed=seed),
                                                                                     max_new_tokens=1)
        assert out.stats.mean_retention < 0.6
    data = recorder.data
    assert len(data) == 3 * 5 * 3 * 2   # prompts x updates (at 32, 64, ..., 160) x layers x KV heads
    before = agreement(namm, data)
    report = fit_scorer(namm, data, steps=300, lr=0.02, seed=0)
    assert report["rank_agreement"] > 0.95, report
    assert report["rank_agreement"] > before["rank_agreement"] + 0.2
    assert report["sign_agreement"] > 0.9


# --- fitness ------------------------------------------------------------------------------------
def test_fitness_functions():
    assert task_ratio([1, 0], [1, 1]) == pytest.approx(0.55 / 1.05)
    assert task_ratio([0, 0], [0, 0]) == 1.0
    assert loglik_ratio([-1.0, -2.0], [-1.0, -2.0]) == 1.0
    assert loglik_ratio([-2.0, -3.0], [-1.0, -2.0]) == pytest.approx(math.exp(-1.0))
    per_task = {"a": ([-1.5], [-1.0]), "b": ([1.0], [1.0])}
    f = candidate_fitness("loglik", {"a": per_task["a"]}, [0.7], retention_target=0.5, retention_weight=1.0)
    assert f == pytest.approx(math.exp(-0.5) - 0.2)
    assert candidate_fitness("task_score", {"b": per_task["b"]}, [0.4], retention_target=0.5) == 1.0
    with pytest.raises(ValueError, match="fitness kind"):
        candidate_fitness("accuracy", per_task, [1.0])


def test_sink_tokens_are_always_kept_and_count_towards_the_budget():
    """With sinks=4 the first four positions survive every update, whatever their scores."""
    model = tiny_model()
    ids = _ids(192, seed=9)
    namm = _random_namm(7, selection="top_k", budget="0.25", sinks=4)
    seen_keeps = []
    original = namm.select

    def spy(layer_idx, layer, step):
        keep = original(layer_idx, layer, step)
        seen_keeps.append((layer.positions.clone(), keep.clone(), int(step.seen[0])))
        return keep

    namm.select = spy
    MemoryManagedLM(model, namm, update_every=32, chunk_size=32).generate(ids, max_new_tokens=1)
    for positions, keep, seen in seen_keeps:
        assert (keep.sum(-1) == math.ceil(0.25 * seen)).all()
        for p in range(4):
            assert keep[positions == p].all()
    # without sinks, this scorer evicts some of the first four tokens
    plain = _random_namm(7, selection="top_k", budget="0.25")
    kept_first = []
    original_plain = plain.select

    def spy_plain(layer_idx, layer, step):
        keep = original_plain(layer_idx, layer, step)
        kept_first.append(bool(keep[layer.positions < 4].all()))
        return keep

    plain.select = spy_plain
    MemoryManagedLM(model, plain, update_every=32, chunk_size=32).generate(ids, max_new_tokens=1)
    assert not all(kept_first)

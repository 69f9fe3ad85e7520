"""Hindsight distillation (namm_core/distill.py): the importance is what the full cache's later
queries attended to, the oracle keeps the most important tokens model-wide, the recorder sees
what the acting memory held, and the fit learns a ranking it can reproduce."""

import pytest
import torch
from conftest import TinyTokenizer, tiny_model

from namm_core import NAMM, MemoryManagedLM, NAMMConfig
from namm_core.distill import (
    DistillData,
    DistillRecorder,
    HindsightOracle,
    fit_global_scorer,
    hindsight_importance,
    kept_share,
    kvzip_importance,
)


def _ids(n, seed):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _global_namm(budget="0.5", pool=1, seed=None):
    namm = NAMM(NAMMConfig(selection="top_k", budget=budget, sinks=2, scope="global", pool=pool))
    if seed is not None:
        namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return namm


def test_importance_is_the_peak_attention_of_the_later_queries_summed():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, reply = _ids(60, 1), _ids(4, 2)
    start = 50
    lm = MemoryManagedLM(model, None, update_every=32, chunk_size=16)
    got = hindsight_importance(lm, ids, reply, start)
    # reference: eager attention of the whole sequence, query heads averaged per KV head
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(torch.cat([ids, reply], 1), output_attentions=True).attentions   # L x [1, Hq, T, T]
    model.set_attn_implementation("sdpa")
    per_kv = [a[0].view(2, 2, *a.shape[-2:]).mean(1) for a in att]                     # [H_kv, T, T]
    peak = torch.stack(per_kv).amax(dim=(0, 1))                                          # [T, T]
    expected = peak[start:ids.shape[1] + reply.shape[1] - 1].sum(0)  # the last reply token is never fed
    assert torch.allclose(got[:expected.numel()], expected, atol=1e-5)


def test_kvzip_importance_decides_as_kvzip_in_the_model_wide_structure():
    """With one update, the oracle keeping the top of kvzip_importance keeps what KVzip itself
    keeps when run in the NAMM's structure (one kept set by the mean score over layers and heads);
    every position up to the update is scored, none after it."""
    from namm_core import parse_policy

    model, tok = tiny_model("llama", num_hidden_layers=2), TinyTokenizer()
    ids, reply = _ids(64, 5), _ids(3, 6)
    lm = MemoryManagedLM(model, None, update_every=64, chunk_size=16, tokenizer=tok)
    importance = kvzip_importance(lm, ids, reply)
    assert importance.shape == (67,)
    assert (importance[:64] > 0).all() and not importance[64:].any()   # one update, after 64 tokens

    kept = {}

    def spy(policy):
        inner = policy.select_all

        def select_all(layers, step):
            keeps = inner(layers, step)
            kept.setdefault(policy.describe(), []).append(set(layers[0].positions[keeps[0]].tolist()))
            return keeps
        policy.select_all = select_all
        return policy
    kvzip = spy(parse_policy("kvzip:0.5/global/sinks=2"))
    oracle = spy(HindsightOracle(importance, "0.5", sinks=2))
    for policy in (kvzip, oracle):
        MemoryManagedLM(model, policy, update_every=64, chunk_size=16, tokenizer=tok).continuation_logprobs(ids, reply)
    (by_kvzip,), (by_oracle,) = kept[kvzip.describe()], kept[oracle.describe()]
    assert by_kvzip == by_oracle and len(by_oracle) == 32


def test_kvzip_importance_needs_the_tokenizer():
    lm = MemoryManagedLM(tiny_model("llama", num_hidden_layers=2), None, update_every=32, chunk_size=16)
    with pytest.raises(ValueError, match="tokenizer"):
        kvzip_importance(lm, _ids(40, 1), _ids(2, 2))


class Spy(HindsightOracle):
    def select_all(self, layers, step):
        keeps = super().select_all(layers, step)
        self.seen.append([(layer.positions[layer.valid].tolist(), layer.positions[k].tolist())
                          for layer, k in zip(layers, keeps)])
        return keeps


def test_the_oracle_keeps_the_most_important_held_tokens_everywhere():
    model = tiny_model("llama", num_hidden_layers=2)
    importance = torch.rand(200, generator=torch.Generator().manual_seed(3))
    oracle = Spy(importance, "0.3", sinks=2)
    oracle.seen = []
    MemoryManagedLM(model, oracle, update_every=32, chunk_size=32).generate(_ids(150, 4), max_new_tokens=1)
    assert len(oracle.seen) == 4
    for layers in oracle.seen:
        held, kept = layers[0]
        held = sorted(set(held))
        for _, k in layers:
            assert sorted(set(k)) == sorted(set(kept)), "one kept set for every layer and head"
        newest = max(held)
        free = [p for p in held if p >= 2 and p != newest]
        n_free = len(set(kept)) - len({0, 1, newest} & set(kept))
        best = sorted(free, key=lambda p: -float(importance[p]))[:n_free]
        assert set(best) <= set(kept)
        assert {0, 1, newest} <= set(kept)


def test_the_recorder_records_what_the_acting_memory_held_and_the_fit_learns_a_ranking():
    """Importance = recency: a ranking the features (which hold each token's age) can express."""
    model = tiny_model("llama", num_hidden_layers=2)
    namm = _global_namm("0.4")
    data = DistillData()
    for seed in range(4):
        importance = torch.arange(300, dtype=torch.float32) ** 2
        recorder = DistillRecorder(namm, HindsightOracle(importance, "0.4", sinks=2), importance, data)
        out = MemoryManagedLM(model, recorder, update_every=32, chunk_size=32).continuation_logprobs(
            _ids(200, seed), _ids(3, 10 + seed))
        assert out[1].mean_retention < 0.6
    assert len(data) == 4 * 6        # prompts x updates at 32, 64, ..., 192
    group = data.groups[-1]
    assert group.features.shape[0] == 2 * 2    # layers x KV heads
    assert group.features.shape[1] == group.positions.numel() == group.importance.numel()
    # the best any ranking can do: the k - protected most important free tokens
    best = total = 0.0
    for g in data.groups:
        free = g.importance[~g.protected]
        best += float(free.sort(descending=True).values[: g.k - int(g.protected.sum())].sum())
        total += float(free.sum())
    before = kept_share(_global_namm("0.4", seed=1), data.groups)
    report = fit_global_scorer(namm, data, steps=400, lr=0.02, groups_per_step=4, rows_per_group=4, seed=0)
    assert report["kept_share_train"] > 0.95 * best / total, (report, best / total)
    assert report["kept_share_train"] > before + 0.05   # a random scorer of the same size


def test_the_recorder_refuses_a_per_head_namm():
    with pytest.raises(ValueError, match="scope 'global'"):
        DistillRecorder(NAMM(NAMMConfig(selection="top_k", budget="0.5")), None, torch.zeros(1), DistillData())


@pytest.mark.parametrize("teacher", ["hindsight", "kvzip"])
def test_a_worker_distils_a_warm_start_on_real_prompts(tmp_path, teacher):
    """The evolution worker's distilled warm start, end to end on a tiny random model with the
    real tokenizer: oracle round, DAgger round, a finite vector that differs from zero."""
    import numpy as np

    from orchestrator.config import config_from_dict
    from workers.evolution_worker import EvolutionWorker

    cfg = config_from_dict({
        "name": "distil-test", "model": {"name": "tiny-random"}, "memory": {"update_every": 64, "chunk_size": 64},
        "namm": {"selection": "top_k", "budget": 0.5, "sinks": 2, "scope": "global", "pool": 3},
        "es": {"warm_start": {"imitate": teacher, "prompts": 4, "steps": 20, "rounds": 1}},
        "stages": [{"name": "s", "generations": 1, "prompts_per_task": 2,
                    "tasks": [{"task": "passkey", "context_length": 256, "pool_size": 4}]}],
    }, base_dir=tmp_path)
    worker = EvolutionWorker({"name": "tiny-random"}, {"update_every": 64, "chunk_size": 64}, cfg.namm_spec())
    worker.prepare([{"key": "passkey@256", "task": "passkey", "file": None, "context_length": 256, "pool_size": 4,
                     "seed": 0}])
    norm = worker.collect_statistics([("passkey@256", 0)])
    threads = torch.get_num_threads()
    out = worker.warm_start(teacher, norm, [("passkey@256", i) for i in range(4)], steps=20, lr=0.01, seed=0,
                            rounds=1, threads=threads + 1)
    assert torch.get_num_threads() == threads     # the job's threads are given back
    vector, report = out["vector"], out["report"]
    assert vector.shape == (4172,) and np.isfinite(vector).all() and np.abs(vector).max() > 0
    assert report["rounds"] == 1 and report["rows"] >= 4 * 3     # 4 prompts x >= 3 updates each
    assert 0 < report["kept_share_heldout"] <= 1 and 0 < report["kept_share_round0"] <= 1


@pytest.mark.parametrize("namm, warm, message", [
    ({"selection": "top_k", "budget": 0.5}, {"imitate": "hindsight"}, "set namm.scope: global"),
    ({"selection": "top_k", "budget": 0.5}, {"imitate": "kvzip"}, "'kvzip' fits a model-wide NAMM"),
    ({"selection": "top_k", "budget": 0.5, "scope": "global"}, {"imitate": "hindsight", "rounds": -1},
     "es.warm_start.rounds"),
    ({"selection": "top_k", "budget": 0.5, "scope": "global"}, {"imitate": "hindsight", "threads": 0},
     "es.warm_start.threads"),
    ({"scope": "global"}, {"imitate": "streamingllm:0.5"}, "namm.scope: NAMM scope 'global' needs selection 'top_k'"),
    ({"selection": "top_k", "budget": 0.5, "pool": 2}, None, "namm.pool: NAMM pool must be an odd"),
])
def test_bad_distillation_settings_name_the_field(namm, warm, message, tmp_path):
    from orchestrator.config import ConfigError, config_from_dict

    data = {"name": "bad", "model": {"name": "tiny-random"}, "namm": namm,
            "stages": [{"name": "s", "generations": 1, "tasks": [{"task": "passkey", "context_length": 256}]}]}
    if warm:
        data["es"] = {"warm_start": warm}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data, base_dir=tmp_path)

"""Span pooling and the model-wide ("global") selection of a NAMM, on hand-made inputs and a
tiny random model: every layer and head then holds the same tokens, exactly the budget, and they
are the best by the mean score over the layers and heads that held them."""

import pytest
import torch
from conftest import tiny_model

from namm_core import NAMM, MemoryManagedLM, NAMMConfig
from namm_core.policies import pool_over_slots, shared_selection
from namm_core.selection import collect_votes, decide_from_votes, kept_in_layers


def test_pooling_runs_over_the_valid_slots_in_order():
    scores = torch.tensor([[0.0, 5.0, -1.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    valid = torch.tensor([[True, True, False, True, True, True, False, True]])
    pooled = pool_over_slots(scores, valid, 3)
    # valid slots in order: 0, 5, 0, 1, 0, 2 -> windows of 3 centred on each
    expected_valid = [5.0, 5.0, 5.0, 1.0, 2.0, 2.0]
    assert pooled[valid].tolist() == expected_valid
    assert pooled[~valid].tolist() == [-1.0, 0.0]        # invalid slots are left alone
    assert torch.equal(pool_over_slots(scores, valid, 1), scores)


class FakeLayer:
    def __init__(self, positions, valid):
        self.positions, self.valid = torch.tensor(positions), torch.tensor(valid)


def test_shared_selection_keeps_the_best_tokens_by_mean_score_everywhere():
    # two layers, two heads each; position 5 is held by only some heads (per-head eviction)
    layers = [FakeLayer([[[0, 1, 2, 5], [0, 1, 2, 0]]], [[[True] * 4, [True, True, True, False]]]),
              FakeLayer([[[0, 1, 2, 5], [0, 1, 2, 5]]], [[[True] * 4, [True] * 4]])]
    scores = [torch.tensor([[[9.0, 1.0, 2.0, 0.0], [9.0, 3.0, 0.0, 100.0]]]),
              torch.tensor([[[9.0, 1.0, 4.0, 3.0], [9.0, 3.0, 2.0, 3.0]]])]
    protected = [torch.zeros(1, 2, 4, dtype=torch.bool), torch.zeros(1, 2, 4, dtype=torch.bool)]
    protected[1][0, 1, 3] = True                    # position 5 protected by one head
    # means over holders: pos0 9, pos1 2, pos2 2, pos5 2 (the invalid slot's 100 takes no part)
    keeps = shared_selection(layers, scores, protected, torch.tensor([2]))
    for layer, keep in zip(layers, keeps):
        kept = set(layer.positions[keep].tolist())
        assert kept == {0, 5}, kept
        assert not (keep & ~layer.valid).any()
    protected[1][0, 1, 3] = False
    scores[0][0, 0, 2] = 6.0                        # pos2's mean is now 3: second best
    keeps = shared_selection(layers, scores, protected, torch.tensor([2]))
    assert set(layers[0].positions[keeps[0]].tolist()) == {0, 2}


def _random_layers(seed, num_layers=4, heads=2, slots=24):
    """Layers holding a random subset of positions 0..39 per head, scores and protection at random."""
    g = torch.Generator().manual_seed(seed)
    layers, scores, protected = [], [], []
    for _ in range(num_layers):
        positions = torch.stack([torch.randperm(40, generator=g)[:slots].sort().values for _ in range(heads)])[None]
        valid = torch.rand(1, heads, slots, generator=g) > 0.2
        layers.append(FakeLayer(positions.tolist(), valid.tolist()))
        scores.append(torch.randn(1, heads, slots, generator=g))
        protected.append(torch.rand(1, heads, slots, generator=g) > 0.95)
    return layers, scores, protected


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pool", [1, 3])
def test_votes_decide_as_the_shared_selection_and_a_subset_of_voters_as_a_layer_subset(seed, pool):
    layers, scores, protected = _random_layers(seed)
    k = torch.tensor([9])
    votes = collect_votes(layers, scores, protected)
    every = kept_in_layers(decide_from_votes(votes, k, pool), layers)
    for a, b in zip(every, shared_selection(layers, scores, protected, k, kernel=pool)):
        assert torch.equal(a, b)
    # only layers 1 and 3 vote: the same as a NAMM whose other layers hold without scoring
    subset = kept_in_layers(decide_from_votes(votes, k, pool, voters=[1, 3]), layers)
    masked = [s if i in (1, 3) else None for i, s in enumerate(scores)]
    expected = shared_selection(layers, masked, protected, k, kernel=pool)
    for a, b in zip(subset, expected):
        assert torch.equal(a, b)


def test_a_subset_of_voters_changes_decisions():
    """The check above has power: on these inputs two voting layers do not decide as four."""
    changed = 0
    for seed in range(5):
        layers, scores, protected = _random_layers(seed)
        votes = collect_votes(layers, scores, protected)
        k = torch.tensor([9])
        changed += not torch.equal(decide_from_votes(votes, k), decide_from_votes(votes, k, voters=[1, 3]))
    assert changed >= 3


class Snapshot(NAMM):
    """Records every layer's kept positions after each model-wide decision."""

    def select_all(self, layers, step):
        keeps = super().select_all(layers, step)
        self.kept.append([[set(layer.positions[b, h][keep[b, h]].tolist()) for h in range(keep.shape[1])
                           for b in range(keep.shape[0])] for layer, keep in zip(layers, keeps)])
        self.seen.append(step.seen.clone())
        return keeps


@pytest.mark.parametrize("pool", [1, 5])
def test_a_global_namm_holds_the_same_budgeted_tokens_in_every_layer_and_head(pool):
    model = tiny_model("llama", num_hidden_layers=3)
    config = NAMMConfig(selection="top_k", budget="0.4", sinks=2, scope="global", pool=pool)
    namm = Snapshot(config).set_params(torch.randn(4172, generator=torch.Generator().manual_seed(2)) * 0.3)
    namm.kept, namm.seen = [], []
    ids = torch.randint(3, 97, (1, 100), generator=torch.Generator().manual_seed(4))
    out = MemoryManagedLM(model, namm, update_every=16, chunk_size=16).generate(ids, max_new_tokens=6)
    assert len(namm.kept) >= 6
    for kept, seen in zip(namm.kept, namm.seen):
        rows = [row for layer in kept for row in layer]
        assert all(row == rows[0] for row in rows), "every layer and head keeps the same tokens"
        assert len(rows[0]) == min(int(seen) , -(-int(seen) * 2 // 5))
        assert {0, 1} <= rows[0]                    # the sinks
    assert out.stats.kept_per_layer_head.unique().numel() == 1


def test_global_scope_needs_a_budget_and_pool_must_be_odd():
    with pytest.raises(ValueError, match="scope 'global' needs selection 'top_k'"):
        NAMMConfig(scope="global")
    with pytest.raises(ValueError, match="pool must be an odd"):
        NAMMConfig(pool=4)
    with pytest.raises(ValueError, match="scope"):
        NAMMConfig(scope="layer")


def test_scope_and_pool_survive_save_and_load(tmp_path):
    namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", scope="global", pool=15))
    namm.save_pretrained(tmp_path / "n")
    loaded = NAMM.from_pretrained(tmp_path / "n")
    assert loaded.config.scope == "global" and loaded.config.pool == 15
    assert loaded.with_budget("0.25").config.scope == "global"
    assert loaded.with_budget("0.25", selection="threshold").config.scope == "head"


def test_a_global_namm_on_sliding_window_layers_equals_masked_attention():
    """Gemma 3: tokens outside a sliding layer's window are held by the full layers only; the
    model-wide decision still gives exactly the masked full forward."""
    from test_memory_equivalence import assert_equals_masked_reference
    from test_policy_contract import Recorder

    model = tiny_model("gemma3")
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", sinks=2, scope="global", pool=3))
    namm.set_params(torch.randn(4172, generator=torch.Generator().manual_seed(8)) * 0.3)
    recorder = Recorder(namm)
    out = MemoryManagedLM(model, recorder, update_every=16, chunk_size=16).generate(
        ids, attention_mask=mask, max_new_tokens=10, return_logits=True)
    assert recorder.evicted
    sliding = [24 if t == "sliding_attention" else None for t in model.config.layer_types]
    assert_equals_masked_reference(model, ids, mask, out, recorder.evicted, 4, 2, sliding=sliding)
    full = [i for i, w in enumerate(sliding) if w is None]
    kept = out.stats.kept_per_layer_head
    assert all(torch.equal(kept[full[0]], kept[i]) for i in full)


def test_a_layer_without_a_score_holds_tokens_without_voting():
    layers = [FakeLayer([[[0, 1, 2, 3]]], [[[True] * 4]]), FakeLayer([[[0, 1, 2, 3]]], [[[True] * 4]])]
    scores = [torch.tensor([[[0.0, 5.0, 1.0, 2.0]]]), None]
    protected = [torch.zeros(1, 1, 4, dtype=torch.bool)] * 2
    keeps = shared_selection(layers, scores, protected, torch.tensor([2]))
    assert [set(layer.positions[keep].tolist()) for layer, keep in zip(layers, keeps)] == [{1, 3}, {1, 3}]


class SubsetRecorder(NAMM):
    """Records which layers are observed, and the kept set the subset's mean score implies."""

    def observe(self, layer_idx, layer, attn, step):
        self.observed.add(layer_idx)
        super().observe(layer_idx, layer, attn, step)

    def select_all(self, layers, step):
        scored = sorted(self.observed_layers(len(layers)))
        # by hand: the mean score of each position over the scored layers' heads (pool 1, no sinks)
        mean = torch.stack([self.score(layers[i])[0].mean(0) for i in scored]).mean(0)
        positions = layers[0].positions[0, 0]
        newest = int(positions.max())
        k = self._budget.tokens(step.seen)[0]
        order = sorted(range(len(positions)), key=lambda s: (int(positions[s]) != newest, -float(mean[s])))
        self.expected.append({int(positions[s]) for s in order[:int(k)]})
        keeps = super().select_all(layers, step)
        self.kept.append({int(p) for p in layers[0].positions[0, 0][keeps[0][0, 0]]})
        return keeps


def test_a_namm_scoring_from_a_subset_of_layers_observes_only_those_and_keeps_their_best():
    from test_memory_equivalence import assert_equals_masked_reference
    from test_policy_contract import Recorder

    model = tiny_model("llama", num_hidden_layers=4)
    namm = SubsetRecorder(NAMMConfig(selection="top_k", budget="0.4", scope="global", score_layers=[1, 3]))
    namm.set_params(torch.randn(4172, generator=torch.Generator().manual_seed(2)) * 0.3)
    namm.observed, namm.expected, namm.kept = set(), [], []
    ids = torch.randint(3, 97, (1, 96), generator=torch.Generator().manual_seed(4))
    recorder = Recorder(namm)
    out = MemoryManagedLM(model, recorder, update_every=16, chunk_size=16).generate(
        ids, max_new_tokens=6, return_logits=True)
    assert namm.observed == {1, 3}, "only the scored layers pay for attention rows"
    assert len(namm.kept) >= 5 and namm.kept == namm.expected
    assert_equals_masked_reference(model, ids, torch.ones_like(ids), out, recorder.evicted, 4, 2)


def test_scoring_from_every_layer_listed_is_the_default_exactly():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 97, (2, 80), generator=torch.Generator().manual_seed(5))
    outs = []
    for layers in (None, [0, 1, 2], 3):
        namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", scope="global", pool=3, sinks=2, score_layers=layers))
        namm.set_params(torch.randn(4172, generator=torch.Generator().manual_seed(2)) * 0.3)
        outs.append(MemoryManagedLM(model, namm, update_every=16, chunk_size=16).generate(
            ids, max_new_tokens=5, return_logits=True))
    for other in outs[1:]:
        assert torch.equal(other.sequences, outs[0].sequences) and torch.equal(other.logits, outs[0].logits)
        assert torch.equal(other.stats.kept_per_layer_head, outs[0].stats.kept_per_layer_head)


def test_score_layers_in_specs_configs_and_saved_namms(tmp_path):
    from namm_core import parse_policy
    from namm_core.namm import scored_layer_indices

    assert scored_layer_indices(6, 30) == [0, 6, 12, 17, 23, 29]
    assert scored_layer_indices(None, 4) == scored_layer_indices(9, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="beyond the model's 4 layers"):
        scored_layer_indices([1, 7], 4)
    namm = parse_policy("namm@0.25/layers=6")
    assert namm.config.score_layers == 6 and namm.describe() == "namm:smollm2@0.25/layers=6"
    assert parse_policy("namm:smollm2@0.5/layers=0,10,29").config.score_layers == [0, 10, 29]
    for bad, message in (("namm@0.5/layers=x", "expected a count or layer indices"),
                         ("namm@0.5/depth=2", "unknown option 'depth' for namm"),
                         ("namm@0.5/layers=0", "a layer count >= 1")):
        with pytest.raises(ValueError, match=message):
            parse_policy(bad)
    with pytest.raises(ValueError, match="needs the model-wide scope"):
        NAMMConfig(score_layers=2)
    namm.save_pretrained(tmp_path / "n")
    assert NAMM.from_pretrained(tmp_path / "n").config.score_layers == 6

"""The baselines keep exactly what their definitions say.

Each policy is run on small hand-made layers (keys, positions, validity and attention built
in the test) and its keep mask is compared with an independent reference computed in plain
Python; the end-to-end tests run every baseline on a tiny random Llama.
"""
import math
from fractions import Fraction

import pytest
import torch
from conftest import TinyTokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from namm_core.cache import MemoryLayer
from namm_core.generation import MemoryManagedLM
from namm_core.policies import H2O, TOVA, Budget, FullCache, L2Norm, SnapKV, StepInfo, StreamingLLM, Structure, keep_top
from namm_core.registry import budgeted_baselines, parse_policy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one intra-op thread is faster and, on a shared machine,
    far less sensitive to other processes (restored after this module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# helpers


def left_pad_valid(B, S, pads):
    """[B, S] bool: row b has pads[b] invalid (left padding) slots at the start."""
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    return valid


def positions_of(valid):
    """Absolute positions the way generation assigns them (padding clamped to 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def make_layer(keys, valid, positions=None, aux_shapes=None):
    """One chunk appended to a fresh MemoryLayer; keys [B, H, S, D], valid [B, S]."""
    B, H, S, D = keys.shape
    positions = positions_of(valid) if positions is None else positions
    columns = torch.arange(S).expand(B, S)
    layer = MemoryLayer()
    layer.append(keys, torch.randn(B, H, S, D), positions, valid, columns, aux_shapes or {})
    return layer


def step_for(valid, processed, next_update, Q):
    """StepInfo after processing the columns [processed - Q, processed) of `valid` [B, T]."""
    chunk_valid = valid[:, processed - Q:processed]
    return StepInfo(seen=valid[:, :processed].sum(-1), processed=processed,
                    query_positions=positions_of(valid)[:, processed - Q:processed],
                    query_valid=chunk_valid, next_update=next_update)


def ref_top(scores, valid, k):
    """Reference keep_top in plain Python: per (b, h) the k[b] largest valid scores,
    ties broken towards the newer (larger) slot index. Returns a set of (b, h, s)."""
    B, H, S = scores.shape
    kept = set()
    for b in range(B):
        for h in range(H):
            slots = [s for s in range(S) if bool(valid[b, h, s])]
            slots.sort(key=lambda s: (float(scores[b, h, s]), s), reverse=True)
            kept.update((b, h, s) for s in slots[:int(k[b])])
    return kept


def as_set(mask):
    return {tuple(i) for i in mask.nonzero().tolist()}


def causal_attention(gen, B, H, q_cols, key_valid, scale=3.0):
    """Softmax attention [B, H, Q, S] of the queries at columns q_cols over the keys at
    columns 0..S-1 (causal, masked by key validity); padding query rows are zero like the
    memory attention hands them to the policies."""
    S = key_valid.shape[-1]
    logits = torch.randn(B, H, len(q_cols), S, generator=gen) * scale
    allowed = torch.zeros(B, 1, len(q_cols), S, dtype=torch.bool)
    for i, c in enumerate(q_cols):
        allowed[:, 0, i, :c + 1] = key_valid[:, None, :c + 1].squeeze(1)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    q_valid = key_valid[:, q_cols]
    return probs * q_valid[:, None, :, None]


# ---------------------------------------------------------------------------------------
# Budget


@pytest.mark.parametrize("spec", ["0.25", 0.25, " 0.25 ", "1.0", 1.0, "1e-3"])
def test_budget_fractions(spec):
    b = Budget.parse(spec)
    assert b.is_fraction and b.value == float(str(spec).strip())


@pytest.mark.parametrize("spec", ["1024", 1024, "1", 7])
def test_budget_counts(spec):
    b = Budget.parse(spec)
    assert not b.is_fraction and b.value == int(spec)


def test_budget_token_counts_written_as_floats():
    assert Budget.parse("1e3") == Budget(1000.0, False)
    assert Budget.parse(1024.0) == Budget(1024.0, False)
    assert Budget.parse("1.0").is_fraction


@pytest.mark.parametrize("spec,words", [
    (0, "positive"), (-1, "positive"), ("0", "positive"), ("-0.5", "positive"),
    ("1.5", "neither a fraction"), (2.5, "neither a fraction"),
    ("abc", "not a number"), ("", "not a number"),
])
def test_budget_rejects_with_reason(spec, words):
    with pytest.raises(ValueError) as err:
        Budget.parse(spec)
    assert words in str(err.value) and repr(spec) in str(err.value)


# Regression: "inf" once reached int() and raised OverflowError instead of naming the problem.
@pytest.mark.parametrize("spec", ["inf", "Infinity"])
def test_budget_rejects_infinity(spec):
    with pytest.raises(ValueError):
        Budget.parse(spec)


def test_budget_parse_passes_budget_through():
    b = Budget(0.5, True)
    assert Budget.parse(b) is b


def test_budget_tokens():
    seen = torch.tensor([0, 1, 3, 10, 64, 101])
    frac = Budget.parse("0.25").tokens(seen)
    assert frac.dtype == torch.long
    # ceil(0.25 * seen), at least one token
    assert frac.tolist() == [1, 1, 1, 3, 16, 26]
    assert Budget.parse(0.5).tokens(seen).tolist() == [1, 1, 2, 5, 32, 51]
    count = Budget.parse("1024").tokens(seen)
    assert count.dtype == torch.long and count.tolist() == [1024] * 6


# Regression: ceil of a float64 product once gave 0.07 * 100 = 7.000000000000001 -> 8 tokens.
def test_budget_tokens_exact_ceil():
    for spec, seen in [("0.07", 100), ("0.14", 100), ("0.7", 10), ("0.3", 10), ("0.57", 100)]:
        expected = math.ceil(Fraction(spec) * seen)
        got = int(Budget.parse(spec).tokens(torch.tensor([seen]))[0])
        assert got == expected, f"budget {spec} of {seen} tokens: {got} != {expected}"


# ---------------------------------------------------------------------------------------
# keep_top


def test_keep_top_keeps_exactly_the_k_largest_valid():
    gen = torch.Generator().manual_seed(0)
    B, H, S = 2, 2, 15
    scores = torch.randn(B, H, S, generator=gen)
    valid = torch.rand(B, H, S, generator=gen) < 0.7
    valid[1, 0, :] = True
    # the highest score of each row sits on an invalid slot
    valid[:, :, 3] = False
    scores[:, :, 3] = 100.0
    k = torch.tensor([4, 6])
    keep = keep_top(scores, valid, k)
    assert keep.shape == (B, H, S) and keep.dtype == torch.bool
    assert as_set(keep) == ref_top(scores, valid, k)
    assert not (keep & ~valid).any()
    assert keep.sum(-1).tolist() == [[4, 4], [6, 6]]


def test_keep_top_more_budget_than_valid_keeps_all_valid_only():
    scores = torch.tensor([[[5., 4., 3., 2., 1., 0.]]])
    valid = torch.tensor([[[False, True, False, True, True, False]]])
    keep = keep_top(scores, valid, torch.tensor([5]))
    assert torch.equal(keep, valid)
    assert not keep_top(scores, valid, torch.tensor([0])).any()


def test_keep_top_minus_inf_valid_scores_still_count():
    # a valid slot with -inf score may be kept when nothing else is left (never an invalid one)
    scores = torch.tensor([[[float("-inf"), 1.0, 2.0, 7.0]]])
    valid = torch.tensor([[[True, True, True, False]]])
    keep = keep_top(scores, valid, torch.tensor([3]))
    assert keep.tolist() == [[[True, True, True, False]]]


def test_keep_top_ties_at_zero_go_to_newer_slot():
    scores = torch.zeros(1, 2, 6)
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    keep = keep_top(scores, valid, torch.tensor([2]))
    assert keep[0, 0].tolist() == [False, False, False, False, True, True]


# Regression: a tie-break by adding arange(S) * 1e-12 once vanished in float32 for scores above
# ~1e-5, and ties went to the older slot.
@pytest.mark.parametrize("value", [1.0, 0.5, 5.0, 1e15])
def test_keep_top_ties_go_to_newer_slot(value):
    scores = torch.tensor([[[value, 0.0, value, 0.0, value, -1.0]]])
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    keep = keep_top(scores, valid, torch.tensor([2]))
    assert as_set(keep) == {(0, 0, 2), (0, 0, 4)}, keep


# ---------------------------------------------------------------------------------------
# FullCache


def test_full_cache_keeps_everything():
    policy = FullCache()
    valid = left_pad_valid(2, 10, [0, 3])
    layer = make_layer(torch.randn(2, 2, 10, 4), valid)
    assert not policy.needs_attention
    assert policy.select(0, layer, step_for(valid, 10, 10, 10)) is None


# ---------------------------------------------------------------------------------------
# StreamingLLM


def test_streamingllm_sinks_plus_recent():
    B, H, S = 2, 2, 16
    valid = left_pad_valid(B, S, [0, 0])
    layer = make_layer(torch.randn(B, H, S, 4), valid)
    policy = StreamingLLM(10, Structure(sinks=4))
    keep = policy.select(0, layer, step_for(valid, S, S, S))
    expected = [True] * 4 + [False] * 6 + [True] * 6          # 4 sinks + 6 most recent
    assert keep.tolist() == [[expected] * H] * B


@pytest.mark.parametrize("pad_position", [0, -1])
def test_streamingllm_fraction_budget_per_sequence_and_left_padding(pad_position):
    B, H, S = 2, 2, 20
    pads = [0, 5]
    valid = left_pad_valid(B, S, pads)
    # what an invalid slot says its position is must not matter (generation clamps it to 0)
    positions = positions_of(valid).masked_fill(~valid, pad_position)
    layer = make_layer(torch.randn(B, H, S, 4), valid, positions)
    policy = StreamingLLM(0.5, Structure(sinks=4))
    keep = policy.select(0, layer, step_for(valid, S, S, S))
    # row 0: seen 20 -> k 10: slots 0-3 and the 6 newest (14-19)
    row0 = [s < 4 or s >= 14 for s in range(S)]
    # row 1: seen 15 -> k 8: the first 4 VALID slots (5-8, positions 0-3) and the 4 newest
    row1 = [5 <= s < 9 or s >= 16 for s in range(S)]
    assert keep[0].tolist() == [row0] * H
    assert keep[1].tolist() == [row1] * H
    assert keep.sum(-1).tolist() == [[10, 10], [8, 8]]


def test_streamingllm_after_compaction_keeps_same_sinks():
    """After an eviction and new tokens, the sinks are still positions 0-3."""
    B, H = 1, 2
    valid = left_pad_valid(B, 12, [0])
    layer = make_layer(torch.randn(B, H, 12, 4), valid)
    policy = StreamingLLM(6, Structure(sinks=4))
    layer.compact(policy.select(0, layer, step_for(valid, 12, 12, 12)))
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 10, 11]
    # append 5 more tokens (positions 12-16, columns 12-16)
    new_valid = torch.ones(B, 5, dtype=torch.bool)
    layer.append(torch.randn(B, H, 5, 4), torch.randn(B, H, 5, 4), torch.arange(12, 17).view(1, 5),
                 new_valid, torch.arange(12, 17).view(1, 5), policy.aux_shapes)
    step = StepInfo(seen=torch.tensor([17]), processed=17, query_positions=torch.arange(12, 17).view(1, 5),
                    query_valid=new_valid, next_update=17)
    keep = policy.select(0, layer, step)
    for h in range(H):
        assert sorted(layer.positions[0, h][keep[0, h]].tolist()) == [0, 1, 2, 3, 15, 16]


# ---------------------------------------------------------------------------------------
# L2Norm


def test_l2norm_keeps_lowest_norm_keys_per_head():
    B, H, S, D = 2, 2, 12, 4
    pads = [0, 3]
    valid = left_pad_valid(B, S, pads)
    gen = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(B, H, S, D, generator=gen), dim=-1)
    # known norms, a different order in each head
    norms = torch.empty(B, H, S)
    norms[:, 0] = torch.tensor([9., 1., 8., 2., 7., 3., 6., 4., 5., 10., 11., 0.5])
    norms[:, 1] = torch.tensor([0.5, 11., 10., 5., 4., 6., 3., 7., 2., 8., 1., 9.])
    keys = directions * norms.unsqueeze(-1)
    # left padding: zero keys (the lowest norm of all) that must never be kept
    keys[1, :, :3] = 0.0
    layer = make_layer(keys, valid)
    policy = L2Norm(4)
    keep = policy.select(0, layer, step_for(valid, S, S, S))
    assert sorted(keep[0, 0].nonzero().flatten().tolist()) == [1, 3, 5, 11]   # norms .5 1 2 3
    assert sorted(keep[0, 1].nonzero().flatten().tolist()) == [0, 6, 8, 10]   # norms .5 1 2 3
    # row 1: slots 0-2 are padding
    assert sorted(keep[1, 0].nonzero().flatten().tolist()) == [3, 5, 7, 11]   # norms .5 2 3 4
    assert sorted(keep[1, 1].nonzero().flatten().tolist()) == [4, 6, 8, 10]   # norms 4 3 2 1
    assert not keep[1, :, :3].any()


# ---------------------------------------------------------------------------------------
# H2O


def _two_chunk_layer(policy, B=2, H=2, S1=8, S2=6, pads=(0, 2), seed=3):
    """Append two chunks to a layer and let the policy observe them like generation does."""
    gen = torch.Generator().manual_seed(seed)
    S = S1 + S2
    valid = left_pad_valid(B, S, pads)
    positions = positions_of(valid)
    columns = torch.arange(S).expand(B, S)
    keys = torch.randn(B, H, S, 4, generator=gen)
    layer = MemoryLayer()
    attns = []
    for lo, hi in [(0, S1), (S1, S)]:
        layer.append(keys[:, :, lo:hi], torch.randn(B, H, hi - lo, 4), positions[:, lo:hi], valid[:, lo:hi],
                     columns[:, lo:hi], policy.aux_shapes)
        attn = causal_attention(gen, B, H, list(range(lo, hi)), valid[:, :hi])
        step = step_for(valid, hi, S, hi - lo)
        policy.observe(0, layer, attn, step)
        attns.append(attn)
    return layer, valid, attns, step


def test_h2o_accumulates_column_sums():
    policy = H2O(0.5)
    layer, valid, (a1, a2), _ = _two_chunk_layer(policy)
    expected = a2.sum(dim=-2)
    expected[..., :a1.shape[-1]] += a1.sum(dim=-2)
    assert layer.aux["h2o_acc"].shape == expected.shape
    assert torch.allclose(layer.aux["h2o_acc"], expected, atol=1e-6)
    assert (layer.aux["h2o_acc"][1, :, :2] == 0).all()   # padding receives no attention


@pytest.mark.parametrize("budget", [0.5, 7, "0.75"])
def test_h2o_keeps_recent_plus_heavy_hitters(budget):
    policy = H2O(budget, recent_fraction=0.5)
    layer, valid, (a1, a2), step = _two_chunk_layer(policy)
    acc = layer.aux["h2o_acc"].clone()
    keep = policy.select(0, layer, step)
    k = Budget.parse(budget).tokens(valid.sum(-1))
    B, H, S = keep.shape
    lv = layer.valid
    for b in range(B):
        n_recent = math.floor(int(k[b]) * 0.5)
        for h in range(H):
            slots = [s for s in range(S) if lv[b, h, s]]
            recent = sorted(slots, key=lambda s: int(layer.positions[b, h, s]))[-n_recent:] if n_recent else []
            rest = [s for s in slots if s not in recent]
            heavy = sorted(rest, key=lambda s: (float(acc[b, h, s]), s), reverse=True)[:int(k[b]) - n_recent]
            got = keep[b, h].nonzero().flatten().tolist()
            assert sorted(got) == sorted(recent + heavy), (b, h, budget)
            assert len(got) == min(int(k[b]), len(slots))
    # the heavy hitters differ per head in this data (the check above is per head)
    assert not torch.equal(keep[:, 0], keep[:, 1])


# ---------------------------------------------------------------------------------------
# TOVA


def test_tova_keeps_top_by_newest_query_of_latest_chunk():
    policy = TOVA(5)
    layer, valid, (a1, a2), step = _two_chunk_layer(policy, seed=4)
    newest = a2[:, :, -1, :]
    assert torch.equal(layer.aux["tova_last"], newest)
    keep = policy.select(0, layer, step)
    assert as_set(keep) == ref_top(newest, layer.valid, [5, 5])
    # not the same as ranking by the whole chunk's attention (the test can tell them apart)
    assert as_set(keep) != ref_top(a2.sum(-2), layer.valid, [5, 5])


# ---------------------------------------------------------------------------------------
# SnapKV


def test_snapkv_observes_only_rows_in_the_window():
    B, H, S1, S2 = 2, 2, 10, 6
    S = S1 + S2
    for window, first_counted_col in [(4, 12), (8, 8)]:
        policy = SnapKV(6, window=window, kernel=3)
        layer, valid, (a1, a2), _ = _two_chunk_layer(policy, S1=S1, S2=S2, pads=(0, 3), seed=5)
        expected = torch.zeros(B, H, S)
        for col in range(first_counted_col, S):
            if col < S1:
                expected[..., :S1] += a1[:, :, col, :]
            else:
                expected += a2[:, :, col - S1, :]
        assert torch.allclose(layer.aux["snap_obs"], expected, atol=1e-6), window


def _snap_layer_with_obs(obs, window):
    """A 16-slot layer whose observation equals obs [1, H, 16] (one query row at column 15)."""
    H, S = obs.shape[1], obs.shape[2]
    valid = torch.ones(1, S, dtype=torch.bool)
    layer = make_layer(torch.randn(1, H, S, 4), valid, aux_shapes={"snap_obs": ()})
    step = step_for(valid, S, S, 1)
    return layer, step


def test_snapkv_pools_scores_and_keeps_window():
    S, window = 16, 4
    obs = torch.zeros(1, 2, S)
    # head 0: peaks at slots 5 and 9; small distinct noise elsewhere (the window slots 12-15
    # get nothing: they must be kept for being the window, not for their score)
    obs[0, 0, :12] = torch.arange(12) * 0.01
    obs[0, 0, 5], obs[0, 0, 9] = 1.0, 0.5
    # head 1: peaks at slots 2 and 7
    obs[0, 1, :12] = (11 - torch.arange(12)) * 0.01
    obs[0, 1, 2], obs[0, 1, 7] = 0.9, 0.6
    obs[0, :, 12:] = 0.0
    policy = SnapKV(10, window=window, kernel=3)
    layer, step = _snap_layer_with_obs(obs, window)
    policy.observe(0, layer, obs.unsqueeze(2), step)
    assert torch.allclose(layer.aux["snap_obs"], obs)
    keep = policy.select(0, layer, step)
    # window 12-15 + the max-pooled plateaus (kernel 3) around each peak
    assert keep[0, 0].nonzero().flatten().tolist() == [4, 5, 6, 8, 9, 10, 12, 13, 14, 15]
    assert keep[0, 1].nonzero().flatten().tolist() == [1, 2, 3, 6, 7, 8, 12, 13, 14, 15]
    # unpooled top-k would have been different
    assert as_set(keep) != ref_top(obs + (torch.arange(S) >= 12) * 1e3, layer.valid, [10])
    # a new observation window starts after the update
    assert (layer.aux["snap_obs"] == 0).all()


def test_snapkv_pooled_scores_reference():
    """Random observations: window + top-(k - window) of the max-pool computed by hand."""
    gen = torch.Generator().manual_seed(6)
    S, window, kernel, k = 16, 3, 5, 9
    obs = torch.rand(1, 2, S, generator=gen)
    policy = SnapKV(k, window=window, kernel=kernel)
    layer, step = _snap_layer_with_obs(obs, window)
    policy.observe(0, layer, obs.unsqueeze(2), step)
    keep = policy.select(0, layer, step)
    half = kernel // 2
    pooled = torch.tensor([[[max(obs[0, h, max(0, s - half):s + half + 1].tolist()) for s in range(S)]
                            for h in range(2)]])
    win = [s for s in range(S) if s > S - 1 - window]
    for h in range(2):
        rest = sorted((s for s in range(S) if s not in win), key=lambda s: (float(pooled[0, h, s]), s),
                      reverse=True)
        # only compare when there is no tie at the boundary (ties are tested separately)
        cut = k - window
        if float(pooled[0, h, rest[cut - 1]]) != float(pooled[0, h, rest[cut]]):
            assert sorted(keep[0, h].nonzero().flatten().tolist()) == sorted(win + rest[:cut]), h
    assert keep.sum(-1).tolist() == [[k, k]]


# Max-pooling makes plateaus of equal scores, so ties at SnapKV's cut-off are common: they go to
# the newer slot, as keep_top documents.
def test_snapkv_plateau_tie_goes_to_newer_slot():
    S, window = 16, 4
    obs = torch.zeros(1, 1, S)
    obs[0, 0, 5] = 1.0          # pooled plateau 4, 5, 6 = 1.0
    policy = SnapKV(window + 2, window=window, kernel=3)
    layer, step = _snap_layer_with_obs(obs, window)
    policy.observe(0, layer, obs.unsqueeze(2), step)
    keep = policy.select(0, layer, step)
    assert keep[0, 0].nonzero().flatten().tolist() == [5, 6, 12, 13, 14, 15]


# ---------------------------------------------------------------------------------------
# the tiny model


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


# every budgeted baseline in the registry, and SnapKV with a window shorter than an update
# per head (kvzip shares its budget model-wide by default): the budget holds for every row
EVICTING = {name: (lambda name=name: parse_policy(f"{name}:0.5/head")) for name in budgeted_baselines()}
EVICTING["snapkv_small_window"] = lambda: SnapKV(0.5, window=8, kernel=3)


@pytest.fixture(scope="module")
def e2e_setup():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(8)
    T, pad = 64, 6
    ids = torch.randint(0, 64, (2, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    full = MemoryManagedLM(model, FullCache(), update_every=16, chunk_size=16).generate(
        ids, attention_mask=mask, max_new_tokens=20)
    return model, ids, mask, pad, full


@pytest.mark.parametrize("name", list(EVICTING))
def test_evicting_baselines_end_to_end(name, e2e_setup):
    model, ids, mask, pad, full = e2e_setup
    T, new, every = ids.shape[1], 20, 16
    lm = MemoryManagedLM(model, EVICTING[name](), update_every=every, chunk_size=every, tokenizer=TinyTokenizer())
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=new)
    processed = T + new - 1                       # the last generated token is never fed back
    last_update = processed // every * every      # 80
    since = processed - last_update               # 3 tokens appended after it
    assert out.stats.updates == processed // every
    seen_at_update = torch.tensor([last_update, last_update - pad])
    budget = torch.ceil(seen_at_update.double() * 0.5).long()   # [40, 37]
    kept = out.stats.kept_per_layer_head          # [L, B, H]
    assert kept.shape == (2, 2, 2)
    limit = (budget + since).view(1, 2, 1)
    assert (kept <= limit).all(), (kept, limit)
    # enough tokens were valid at every update, so the budget is met exactly
    assert (kept == limit).all(), (kept, limit)
    assert out.stats.tokens_seen == [processed, processed - pad]
    assert out.stats.final_kv_bytes < full.stats.final_kv_bytes
    # the cache holds at most the longest kept row: 43 of 83 slots
    assert out.stats.final_kv_bytes * 83 <= full.stats.final_kv_bytes * int(limit.max())


# ---------------------------------------------------------------------------------------
# FastGen


def test_fastgen_gives_each_head_the_cheapest_rule_that_recovers_enough_attention():
    from namm_core.policies import FastGen

    S, Q = 20, 4
    ids = torch.tensor([[0, 5, 6, 1, 7, 8, 9, 2, 10, 11, 12, 13, 1, 14, 15, 16, 17, 18, 19, 20]])
    special, punct = {0}, {3, 7, 12}
    mass = torch.zeros(4, S)
    mass[0, 0] = 1.0                                       # a BOS sink: special tokens suffice
    mass[1, 0], mass[1, [3, 7, 12]], mass[1, 9] = 0.5, 0.15, 0.05   # + punctuation reaches 0.95
    mass[2, [5, 9, 10, 13]] = 0.24                          # needs its heavy hitters
    mass[2, 0] = 0.04
    mass[3] = 1.0 / S                                      # spread out: nothing short of everything
    attn = (mass / Q).view(1, 4, 1, S).expand(1, 4, Q, S).contiguous()
    policy = FastGen(recovery=0.85, heavy_fraction=0.3, recent_fraction=0.3)
    policy.bind_tokenizer(TinyTokenizer())
    policy.new_sequence()
    valid = torch.ones(1, S, dtype=torch.bool)
    layer = make_layer(torch.randn(1, 4, S, 2), valid, aux_shapes=policy.aux_shapes)
    step = StepInfo(seen=torch.tensor([S]), processed=S, query_positions=torch.arange(S - Q, S).view(1, Q),
                    query_valid=torch.ones(1, Q, dtype=torch.bool), next_update=S, query_ids=ids[:, S - Q:])
    # the token kinds of the whole prompt, as if every chunk had been observed
    policy.observe(0, layer, torch.zeros(1, 4, 0, S), dataclass_replace(step, processed=S, query_ids=ids))
    policy.observe(0, layer, attn, step)
    keep = policy.select(0, layer, step)

    n = math.ceil(0.3 * S)
    heavy_of = lambda h: set(sorted(range(S), key=lambda s: (float(mass[h, s]), s), reverse=True)[:n])  # noqa: E731
    recent = set(range(S - n, S))
    expected_rules, expected = [], []
    for h in range(4):
        rules = [special, special | punct, special | punct | heavy_of(h), special | punct | heavy_of(h) | recent,
                 set(range(S))]
        rule = next(i for i, r in enumerate(rules) if sum(float(mass[h, s]) for s in r) >= 0.85 - 1e-6)
        expected_rules.append(rule)
        expected.append(rules[rule])
    assert expected_rules == [0, 1, 2, 4]          # the data exercise four different rules
    for h in range(4):
        assert set(keep[0, h].nonzero().flatten().tolist()) == expected[h], h
    assert policy.rule_counts.tolist() == [1, 1, 1, 0, 1]
    assert float(layer.aux["fg_recent"].abs().sum()) == 0.0   # a fresh profile for the next update


def dataclass_replace(step, **changes):
    import dataclasses

    return dataclasses.replace(step, **changes)


def test_fastgen_end_to_end_and_its_errors():
    from namm_core.policies import FastGen
    from namm_core.registry import parse_policy

    model = tiny_llama()
    ids = torch.randint(3, 64, (1, 80), generator=torch.Generator().manual_seed(13))
    ids[0, 0] = 0
    ids[0, 10::9] = 1
    with pytest.raises(ValueError, match="needs the tokenizer"):
        MemoryManagedLM(model, FastGen(), update_every=16, chunk_size=16).generate(ids, max_new_tokens=4)
    policy = parse_policy("fastgen:0.6")
    assert isinstance(policy, FastGen) and policy.recovery == 0.6 and policy.describe() == "fastgen:0.6"
    out = MemoryManagedLM(model, policy, update_every=16, chunk_size=16, tokenizer=TinyTokenizer()).generate(
        ids, max_new_tokens=8)
    assert out.stats.updates > 0 and out.stats.mean_retention < 1.0
    assert int(policy.rule_counts.sum()) == out.stats.updates * 2 * 2   # layers x KV heads per update
    for bad in ("fastgen:0", "fastgen:1.5", "fastgen:x"):
        with pytest.raises(ValueError, match="fastgen"):
            parse_policy(bad)

"""The memory's faster ways of doing plain things give exactly what the plain ways give: the
query-group mean of the attention rows, a compaction that keeps one set of slots for every head,
and one attention mask broadcast over heads that hold the same slots."""
import pytest
import torch
from conftest import tiny_config, tiny_model
from test_memory_equivalence import RecordingRandomKeep

from namm_core import attention
from namm_core.attention import mean_over_group, namm_attention_forward
from namm_core.cache import MemoryCache, MemoryLayer, active_cache
from namm_core.features import _late_key_masks
from namm_core.generation import MemoryManagedLM
from namm_core.namm import NAMM
from namm_core.policies import FullCache


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("probs_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("with_work", [False, True])
def test_group_mean_equals_torch_mean_bit_for_bit(group, probs_dtype, out_dtype, with_work):
    g = torch.Generator().manual_seed(group)
    probs = torch.softmax(3 * torch.randn(2, 3, group, 17, 301, generator=g), dim=-1).to(probs_dtype)
    buffer = torch.full((2, 3, 40, 301), float("nan"), dtype=out_dtype)
    out = buffer[:, :, 5:22]                                   # a strided slice, as the attention writes
    # a reused float32 sum (the attention's scratch), holding whatever the last block left there
    work = torch.full(out.shape, float("nan")) if with_work and out_dtype != torch.float32 else None
    mean_over_group(probs, out, work=work)
    assert torch.equal(out, torch.mean(probs.to(out_dtype), dim=2))
    assert buffer[:, :, :5].isnan().all() and buffer[:, :, 22:].isnan().all()   # nothing written outside


def _filled_layer(B=2, H=3, S=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = MemoryLayer()
    positions = torch.arange(S).expand(B, S)
    layer.append(torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g), positions,
                 torch.ones(B, S, dtype=torch.bool), positions.clone(), {"stat": (5,), "score": ()})
    layer.aux["stat"].copy_(torch.randn(B, H, S, 5, generator=g))
    layer.aux["score"].copy_(torch.randn(B, H, S, generator=g))
    return layer


@pytest.mark.parametrize("uniform,batch", [(True, 1), (True, 2), (False, 2)])
def test_compaction_keeps_each_rows_slots_in_order(uniform, batch):
    layer = _filled_layer(B=batch)
    B, H, S = layer.valid.shape
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(1 if uniform else B, 1 if uniform else H, S, generator=g) < 0.4
    keep = keep.expand(B, H, S).clone()
    keep[..., -1] = True
    before = {"keys": layer.keys.clone(), "values": layer.values.clone(), "positions": layer.positions.clone(),
              "columns": layer.columns.clone(),
              "stat": layer.aux["stat"].clone(), "score": layer.aux["score"].clone()}
    layer.compact(keep)
    for b in range(B):
        for h in range(H):
            n = int(keep[b, h].sum())
            kept = keep[b, h]
            assert torch.equal(layer.keys[b, h, :n], before["keys"][b, h][kept])
            assert torch.equal(layer.values[b, h, :n], before["values"][b, h][kept])
            assert torch.equal(layer.positions[b, h, :n], before["positions"][b, h][kept])
            assert torch.equal(layer.columns[b, h, :n], before["columns"][b, h][kept])
            assert torch.equal(layer.aux["stat"][b, h, :n], before["stat"][b, h][kept])
            assert torch.equal(layer.aux["score"][b, h, :n], before["score"][b, h][kept])
            assert layer.valid[b, h, :n].all() and not layer.valid[b, h, n:].any()


class _Module:
    layer_idx = 0


def _chunk_on_compacted_cache(dtype=torch.float32):
    """A layer holding a compacted cache plus a new chunk's keys, and the chunk's queries."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, n_rep, D, S_old, Q = 1, 3, 3, 16, 30, 40
    cache = MemoryCache(tiny_config("llama"))
    cache.layers[0] = _filled_layer(B=B, H=Hkv, S=S_old, D=D)
    layer = cache.layers[0]
    layer.compact((torch.rand(B, 1, S_old, generator=g) < 0.5).expand(B, Hkv, S_old))
    layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    first_new = int(layer.positions.max()) + 1 + 7              # a gap: evicted tokens before the chunk
    positions = torch.arange(first_new, first_new + Q).expand(B, Q)
    valid = torch.ones(B, Q, dtype=torch.bool)
    cache.set_chunk(positions, valid, positions.clone())
    layer.append(torch.randn(B, Hkv, Q, D, generator=g).to(dtype), torch.randn(B, Hkv, Q, D, generator=g).to(dtype),
                 positions, valid, positions.clone(), {})
    return layer, cache, torch.randn(B, Hkv * n_rep, Q, D, generator=g).to(dtype)


def test_one_mask_for_heads_holding_the_same_slots_equals_a_mask_per_head():
    """A chunk attending to a compacted cache plus its own slots, with its rows observed."""
    layer, cache, query = _chunk_on_compacted_cache()
    Q = query.shape[2]
    seen = []
    cache.observer = lambda i, lay, rows: seen.append(rows.clone())
    with cache.active():
        assert layer.heads_uniform
        shared, _ = namm_attention_forward(_Module(), query, layer.keys, layer.values, None)
        layer.heads_uniform = False
        per_head, _ = namm_attention_forward(_Module(), query, layer.keys, layer.values, None)
    assert torch.equal(shared, per_head)
    assert torch.equal(seen[0], seen[1])
    # the chunk's queries do not see its later keys: a causal triangle of zeros in the rows
    new = seen[0][..., -Q:]
    assert (new.triu(diagonal=1) == 0).all() and (new.diagonal(dim1=-2, dim2=-1) > 0).all()


def _recorded(model, ids, mask, row_capture, policy=None):
    policy = policy or RecordingRandomKeep(keep_prob=0.7, seed=5)
    out = MemoryManagedLM(model, policy, update_every=16, chunk_size=24, row_capture=row_capture).generate(
        ids, attention_mask=mask, max_new_tokens=5, return_logits=True)
    return out, policy


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_separate_row_capture_runs_like_the_inline_capture(kind):
    """The GPU way (outputs fused, rows apart) run on CPU through a whole generation: the same
    rows and logits up to the fused kernel's rounding (later layers read slightly different inputs)."""
    model = tiny_model(kind, seed=2)
    ids = torch.randint(1, 97, (2, 60), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    inline, p_inline = _recorded(model, ids, mask, "inline")
    separate, p_separate = _recorded(model, ids, mask, "separate")
    assert len(p_inline.observed) == len(p_separate.observed) > 0
    for a, b in zip(p_inline.observed, p_separate.observed):
        assert torch.allclose(a, b, atol=1e-6)
    assert p_inline.evicted == p_separate.evicted and len(p_inline.evicted) > 0
    real = torch.cat([mask, torch.ones_like(inline.sequences[:, :-1])], 1).bool()
    assert (inline.logits[real] - separate.logits[real]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("observe_from", [0, 5])
def test_separate_row_capture_gives_the_inline_rows_bit_for_bit(dtype, observe_from, monkeypatch):
    """On the same inputs the rows handed over are identical, and the outputs agree (also when only
    the chunk's later rows are read, and with the rows in several blocks)."""
    monkeypatch.setattr(attention, "EAGER_BLOCK_BYTES", 16 * 9 * 42 * 4)    # blocks of 16 rows
    layer, cache, query = _chunk_on_compacted_cache(dtype)
    cache.observe_dtype, cache.observe_from = dtype, observe_from
    seen, outputs = [], []
    cache.observer = lambda i, lay, rows: seen.append(rows.clone())
    with cache.active():
        for mode in ("inline", "separate"):
            cache.row_capture = mode
            outputs.append(namm_attention_forward(_Module(), query, layer.keys, layer.values, None)[0])
    assert torch.equal(seen[0], seen[1]) and seen[0].dtype == dtype
    assert torch.allclose(outputs[0].float(), outputs[1].float(), atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("pad", [0, 13])
def test_separate_row_capture_zero_namm_equals_the_full_cache(pad):
    """With every output from the fused kernel, a NAMM that keeps everything is the full cache: bit for
    bit in a batch without padding; with left padding the compacted cache drops the padding slots the
    full cache keeps (masked), so the fused kernel's sums round differently (~1e-7)."""
    model = tiny_model("llama", seed=3)
    ids = torch.randint(1, 97, (2, 90), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    settings = dict(update_every=32, chunk_size=20)
    full = MemoryManagedLM(model, FullCache(), **settings).generate(ids, attention_mask=mask, max_new_tokens=6,
                                                                    return_logits=True)
    zero = MemoryManagedLM(model, NAMM(), row_capture="separate", **settings).generate(
        ids, attention_mask=mask, max_new_tokens=6, return_logits=True)
    assert zero.stats.updates > 0 and zero.stats.observe_seconds > 0     # rows were read
    assert torch.equal(full.sequences, zero.sequences)
    real = torch.cat([mask, torch.ones_like(zero.sequences[:, :-1])], 1).bool()
    if pad:
        assert (full.logits[real] - zero.logits[real]).abs().max() < 1e-5
    else:
        assert torch.equal(full.logits, zero.logits)


def test_row_capture_choice_is_checked_and_inline_by_default():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="row_capture 'fused'"):
        MemoryManagedLM(model, NAMM(), row_capture="fused")
    seen = []
    policy = RecordingRandomKeep(keep_prob=0.7, seed=5)
    observe = policy.observe
    policy.observe = lambda *a: (seen.append(active_cache().row_capture), observe(*a))
    MemoryManagedLM(model, policy, update_every=16).generate(torch.randint(1, 97, (1, 40)), max_new_tokens=2)
    assert seen and set(seen) == {"inline"}


@pytest.mark.parametrize("late", ["appended", "none"])
def test_late_key_frames_found_once_equal_the_general_mask(late):
    """The fold zeroes frame j of keys that arrived after it: the suffix fill (frame starts found once)
    gives what the general per-key mask gives."""
    S, k = 40, 9
    first = torch.randint(-3, 1, (2, 3, S), generator=torch.Generator().manual_seed(2))
    if late == "appended":
        first[..., S - 15:] = torch.sort(torch.randint(-1, k + 3, (15,), generator=torch.Generator().manual_seed(3))).values
    masks = _late_key_masks(first, k)
    assert masks.suffix is not None or late == "none"
    for j in range(k):
        fast = torch.rand(2, 3, 17, S, generator=torch.Generator().manual_seed(j))
        general = fast.clone()
        masks.apply(fast, j)
        general.masked_fill_(first.unsqueeze(-2) > j, 0.0)
        assert torch.equal(fast, general)

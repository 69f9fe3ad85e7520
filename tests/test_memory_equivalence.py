"""The memory changes nothing it should not: a zero NAMM equals the full cache, and any
eviction equals full attention with the evicted tokens masked out."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm_core.generation import MemoryManagedLM
from namm_core.namm import NAMM
from namm_core.policies import FullCache, MemoryPolicy


class RandomKeep(MemoryPolicy):
    """Evicts a random subset at every update, different per layer, batch row and head,
    and records when each (layer, batch, head, position) was evicted."""
    name = "random"

    def __init__(self, keep_prob=0.6, seed=0):
        self.keep_prob, self.seed = keep_prob, seed
        self.evicted = []  # (layer, b, h, position, column at which it stopped being visible)

    def new_sequence(self):
        self.gen = torch.Generator().manual_seed(self.seed)
        self.evicted = []

    def select(self, layer_idx, layer, step):
        keep = torch.rand(layer.valid.shape, generator=self.gen) < self.keep_prob
        newly = layer.valid & ~keep
        for b, h, s in newly.nonzero().tolist():
            self.evicted.append((layer_idx, b, h, int(layer.positions[b, h, s]), step.processed))
        return keep


_REFERENCE_MASKS = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    mask = _REFERENCE_MASKS[module.layer_idx]                      # [B, H_kv, T, T]
    n_rep = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.repeat_interleave(n_rep, 1),
                                         scale=scaling, enable_gqa=n_rep > 1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("masked_reference", _masked_reference_attention)
AttentionMaskInterface.register("masked_reference", sdpa_mask)


def reference_logits(model, ids, attention_mask, evicted, n_layers, n_kv, sliding=None):
    """Full forward in which each layer/head hides a token from every query processed at or
    after the column where the memory evicted it."""
    B, T = ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    pad_offset = T - attention_mask.sum(-1)                       # column = position + pad_offset
    q_col = torch.arange(T).view(1, T, 1)
    k_col = torch.arange(T).view(1, 1, T)
    base = (k_col <= q_col) & attention_mask.bool().view(B, 1, T)
    for layer in range(n_layers):
        m = base.unsqueeze(1).repeat(1, n_kv, 1, 1)
        if sliding and sliding[layer]:
            m &= (positions.view(B, 1, 1, T) > positions.view(B, 1, T, 1) - sliding[layer])
        _REFERENCE_MASKS[layer] = m
    for layer, b, h, pos, column in evicted:
        k = pos + int(pad_offset[b])
        _REFERENCE_MASKS[layer][b, h, column:, k] = False
    for layer in range(n_layers):  # padding query rows: anything finite
        _REFERENCE_MASKS[layer] |= ~attention_mask.bool().view(B, 1, T, 1)
    model.set_attn_implementation("masked_reference")
    try:
        return model(input_ids=ids, position_ids=positions).logits
    finally:
        model.set_attn_implementation("sdpa")


def assert_equals_masked_reference(model, ids, mask, out, evicted, n_layers, n_kv, sliding=None):
    """Teacher-force the generated tokens through the masked full forward and compare the
    logits of every real position with the memory-managed run's."""
    full_ids = torch.cat([ids, out.sequences[:, :-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, :-1])], dim=1)
    ref = reference_logits(model, full_ids, full_mask, evicted, n_layers, n_kv, sliding=sliding)
    real = full_mask.bool()
    assert torch.allclose(out.logits[real], ref[real], atol=1e-4), (out.logits[real] - ref[real]).abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("policy", ["full", "zero namm"])
def test_full_cache_and_zero_namm_equal_the_model(kind, policy):
    """Keeping everything changes nothing: every prompt position's logits equal the model's own
    forward, and the greedy tokens equal transformers' generate (batch 2, left padding)."""
    model = tiny_model(kind)
    T, pad = 150, 9
    ids = torch.randint(1, 97, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    with torch.inference_mode():
        ref_rows = [model(ids[:1]).logits[0], model(ids[1:, pad:]).logits[0]]
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)[:, T:]
    lm = MemoryManagedLM(model, FullCache() if policy == "full" else NAMM(), update_every=32, chunk_size=20)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=12, return_logits=True)
    assert (out.logits[0, :T] - ref_rows[0]).abs().max() < 1e-4
    assert (out.logits[1, pad:T] - ref_rows[1]).abs().max() < 1e-4
    assert torch.equal(out.sequences, ref_tokens)
    assert out.stats.mean_retention == 1.0 and out.stats.updates > 0


@pytest.mark.parametrize("batch,left_pad", [(1, False), (2, True)])
@pytest.mark.parametrize("chunk,update", [(16, 16), (10, 32)])
def test_random_eviction_equals_masked_full_attention(batch, left_pad, chunk, update):
    model = tiny_model("llama", num_hidden_layers=3)
    T = 100
    ids = torch.randint(0, 97, (batch, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(batch, T, dtype=torch.long)
    if left_pad:
        mask[1, :23] = 0
        ids[1, :23] = 0
    policy = RandomKeep(keep_prob=0.6, seed=3)
    lm = MemoryManagedLM(model, policy, update_every=update, chunk_size=chunk)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=20, return_logits=True)
    assert len(policy.evicted) > 50, "the test must actually evict"
    assert out.stats.mean_retention < 0.9
    assert_equals_masked_reference(model, ids, mask, out, policy.evicted, 3, 2)
    # and the cache really shrank below the tokens seen
    assert out.stats.final_kv_bytes < out.stats.peak_kv_bytes or out.stats.updates == 0


def test_eviction_equivalence_on_sliding_window_layers():
    """Gemma 3: sliding layers evict outside their window, and random eviction on top."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    policy = RandomKeep(keep_prob=0.7, seed=5)
    lm = MemoryManagedLM(model, policy, update_every=16, chunk_size=16)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, return_logits=True)
    sliding = [24 if t == "sliding_attention" else None for t in model.config.layer_types]
    assert_equals_masked_reference(model, ids, mask, out, policy.evicted, 4, 2, sliding=sliding)
    # sliding layers hold no more than window + tokens since the last update
    kept = out.stats.kept_per_layer_head
    for layer, w in enumerate(sliding):
        if w:
            assert int(kept[layer].max()) <= w + 16


@pytest.mark.slow
def test_zero_namm_equals_full_cache_smollm2(smollm2):
    model, tok = smollm2
    text = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(120))
    ids = tok(text, return_tensors="pt").input_ids[:, :700]
    with torch.inference_mode():
        ref = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    lm = MemoryManagedLM(model, NAMM(), update_every=256, chunk_size=256)
    out = lm.prefill_logits(ids)
    assert (out.logits - ref).abs().max() < 1e-4
    gen = lm.generate(ids, max_new_tokens=8)
    assert torch.equal(gen.sequences, ref_tokens)


class ObservingRandomKeep(RandomKeep):
    """RandomKeep on the eager attention path (as if it read attention values)."""
    needs_attention = True

    def observe(self, layer_idx, layer, attn, step):
        self.rows_seen = getattr(self, "rows_seen", 0) + attn.shape[-2]


@pytest.mark.parametrize("block_bytes", [1, 1 << 30])
def test_random_eviction_equals_masked_full_attention_on_the_eager_path(monkeypatch, block_bytes):
    """The eager path (blocks of 16 query rows, or one block per chunk) with batch 2 and left padding."""
    from namm_core import attention

    monkeypatch.setattr(attention, "EAGER_BLOCK_BYTES", block_bytes)
    model = tiny_model("llama", num_hidden_layers=3)
    T = 100
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :19] = 0
    policy = ObservingRandomKeep(keep_prob=0.6, seed=7)
    lm = MemoryManagedLM(model, policy, update_every=32, chunk_size=40)
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=12, return_logits=True)
    assert len(policy.evicted) > 50 and policy.rows_seen == 3 * (T + 11)
    assert_equals_masked_reference(model, ids, mask, out, policy.evicted, 3, 2)


def test_decoded_tokens_are_written_in_place_and_equal_concatenation():
    """A decoded token goes into the layer's reserve (no copy of the layer); the result equals
    plain concatenation, and a field a policy replaced gets a fresh buffer with its values."""
    from namm_core.cache import MemoryLayer

    g = torch.Generator().manual_seed(10)
    layer, shapes = MemoryLayer(), {"stat": (3,)}
    keys = [torch.randn(1, 2, 5, 4, generator=g)] + [torch.randn(1, 2, 1, 4, generator=g) for _ in range(70)]
    pointers = []
    for i, k in enumerate(keys):
        n = k.shape[2]
        pos = torch.arange(sum(t.shape[2] for t in keys[:i]), sum(t.shape[2] for t in keys[:i + 1])).view(1, n)
        layer.append(k, -k, pos, torch.ones(1, n, dtype=torch.bool), pos, shapes)
        pointers.append(layer.keys.data_ptr())
        if i == 30:  # a policy replaces its statistics with a new tensor
            layer.aux["stat"] = torch.full_like(layer.aux["stat"], 7.0)
    assert torch.equal(layer.keys, torch.cat(keys, dim=2)) and torch.equal(layer.values, -torch.cat(keys, dim=2))
    assert torch.equal(layer.positions[0, 0], torch.arange(75)) and bool(layer.valid.all())
    assert bool((layer.aux["stat"][:, :, :35] == 7).all()) and bool((layer.aux["stat"][:, :, 35:] == 0).all())
    # the first single token allocates a reserve of 64 slots; the next 64 are written in place
    assert len(set(pointers[1:66])) == 1 and pointers[66] != pointers[65]
    layer.compact(torch.arange(75).view(1, 1, 75).expand(1, 2, 75) % 2 == 0)
    k_new = torch.randn(1, 2, 1, 4, generator=g)
    layer.append(k_new, k_new, torch.tensor([[75]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[75]]), shapes)
    assert torch.equal(layer.keys, torch.cat([torch.cat(keys, dim=2)[:, :, ::2], k_new], dim=2))


class RecordingRandomKeep(ObservingRandomKeep):
    """Records every block of attention rows it observes."""

    def new_sequence(self):
        super().new_sequence()
        self.observed = []

    def observe(self, layer_idx, layer, attn, step):
        self.observed.append(attn.clone())


def _tiny_gemma2():
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                          sliding_window=24, attn_logit_softcapping=5.0, query_pre_attn_scalar=8)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                        ("gemma3", torch.float32), ("gemma2", torch.float32)])
def test_observed_attention_rows_equal_a_plain_masked_softmax(monkeypatch, kind, dtype):
    """What the eager path hands to a policy, block by block, equals softmax(q k^T * scale + mask)
    averaged over each KV head's query heads, with padding queries zeroed: batch 2 with left
    padding, per-head eviction, sliding windows (Gemma 3/2) and softcapping (Gemma 2)."""
    from namm_core import attention

    monkeypatch.setattr(attention, "EAGER_BLOCK_BYTES", 1)   # blocks of 16 query rows
    model = (_tiny_gemma2() if kind == "gemma2" else tiny_model(kind)).to(dtype)
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    policy = RecordingRandomKeep(keep_prob=0.7, seed=12)
    lm = MemoryManagedLM(model, policy, update_every=16, chunk_size=40)
    captured = []
    real_forward = attention.namm_attention_forward

    def capturing(module, query, key, value, attention_mask, **kwargs):
        cache = attention.active_cache()
        layer = cache.layers[module.layer_idx]
        captured.append((query.float().clone(), key.float().clone(), layer.valid.clone(), layer.positions.clone(),
                         cache.chunk_positions.clone(), cache.chunk_valid.clone(),
                         kwargs.get("sliding_window") or layer.sliding_window, kwargs.get("softcap"),
                         kwargs.get("scaling") or query.shape[-1] ** -0.5, layer))
        return real_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, capturing)
    try:
        lm.generate(ids, attention_mask=mask, max_new_tokens=6)
    finally:
        AttentionInterface.register(attention.ATTN_IMPLEMENTATION, real_forward)
    assert len(captured) == len(policy.observed) > 0 and len(policy.evicted) > 0
    for (q, k, valid, positions, qpos, qvalid, window, softcap, scale, _layer), seen in zip(captured, policy.observed):
        B, Hq, Q, _ = q.shape
        Hkv = k.shape[1]
        logits = torch.einsum("bhqd,bhsd->bhqs", q, k.repeat_interleave(Hq // Hkv, dim=1)) * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        kp, qp = positions.unsqueeze(-2), qpos[:, None, :, None]
        allowed = valid.unsqueeze(-2) & (kp <= qp)
        if window is not None:
            allowed &= kp > qp - window
        allowed |= ~qvalid[:, None, :, None]
        logits = logits.masked_fill(~allowed.repeat_interleave(Hq // Hkv, dim=1), float("-inf"))
        expected = torch.softmax(logits, -1).view(B, Hkv, Hq // Hkv, Q, -1).mean(2) * qvalid[:, None, :, None]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(seen, expected, atol=tol), (seen - expected).abs().max()

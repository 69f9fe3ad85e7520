"""The current peers, each against a plain re-computation of its rule from the model's own
tensors: Expected Attention (query statistics before RoPE, RoPE averaged over future positions,
the expected softmax times the value norm), KVzip (the model asked to repeat its context, the
softmax over each piece's own keys), and the head-adaptive (AdaKV) and model-wide budgets."""
import pytest
import torch
from conftest import TinyTokenizer, tiny_model

from namm_core import MemoryManagedLM, parse_policy
from namm_core.expected_attention import ExpectedAttention
from namm_core.kvzip import FIRST_PROMPT, NEXT_PROMPT, KVzip
from namm_core.rope import Rotary
from namm_core.selection import Structure, select_with_structure


def plain_forward(model, ids):
    """Hidden states entering each layer, and the full cache's keys and values (after RoPE)."""
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True)
    return out.hidden_states, out.past_key_values


def rope_by_hand(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double().view(-1, 1) * inv_freq
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def rotate_half_matrix(dim: int) -> torch.Tensor:
    P = torch.zeros(dim, dim, dtype=torch.float64)
    half = dim // 2
    P[torch.arange(half), torch.arange(half) + half] = -1.0
    P[torch.arange(half) + half, torch.arange(half)] = 1.0
    return P


class Capture:
    """Wraps a policy's score() to keep what it returned at each update."""

    def __init__(self, policy):
        self.scores = []
        inner = policy.score

        def score(layer_idx, layer, step):
            s = inner(layer_idx, layer, step)
            self.scores.append((layer_idx, s.clone(), layer.positions.clone()))
            return s
        policy.score = score


def test_expected_attention_equals_its_formula_from_the_model_tensors():
    model = tiny_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    with torch.no_grad():   # logits of order 1 (a random tiny model attends almost uniformly)
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(12.0)
            block.self_attn.k_proj.weight.mul_(12.0)
    T, sinks, future = 60, 4, 512
    ids = torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(0))
    policy = ExpectedAttention("0.5", Structure(sinks=sinks), future=future, epsilon=0.01)
    capture = Capture(policy)
    MemoryManagedLM(model, policy, update_every=16, chunk_size=16).generate(ids, max_new_tokens=2, compress_at=T)
    hidden, cache = plain_forward(model, ids)
    cfg = model.config
    D, Hq, H = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    cos, sin = rope_by_hand(torch.arange(T, T + future), D, cfg.rope_parameters["rope_theta"])
    P = rotate_half_matrix(D)
    R = (torch.diag_embed(cos) + torch.diag_embed(sin) @ P).mean(0)                   # averaged rotation
    assert len(capture.scores) == cfg.num_hidden_layers
    for layer_idx, got, positions in capture.scores:
        block = model.model.layers[layer_idx]
        with torch.no_grad():
            x = block.input_layernorm(hidden[layer_idx])
            q = block.self_attn.q_proj(x).view(T, Hq, D).transpose(0, 1).double()        # before RoPE
        keys, values = cache.layers[layer_idx].keys[0].double(), cache.layers[layer_idx].values[0].double()
        q = q[:, sinks:]
        mean = q.mean(1)                                                                  # [Hq, D]
        cov = torch.einsum("hnd,hne->hde", q - mean[:, None], q - mean[:, None]) / q.shape[1]
        mean, cov = mean @ R.T, R @ cov @ R.T
        expected = torch.zeros(H, T, dtype=torch.float64)
        for h in range(Hq):
            k = keys[h // (Hq // H)]
            z = k @ mean[h] / D ** 0.5 + 0.5 * torch.einsum("sd,de,se->s", k, cov[h], k) / D
            z[:sinks] = float("-inf")
            expected[h // (Hq // H)] += torch.softmax(z, -1) / (Hq // H)
        expected = (expected + 0.01) * values.norm(dim=-1)
        order = positions[0].argsort(-1)
        assert torch.allclose(got[0].gather(-1, order)[:, sinks:].double(), expected[:, sinks:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_queries_taken_back_before_rope_are_the_model_projections(kind):
    """Rotary.unrotate inverts the rotation each layer applied (Gemma 3: a base per layer type)."""
    model = tiny_model(kind)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    rotary = Rotary(model)
    seen = {}

    class Spy(ExpectedAttention):
        observations_feed_updates_only = False   # a recorder: no update runs in this prompt

        def observe_queries(self, layer_idx, layer, query, scaling, step):
            seen.setdefault(layer_idx, []).append(rotary.unrotate(query, step.query_positions, layer_idx))

    policy = Spy("0.5")
    MemoryManagedLM(model, policy, update_every=64, chunk_size=16).generate(ids, max_new_tokens=1)
    hidden, _ = plain_forward(model, ids)
    for layer_idx, block in enumerate(model.model.layers):
        attn = block.self_attn
        with torch.no_grad():
            q = attn.q_proj(block.input_layernorm(hidden[layer_idx])).view(1, 40, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
        got = torch.cat(seen[layer_idx], dim=2)[..., :40, :]
        assert torch.allclose(got, q.transpose(1, 2), atol=1e-5)


def test_kvzip_equals_the_attention_of_the_model_repeating_each_piece():
    """One compression after T tokens, pieces of 20: each piece is re-read after the repeat prompt
    (the later ones after the 8 tokens before them); a key's score is the largest softmax weight
    any repeat query of its KV head gives it among the sinks, its piece's keys and the repeat's."""
    model = tiny_model("llama", num_hidden_layers=2)
    tok = TinyTokenizer()
    T, chunk, sinks = 50, 20, 4
    ids = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(2))
    policy = KVzip("0.5", Structure(scope="head", sinks=sinks), chunk=chunk)
    captured = {}
    original = policy.score

    def score(layer_idx, layer, step):
        captured[layer_idx] = (layer.aux["kvzip"][0].clone(), layer.positions[0].clone())
        return original(layer_idx, layer, step)
    policy.score = score
    MemoryManagedLM(model, policy, update_every=16, chunk_size=16, tokenizer=tok).generate(
        ids, max_new_tokens=2, compress_at=T)

    cfg = model.config
    Hq, H = cfg.num_attention_heads, cfg.num_key_value_heads
    expected = torch.zeros(cfg.num_hidden_layers, H, T)
    encode = lambda text: torch.tensor([tok(text).input_ids])  # noqa: E731
    for start in range(0, T, chunk):
        prompt = encode(FIRST_PROMPT + "\n") if start == 0 else torch.cat(
            [encode(NEXT_PROMPT), ids[:, start - 8:start], encode("\n")], dim=1)
        piece = torch.cat([prompt, ids[:, start:start + chunk]], dim=1)
        P = piece.shape[1]
        _, cache = plain_forward(model, ids)
        with torch.no_grad():
            out = model(piece, past_key_values=cache, position_ids=torch.arange(T, T + P).view(1, -1),
                        output_hidden_states=True, use_cache=True)
        cos, sin = model.model.rotary_emb(out.hidden_states[0], torch.arange(T, T + P).view(1, -1))
        for layer_idx, block in enumerate(model.model.layers):
            attn = block.self_attn
            with torch.no_grad():
                q = attn.q_proj(block.input_layernorm(out.hidden_states[layer_idx])).view(1, P, Hq, -1).transpose(1, 2)
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            keys = out.past_key_values.layers[layer_idx].keys[0]                       # [H, T + P, D]
            visible = torch.zeros(P, T + P, dtype=torch.bool)
            visible[:, :sinks] = True
            visible[:, start:start + chunk] = True
            visible[:, T:] = torch.ones(P, P, dtype=torch.bool).tril()
            for h in range(Hq):
                logits = (q[0, h] @ keys[h // (Hq // H)].T) * attn.scaling
                probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
                best = probs.amax(0)[start:min(start + chunk, T)]
                kv = h // (Hq // H)
                expected[layer_idx, kv, start:start + chunk] = torch.maximum(expected[layer_idx, kv, start:start + chunk], best)
    for layer_idx, (got, positions) in captured.items():
        got = got.gather(-1, positions.argsort(-1))
        assert torch.allclose(got, expected[layer_idx], atol=1e-5), (got - expected[layer_idx]).abs().max()


class Slots:
    def __init__(self, valid, positions=None):
        self.valid = valid
        self.positions = positions if positions is not None else torch.arange(valid.shape[-1]).expand_as(valid).clone()


def test_adakv_and_modelwide_budgets_equal_a_plain_count():
    """AdaKV: each head's best floor(0.2 k) first, then the layer's best H x k overall; model-wide:
    the best L x H x k of every layer and head together (invalid slots never kept)."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        B, H, S, L = 2, 3, 12, 2
        layers = [Slots(torch.rand(B, H, S, generator=gen) > 0.2) for _ in range(L)]
        scores = [torch.randn(B, H, S, generator=gen) for _ in range(L)]
        none = [torch.zeros(B, H, S, dtype=torch.bool) for _ in range(L)]
        k = torch.tensor([3, 5])
        ada = select_with_structure(layers, scores, none, k, Structure(scope="adakv", safeguard=0.4))
        wide = select_with_structure(layers, scores, none, k, Structure(scope="modelwide"))
        for b in range(B):
            everything = []
            for layer, s, keep in zip(layers, scores, ada):
                n_safe = int(k[b] * 0.4)
                chosen = set()
                for h in range(H):
                    ranked = sorted((float(s[b, h, i]), h, i) for i in range(S) if layer.valid[b, h, i])
                    chosen |= {(hh, i) for _, hh, i in ranked[::-1][:n_safe]}
                rest = sorted(((float(s[b, h, i]), h, i) for h in range(H) for i in range(S)
                               if layer.valid[b, h, i] and (h, i) not in chosen), reverse=True)
                chosen |= {(h, i) for _, h, i in rest[:H * int(k[b]) - len(chosen)]}
                assert {(h, i) for h in range(H) for i in range(S) if keep[b, h, i]} == chosen, trial
                everything += [(float(s[b, h, i]), id(layer), h, i) for h in range(H) for i in range(S)
                               if layer.valid[b, h, i]]
            best = set((lid, h, i) for _, lid, h, i in sorted(everything, reverse=True)[:L * H * int(k[b])])
            got = {(id(layer), h, i) for layer, keep in zip(layers, wide) for h in range(H) for i in range(S)
                   if keep[b, h, i]}
            assert got == best, trial


def test_the_peers_need_what_they_read():
    model = tiny_model("llama")
    ids = torch.randint(3, 60, (1, 40))
    with pytest.raises(ValueError, match="kvzip needs the tokenizer"):
        MemoryManagedLM(model, parse_policy("kvzip:0.5")).generate(ids, max_new_tokens=1)
    with pytest.raises(ValueError, match="needs the model's rotary embedding"):
        policy = parse_policy("expected_attention:0.5")
        policy.new_sequence()

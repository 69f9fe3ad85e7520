"""Work the memory skips without changing a decision: attention after the run's last update is not
captured (it would feed no update; the forward runs on the fused kernel instead), and layers a NAMM
does not score carry none of its statistics. Each saving is checked against the same run with it
switched off: the same tokens and kept sets, the same logits (up to the two kernels' rounding)."""

import pytest
import torch
from conftest import tiny_model

from namm_core import NAMM, MemoryManagedLM, NAMMConfig, parse_policy


def random_namm(seed=0, **config):
    namm = NAMM(NAMMConfig(**config)) if config else NAMM()
    g = torch.Generator().manual_seed(seed)
    return namm.set_params(torch.randn(namm.num_params, generator=g) * 0.3)


class CountingObserver:
    """Wraps a policy; counts the forwards whose attention (or queries) it was given."""

    def __init__(self, policy, skip: bool):
        self.policy = policy
        policy.observations_feed_updates_only = skip
        self.columns = []
        inner_observe, inner_queries = policy.observe, policy.observe_queries

        def observe(layer_idx, layer, attn, step):
            if layer_idx == 0:
                self.columns.append(step.processed)
            inner_observe(layer_idx, layer, attn, step)

        def observe_queries(layer_idx, layer, query, scaling, step):
            if layer_idx == 0:
                self.columns.append(step.processed)
            inner_queries(layer_idx, layer, query, scaling, step)
        policy.observe, policy.observe_queries = observe, observe_queries


def run(model, policy, ids, new_tokens, skip):
    counter = CountingObserver(policy, skip)
    out = MemoryManagedLM(model, policy, update_every=16, chunk_size=16).generate(
        ids, max_new_tokens=new_tokens, return_logits=True)
    return out, counter.columns


@pytest.mark.parametrize("spec", ["namm", "namm_global", "h2o:0.5", "snapkv:0.5/window=8", "tova:0.5",
                                  "expected_attention:0.5"])
@pytest.mark.parametrize("new_tokens", [5, 30])
def test_skipping_unused_observations_changes_nothing(spec, new_tokens):
    model = tiny_model(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))

    def make():
        if spec == "namm":
            return random_namm()
        if spec == "namm_global":
            return random_namm(selection="top_k", budget="0.5", scope="global", pool=3, sinks=2)
        return parse_policy(spec)
    full, seen_all = run(model, make(), ids, new_tokens, skip=False)
    saved, seen_some = run(model, make(), ids, new_tokens, skip=True)
    assert torch.equal(full.sequences, saved.sequences)
    torch.testing.assert_close(full.logits, saved.logits, rtol=0, atol=1e-5)
    assert torch.equal(full.stats.kept_per_layer_head, saved.stats.kept_per_layer_head)
    # updates at columns 16, 32, 48, 64; the last forward processes 40 + new_tokens - 1 columns
    last = 40 + new_tokens - 1
    final_update = max(c for c in (16, 32, 48, 64) if c <= last)
    assert max(seen_all) == last
    assert max(seen_some) == final_update          # nothing observed after the last update
    assert set(seen_some) == {c for c in seen_all if c <= final_update}


def test_continuation_likelihood_skips_only_what_no_update_uses():
    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(5)
    prompt, reply = torch.randint(0, 97, (1, 37), generator=g), torch.randint(0, 97, (1, 12), generator=g)
    results = []
    for skip in (False, True):
        namm = random_namm(seed=4)
        counter = CountingObserver(namm, skip)
        logp, stats = MemoryManagedLM(model, namm, update_every=16, chunk_size=16).continuation_logprobs(prompt, reply)
        results.append((logp, stats.kept_per_layer_head, counter.columns))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    assert torch.equal(results[0][1], results[1][1])
    assert max(results[0][2]) == 48 and max(results[1][2]) == 48   # 49 columns in all: the last update is at 48


def test_one_shot_compression_observes_nothing_after_it():
    model = tiny_model(seed=3)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(6))
    outs = []
    for skip in (False, True):
        namm = random_namm(seed=5, selection="top_k", budget="0.5", scope="global")
        counter = CountingObserver(namm, skip)
        out = MemoryManagedLM(model, namm, update_every=16, chunk_size=16).generate(
            ids, max_new_tokens=6, compress_at=32, return_logits=True)
        outs.append((out, counter.columns))
    torch.testing.assert_close(outs[0][0].logits, outs[1][0].logits, rtol=0, atol=1e-5)
    assert torch.equal(outs[0][0].sequences, outs[1][0].sequences)
    assert max(outs[1][1]) == 32 and max(outs[0][1]) == 55


def test_a_recorder_of_attention_still_sees_every_forward():
    # the default: a policy that does not declare its observations update-only is always observed
    from namm_core.policies import H2O

    class Recorder(H2O):
        observations_feed_updates_only = False
    model = tiny_model(seed=4)
    policy = Recorder("0.5")
    counter = CountingObserver(policy, skip=False)
    MemoryManagedLM(model, policy, update_every=16, chunk_size=16).generate(
        torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1)), max_new_tokens=4)
    assert max(counter.columns) == 23


def test_unscored_layers_hold_no_namm_statistics_and_decide_the_same():
    model = tiny_model(seed=5)
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    namm = random_namm(seed=6, selection="top_k", budget="0.5", scope="global", score_layers=[0])
    lm = MemoryManagedLM(model, namm, update_every=16, chunk_size=16)
    seen = {}
    original = namm.select_all

    def select_all(layers, step):
        seen.update({i: set(layer.aux) for i, layer in enumerate(layers)})
        return original(layers, step)
    namm.select_all = select_all
    out = lm.generate(ids, max_new_tokens=3, return_logits=True)
    assert seen[0] == {"namm_ema", "namm_rows"}
    assert all(seen[i] == set() for i in range(1, n_layers))
    # the same run with every layer carrying the statistics (the cache told nothing is unobserved)
    namm2 = random_namm(seed=6, selection="top_k", budget="0.5", scope="global", score_layers=[0])
    from namm_core import cache as cache_module
    update = cache_module.MemoryCache.update

    def update_with_all_aux(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].append(key_states, value_states, self.chunk_positions, self.chunk_valid,
                                             self.chunk_columns, self.aux_shapes)
    cache_module.MemoryCache.update = update_with_all_aux
    try:
        other = MemoryManagedLM(model, namm2, update_every=16, chunk_size=16).generate(
            ids, max_new_tokens=3, return_logits=True)
    finally:
        cache_module.MemoryCache.update = update
    assert torch.equal(out.logits, other.logits)
    assert torch.equal(out.stats.kept_per_layer_head, other.stats.kept_per_layer_head)


def _first_read(rows, next_update, hop=16):
    return max(0, (next_update - rows) // hop * hop)


def _record_ema(namm):
    """Wraps select_all: the spectrogram EMA of every layer at each update."""
    seen, original = [], namm.select_all

    def select_all(layers, step):
        seen.append([layer.aux["namm_ema"].clone() for layer in layers])
        return original(layers, step)
    namm.select_all = select_all
    return seen


GLOBAL = dict(selection="top_k", budget="0.5", scope="global", pool=3, sinks=2)


@pytest.mark.parametrize("config, update_every, chunk, rows", [(GLOBAL, 40, 16, 16), ({}, 48, 24, 32)])
def test_reading_the_last_rows_equals_zero_attention_before_them(config, update_every, chunk, rows):
    """`observe_rows`: the rows an update does not read are not computed (the fused kernel runs
    there) and count as zero attention: the same features, decisions and tokens as the NAMM that
    reads every row with those rows zeroed. Updates every 40 tokens leave rows pending mid-hop."""
    model = tiny_model(seed=7)
    ids = torch.randint(0, 97, (2, 100), generator=torch.Generator().manual_seed(8))

    def run_with(namm, zero_before):
        if zero_before:
            inner = namm.observe

            def observe(layer_idx, layer, attn, step):
                unread = _first_read(rows, step.next_update) - (step.processed - attn.shape[-2])
                if unread > 0:
                    attn = attn.clone()
                    attn[..., :unread, :] = 0
                inner(layer_idx, layer, attn, step)
            namm.observe = observe
        emas = _record_ema(namm)
        out = MemoryManagedLM(model, namm, update_every=update_every, chunk_size=chunk).generate(
            ids, max_new_tokens=50, return_logits=True)
        return out, emas

    reading, ema_reading = run_with(random_namm(seed=9, observe_rows=rows, **config), zero_before=False)
    zeroed, ema_zeroed = run_with(random_namm(seed=9, **config), zero_before=True)
    assert len(ema_reading) == len(ema_zeroed) >= 3          # updates in the prompt and while decoding
    for a, b in zip(ema_reading, ema_zeroed):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert torch.equal(reading.sequences, zeroed.sequences)
    assert torch.equal(reading.stats.kept_per_layer_head, zeroed.stats.kept_per_layer_head)
    torch.testing.assert_close(reading.logits, zeroed.logits, rtol=0, atol=1e-4)
    # and the NAMM that reads every row decides otherwise (the test can tell the two apart)
    full, ema_full = run_with(random_namm(seed=9, **config), zero_before=False)
    assert not torch.allclose(ema_full[1][0], ema_reading[1][0], atol=1e-5)


def test_reading_as_many_rows_as_the_interval_changes_nothing():
    model = tiny_model(seed=7)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(4))
    outs = [MemoryManagedLM(model, random_namm(seed=2, **extra), update_every=32, chunk_size=16).generate(
        ids, max_new_tokens=40, return_logits=True) for extra in ({}, {"observe_rows": 32})]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].stats.kept_per_layer_head, outs[1].stats.kept_per_layer_head)


def test_rows_option_in_a_policy_spec(tmp_path):
    namm = random_namm(selection="top_k", budget="0.5", scope="global")
    namm.save_pretrained(tmp_path / "n")
    policy = parse_policy(f"namm:{tmp_path / 'n'}@0.25/rows=64")
    assert policy.config.observe_rows == 64 and policy.describe().endswith("@0.25/rows=64")
    assert policy.prefix_key() != parse_policy(f"namm:{tmp_path / 'n'}@0.25").prefix_key()
    with pytest.raises(ValueError, match="observe_rows must be a positive multiple of the spectrogram hop"):
        parse_policy(f"namm:{tmp_path / 'n'}@0.25/rows=40")
    with pytest.raises(ValueError, match="rows='many'"):
        parse_policy(f"namm:{tmp_path / 'n'}@0.25/rows=many")

"""One contract, every registered policy (namm_core.registry): what it keeps is exactly what the
model then attends to (logits equal a full forward with the evicted tokens masked), a budget is
honoured at every update, its per-token state stays aligned with the slots through compaction,
and an attention reader decides the same when attention arrives in blocks of rows."""

import pytest
import torch
from conftest import TinyTokenizer, tiny_model
from test_memory_equivalence import assert_equals_masked_reference

from namm_core import NAMM, REGISTRY, MemoryManagedLM, NAMMConfig, parse_policy
from namm_core.policies import Budget, MemoryPolicy

GLOBAL_NAMM = "namm-global"   # the NAMM with one kept set for the whole model, spans pooled


def build(kind) -> MemoryPolicy:
    if kind == GLOBAL_NAMM:
        namm = NAMM(NAMMConfig(selection="top_k", budget="0.5", sinks=2, scope="global", pool=3))
        return namm.set_params(torch.randn(4172, generator=torch.Generator().manual_seed(6)) * 0.3)
    if kind.name == "namm":   # a random scorer (the shipped one is for SmolLM2, not a random model)
        namm = NAMM().set_params(torch.randn(4172, generator=torch.Generator().manual_seed(5)) * 0.3)
        return namm.with_budget("0.5") if "@" in kind.example else namm
    return parse_policy(kind.example)


def kind_of(name):
    return GLOBAL_NAMM if name == GLOBAL_NAMM else REGISTRY[name]


class Recorder(MemoryPolicy):
    """Runs `inner` and records evictions, kept counts and per-token state shapes at every update."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.needs_attention = inner.needs_attention
        self.aux_shapes = getattr(inner, "aux_shapes", {})

    def new_sequence(self):
        self.inner.new_sequence()
        self.evicted, self.updates = [], []

    def bind_tokenizer(self, tokenizer):
        self.inner.bind_tokenizer(tokenizer)

    def observe(self, layer_idx, layer, attn, step):
        self.inner.observe(layer_idx, layer, attn, step)

    def select_all(self, layers, step):
        keeps = self.inner.select_all(layers, step)   # the memory's own entry point
        for layer_idx, (layer, keep) in enumerate(zip(layers, keeps)):
            if keep is None:
                keep = keeps[layer_idx] = layer.valid.clone()
            for b, h, s in (layer.valid & ~keep).nonzero().tolist():
                self.evicted.append((layer_idx, b, h, int(layer.positions[b, h, s]), step.processed))
            self.updates.append((layer_idx, step.seen.clone(), (keep & layer.valid).sum(-1), layer))
        return keeps


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 97, (2, 96), generator=torch.Generator().manual_seed(3))
    ids[:, ::7] = 1                       # punctuation, for FastGen
    mask = torch.ones_like(ids)
    mask[1, :9] = 0                      # left padding in the second row
    return model, ids, mask


@pytest.mark.parametrize("name", list(REGISTRY) + [GLOBAL_NAMM])
def test_every_policy_keeps_what_the_model_then_sees(name, setup):
    model, ids, mask = setup
    kind = kind_of(name)
    recorder = Recorder(build(kind))
    lm = MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer())
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, return_logits=True)
    if name != "full":
        assert recorder.evicted, f"{name} evicted nothing: the test would prove nothing"
    assert_equals_masked_reference(model, ids, mask, out, recorder.evicted, 2, 2)


@pytest.mark.parametrize("name", [k.name for k in REGISTRY.values() if k.budgeted] + [GLOBAL_NAMM])
def test_every_budgeted_policy_honours_its_budget_at_every_update(name, setup):
    model, ids, mask = setup
    kind = kind_of(name)
    policy = build(kind)
    budget = Budget.parse("0.5" if kind == GLOBAL_NAMM else kind.example.rpartition(":")[2].rpartition("@")[2])
    recorder = Recorder(policy)
    MemoryManagedLM(model, recorder, update_every=16, chunk_size=16).generate(ids, attention_mask=mask,
                                                                              max_new_tokens=10)
    assert recorder.updates
    for _, seen, kept, _ in recorder.updates:
        limit = budget.tokens(seen).view(-1, 1)
        assert (kept <= limit).all(), (name, kept, limit)


@pytest.mark.parametrize("name", [k.name for k in REGISTRY.values() if getattr(build(k), "aux_shapes", {})]
                         + [GLOBAL_NAMM])
def test_per_token_state_stays_aligned_through_compaction(name, setup):
    model, ids, mask = setup
    recorder = Recorder(build(kind_of(name)))
    MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer()).generate(
        ids, attention_mask=mask, max_new_tokens=10)
    for _, _, _, layer in recorder.updates:
        for field, value in layer.aux.items():
            assert value.shape[:3] == layer.valid.shape, (name, field, value.shape, layer.valid.shape)
    assert any(layer.valid.shape[-1] < ids.shape[1] for *_, layer in recorder.updates), "compaction happened"


@pytest.mark.parametrize("name", [k.name for k in REGISTRY.values() if build(k).needs_attention] + [GLOBAL_NAMM])
def test_attention_readers_decide_the_same_on_row_blocks(name, setup, monkeypatch):
    from namm_core import attention

    model, ids, mask = setup

    def run(block_bytes):
        monkeypatch.setattr(attention, "EAGER_BLOCK_BYTES", block_bytes)
        lm = MemoryManagedLM(model, build(kind_of(name)), update_every=32, chunk_size=32, tokenizer=TinyTokenizer())
        return lm.generate(ids, attention_mask=mask, max_new_tokens=8, return_logits=True)

    blocked, whole = run(1), run(1 << 30)
    assert torch.equal(blocked.stats.kept_per_layer_head, whole.stats.kept_per_layer_head)
    assert torch.equal(blocked.sequences, whole.sequences)
    assert torch.allclose(blocked.logits, whole.logits, atol=1e-5)


def test_the_registry_drives_the_command_line_help_and_the_baseline_lists():
    from namm_cli.cli import build_parser
    from namm_core import POLICY_HELP, budgeted_baselines

    assert set(budgeted_baselines()) == {"streamingllm", "h2o", "l2", "snapkv", "tova"}
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for kind in REGISTRY.values():
        assert kind.syntax in POLICY_HELP
        assert kind.name in help_text.replace("\n", " ")

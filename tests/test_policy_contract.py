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
        self.needs_attention, self.needs_queries = inner.needs_attention, inner.needs_queries
        self.reconstructs = inner.reconstructs
        self.aux_shapes = getattr(inner, "aux_shapes", {})
        # every other hook goes straight to the policy under test
        for hook in ("bind_tokenizer", "bind_model", "observe", "observe_queries", "reconstruction_inputs",
                     "observe_reconstruction", "observed_layers"):
            setattr(self, hook, getattr(inner, hook))

    def new_sequence(self):
        self.inner.new_sequence()
        self.evicted, self.updates = [], []

    def select_all(self, layers, step):
        keeps = self.inner.select_all(layers, step)   # the memory's own entry point
        for layer_idx, (layer, keep) in enumerate(zip(layers, keeps)):
            if keep is None:
                keep = keeps[layer_idx] = layer.valid.clone()
            for b, h, s in (layer.valid & ~keep).nonzero().tolist():
                self.evicted.append((layer_idx, b, h, int(layer.positions[b, h, s]), step.processed))
            self.updates.append((layer_idx, step.seen, (keep & layer.valid).sum(-1), layer.valid.sum(-1), layer))
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


def scope_of(policy) -> str:
    return policy.config.scope if isinstance(policy, NAMM) else policy.structure.scope


def assert_budget_shared_as_its_scope_says(recorder, budget, scope):
    """At every update: per head (head), per layer (adakv), over the model (modelwide) or one
    set (global), the kept slots are exactly the budget, or all there are when fewer."""
    by_update = {}
    for _, seen, kept, held, _ in recorder.updates:
        by_update.setdefault(id(seen), []).append((seen, kept, held))
    assert by_update
    for entries in by_update.values():
        seen = entries[0][0]
        kept = torch.stack([k for _, k, _ in entries])          # [L, B, H]
        held = torch.stack([h for _, _, h in entries])
        k = budget.tokens(seen).view(1, -1, 1)
        if scope in ("head", "global"):
            assert torch.equal(kept, torch.minimum(held, k)), (scope, kept, k)
        if scope == "global":
            assert (kept == kept[:1, :, :1]).all(), "one kept set for every layer and head"
        if scope == "adakv":
            limit = k[..., 0] * held.shape[-1]
            assert torch.equal(kept.sum(-1), torch.minimum(held.sum(-1), limit)), (kept, limit)
        if scope == "modelwide":
            limit = k[0, :, 0] * held.shape[0] * held.shape[-1]
            assert torch.equal(kept.sum((0, 2)), torch.minimum(held.sum((0, 2)), limit)), (kept, limit)


@pytest.mark.parametrize("name", [k.name for k in REGISTRY.values() if k.budgeted] + [GLOBAL_NAMM])
def test_every_budgeted_policy_honours_its_budget_at_every_update(name, setup):
    model, ids, mask = setup
    kind = kind_of(name)
    policy = build(kind)
    budget = Budget.parse("0.5" if kind == GLOBAL_NAMM else kind.example.rpartition(":")[2].rpartition("@")[2])
    recorder = Recorder(policy)
    MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer()).generate(
        ids, attention_mask=mask, max_new_tokens=10)
    assert_budget_shared_as_its_scope_says(recorder, budget, scope_of(policy))


SCORING = [k.name for k in REGISTRY.values() if k.argument == "budget"]
STRUCTURES = ["head", "adakv", "modelwide", "global/pool=3/sinks=2", "adakv/safeguard=0.5/pool=3"]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", SCORING)
def test_every_scoring_policy_in_every_structure_keeps_what_the_model_sees_within_its_budget(name, structure, setup):
    """The structure (who shares the budget, pooling, sinks) is an option of every scorer: the
    model attends to exactly what is kept, and the budget is shared as the scope says."""
    model, ids, mask = setup
    policy = parse_policy(f"{name}:0.5/{structure}")
    assert policy.describe() == parse_policy(policy.describe()).describe()
    recorder = Recorder(policy)
    lm = MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer())
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, return_logits=True)
    assert recorder.evicted
    assert_equals_masked_reference(model, ids, mask, out, recorder.evicted, 2, 2)
    assert_budget_shared_as_its_scope_says(recorder, Budget.parse("0.5"), structure.split("/")[0])
    sinks = int(structure.partition("sinks=")[2] or 0) or policy.default_structure.sinks
    evicted_in_first_row = {pos for _, b, _, pos, _ in recorder.evicted if b == 0}   # row 0 is unpadded
    assert not (set(range(sinks)) & evicted_in_first_row), "a sink was evicted"


@pytest.mark.parametrize("name", SCORING + [GLOBAL_NAMM])
def test_one_compression_after_the_prompt_then_nothing_more(name, setup):
    """The peers' protocol (compress_at): one update at that column, the model then attends to
    exactly what it kept, and the reply is read and written with nothing more evicted."""
    model, ids, mask = setup
    kind = kind_of(name)
    recorder = Recorder(build(kind))
    lm = MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer())
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=10, return_logits=True, compress_at=80)
    assert out.stats.updates == 1 and recorder.evicted
    assert {when for *_, when in recorder.evicted} == {80}
    assert_equals_masked_reference(model, ids, mask, out, recorder.evicted, 2, 2)


@pytest.mark.parametrize("name", [k.name for k in REGISTRY.values() if getattr(build(k), "aux_shapes", {})]
                         + [GLOBAL_NAMM])
def test_per_token_state_stays_aligned_through_compaction(name, setup):
    model, ids, mask = setup
    recorder = Recorder(build(kind_of(name)))
    MemoryManagedLM(model, recorder, update_every=16, chunk_size=16, tokenizer=TinyTokenizer()).generate(
        ids, attention_mask=mask, max_new_tokens=10)
    for *_, layer in recorder.updates:
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

    assert set(budgeted_baselines()) == {"streamingllm", "h2o", "l2", "snapkv", "tova", "expected_attention", "kvzip"}
    help_text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    from namm_core.registry import policy_listing

    listing = policy_listing()
    for kind in REGISTRY.values():
        assert kind.syntax in POLICY_HELP
        assert kind.name in help_text.replace("\n", " ")
        assert f"{kind.syntax:<24} {kind.keeps}" in listing

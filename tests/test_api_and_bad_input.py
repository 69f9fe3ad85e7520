"""The public API's edges: loading, policy specs, unsupported models, other architectures."""
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from namm_core import NAMM, MemoryManagedLM, load_model, parse_policy
from namm_core.models import pick_dtype, resolve_model_path


def test_namm_core_imports_neither_ray_nor_mlflow():
    code = "import sys, namm_core; print(any(m.split('.')[0] in ('ray', 'mlflow') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spec,message", [
    ("h2o", "needs a budget"),
    ("h2o:0", "must be positive"),
    ("h2o:-3", "must be positive"),
    ("snapkv:1.5", r"neither a fraction in \(0, 1\] nor a whole number"),
    ("l2:abc", "not a number"),
    ("tova:10.5", "neither a fraction"),
    ("full:0.5", "takes no budget"),
    ("magic:0.5", "unknown policy"),
    ("namm:/definitely/not/here", "does not exist"),
    ("tova:0.5/global/adakv", "choose one scope"),
    ("tova:0.5/pool=4", "pool must be an odd"),
    ("tova:0.5/sinks=-1", "sinks must be a whole number"),
    ("tova:0.5/window=8", "unknown option 'window' for tova; known: head, adakv"),
    ("snapkv:0.5/window=abc", "window='abc' is not a int"),
    ("snapkv:0.5/window", "option window needs a value"),
    ("snapkv:0.5/window=8/window=9", "given twice"),
    ("snapkv:0.5//global", "empty option"),
    ("l2:0.5/safeguard=0.3", "safeguard applies to the adakv scope only"),
    ("l2:0.5/adakv/safeguard=2", "safeguard must be in"),
    ("kvzip:0.5/chunk=0", "chunk must be a whole number >= 1"),
    ("expected_attention:0.5/covariance=2", "covariance must be 0 or 1"),
    ("full/global", "takes no budget and no options"),
    ("fastgen:0.8/heavy_fraction=2", "heavy_fraction must be in"),
])
def test_bad_policy_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(spec)


def test_policy_specs_build_the_right_policies():
    assert parse_policy("full").describe() == "full"
    assert parse_policy("h2o:0.25").describe() == "h2o:0.25"
    assert parse_policy("SnapKV:1024").describe() == "snapkv:1024"
    assert parse_policy("streamingllm:0.5").structure.sinks == 4
    # every hyperparameter is in describe() when it differs from the default, and always in hyperparameters()
    snap = parse_policy("snapkv:0.5/window=64/kernel=5/adakv/pool=3")
    assert snap.describe() == "snapkv:0.5/window=64/kernel=5/adakv/pool=3"
    assert parse_policy("snapkv:0.5").hyperparameters() != parse_policy("snapkv:0.5/window=64").hyperparameters()
    assert parse_policy("snapkv:0.5").hyperparameters()["window"] == 32
    assert parse_policy("TOVA:0.25/Global/sinks=4/pool=15").describe() == "tova:0.25/global/pool=15/sinks=4"
    assert parse_policy("kvzip:0.5").describe() == "kvzip:0.5" and parse_policy("kvzip:0.5/head").structure.scope == "head"
    assert parse_policy("expected_attention:0.5/epsilon=0.01/adakv").describe() == \
        "expected_attention:0.5/epsilon=0.01/adakv"
    assert parse_policy("fastgen:0.7/recent_fraction=0.2").describe() == "fastgen:0.7/recent_fraction=0.2"


def test_model_without_attention_interface_is_refused():
    from transformers import AutoModelForCausalLM, MambaConfig

    mamba = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                         state_size=4))
    with pytest.raises(TypeError, match="attention interface"):
        MemoryManagedLM(mamba)
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        MemoryManagedLM(torch.nn.Linear(2, 2))


def test_bad_generation_arguments(tiny_llama):
    with pytest.raises(ValueError, match="must be a positive integer"):
        MemoryManagedLM(tiny_llama, update_every=0)
    lm = MemoryManagedLM(tiny_llama)
    ids = torch.randint(0, 97, (2, 10))
    right_padded = torch.ones_like(ids)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        lm.generate(ids, attention_mask=right_padded)


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma3"])
def test_other_architectures_run_end_to_end_with_a_namm(kind):
    model = tiny_model(kind)
    namm = NAMM()
    namm.set_params(torch.randn(namm.num_params, generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, 97, (2, 120), generator=torch.Generator().manual_seed(1))
    out = MemoryManagedLM(model, namm, update_every=32, chunk_size=32).generate(ids, max_new_tokens=6)
    assert out.sequences.shape == (2, 6)
    assert out.stats.updates >= 3 and 0 < out.stats.mean_retention < 1
    assert out.stats.kept_per_layer_head.shape == (model.config.num_hidden_layers, 2, 2)


def test_load_model_from_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(97)}
    vocab["[UNK]"] = 0
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w1").save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    assert tok.pad_token is not None and tok.padding_side == "left"
    ids = torch.randint(0, 97, (1, 12))
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_load_model_errors_and_dtypes(tmp_path):
    with pytest.raises(OSError, match="cannot load model"):
        load_model(str(tmp_path / "nothing-here"))
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float8")
    assert resolve_model_path("some/hub-id") == "some/hub-id"


@pytest.mark.slow
def test_embedded_model_loads_and_is_cached(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    from pathlib import Path
    assert (Path(resolve_model_path("smollm2")) / "model.safetensors").is_file()


def test_bfloat16_memory_runs_and_a_zero_namm_matches_the_full_cache():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(3))
    full = MemoryManagedLM(model, parse_policy("full"), update_every=32).prefill_logits(ids)
    zero = MemoryManagedLM(model, NAMM(), update_every=32).prefill_logits(ids)
    assert zero.logits.dtype == torch.bfloat16
    assert (zero.logits.float() - full.logits.float()).abs().max() < 0.05
    evicting = MemoryManagedLM(model, parse_policy("h2o:0.5"), update_every=32).generate(ids, max_new_tokens=4)
    assert evicting.stats.mean_retention < 1.0 and evicting.sequences.shape == (2, 4)


def test_shipped_namm_is_the_default_namm_policy():

    from namm_core.registry import DEFAULT_NAMM_DIR

    namm = parse_policy("namm")
    assert namm.source == "smollm2" and DEFAULT_NAMM_DIR.name == "smollm2"
    assert namm.describe() == "namm:smollm2@0.5" and parse_policy("namm@0.25").describe() == "namm:smollm2@0.25"
    assert namm.num_params == 4172 and namm.norm_count > 0
    params = namm.get_params()
    assert torch.isfinite(params).all() and params.abs().sum() > 0, "an evolved NAMM, not the zero one"
    assert namm.metadata["which"] == "best-validated"
    assert (DEFAULT_NAMM_DIR / "README.md").is_file() and (DEFAULT_NAMM_DIR / "evolve.yaml").is_file()


@pytest.mark.slow
def test_shipped_namm_evicts_on_its_own_model(smollm2):
    """On a 1k-token retrieval prompt of a seed evolution never saw, it drops part of the cache."""
    from namm_eval.evaluator import Evaluator
    from namm_eval.tasks import load_tasks

    model, tok = smollm2
    sample = load_tasks(["passkey"], tok, num_prompts=1, context_length=1024, seed=11)[0]
    result = Evaluator(model, tok, update_every=256, chunk_size=256).run_sample(sample, parse_policy("namm"))
    assert 0.05 < result.retention < 1.0
    assert result.peak_kv_bytes > result.final_kv_bytes


def test_the_callers_model_keeps_its_attention_implementation(tiny_llama):
    """MemoryManagedLM switches to the memory's attention only while it runs, and restores it."""
    from namm_core import parse_policy

    before = tiny_llama.config._attn_implementation
    lm = MemoryManagedLM(tiny_llama, parse_policy("h2o:0.5"), update_every=8, chunk_size=8)
    assert tiny_llama.config._attn_implementation == before
    ids = torch.randint(0, 97, (1, 20))
    lm.generate(ids, max_new_tokens=3)
    assert tiny_llama.config._attn_implementation == before
    lm.continuation_logprobs(ids, ids[:, :3])
    MemoryManagedLM(tiny_llama, NAMM(), update_every=8, chunk_size=8).shared_prefix(ids)
    assert tiny_llama.config._attn_implementation == before
    with torch.no_grad():
        tiny_llama(ids)   # the model still runs on its own


def test_the_core_library_needs_no_evaluation_or_evolution_packages():
    """`pip install .` (the core) gives the memory: importing namm_core and running a policy
    never loads Ray, MLflow, pycma, the metric packages or the evaluation/evolution code."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from namm_core import MemoryManagedLM, NAMM, parse_policy\n"
            "from namm_core.official import load_official_checkpoint\n"
            "heavy = [m for m in ('ray', 'mlflow', 'cma', 'jieba', 'rouge_score', 'rapidfuzz', 'pyarrow', "
            "'namm_eval', 'workers', 'orchestrator', 'namm_cli') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

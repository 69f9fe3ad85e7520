"""namm_core: Neural Attention Memory Models and baseline KV-cache memories for Hugging Face
causal LMs. torch + transformers only (no Ray, no MLflow).

    from namm_core import load_model, MemoryManagedLM, NAMM, parse_policy
    model, tok = load_model("smollm2")
    lm = MemoryManagedLM(model, parse_policy("h2o:0.25"))
    out = lm.generate(tok("...", return_tensors="pt").input_ids, max_new_tokens=32)
"""
from .features import SpectrogramConfig
from .generation import GenerationOutput, MemoryManagedLM, MemoryStats, SharedPrefix
from .models import DEFAULT_MODEL, load_model
from .namm import NAMM, NAMMConfig
from .policies import H2O, TOVA, Budget, FastGen, FullCache, L2Norm, MemoryPolicy, SnapKV, StreamingLLM
from .registry import DEFAULT_NAMM_DIR, POLICY_HELP, REGISTRY, budgeted_baselines, parse_policy

__all__ = [
    "SpectrogramConfig", "GenerationOutput", "MemoryManagedLM", "SharedPrefix", "MemoryStats", "DEFAULT_MODEL", "load_model",
    "NAMM", "NAMMConfig", "H2O", "TOVA", "Budget", "FastGen", "FullCache", "L2Norm", "MemoryPolicy",
    "SnapKV", "StreamingLLM", "DEFAULT_NAMM_DIR", "POLICY_HELP", "REGISTRY", "budgeted_baselines", "parse_policy",
]

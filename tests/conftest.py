import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(kind: str = "llama", **overrides):
    """A tiny random model config of the given architecture (milliseconds to build)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "gemma3":
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 4, "head_dim": 8}, sliding_window=24,
                                sliding_window_pattern=2, query_pre_attn_scalar=8)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (real weights). Converted once into $NAMM_CACHE."""
    from namm_core.models import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


class TinyTokenizer:
    """For tiny random models (vocab 97): token 0 is special (BOS), 1 and 2 are punctuation, the rest words."""
    all_special_ids = [0]

    def __len__(self):
        return 97

    def get_vocab(self):
        return {f"t{i}": i for i in range(97)}

    def decode(self, ids):
        return {0: "<s>", 1: " .", 2: ","}.get(ids[0], f" w{ids[0]}")

    def __call__(self, text, add_special_tokens=True, **kwargs):
        """Characters as word ids (KVzip's reconstruction prompt)."""
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[3 + ord(ch) % 60 for ch in text])   # within every tiny vocabulary

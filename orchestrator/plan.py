"""`namm evolve CONFIG --plan`: what a run needs and how long a generation takes, before anything starts.

For the config's model (its architecture read from its config, or from the table below for hub
models that are not on this machine) and the GPUs it would run on (`--plan-gpus 8xA100-80GB`,
the Ray cluster at RAY_ADDRESS, or this machine), the plan gives, per actor: the weights, the KV
cache at the longest stage's context with and without the NAMM's budget, the attention rows the
NAMM's features need for one chunk, the logits of a chunk, and what that leaves of the GPU;
then actors per GPU, candidates per generation, the tokens a generation reads, and the seconds
per generation from a per-token cost (given, measured here, or estimated from the GPU's bf16
throughput at a stated utilisation). A config that cannot fit is refused with the numbers.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

from .config import ConfigError, RunConfig

GIB = 1024 ** 3
CUDA_OVERHEAD_BYTES = 1.5 * GIB      # CUDA context, allocator slack, the NAMM and its buffers
HEADROOM = 0.95                      # never plan past 95% of a GPU's memory
ASSUMED_UTILISATION = 0.3            # share of peak bf16 FLOPs a prefill reaches (estimate only)

# Architectures of hub models a plan may be asked about without their files on this machine
# (from the models' published configs).
KNOWN_ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                       vocab_size=128256, max_position_embeddings=8192),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                                vocab_size=128256, max_position_embeddings=8192),
    "meta-llama/Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                             vocab_size=128256, max_position_embeddings=131072),
}
# Ray's accelerator types (and names users write) -> memory in GiB and peak dense bf16 TFLOPs
GPUS = {"A100-40G": (40, 312), "A100-80G": (80, 312), "A100": (80, 312), "H100": (80, 989), "L4": (24, 121),
        "A10G": (24, 125), "T4": (16, 65), "V100": (16, 125), "RTX4090": (24, 165), "L40S": (48, 362)}


@dataclass
class Architecture:
    params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass
class GPUs:
    count: int
    name: str
    memory_bytes: float
    tflops: Optional[float]     # peak dense bf16; None when unknown

    @staticmethod
    def parse(text: str) -> "GPUs":
        """`8xA100-80GB`, `1xL4`, `4xH100`: COUNT x NAME[-MEMORY GB]."""
        m = re.fullmatch(r"(\d+)\s*[xX]\s*([A-Za-z0-9]+?)(?:-(\d+)\s*G[Bi]?B?)?", text.strip())
        if not m or int(m.group(1)) < 1:
            raise ConfigError(f"--plan-gpus {text!r}: expected COUNT x NAME[-MEMORY], e.g. 8xA100-80GB or 1xL4")
        count, name, memory = int(m.group(1)), m.group(2).upper(), m.group(3)
        key = next((k for k in (f"{name}-{memory}G", name) if k in GPUS), None)
        if memory is None and key is None:
            raise ConfigError(f"--plan-gpus {text!r}: unknown GPU {name}; give its memory, e.g. {count}x{name}-24GB")
        gib = float(memory) if memory else GPUS[key][0]
        return GPUs(count, f"{name}-{int(gib)}GB", gib * GIB, GPUS[key][1] if key else None)

    @staticmethod
    def from_cluster(resources: dict) -> Optional["GPUs"]:
        """The GPUs of a Ray cluster (`ray.cluster_resources()`), typed by its accelerator_type."""
        count = int(resources.get("GPU", 0))
        if count < 1:
            return None
        types = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        known = [t for t in types if t in GPUS]
        if not known:
            raise ConfigError(f"the cluster has {count} GPU(s) of type {', '.join(types) or 'unknown'}: say which "
                              "with --plan-gpus, e.g. --plan-gpus 8xA100-80GB")
        memory, tflops = GPUS[known[0]]
        return GPUs(count, known[0], memory * GIB, tflops)


def architecture(cfg: RunConfig) -> Architecture:
    """The model's shape from its config (local files, the embedded models, tiny random ones)
    or the table of known hub models; parameters counted on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from namm_core.files import text_config
    from namm_core.models import resolve_model_path

    name = cfg.model.name
    if cfg.model.tiny_random is not None:
        from namm_core.models import tiny_random_config

        config, _ = tiny_random_config(**{k: v for k, v in cfg.model.tiny_random.items() if k != "seed"})
    elif name in KNOWN_ARCHITECTURES and not os.path.isdir(name):
        fields = dict(KNOWN_ARCHITECTURES[name])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(name))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name: cannot read the config of {name!r} for a plan ({e}); known without "
                              f"files: {', '.join(KNOWN_ARCHITECTURES)}") from None
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    text = text_config(config)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return Architecture(params, int(text.num_hidden_layers), heads,
                        int(getattr(text, "num_key_value_heads", None) or heads), head_dim, int(text.vocab_size))


def longest_context(cfg: RunConfig) -> int:
    """Synthetic tasks: their length. Task files: the model's window (longer prompts are cropped to it)."""
    window = cfg.model.max_position_embeddings
    lengths = []
    for stage in cfg.stages:
        for task in stage.tasks:
            if task.task:
                lengths.append(task.context_length)
            elif window:
                lengths.append(window)
            else:
                raise ConfigError(f"model.max_position_embeddings: needed to plan for task file {task.file} "
                                  "(its prompts are cropped to the model's window)")
    return max(lengths)


@dataclass
class Plan:
    lines: list[tuple[str, str]]
    fits: bool
    seconds_per_generation: Optional[float]

    def text(self) -> str:
        width = max(len(k) for k, _ in self.lines)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.lines)


def make_plan(cfg: RunConfig, gpus: Optional[GPUs], arch: Architecture,
              seconds_per_token: Optional[float] = None, cost_note: str = "given") -> Plan:
    dtype_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") or (cfg.model.dtype == "auto" and gpus) else 4
    tokens = longest_context(cfg)
    chunk = cfg.memory.chunk_size
    weights = arch.params * dtype_bytes
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes
    kv_full = kv_per_token * tokens
    budget = cfg.namm_config().budget
    if budget is None:
        kept, kept_note = tokens, "no budget: a score >= 0 NAMM may keep everything"
    else:
        import torch

        from namm_core.selection import Budget

        kept = min(tokens, int(Budget.parse(budget).tokens(torch.tensor(tokens))) + cfg.memory.update_every)
        kept_note = f"budget {budget} + one update interval ({cfg.memory.update_every}) read between updates"
    kv_namm = kv_per_token * kept
    # one layer's eager attention over a chunk (the NAMM's features need its rows): the scores in
    # the model's dtype, their softmax in float32, the probabilities cast back
    rows = arch.heads * chunk * tokens * (dtype_bytes + 4 + dtype_bytes)
    logits = arch.vocab * chunk * 4
    per_actor = weights + kv_full + rows + logits + CUDA_OVERHEAD_BYTES
    # an actor holds one model on one device: a fraction of a GPU packs several actors on it
    gpus_per_actor = 1.0 if isinstance(cfg.workers.gpus_per_actor, str) else float(cfg.workers.gpus_per_actor)
    actors_per_gpu = max(1, int(1 / gpus_per_actor)) if 0 < gpus_per_actor < 1 else 1
    lines = [("model", f"{cfg.model.name}: {arch.params / 1e9:.2f}B parameters, {arch.layers} layers, "
                       f"{arch.kv_heads} KV heads x {arch.head_dim}"),
             *([("transfer models", f"{', '.join(m.label for m in cfg.transfer_models)}: each on actors of its "
                                   "own, not in this plan (plan each with a config where it is `model`)")]
               if cfg.transfer_models else []),
             ("longest context", f"{tokens} tokens (chunks of {chunk}, a NAMM update every {cfg.memory.update_every})"),
             ("weights per actor", _gib(weights) + f" ({dtype_bytes} bytes per parameter)"),
             ("KV cache, full", _gib(kv_full)),
             ("KV cache, with the NAMM", f"{_gib(kv_namm)} ({kept_note})"),
             ("attention of a chunk", _gib(rows) + " (eager, for the NAMM's features; one layer at a time)"),
             ("logits of a chunk", _gib(logits)),
             ("per actor, at most", _gib(per_actor) + f" (the full cache's references read every prompt whole; "
                                    f"{_gib(CUDA_OVERHEAD_BYTES)} for CUDA and buffers)")]
    fits = True
    if gpus is not None:
        usable = gpus.memory_bytes * HEADROOM / actors_per_gpu
        fits = per_actor <= usable
        actors = gpus.count * actors_per_gpu // max(1, int(gpus_per_actor))
        lines += [("GPUs", f"{gpus.count} x {gpus.name} ({_gib(gpus.memory_bytes)} each, planned to {HEADROOM:.0%})"),
                  ("actors per GPU", str(actors_per_gpu)),
                  ("fits", "yes" if fits else f"NO: an actor needs {_gib(per_actor)}, a GPU gives it {_gib(usable)}")]
    else:
        actors = cfg.workers.num_actors
    candidates = cfg.es.population
    stage_tokens = [sum(stage.prompts_per_task * _prompt_tokens(task, tokens) for task in stage.tasks)
                    for stage in cfg.stages]
    per_generation = candidates * max(stage_tokens)
    lines += [("candidates per generation", f"{candidates} (+ the CMA mean on the validation set every "
                                            f"{min(s.validation_every for s in cfg.stages)} generations)"),
              ("actors", str(actors)),
              ("tokens per generation", f"{per_generation:,} at most (candidates x prompts x tokens, largest stage)")]
    if seconds_per_token is None and gpus is not None and gpus.tflops:
        seconds_per_token = 2 * arch.params / (gpus.tflops * 1e12 * ASSUMED_UTILISATION)
        cost_note = (f"estimated: 2 x parameters FLOPs at {ASSUMED_UTILISATION:.0%} of {gpus.tflops:g} TFLOPs; "
                     "the NAMM's own cost not included")
    seconds = None
    if seconds_per_token is not None:
        seconds = per_generation * seconds_per_token / max(1, actors)
        days = seconds * cfg.total_generations / 86400
        lines += [("seconds per token", f"{seconds_per_token:.3g} ({cost_note})"),
                  ("seconds per generation", f"{seconds:,.0f} ({seconds / 3600:.2f} h) with {actors} actor(s); "
                                             f"{cfg.total_generations} generations: {days:.1f} days")]
    else:
        lines.append(("seconds per generation", "unknown: give --plan-seconds-per-token (or a known --plan-gpus)"))
    return Plan(lines, fits, seconds)


def _prompt_tokens(task, longest: int) -> int:
    from namm_eval.tasks.files import DEFAULT_MAX_NEW_TOKENS

    return (task.context_length if task.task else longest) + DEFAULT_MAX_NEW_TOKENS


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024 ** 2:.1f} MiB"


def plan_for(cfg: RunConfig, gpus_text: Optional[str] = None, seconds_per_token: Optional[float] = None,
             cluster_resources: Optional[dict] = None, measure: bool = False) -> Plan:
    """The plan on `--plan-gpus`, else on a cluster's GPUs (its resources), else on this machine's.
    `measure`: time the model here when no per-token cost is given (a plan for this machine)."""
    if gpus_text:
        gpus = GPUs.parse(gpus_text)
    elif cluster_resources is not None:
        gpus = GPUs.from_cluster(cluster_resources)
    else:
        gpus = _local_gpus()
    if seconds_per_token is not None and (not math.isfinite(seconds_per_token) or seconds_per_token <= 0):
        raise ConfigError(f"--plan-seconds-per-token: must be a positive number, got {seconds_per_token}")
    note = "given"
    if seconds_per_token is None and measure:
        seconds_per_token, note = measured_seconds_per_token(cfg), "measured here: a full-cache read of 1k tokens"
    return make_plan(cfg, gpus, architecture(cfg), seconds_per_token, note)


def measured_seconds_per_token(cfg: RunConfig, tokens: int = 1024) -> float:
    """A full-cache read of one synthetic prompt on this machine, in the run's chunks: seconds per token."""
    import time

    import torch

    from namm_core import FullCache, MemoryManagedLM, load_model

    m = cfg.model
    model, _ = load_model(m.name, device=m.device, dtype=m.dtype, rope_scaling=m.rope_scaling,
                          max_position_embeddings=m.max_position_embeddings, tiny_random=m.tiny_random)
    ids = torch.randint(0, int(model.config.vocab_size), (1, min(tokens, longest_context(cfg))))
    lm = MemoryManagedLM(model, FullCache(), chunk_size=cfg.memory.chunk_size, update_every=cfg.memory.update_every)
    t = time.perf_counter()
    lm.generate(ids, max_new_tokens=1)
    return (time.perf_counter() - t) / ids.shape[1]


def _local_gpus() -> Optional[GPUs]:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GPUs(torch.cuda.device_count(), props.name, float(props.total_memory), None)

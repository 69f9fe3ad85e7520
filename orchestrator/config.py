"""Run configuration: YAML validated once, at the edge, into typed dataclasses.

Every error names the offending field by its path (e.g. `stages[1].tasks[0].context_length`).
Relative paths in the file (task files, checkpoint root) are resolved against the config
file's directory, so a job behaves the same from any working directory.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the field."""


def _positive(value, where: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


def _whole_number(value, where: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected a whole number >= {minimum}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = "smollm2"                 # 'smollm2', 'gemma3-270m', a hub id or a local path
    dtype: str = "auto"                   # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    rope_scaling: Optional[dict] = None   # e.g. {rope_type: dynamic, factor: 4.0} (NTK) for 32k Llama-3
    max_position_embeddings: Optional[int] = None
    tiny_random: Optional[dict] = None    # a tiny randomly initialised model (tests, smoke runs): config kwargs

    def check(self, where: str = "model") -> None:
        import torch

        from namm_core.models import pick_dtype

        try:
            pick_dtype(torch.device("cpu"), self.dtype)
        except ValueError as e:
            raise ConfigError(f"{where}.dtype: {e}") from None
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ConfigError(f"{where}.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.tiny_random is not None and not isinstance(self.tiny_random, dict):
            raise ConfigError(f"{where}.tiny_random: expected a mapping of config fields")

    @property
    def label(self) -> str:
        """A short name for tables and metric keys: the embedded name, a path's last part, or
        `tiny-<architecture>-s<seed>-l<layers>-h<hidden size>` for a tiny random model."""
        if self.tiny_random is not None:
            t = self.tiny_random
            return (f"tiny-{t.get('architecture', 'llama')}-s{t.get('seed', 0)}-l{t.get('num_hidden_layers', '')}"
                    f"-h{t.get('hidden_size', '')}")
        return Path(str(self.name).rstrip("/")).name or str(self.name)


@dataclass
class MemoryConfig:
    update_every: int = 512
    chunk_size: int = 512
    shared_prefixes: int = 64             # prompts whose pre-update state a worker keeps for all candidates (0: off)

    def check(self) -> None:
        _positive(self.update_every, "memory.update_every")
        _positive(self.chunk_size, "memory.chunk_size")
        if self.shared_prefixes < 0:
            raise ConfigError(f"memory.shared_prefixes: must be 0 or more, got {self.shared_prefixes}")


def _namm_spec_class():
    """`namm:` of a run config: the NAMM's own fields, declared once in namm_core's NAMMConfig
    (their meaning is documented there), less what a run sets elsewhere (the memory settings
    come from `memory:`; the format version and the spectrogram are fixed by the code), plus how
    many prompts give the normalisation statistics. NAMMConfig validates them."""
    from namm_core.namm import NAMMConfig

    hints = typing.get_type_hints(NAMMConfig)
    hints["budget"] = Optional[Union[str, int, float]]   # YAML gives 0.5 or 1024; NAMMConfig keeps "0.5"
    fixed = {"update_every", "chunk_size", "format_version", "spectrogram", "norm_eps"}
    fields_ = [(f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory))
               for f in dataclasses.fields(NAMMConfig) if f.name not in fixed]
    # prompts of the first stage used to collect the normalisation statistics
    fields_.append(("stats_prompts", int, field(default=8)))
    return dataclasses.make_dataclass("NAMMSpec", fields_, namespace={"__module__": __name__})


NAMMSpec = _namm_spec_class()


@dataclass
class WarmStartConfig:
    """Start CMA-ES from a scorer fitted to imitate a baseline's keep decisions, or distilled from a
    teacher's importance (namm_core.distill): "hindsight", what the full cache's question and reply
    attended to; "kvzip", how much the model needs a token to reconstruct its context."""
    imitate: str = "streamingllm:0.5"     # a baseline policy spec (parse_policy), "hindsight" or "kvzip"
    prompts: int = 4                      # first-stage prompts whose features and decisions are collected
    steps: int = 300                      # gradient steps of the fit (per round for "hindsight"/"kvzip")
    lr: float = 0.01
    rounds: int = 1                       # "hindsight"/"kvzip": rounds recorded under the fitted NAMM (DAgger)
    # torch threads of the one actor that runs the warm start (the others idle meanwhile);
    # default: workers.torch_threads
    threads: Optional[int] = None

    def check(self, namm_scope: str) -> None:
        from namm_core import budgeted_baselines, parse_policy
        from namm_core.distill import TEACHERS

        if self.threads is not None:
            _whole_number(self.threads, "es.warm_start.threads", minimum=1)
        if self.imitate in TEACHERS:
            if namm_scope != "global":
                raise ConfigError(f"es.warm_start.imitate: {self.imitate!r} fits a model-wide NAMM: set namm.scope: "
                                  "global (with namm.selection: top_k and a budget)")
            _whole_number(self.rounds, "es.warm_start.rounds", minimum=0)
        else:
            try:
                imitated = parse_policy(self.imitate)
            except ValueError as e:
                raise ConfigError(f"es.warm_start.imitate: {e}") from None
            if imitated.name not in budgeted_baselines():
                raise ConfigError(f"es.warm_start.imitate: expected a baseline with a budget, e.g. streamingllm:0.5, "
                                  f"or 'hindsight' or 'kvzip', got {self.imitate!r}")
        _positive(self.prompts, "es.warm_start.prompts")
        _positive(self.steps, "es.warm_start.steps")
        _positive(self.lr, "es.warm_start.lr")


@dataclass
class SubspaceConfig:
    """Search only part of the parameter vector around the start (orchestrator.subspace): the
    coordinates of named parameter groups of the scorer, or k random orthonormal directions."""
    params: Optional[list[str]] = None    # e.g. [readout, modulation]; "readout.bias" names one tensor
    random_dim: Optional[int] = None

    def check(self, slices: dict) -> None:
        from .subspace import param_indices

        if (self.params is None) == (self.random_dim is None):
            raise ConfigError("es.subspace: give exactly one of params (parameter groups) or random_dim")
        if self.random_dim is not None:
            _whole_number(self.random_dim, "es.subspace.random_dim", minimum=2)
            if self.random_dim > sum(s.stop - s.start for s in slices.values()):
                raise ConfigError(f"es.subspace.random_dim: {self.random_dim} is more than the NAMM's parameters")
            return
        if not self.params or not all(isinstance(p, str) for p in self.params):
            raise ConfigError(f"es.subspace.params: expected a list of parameter group names, got {self.params!r}")
        try:
            if len(param_indices(slices, self.params)) < 2:
                raise ConfigError("es.subspace.params: pycma needs at least 2 coordinates to search")
        except ValueError as e:
            raise ConfigError(f"es.subspace.params: {e}") from None


@dataclass
class ESConfig:
    population: int = 32
    sigma0: float = 0.065
    elite_ratio: float = 0.5
    seed: int = 0
    diagonal: bool = False                # CMA_diagonal: cheaper updates and small checkpoints
    warm_start: Optional[WarmStartConfig] = None   # default: the paper's mean 0 (keep everything)
    subspace: Optional[SubspaceConfig] = None      # default: search every parameter
    # a saved NAMM directory to evolve from: its weights are the starting mean and its
    # normalisation statistics are used as they are (no warm start, no statistics collected)
    start: Optional[str] = None
    # validate the starting mean before the first generation (recorded as generation -1): the
    # bar an evolved mean must clear to become namm_best, and what a run's gain is measured from
    validate_start: bool = True

    def check(self, namm_scope: str) -> None:
        _positive(self.population, "es.population")
        if self.population < 4:
            # pycma injects two step-size test points per generation in high dimensions (TPA)
            raise ConfigError(f"es.population: CMA-ES here needs at least 4 candidates, got {self.population}")
        _positive(self.sigma0, "es.sigma0")
        if not 0 < self.elite_ratio <= 1:
            raise ConfigError(f"es.elite_ratio: must be in (0, 1], got {self.elite_ratio}")
        if self.warm_start is not None:
            self.warm_start.check(namm_scope)
        if self.start is not None and self.warm_start is not None:
            raise ConfigError("es.start: a run starts from a saved NAMM or from a warm start, not both")
        if not isinstance(self.validate_start, bool):
            raise ConfigError(f"es.validate_start: expected true or false, got {self.validate_start!r}")

    def check_start(self, namm_config) -> None:
        """es.start must be the very memory this run evolves (same scorer, selection, structure)."""
        from namm_core import NAMM

        try:
            saved = NAMM.from_pretrained(self.start)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"es.start: {e}") from None
        ours, theirs = dataclasses.asdict(namm_config), dataclasses.asdict(saved.config)
        differ = [k for k in ours if ours[k] != theirs.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError(f"es.start: {self.start} has {k} {theirs.get(k)!r}, this run's NAMM has {ours[k]!r} "
                              f"(differing: {', '.join(differ)}); set the namm section to match it")


@dataclass
class FitnessConfig:
    # The paper's fitness is task performance only. With a target, a candidate whose mean
    # retention r exceeds it loses weight * (r - target): a memory budget in the objective.
    retention_target: Optional[float] = None
    retention_weight: float = 1.0
    # "task_score": the paper's metric ratio to the full cache (needs decoding);
    # "loglik": teacher-forced likelihood of the reply relative to the full cache (dense, no decoding)
    kind: str = "task_score"
    loglik_target: str = "reference"      # "reference" answer, or the "full_cache" model's own reply
    # what CMA-ES is told: the fitness above ("none"), or each prompt's values ranked / z-scored
    # among the generation's candidates, then averaged (workers.fitness.per_prompt_fitness)
    per_prompt: str = "none"

    def check(self) -> None:
        from workers.fitness import FITNESS

        if self.kind not in FITNESS:
            raise ConfigError(f"fitness.kind: expected one of {', '.join(FITNESS)}, got {self.kind!r}")
        # checked whatever the kind, so a typo never waits for the day the kind changes
        targets = FITNESS[self.kind].targets or tuple(t for k in FITNESS.values() for t in k.targets)
        if self.loglik_target not in targets:
            raise ConfigError(f"fitness.loglik_target: expected one of {', '.join(targets)}, got {self.loglik_target!r}")
        if self.retention_target is not None and not 0 < self.retention_target <= 1:
            raise ConfigError(f"fitness.retention_target: must be in (0, 1], got {self.retention_target}")
        if self.retention_weight < 0:
            raise ConfigError(f"fitness.retention_weight: must be 0 or more, got {self.retention_weight}")
        from workers.fitness import PER_PROMPT

        if self.per_prompt not in PER_PROMPT:
            raise ConfigError(f"fitness.per_prompt: expected one of {', '.join(PER_PROMPT)}, got {self.per_prompt!r}")
        if self.per_prompt != "none" and self.retention_target is not None:
            raise ConfigError("fitness.per_prompt: a per-prompt ranking has no scale to charge memory on; "
                              "use it without fitness.retention_target (or give the NAMM a budget)")


@dataclass
class WorkersConfig:
    # "ray": Ray actors, one model each (local, or the cluster at RAY_ADDRESS). "in_process": the
    # same worker code in the driver's process, no Ray (a notebook, a debugger); one model, the
    # jobs of num_actors actors run one after another, so a run equals the Ray run of the config
    pool: str = "ray"
    num_actors: int = 2                   # CPU actors; on a GPU cluster, the number of GPU actors
    gpus_per_actor: Union[str, float] = "auto"   # auto: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    torch_threads: int = 1
    max_retries: int = 2                  # per job, on other actors, before its candidate is told as NaN
    timeout_seconds: float = 1800
    # a candidate's prompts are dispatched in jobs of this many (none: one job per candidate), so
    # an actor that finishes early takes over part of a slow candidate; the scores are the same
    prompts_per_job: Optional[int] = None

    def check(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"workers.pool: expected one of {', '.join(POOLS)}, got {self.pool!r}")
        for name in ("num_actors", "cpus_per_actor", "torch_threads", "timeout_seconds"):
            _positive(getattr(self, name), f"workers.{name}")
        if self.max_retries < 0:
            raise ConfigError("workers.max_retries: must be 0 or more")
        if self.prompts_per_job is not None:
            _whole_number(self.prompts_per_job, "workers.prompts_per_job", minimum=1)
        if isinstance(self.gpus_per_actor, str) and self.gpus_per_actor != "auto":
            raise ConfigError(f"workers.gpus_per_actor: expected 'auto' or a number, got {self.gpus_per_actor!r}")


@dataclass
class TaskSpec:
    task: Optional[str] = None            # a synthetic task name (see `namm eval --list-tasks`)
    file: Optional[str] = None            # or a LongBench-format .jsonl/.parquet file
    context_length: int = 2048            # synthetic prompt length in model tokens
    pool_size: int = 64                   # prompts in the task's pool
    seed: int = 0

    @property
    def key(self) -> str:
        if self.file:
            return f"file:{Path(self.file).name}"
        return f"{self.task}@{self.context_length}"

    def check(self, where: str, stage: "StageConfig", fitness_kind: str, check_files: bool) -> None:
        """`file` is already resolved against the config's directory (see _resolve_paths)."""
        from namm_eval.tasks import task_names
        from workers.fitness import FITNESS

        if bool(self.task) == bool(self.file):
            raise ConfigError(f"{where}: give exactly one of 'task' (a synthetic task) or 'file'")
        if self.task and self.task not in task_names():
            raise ConfigError(f"{where}.task: unknown task {self.task!r}; known: {task_names()}")
        if self.task in FITNESS[fitness_kind].unsupported_tasks:
            raise ConfigError(f"{where}.task: {self.task!r} cannot be measured by fitness.kind {fitness_kind!r} "
                              "(use fitness.kind 'task_score')")
        if self.file and check_files:
            self._check_file(where, stage)
        _positive(self.context_length, f"{where}.context_length")
        _positive(self.pool_size, f"{where}.pool_size")
        if stage.prompts_per_task > self.pool_size:
            raise ConfigError(f"{where}.pool_size: {self.pool_size} is smaller than the stage's prompts_per_task "
                              f"({stage.prompts_per_task})")

    def _check_file(self, where: str, stage: "StageConfig") -> None:
        from namm_eval.tasks.files import load_task_file

        path = Path(self.file)
        if not path.is_file():
            raise ConfigError(f"{where}.file: {path} does not exist")
        try:
            records = len(load_task_file(path))
        except ValueError as e:
            raise ConfigError(f"{where}.file: {e}") from None
        needed = self.pool_size + stage.validation_prompts
        if needed > records:
            raise ConfigError(f"{where}.pool_size: {self.pool_size} training + {stage.validation_prompts} validation "
                              f"prompts (the stage's validation_prompts) need {needed} records; {path} has {records}")


@dataclass
class StageConfig:
    name: str
    generations: int
    tasks: list
    prompts_per_task: int = 8             # resampled each generation from each task's pool
    validation_every: int = 10
    validation_prompts: int = 16          # per task, a fixed set (the first of the pool)

    def check(self, where: str, fitness_kind: str, check_files: bool) -> None:
        for name in ("generations", "prompts_per_task", "validation_every", "validation_prompts"):
            _positive(getattr(self, name), f"{where}.{name}")
        for j, task in enumerate(self.tasks):
            task.check(f"{where}.tasks[{j}]", self, fitness_kind, check_files)


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None    # default: $MLFLOW_TRACKING_URI, else sqlite:///<run root>/mlflow.db
    experiment: str = "namm-evolution"


@dataclass
class CheckpointConfig:
    root: str = "runs"                    # the run directory is <root>/<name>
    keep: int = 3

    def check(self) -> None:
        _positive(self.keep, "checkpoint.keep")


@dataclass
class RunConfig:
    name: str
    stages: list
    model: ModelConfig = field(default_factory=ModelConfig)
    # more models every candidate is also evaluated on, each on its own actors (workers.num_actors
    # per model); a candidate's fitness is the mean over models of its fitness on each. The NAMM's
    # normalisation statistics and warm start come from `model`, the one it is exported for.
    transfer_models: list = field(default_factory=list)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    namm: NAMMSpec = field(default_factory=NAMMSpec)
    es: ESConfig = field(default_factory=ESConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.root) / self.name

    @property
    def models(self) -> list:
        """Every model a candidate runs on: `model` first, then `transfer_models`."""
        return [self.model, *self.transfer_models]

    @property
    def total_generations(self) -> int:
        return sum(s.generations for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, check_files: bool = True) -> None:
        """Every section checks its own fields; the NAMM's are checked by NAMMConfig itself."""
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")
        labels = {}
        for where, m in _named_models(self):
            m.check(where)
            if m.label in labels:
                raise ConfigError(f"{where}: {m.label!r} is already {labels[m.label]}; every model "
                                  "a candidate runs on must be a different one")
            labels[m.label] = where
        self.memory.check()
        _positive(self.namm.stats_prompts, "namm.stats_prompts")
        namm_config = self.namm_config()
        self.es.check(self.namm.scope)
        if self.es.start is not None and check_files:
            self.es.check_start(namm_config)
        if self.es.subspace is not None:
            from namm_core import NAMM

            self.es.subspace.check(NAMM(namm_config).param_slices())
        self.fitness.check()
        self.workers.check()
        self.checkpoint.check()
        for i, stage in enumerate(self.stages):
            stage.check(f"stages[{i}]", self.fitness.kind, check_files)

    def namm_config(self):
        """The NAMM this run evolves, as namm_core builds it (its errors named under `namm`)."""
        from namm_core import NAMMConfig

        try:
            return NAMMConfig.from_spec(self.namm_spec())
        except ValueError as e:   # NAMMConfig's messages start "NAMM <field> ..." where one field is at fault
            words = str(e).split()
            named = words[1].rstrip(":") if len(words) > 1 and words[0] == "NAMM" else ""
            where = f"namm.{named}" if named in {f.name for f in dataclasses.fields(self.namm)} else "namm"
            raise ConfigError(f"{where}: {e}") from None

    def namm_spec(self) -> dict:
        """What a run records of the NAMM it evolves (checkpoints, workers): its fields, the
        format version and the memory settings; `NAMMConfig.from_spec` builds it."""
        from namm_core.namm import FORMAT_VERSION

        return {**dataclasses.asdict(self.namm), "format_version": FORMAT_VERSION,
                "update_every": self.memory.update_every, "chunk_size": self.memory.chunk_size}


POOLS = ("ray", "in_process")
_NESTED = {"stages": StageConfig, "tasks": TaskSpec, "transfer_models": ModelConfig}
_MAY_BE_EMPTY = {"transfer_models"}


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown field (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field is missing")
            continue
        kwargs[name] = _convert(hints[name], data[name], where, name)
    return cls(**kwargs)


def _convert(hint, value, where: str, name: str):
    if name in _NESTED:
        if value is None and name in _MAY_BE_EMPTY:
            return []
        if not isinstance(value, list) or (not value and name not in _MAY_BE_EMPTY):
            raise ConfigError(f"{where}: expected a {'' if name in _MAY_BE_EMPTY else 'non-empty '}list")
        return [_build(_NESTED[name], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} has the wrong type")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint in (dict, list) or origin in (dict, list):
        expected = origin or hint
        if not isinstance(value, expected):
            raise ConfigError(f"{where}: expected a {expected.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _validate(cfg: RunConfig, base_dir: Path, check_files: bool = True) -> RunConfig:
    """Resolve the config's paths, check every field, then normalise (the NAMM budget as
    NAMMConfig writes it: "0.5", "1024"), so checking never edits what it checks."""
    _resolve_paths(cfg, base_dir)
    cfg.check(check_files)
    cfg.namm.budget = cfg.namm_config().budget
    return cfg


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> None:
    """Task files and the run root relative to the config file's directory. `ray job submit
    --working-dir` runs the driver in a temporary copy of the repo: the run root (and the MLflow
    URI) must then come from the environment as absolute paths."""
    for stage in cfg.stages:
        for task in stage.tasks:
            if task.file and not Path(task.file).is_absolute():
                task.file = str((base_dir / task.file).resolve())
    if cfg.es.start and not Path(cfg.es.start).is_absolute():
        cfg.es.start = str((base_dir / cfg.es.start).resolve())
    root = Path(os.environ.get("NAMM_RUN_ROOT") or cfg.checkpoint.root)
    cfg.checkpoint.root = str(root if root.is_absolute() else (base_dir / root).resolve())


def check_resources(cfg: RunConfig, num_cpus: Optional[int] = None) -> None:
    """A local Ray has this machine's CPUs: refuse an actor pool that could never be placed
    (Ray would wait for it forever)."""
    if os.environ.get("RAY_ADDRESS") and cfg.workers.pool == "ray":
        return   # a cluster: the pool's start-up timeout says what is missing
    import torch

    # a local run's actors are on this machine: a GPU it does not have is a config error
    for where, m in _named_models(cfg):
        if str(m.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{where}.device: {m.device!r}, but this machine has no CUDA device (set auto or "
                              "cpu, or submit to a GPU cluster: RAY_ADDRESS)")
    if cfg.workers.pool == "in_process":
        return   # the models in this process, whatever num_actors says
    available = num_cpus or os.cpu_count() or 1
    models = len(cfg.models)
    needed = cfg.workers.num_actors * cfg.workers.cpus_per_actor * models
    if needed > available:
        per_model = f" for each of {models} models" if models > 1 else ""
        raise ConfigError(f"workers.num_actors: {cfg.workers.num_actors} actors x {cfg.workers.cpus_per_actor:g} "
                          f"CPUs (workers.cpus_per_actor){per_model} need {needed:g} CPUs; the local Ray has {available}")


def _named_models(cfg: RunConfig) -> list:
    """(config path, ModelConfig) of every model of the run, for error messages."""
    return [("model", cfg.model)] + [(f"transfer_models[{i}]", m) for i, m in enumerate(cfg.transfer_models)]


def check_context_lengths(cfg: RunConfig) -> None:
    """Refuse synthetic prompts longer than a model's window (read from its config, no weights)."""
    for where, m in _named_models(cfg):
        _check_context_lengths(cfg, m, where)


def _check_context_lengths(cfg: RunConfig, m: ModelConfig, where: str) -> None:
    from transformers import AutoConfig

    from namm_core.files import text_config
    from namm_core.models import resolve_model_path

    if m.tiny_random is not None:
        window = int(m.tiny_random.get("max_position_embeddings", 8192))
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(m.name))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.name: cannot read the config of {m.name!r}: {e}") from None
        text = text_config(config)
        window = int(m.max_position_embeddings or getattr(text, "max_position_embeddings", 0) or 0)
        if m.rope_scaling and not m.max_position_embeddings:
            window = int(window * float(m.rope_scaling.get("factor", 1.0)))
    if not window:
        return
    beyond = f" of {where} ({m.label})" if where != "model" else ""
    for i, stage in enumerate(cfg.stages):
        for j, task in enumerate(stage.tasks):
            if task.task and task.context_length > window:
                raise ConfigError(f"stages[{i}].tasks[{j}].context_length: {task.context_length} tokens is beyond "
                                  f"the model's window of {window}{beyond}")


def load_config(path, check_files: bool = True) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        cfg = _build(RunConfig, data, "")
        return _validate(cfg, path.resolve().parent, check_files)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(data: dict, base_dir: Union[str, Path] = ".") -> RunConfig:
    return _validate(_build(RunConfig, data, ""), Path(base_dir).resolve())

"""The policy registry: every memory policy by name, and the spec strings users write.

`full`, `h2o:0.25`, `snapkv:1024`, `fastgen:0.9`, `namm`, `namm:DIR@0.5`. One entry per policy
feeds `parse_policy`, the command-line help, the benchmarks' default lists and the contract
test that runs over every policy (tests/test_policy_contract.py).

Adding a policy: write its class (a `MemoryPolicy` subclass, see policies.py) and add one
`register(PolicyKind(...))` line below; nothing else needs to know its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import namms

from .expected_attention import ExpectedAttention
from .kvzip import KVzip
from .namm import NAMM, OBSERVE_SPEC_NAMES
from .policies import H2O, TOVA, FastGen, FullCache, L2Norm, MemoryPolicy, SnapKV, StreamingLLM
from .selection import SCOPES, parse_structure_options

# The NAMM shipped with the package (evolved on the embedded model), loaded by `namm` alone.
DEFAULT_NAMM_DIR = namms.shipped_namm()


ARGUMENTS = ("budget", "none", "threshold", "namm")


@dataclass(frozen=True)
class PolicyKind:
    name: str
    factory: Callable[..., MemoryPolicy]   # builds the policy from its parsed argument
    argument: str                          # "budget" (required B), "none", "threshold" (optional T), "namm"
    keeps: str                             # one line: what the policy keeps
    example: str                           # a spec that evicts on short prompts (tests, benchmarks)

    @property
    def budgeted(self) -> bool:
        """Takes a budget: comparable with another policy at exactly the same cache size."""
        return self.argument in ("budget", "namm")

    @property
    def syntax(self) -> str:
        return {"budget": f"{self.name}:B", "none": self.name, "threshold": f"{self.name}[:T]",
                "namm": f"{self.name}[:DIR|NAME][@B]"}[self.argument]


REGISTRY: dict[str, PolicyKind] = {}


def register(kind: PolicyKind) -> PolicyKind:
    if kind.argument not in ARGUMENTS:
        raise ValueError(f"policy {kind.name}: argument must be one of {ARGUMENTS}")
    REGISTRY[kind.name] = kind
    return kind


register(PolicyKind("full", FullCache, "none", "everything", "full"))
register(PolicyKind("streamingllm", StreamingLLM, "budget", "the first 4 (sink) tokens and the most recent ones",
                    "streamingllm:0.5"))
register(PolicyKind("h2o", H2O, "budget", "a recent window (half the budget) + the largest accumulated attention",
                    "h2o:0.5"))
register(PolicyKind("l2", L2Norm, "budget", "per head, the keys with the lowest L2 norm", "l2:0.5"))
register(PolicyKind("snapkv", SnapKV, "budget", "per head, the most attended by the last 32 queries before each "
                    "update, max-pooled; the observation window is kept", "snapkv:0.5"))
register(PolicyKind("tova", TOVA, "budget", "per head, the most attended by the newest query", "tova:0.5"))
register(PolicyKind("expected_attention", ExpectedAttention, "budget", "per head, the keys future queries are "
                    "expected to attend to (statistics of the queries since the last update, RoPE averaged over the next "
                    "512 positions), times the value norm; the first 4 tokens", "expected_attention:0.5"))
register(PolicyKind("kvzip", KVzip, "budget", "the keys the model attends to when asked to repeat the tokens since the "
                    "last update (a side forward per update), the budget shared by every layer and head; the first 4 "
                    "tokens", "kvzip:0.5"))
register(PolicyKind("fastgen", FastGen, "threshold", "per head, the cheapest of special / +punctuation / +heavy "
                    "hitters / +recent / all that holds a share T (default 0.85) of the recent attention; no budget",
                    "fastgen:0.7"))
register(PolicyKind("namm", NAMM.from_pretrained, "namm", "tokens its scorer rates >= 0, or (@B) its B best-scored, "
                    "in the structure it was evolved with (the shipped NAMM: one kept set for the whole model)", "namm@0.5"))


def budgeted_baselines() -> list[str]:
    """Names of the hand-designed policies that take a budget (what a NAMM is compared with)."""
    return [k.name for k in REGISTRY.values() if k.argument == "budget"]


def policy_help() -> str:
    syntax = " | ".join(k.syntax for k in REGISTRY.values())
    return (f"{syntax}  (B = a fraction of the tokens seen, e.g. 0.25, or a token count, e.g. 1024; "
            "T = the share of attention FastGen must keep, default 0.85; namm alone is the shipped NAMM, "
            "namm@B keeps its B best-scored tokens; options after '/', see `namm eval --list-policies`)")


POLICY_HELP = policy_help()

STRUCTURE_HELP = ("options of every policy with a budget, after '/': head (each layer and KV head keeps B; the "
                  "default of most), adakv (a layer's heads share its budget, each keeping at least safeguard=0.2 "
                  "of B), modelwide (every layer and head share the model's budget; kvzip's default), global (one "
                  "kept set for the whole model, by the mean score), pool=N (a token scores the best of its N "
                  "neighbours), sinks=N (the first N tokens are always kept); and the policy's own "
                  "hyperparameters as name=value, e.g. snapkv:0.5/window=64/kernel=5, tova:0.25/global/pool=15/sinks=4. "
                  "A model-wide NAMM takes layers=K after its budget (namm@0.25/layers=6: it scores from six layers "
                  "evenly spaced, or from the listed ones, layers=0,10,20; the others attend with the fused kernel). "
                  "A BAM NAMM takes window=W (namm@0.25/window=256: each token's backward attention sees itself and "
                  "the W newest tokens, S x W work instead of S^2/2) and keys=band (the W - 1 tokens right after it). "
                  "Any NAMM takes rows=R (namm@0.25/rows=64: each update reads the attention rows of the R queries "
                  "before it, earlier rows count as zero; the others attend with the fused kernel) and obs=bf16 (the attention "
                  "rows read and folded in bfloat16: on a bf16 model no float32 copy of the probabilities)")


def policy_listing() -> str:
    """Every registered policy: its spec syntax, what it keeps, and its hyperparameters' defaults."""
    lines = []
    for kind in REGISTRY.values():
        defaults = kind.factory.option_defaults() if hasattr(kind.factory, "option_defaults") else {}
        options = ", ".join(f"{k}={v}" for k, v in defaults.items())
        lines.append(f"{kind.syntax:<24} {kind.keeps}" + (f" [{options}]" if options else ""))
    return "\n".join(lines) + "\n\n" + STRUCTURE_HELP


def parse_policy(spec: str) -> MemoryPolicy:
    """Build a memory policy from its spec string; errors name the spec and the fix.

    `NAME[:ARG][/OPTION...]`: ARG is the budget (or FastGen's threshold); each OPTION is a
    hyperparameter `name=value` or a structure flag (`head`, `adakv`, `modelwide`, `global`,
    `pool=N`, `sinks=N`, `safeguard=F`), e.g. `tova:0.5/global/pool=15/sinks=4`."""
    spec = spec.strip()
    if spec.lower().startswith("namm@") or spec.lower() == "namm" or spec.lower().startswith("namm:"):
        return _parse_namm(spec)
    head, *option_texts = spec.split("/")
    name, _, arg = head.partition(":")
    name = name.lower()
    kind = REGISTRY.get(name)
    if kind is None:
        raise ValueError(f"unknown policy {spec!r}: expected {policy_help()}")
    try:
        options = _parse_options(option_texts)
        if kind.argument == "none":
            if arg or options:
                raise ValueError(f"{name} takes no budget and no options")
            return kind.factory()
        settings = _typed_options(kind, options)
        if kind.argument == "threshold":
            return kind.factory(float(arg), **settings) if arg else kind.factory(**settings)
        if not arg:
            raise ValueError(f"needs a budget, e.g. {name}:0.25 or {name}:1024")
        structure = parse_structure_options({k: v for k, v in options.items() if k in STRUCTURE_OPTIONS},
                                            kind.factory.default_structure)
        return kind.factory(arg, structure=structure, **settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"policy {spec!r}: {e}") from None


STRUCTURE_OPTIONS = (*SCOPES, "pool", "sinks", "safeguard")


def _parse_options(texts: list[str]) -> dict[str, object]:
    """['global', 'pool=15'] -> {'global': True, 'pool': '15'}; each option once."""
    options: dict[str, object] = {}
    for text in texts:
        key, eq, value = text.strip().partition("=")
        key = key.strip().lower()
        if not key or (eq and not value.strip()):
            raise ValueError(f"empty option in {'/'.join(texts)!r}: write /name=value or /flag")
        if key in options:
            raise ValueError(f"option {key!r} given twice")
        options[key] = value.strip() if eq else True
    return options


def _typed_options(kind: PolicyKind, options: dict) -> dict:
    """The policy's own hyperparameters among the options, cast like their defaults."""
    defaults = kind.factory.option_defaults() if hasattr(kind.factory, "option_defaults") else {}
    structure = STRUCTURE_OPTIONS if kind.argument == "budget" else ()
    unknown = [k for k in options if k not in defaults and k not in structure]
    if unknown:
        known = sorted(defaults) + list(structure)
        raise ValueError(f"unknown option {unknown[0]!r} for {kind.name}; known: {', '.join(known) or 'none'}")
    typed = {}
    for key, default in defaults.items():
        if key not in options:
            continue
        value = options[key]
        if value is True:
            raise ValueError(f"option {key} needs a value: /{key}=...")
        try:
            typed[key] = int(value) if isinstance(default, int) and not isinstance(default, bool) else float(value)
        except ValueError:
            raise ValueError(f"option {key}={value!r} is not a {type(default).__name__}") from None
    return typed


def _namm_directory(spec: str, where: str) -> Path:
    """A saved NAMM's directory: a path, or the name of a NAMM shipped with the package."""
    if not where:
        return DEFAULT_NAMM_DIR
    if Path(where).exists():
        return Path(where)
    if where in namms.names():
        return namms.shipped_namm(where)
    raise ValueError(f"policy {spec!r}: NAMM directory {where} does not exist (shipped NAMMs: "
                     f"{', '.join(namms.names())})")


def _parse_namm(spec: str) -> NAMM:
    """`namm`, `namm:DIR`, `namm@B`, `namm:DIR@B` (a directory name may itself contain '@')."""
    body = spec[len("namm"):]
    budget: Optional[str] = None
    options: dict = {}
    head, at, tail = body.rpartition("@")
    if at and "/" not in tail:
        body, budget = head, tail
    elif at and _is_budget(tail.split("/")[0]):
        # namm[:DIR]@B/OPTION...: options come after the budget
        budget, *option_texts = tail.split("/")
        body = head
        try:
            options = _parse_options(option_texts)
        except ValueError as e:
            raise ValueError(f"policy {spec!r}: {e}") from None
    if body and not body.startswith(":"):
        raise ValueError(f"unknown policy {spec!r}: expected {policy_help()}")
    directory = _namm_directory(spec, body[1:])
    namm = REGISTRY["namm"].factory(directory)
    if directory.parent == namms.DIRECTORY:   # a shipped NAMM is named by its name, wherever installed
        namm.source = directory.name
    try:
        if budget is not None:
            namm = namm.with_budget(budget)
        unknown = [k for k in options if k not in NAMM_OPTIONS]
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for namm; known: {', '.join(NAMM_OPTIONS)}")
        if "layers" in options:
            namm = namm.scoring_from(_layers_option(options["layers"]))
        if "window" in options or "keys" in options:
            namm = namm.with_bam_window(*_window_options(options, namm))
        if "rows" in options:
            namm = namm.reading_rows(_rows_option(options["rows"]))
        if "obs" in options:
            namm = namm.observing_in(_obs_option(options["obs"]))
    except ValueError as e:
        raise ValueError(f"policy {spec!r}: {e}") from None
    return namm


def _is_budget(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


NAMM_OPTIONS = ("layers", "window", "keys", "rows", "obs")


def _rows_option(text) -> int:
    """`rows=64`: each update reads the attention of the 64 queries before it (`NAMMConfig.observe_rows`)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"option rows={text!r}: expected a number of query rows like 64") from None


def _obs_option(text) -> str:
    """`obs=bf16`: the attention rows read and folded in bfloat16 (`NAMMConfig.observe_dtype`)."""
    names = {short: dtype for dtype, short in OBSERVE_SPEC_NAMES.items()}
    if text not in names:
        raise ValueError(f"option obs={text!r}: expected one of {', '.join(names)}")
    return names[text]


def _window_options(options: dict, namm: NAMM) -> tuple:
    """`window=256` (the BAM attends to the 256 newest tokens) and `keys=band` (to the 255 right
    after each token instead); `NAMMConfig.bam_window`."""
    window, keys = namm.config.bam_window, options.get("keys", namm.config.bam_window_keys)
    if "window" in options:
        try:
            window = int(options["window"])
        except (TypeError, ValueError):
            raise ValueError(f"option window={options['window']!r}: expected a number of tokens like 256") from None
    if window is None:
        raise ValueError("option keys needs a window: /window=256/keys=band")
    return window, keys


def _layers_option(value) -> object:
    """`layers=6` (six layers evenly spaced) or `layers=0,10,20` (those layers)."""
    if value is True:
        raise ValueError("option layers needs a value: /layers=6 or /layers=0,10,20")
    try:
        items = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"option layers={value!r}: expected a count or layer indices like 0,10,20") from None
    return items if "," in str(value) else items[0]

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

from .namm import NAMM
from .policies import H2O, TOVA, FastGen, FullCache, L2Norm, MemoryPolicy, SnapKV, StreamingLLM

# The NAMM shipped with the project (evolved on the embedded model), used by `namm` alone.
DEFAULT_NAMM_DIR = Path(__file__).resolve().parent.parent / "namms" / "smollm2"

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
                "namm": f"{self.name}[:DIR][@B]"}[self.argument]


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
register(PolicyKind("fastgen", FastGen, "threshold", "per head, the cheapest of special / +punctuation / +heavy "
                    "hitters / +recent / all that holds a share T (default 0.85) of the recent attention; no budget",
                    "fastgen:0.7"))
register(PolicyKind("namm", NAMM.from_pretrained, "namm", "tokens its scorer rates >= 0, or (@B) its B best-scored, "
                    "per layer and KV head", "namm@0.5"))


def budgeted_baselines() -> list[str]:
    """Names of the hand-designed policies that take a budget (what a NAMM is compared with)."""
    return [k.name for k in REGISTRY.values() if k.argument == "budget"]


def policy_help() -> str:
    syntax = " | ".join(k.syntax for k in REGISTRY.values())
    return (f"{syntax}  (B = a fraction of the tokens seen, e.g. 0.25, or a token count, e.g. 1024; "
            "T = the share of attention FastGen must keep, default 0.85; namm alone is the shipped NAMM, "
            "namm@B keeps its B best-scored tokens per layer and KV head)")


POLICY_HELP = policy_help()


def parse_policy(spec: str) -> MemoryPolicy:
    """Build a memory policy from its spec string; errors name the spec and the fix."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name.startswith("namm@") or name == "namm":
        return _parse_namm(spec)
    kind = REGISTRY.get(name)
    if kind is None:
        raise ValueError(f"unknown policy {spec!r}: expected {policy_help()}")
    try:
        if kind.argument == "none":
            if arg:
                raise ValueError(f"{name} takes no budget")
            return kind.factory()
        if kind.argument == "threshold":
            return kind.factory(float(arg)) if arg else kind.factory()
        if not arg:
            raise ValueError(f"needs a budget, e.g. {name}:0.25 or {name}:1024")
        return kind.factory(arg)
    except ValueError as e:
        raise ValueError(f"policy {spec!r}: {e}") from None


def _parse_namm(spec: str) -> NAMM:
    """`namm`, `namm:DIR`, `namm@B`, `namm:DIR@B` (a directory name may itself contain '@')."""
    body = spec[len("namm"):]
    budget: Optional[str] = None
    head, at, tail = body.rpartition("@")
    if at and "/" not in tail:
        body, budget = head, tail
    if body and not body.startswith(":"):
        raise ValueError(f"unknown policy {spec!r}: expected {policy_help()}")
    directory = Path(body[1:]) if body[1:] else DEFAULT_NAMM_DIR
    if not directory.exists():
        raise ValueError(f"policy {spec!r}: NAMM directory {directory} does not exist")
    namm = REGISTRY["namm"].factory(directory)
    if budget is not None:
        try:
            namm = namm.with_budget(budget)
        except ValueError as e:
            raise ValueError(f"policy {spec!r}: {e}") from None
    return namm

"""Policy specs as users write them: `full`, `h2o:0.25`, `snapkv:1024`, `namm:PATH`."""
from __future__ import annotations

from pathlib import Path

from .namm import NAMM
from .policies import BASELINES, FastGen, MemoryPolicy

# The NAMM shipped with the project (evolved on the embedded model), used by `namm` alone.
DEFAULT_NAMM_DIR = Path(__file__).resolve().parent.parent / "namms" / "smollm2"

POLICY_HELP = (
    "full | streamingllm:B | h2o:B | l2:B | snapkv:B | tova:B | fastgen[:T] | namm[:DIR][@B]  "
    "(B = a fraction of the tokens seen, e.g. 0.25, or a token count, e.g. 1024; "
    "T = the share of attention FastGen must keep, default 0.85; namm@B keeps the NAMM's B best-scored "
    "tokens per layer and KV head, whatever budget it was saved with)"
)


def parse_policy(spec: str) -> MemoryPolicy:
    """Build a memory policy from its spec string; errors name the spec and the fix."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name.startswith("namm@") or name == "namm":
        return _parse_namm(spec)
    if name == "fastgen":
        try:
            return FastGen(float(arg)) if arg else FastGen()
        except ValueError as e:
            raise ValueError(f"policy {spec!r}: {e}") from None
    if name not in BASELINES:
        raise ValueError(f"unknown policy {spec!r}: expected {POLICY_HELP}")
    cls = BASELINES[name]
    if name == "full":
        if arg:
            raise ValueError(f"policy {spec!r}: the full cache takes no budget")
        return cls()
    if not arg:
        raise ValueError(f"policy {spec!r} needs a budget, e.g. {name}:0.25 or {name}:1024")
    try:
        return cls(arg)
    except ValueError as e:
        raise ValueError(f"policy {spec!r}: {e}") from None


def _parse_namm(spec: str) -> NAMM:
    """`namm`, `namm:DIR`, `namm@B`, `namm:DIR@B` (a directory name may itself contain '@')."""
    body = spec[len("namm"):]
    budget = None
    head, at, tail = body.rpartition("@")
    if at and "/" not in tail:
        body, budget = head, tail
    if body and not body.startswith(":"):
        raise ValueError(f"unknown policy {spec!r}: expected {POLICY_HELP}")
    directory = Path(body[1:]) if body[1:] else DEFAULT_NAMM_DIR
    if not directory.exists():
        raise ValueError(f"policy {spec!r}: NAMM directory {directory} does not exist")
    namm = NAMM.from_pretrained(directory)
    if budget is not None:
        try:
            namm = namm.with_budget(budget)
        except ValueError as e:
            raise ValueError(f"policy {spec!r}: {e}") from None
    return namm

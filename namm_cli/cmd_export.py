"""`namm export CHECKPOINT OUT_DIR`: a checkpoint's CMA mean (or best) as a NAMM directory."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write the CMA mean (or the best candidate / best validated mean) of a checkpoint as a NAMM directory"


def add_parser(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=HELP + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .ckpt file, or a run's checkpoints directory (newest valid)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--which", choices=["mean", "best", "best-validated", "start"], default="mean",
                   help="the CMA mean (default), the best candidate seen, the best validated CMA mean, or the "
                        "mean the ES started from (with es.warm_start: the fitted imitation of a baseline)")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from namm_core import NAMM, NAMMConfig
    from orchestrator import checkpoint
    from orchestrator.state import EvolutionState

    if args.checkpoint.is_dir():
        found = checkpoint.load_latest(args.checkpoint)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {args.checkpoint}")
        path, payload = found
    else:
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
        path, payload = args.checkpoint, checkpoint.read_checkpoint(args.checkpoint)
    state = EvolutionState.from_payload(payload, where=str(path))
    if state.es is None:
        raise ValueError(f"{path}: the run has not started its first generation yet")
    selected = state.global_generation   # the generation the exported vector comes from
    if args.which == "mean":
        vector = state.es.mean
    elif args.which == "start":
        vector, selected = state.es.start, 0
    else:
        entry = state.best if args.which == "best" else state.best_validation
        if entry is None:
            raise ValueError(f"{path}: no {args.which} candidate recorded yet")
        vector, selected = entry["vector"], entry["generation"]
    namm = NAMM.from_vector(np.asarray(vector), state.norm, NAMMConfig.from_spec(state.namm_spec))
    namm.save_pretrained(args.out_dir, metadata={"checkpoint": checkpoint_label(path), "which": args.which,
                                                 "generation": selected,
                                                 "checkpoint_generation": state.global_generation})
    print(f"wrote {args.out_dir} ({namm.num_params} parameters, {args.which} of {path.name})")
    return 0


def checkpoint_label(path: Path) -> str:
    """Where a NAMM came from, without the machine's own directories: `RUN/checkpoints/FILE`."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/checkpoints/{path.name}"
    return path.name

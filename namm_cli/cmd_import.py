"""`namm import-official CKPT OUT_DIR`: a NAMM evolved with the official code, as a NAMM directory."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a checkpoint of the official NAMM code (SakanaAI/evo-memory ckpt.pt) into a NAMM directory"
EPILOG = """The checkpoint is read with torch.load(weights_only=True): tensors only, nothing else is
unpickled. The NAMM written (safetensors + JSON, format 2: the official conventions) scores
exactly as the official code would: the paper's BAM (4,172 parameters) or MLP (865) scorer, its
normalisation statistics, keep score >= 0. Use it like any other:

  namm import-official exp/namm_bam_i1/ckpt.pt namms/paper-bam
  namm eval --policy namm:namms/paper-bam --policy namm:namms/paper-bam@0.25 --policy full
"""


def add_parser(sub) -> None:
    p = sub.add_parser("import-official", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="the official ckpt.pt")
    p.add_argument("out_dir", type=Path, help="the NAMM directory to write")
    p.add_argument("--which", choices=("mean", "best"), default="mean",
                   help="the CMA-ES mean (the paper evaluates it; default) or the best member seen")
    p.set_defaults(run=run)


def run(args) -> int:
    from namm_core.official import load_official_checkpoint

    namm = load_official_checkpoint(args.checkpoint, which=args.which)
    namm.save_pretrained(args.out_dir, metadata=namm.metadata)
    print(f"wrote {args.out_dir}: {namm.config.scorer} scorer, {namm.num_params} parameters "
          f"({args.which} of {args.checkpoint}), normalisation from {int(namm.norm_count)} feature vectors")
    return 0

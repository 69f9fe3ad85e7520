"""`namm evolve CONFIG`: run (or resume) an evolution described by a YAML job file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "evolve a NAMM with CMA-ES on Ray workers, tracked in MLflow, resumable from checkpoints"
EPILOG = """Resuming: re-running the same command continues the run from its newest valid
checkpoint in <checkpoint.root>/<name>/checkpoints (a corrupt newest checkpoint is reported and
the previous one used). --resume makes that explicit and fails if there is nothing to resume.

Ray: with workers.pool: in_process the run needs no Ray (one model in this process, the same
results). Otherwise, with RAY_ADDRESS set (a cluster, or inside `ray job submit`) the driver joins that cluster;
otherwise it starts a private local Ray. MLflow: tracking.tracking_uri, else $MLFLOW_TRACKING_URI,
else sqlite:///<run dir>/mlflow.db. $NAMM_RUN_ROOT overrides checkpoint.root.

examples:
  namm evolve jobs/smoke.yaml
  namm evolve jobs/local.yaml                   # ~20 min on 2 CPU cores
  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python -m namm_cli evolve jobs/evolve.yaml
"""


def add_parser(sub) -> None:
    p = sub.add_parser("evolve", help=HELP, description=HELP + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML job file (see jobs/)")
    p.add_argument("--resume", action="store_true", help="require an existing checkpoint to continue from")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpointed run's")
    p.add_argument("--stop-after", type=int, default=None, metavar="G",
                   help="stop cleanly once G generations are done (resume later)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--plan", action="store_true",
                   help="print what the run needs per actor (weights, KV cache, attention of a chunk) on its GPUs "
                        "and the seconds per generation, refuse it if it cannot fit, and exit without running")
    p.add_argument("--plan-gpus", metavar="NxGPU", default=None,
                   help="with --plan: the GPUs to plan for, e.g. 8xA100-80GB, 1xL4, 4xH100 (default: the cluster at "
                        "RAY_ADDRESS, else this machine)")
    p.add_argument("--plan-seconds-per-token", type=float, default=None, metavar="S",
                   help="with --plan: the model's cost per token read (default: estimated from the GPU's bf16 "
                        "throughput, or measured here when planning for this machine)")
    p.set_defaults(run=run)


def run(args) -> int:
    import signal

    from orchestrator.config import check_context_lengths, check_resources, load_config
    from orchestrator.driver import EvolutionRun, Interrupted, init_ray

    if args.plan:
        return print_plan(args)
    cfg = load_config(args.config)
    check_resources(cfg, args.num_cpus)
    check_context_lengths(cfg)
    for i, stage in enumerate(cfg.stages):
        for task in stage.tasks:
            if task.file:
                print(f"stage {i}: task file {task.file}: {task.pool_size} training and {stage.validation_prompts} "
                      f"validation prompts, disjoint (records shuffled with seed {task.seed})")
    evolution = EvolutionRun(cfg, stop_after=args.stop_after, allow_config_change=args.allow_config_change)
    # refusals (locked or unwritable run dir, corrupt checkpoints with --resume, another config,
    # unreachable tracking server) come before Ray starts or a model loads
    evolution.prepare(require_checkpoint=args.resume)
    if evolution.complete:
        evolution.lock.release()
        print(f"{cfg.name} is already complete ({evolution.state.global_generation} generations in "
              f"{evolution.run_dir}); nothing to do. Export it with `namm export {evolution.ckpt_dir} OUT_DIR`.")
        return 0

    from orchestrator.interrupts import request_stop

    # `ray job stop`, `kill` and Ctrl-C stop the run as KeyboardInterrupt, held while an MLflow
    # write is under way (orchestrator/interrupts.py)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if cfg.workers.pool == "ray":
            init_ray(args.num_cpus)
        for sig in previous:   # after ray.init, which installs a SIGTERM handler that aborts
            signal.signal(sig, request_stop)
        summary = evolution.run()
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"namm evolve: interrupted; {e or 'the run resumes from its newest checkpoint when started again'}",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    best = summary["best_validation"]
    print(f"{'stopped' if summary['stopped'] else 'finished'} after {summary['generations']} generations; "
          f"run dir {summary['run_dir']}")
    start = summary.get("start_validation")
    if start:
        print(f"starting mean (generation -1): validation fitness {start['fitness']:.4f}{_on_models(start)}")
    if best and start and best["generation"] == -1:
        evolved = "no evolved CMA mean was validated yet" if not summary.get("evolved_validations") else \
            "no evolved CMA mean beat the start on validation"
        print(f"{evolved}: namm_best is the start -> {summary['run_dir']}/artifacts/namm_best")
    elif best:
        # validation sets differ between stages: a gain is only read within one
        same_set = start and best.get("stage", 0) == start.get("stage", 0)
        gain = f" ({best['fitness'] - start['fitness']:+.4f} over the start on the same prompts)" if same_set else ""
        print(f"best validated CMA mean: fitness {best['fitness']:.4f}{_on_models(best)} at generation "
              f"{best['generation']}{gain}, retention {best['retention']:.3f} -> {summary['run_dir']}/artifacts/namm_best")
    print(f"MLflow: {summary['tracking_uri']} (run {summary['mlflow_parent']}); "
          f"`mlflow ui --backend-store-uri {summary['tracking_uri']}`, then open the experiment "
          f"'{cfg.tracking.experiment}' (its runs are under the Runs tab; each stage is a nested run)")
    return 0


def _on_models(validation: dict) -> str:
    """" (smollm2 0.81, gemma3-270m 0.74)": the fitness on each model of a run with transfer models."""
    parts = [f"{k[len('fitness@'):]} {v:.4f}" for k, v in validation.items() if k.startswith("fitness@")]
    return f" ({', '.join(parts)})" if parts else ""


def print_plan(args) -> int:
    import os

    from orchestrator.config import load_config
    from orchestrator.plan import plan_for

    cfg = load_config(args.config, check_files=False)   # a plan is often made before the data is in place
    resources = None
    if not args.plan_gpus and os.environ.get("RAY_ADDRESS") and cfg.workers.pool == "ray":
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"])
        resources = ray.cluster_resources()
    local = not args.plan_gpus and resources is None
    plan = plan_for(cfg, args.plan_gpus, args.plan_seconds_per_token, cluster_resources=resources,
                    measure=local and args.plan_seconds_per_token is None)
    print(plan.text())
    if not plan.fits:
        print(f"namm evolve: error: {cfg.name} does not fit on these GPUs (see 'fits' above): shorten the longest "
              "context or the chunk size, or plan for GPUs with more memory", file=sys.stderr)
        return 2
    return 0


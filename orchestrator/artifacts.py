"""What a run leaves behind besides checkpoints: the CMA mean and the best validated mean as NAMM
directories, the history as parquet, the curves as PNG, all under <run dir>/artifacts and, at
validations and at the end, in the MLflow parent run."""
from __future__ import annotations

from pathlib import Path

from .plots import plot_evolution, plot_retention_per_layer
from .state import EvolutionState

TABLES = ("history.parquet", "validation.parquet", "fitness.png", "retention_per_layer.png")


def _best_kind(st: EvolutionState) -> str:
    if st.best_validation["generation"] != -1:
        return "best validated cma-mean"
    if any(v["generation"] >= 0 for v in st.validation):
        return "the starting mean (no evolved mean validated better)"
    return "the starting mean (no evolved mean validated yet)"


def export_artifacts(st: EvolutionState, cfg, out: Path, tracker, final: bool) -> None:
    from namm_core import NAMM, NAMMConfig
    from namm_eval.report import write_parquet_atomic

    namm_cfg = NAMMConfig.from_spec(st.namm_spec)
    meta = {"run": cfg.name, "model": cfg.model.name, "generation": st.global_generation}
    if cfg.transfer_models:   # evolved on several models: the fitness was the mean over them
        meta["transfer_models"] = [m.label if m.tiny_random is not None else m.name for m in cfg.transfer_models]
    NAMM.from_vector(st.es.mean, st.norm, namm_cfg).save_pretrained(
        out / "namm_latest", metadata={**meta, "kind": "cma-mean"})
    if st.best_validation:
        bv = st.best_validation
        NAMM.from_vector(bv["vector"], st.norm, namm_cfg).save_pretrained(
            out / "namm_best", metadata={**meta, "generation": bv["generation"],
                                         "kind": _best_kind(st),
                                         "validation_fitness": bv["fitness"], "retention": bv["retention"],
                                         **{f"validation_{k}": v for k, v in bv.items() if k.startswith("fitness@")}})
    write_parquet_atomic(st.history, out / "history.parquet")
    if st.validation:
        write_parquet_atomic(st.validation, out / "validation.parquet")
    plot_evolution(st.history, st.validation, out / "fitness.png", title=cfg.name)
    if st.last_metrics and st.last_metrics["retention_per_layer"]:
        plot_retention_per_layer(st.last_metrics["retention_per_layer"], out / "retention_per_layer.png")
    is_validation = bool(st.validation) and st.validation[-1]["generation"] == st.global_generation - 1
    if final or is_validation:
        for name in ("namm_latest", "namm_best"):
            if (out / name).exists():
                tracker.log_artifacts(st.mlflow.parent, out / name, name)
        for name in TABLES:
            if (out / name).exists():
                tracker.log_artifact(st.mlflow.parent, out / name)

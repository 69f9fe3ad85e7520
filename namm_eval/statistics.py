"""A NAMM's normalisation statistics, collected on a model: what evolution does once for the model
it evolves on, and what `namm adapt` does for another model a NAMM is moved to.

The statistics are the mean and variance of the EMA spectrogram features of every cached token,
over some prompts read with the full cache: a zero NAMM of the same config (it keeps every token)
records them. No answers are used, so moving a NAMM to another model this way needs only prompts.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from namm_core import NAMM, NAMMConfig


def feature_statistics(evaluator, config: NAMMConfig, samples, progress: Optional[Callable] = None) -> dict:
    """{"mean", "var", "count"} of the features a NAMM of `config` reads, over `samples`, full cache."""
    namm = NAMM(replace(config, budget=None, selection="threshold", scope="head"))
    with namm.collecting_statistics():
        for sample in samples:
            evaluator.run_sample(sample, namm)
            if progress is not None:
                progress(sample)
    return {"mean": namm.norm_mean.numpy(), "var": namm.norm_var.numpy(), "count": namm.norm_count}


def with_statistics(namm: NAMM, statistics: dict) -> NAMM:
    """A copy of `namm` (same scorer weights and config) with these normalisation statistics."""
    adapted = NAMM.from_vector(namm.get_params().numpy(), statistics, namm.config)
    adapted.source = namm.source
    return adapted

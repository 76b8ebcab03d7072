"""Budgets shared by the benchmarks: a run shortened to a common budget shortens a staged method's stages alike."""
from __future__ import annotations


def scale_stage_lengths(module, factor: float) -> None:
    """Multiply a staged method's stage lengths (PD's steps_per_stage, TCM's stage1_steps, InstaFlow's reflow_steps,
    ...: the attributes its class lists in ``stage_lengths``, counted in generator updates) by ``factor``, so a
    benchmark that runs ``factor`` of the config's updates still reaches every stage. Zero (a disabled stage) stays."""
    for name in getattr(type(module), "stage_lengths", ()):
        value = getattr(module, name)
        if value:
            setattr(module, name, max(1, round(value * factor)))

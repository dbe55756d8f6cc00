"""What a sweep would run, said before anything runs (`attzoom sweep SPEC --check`).

A paper-scale sweep holds a cluster for a day: its size, its resources and where it writes are read
here from the checked spec, so a wrong edit shows before the GPUs are paid for.
"""

from __future__ import annotations

import os

from .layout import DECISIVE, experiment_name
from .naming import counted
from .spec import Spec, hide_password, optuna_storage_url
from .storage import sweep_location


def sweep_plan(spec: Spec, address: str | None, continues: bool = False) -> str:
    """The sweep's size, resources and stores, and what was checked, as lines for a terminal. ``continues``: a
    started sweep that `--continue` would go on with."""
    trials = len(spec.studies) * spec.trials
    stopping = f"patience {spec.patience}; early stopping of hopeless trials: {spec.scheduler.kind}"
    optuna = optuna_storage_url(spec)
    rows = [
        ("backbones", ", ".join(spec.backbones)),
        ("data sets", f"{', '.join(spec.datasets)} (in {spec.data_root})"),
        ("variants", ", ".join(spec.variants)),
        ("per trial", f"{spec.cpus:g} CPU, {spec.gpus:g} GPU; at most {spec.max_concurrent} trials at once"),
        ("storage", sweep_location(spec.storage, spec.name)),
        ("tracking", f"{hide_password(spec.tracking_uri)} (experiment {experiment_name(spec.name)})"),
        ("studies", hide_password(optuna) if optuna else "in memory only (give optuna_storage to keep them)"),
    ]
    where = ("that --address answers as Ray (the cluster's CPUs and GPUs are checked when the sweep joins it)"
             if address else "this machine's CPUs and GPUs")
    verb = "continue" if continues else "start"
    return "\n".join([
        f"{'started ' if continues else ''}sweep {spec.name}: {counted(len(spec.studies), 'study', 'studies')} x "
        f"{counted(spec.trials, 'trial')} = {counted(trials, 'trial')} of up to {counted(spec.epochs, 'epoch')} "
        f"({trials * spec.epochs:,} trial-epochs at most; {stopping})",
        *(f"  {label:<10} {value}" for label, value in rows),
        *plan_notes(spec, address, continues),
        f"checked: the spec, the storage, the tracking store, the Optuna storage, the data sets, and {where}",
        f"nothing was started or stored; run the same command without --check to {verb} it",
    ])


def plan_notes(spec: Spec, address: str | None, continues: bool = False) -> list[str]:
    """What the sweep, as specified, cannot show or do: said before it runs, where the report would say it after a
    day of GPUs (dashboards/verdict.py). A sweep that continues keeps its matrix: nothing to say of it then."""
    notes = [] if continues else matrix_notes(spec.variants)
    if address:  # a cluster's nodes are counted when the sweep joins it
        return notes
    fits = [("CPU", os.cpu_count() or 1, spec.cpus)]
    if spec.gpus > 0:
        fits.append(("GPU", local_gpus(spec), spec.gpus))
    kind, have, each = min(fits, key=lambda fit: fit[1] // fit[2])
    if (fit := int(have // each)) < spec.max_concurrent:
        notes.append(f"note: max_concurrent = {spec.max_concurrent}, but this machine's {counted(have, kind)} fit "
                     f"{counted(fit, 'trial')} at once ({each:g} {kind} each); the others wait their turn")
    return notes


def local_gpus(spec: Spec) -> int:
    """The GPUs a local sweep's Ray gets (preflight checked them, with torch already imported)."""
    if spec.local_gpus is not None:
        return spec.local_gpus
    import torch

    return torch.cuda.device_count()


def matrix_notes(variants: tuple[str, ...]) -> list[str]:
    """AttZoom without the studies its verdict compares it with."""
    notes = []
    if "attzoom" in variants and "baseline" not in variants:
        notes.append("note: no baseline study, so the report has nothing to measure AttZoom's gain against; add "
                     '"baseline" to [matrix] variants')
    if "attzoom" in variants and (missing := [v for v in DECISIVE if v not in variants]):
        notes.append(f"note: no {' or '.join(missing)} control, so the report cannot tell whether AttZoom's "
                     f"attention helps or only the doubled resolution it feeds the network; add {' and '.join(missing)}"
                     " to [matrix] variants")
    return notes

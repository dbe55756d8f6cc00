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
        *plan_notes(spec, address),
        f"checked: the spec, the storage, the tracking store, the Optuna storage, the data sets, and {where}",
        f"nothing was started or stored; run the same command without --check to {verb} it",
    ])


def plan_notes(spec: Spec, address: str | None) -> list[str]:
    """What the sweep, as specified, cannot show or do: said before it runs, where the report would say it after a
    day of GPUs (dashboards/verdict.py)."""
    notes = []
    if "attzoom" in spec.variants and "baseline" not in spec.variants:
        notes.append("note: no baseline study, so the report has nothing to measure AttZoom's gain against; add "
                     '"baseline" to [matrix] variants')
    if "attzoom" in spec.variants and (missing := [v for v in DECISIVE if v not in spec.variants]):
        notes.append(f"note: no {' or '.join(missing)} control, so the report cannot tell whether AttZoom's "
                     f"attention helps or only the doubled resolution it feeds the network; add {' and '.join(missing)}"
                     " to [matrix] variants")
    fit = int((os.cpu_count() or 1) // spec.cpus)
    if not address and fit < spec.max_concurrent:
        notes.append(f"note: max_concurrent = {spec.max_concurrent}, but this machine's {os.cpu_count()} CPUs fit "
                     f"{counted(fit, 'trial')} of {spec.cpus:g} CPU at once; the others wait their turn")
    return notes

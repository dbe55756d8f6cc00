"""What a sweep would run, said before anything runs (`attzoom sweep SPEC --check`).

A paper-scale sweep holds a cluster for a day: its size, its resources and where it writes are read
here from the checked spec, so a wrong edit shows before the GPUs are paid for.
"""

from __future__ import annotations

from .layout import experiment_name
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
        f"checked: the spec, the storage, the tracking store, the Optuna storage, the data sets, and {where}",
        f"nothing was started or stored; run the same command without --check to {verb} it",
    ])

"""What a person reads in the MLflow UI: run names, run descriptions, the code's source, the runs table's view.

MLflow names a run it is not given a name for by a random pair of words, and a name cut at the
table's width hides whatever comes last; so the part that tells runs apart comes first in a
trial's name (its variant and number) and the study's three parts are spaced apart. Every
run also carries a description (MLflow's note, shown above the run's details) that says what
the run is and how to read it, and the git commit of the code the sweep ran.

    study (parent) run   tiny_resnet · cluttered-digits · attzoom
    trial (child) run    attzoom #3 (1a2b3c4d)         # 3rd trial of its study; the Tune trial id
    confirm run          attzoom seed 2 (5e6f7a8b)     # the study's best config, re-trained with seed 2

Plain functions of strings (no MLflow import); the layout's tag names come from tune_jobs/layout.py.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

from . import layout

ROOT = Path(__file__).resolve().parent.parent
SEP = " · "
# The runs table's view: the best epoch's columns (MLflow's Source and Models out, to keep them on screen), rows
# ranked by the best epoch's top-1 (MLflow then lists trials flat, each name led by its variant), names uncut.
RUNS_COLUMNS = (f"metrics.`{layout.BEST_TOP1}`", f"metrics.`{layout.BEST_EPOCH}`", f"metrics.`{layout.EPOCHS_DONE}`")
NAME_COLUMN, NAME_WIDTH = "attributes.`Run Name`", 290


def study_run_name(backbone: str, dataset: str, variant: str) -> str:
    return SEP.join((backbone, dataset, variant))


def trial_run_name(variant: str, number: int, trial_id: str) -> str:
    return f"{variant} #{number} ({trial_id})"


def confirm_run_name(variant: str, seed: str | int, trial_id: str) -> str:
    return f"{variant} seed {seed} ({trial_id})"


def study_note(sweep: str, backbone: str, dataset: str, variant: str, trials: int) -> str:
    return (f"Study {layout.study_name(backbone, dataset, variant)} of sweep {sweep}: an Optuna TPE search of "
            f"{trials} trials training {backbone} ({variant}) on {dataset}. Each trial is a child run (expand this "
            f"row), named <variant> #<n> (<Tune trial id>). When the sweep ends this run holds trials_finished, "
            f"trials_failed and {layout.STUDY_METRICS[2]}, the best validation top-1 of any of its trials.")


def trial_note(sweep: str, study: str, number: int, params: dict) -> str:
    return (f"Trial #{number} of study {study} (sweep {sweep}): one sample of the study's search space, "
            f"{searched(params)}; every setting is under Parameters. Metrics are per epoch (step = epoch): "
            f"val_top1 is the latest epoch, {layout.BEST_TOP1} / {layout.BEST_EPOCH} the best epoch so far, the "
            f"one the checkpoint best.pt holds ({layout.STATUS} says how training ended).")


def confirm_note(sweep: str, study: str, seed: str | int) -> str:
    return (f"Seed re-run {seed} of study {study} (sweep {sweep}): the study's best trial's config trained again "
            f"with seed {seed}, every other setting unchanged, to tell the config's merit from a lucky seed. "
            f"`attzoom report {sweep}` averages the test top-1 over these runs.")


def experiment_note(sweep: str) -> str:
    return (f"Sweep {sweep}: one parent run per study (backbone · dataset · variant), one child run per trial "
            f"(expand a study) and per seed re-run. Sort or compare on {layout.BEST_TOP1}, the best epoch's "
            f"validation top-1 (val_top1 is the last epoch's). Filter with tags, e.g. "
            f"tags.`{layout.ROLE}` = '{layout.TRIAL_ROLE}'.")


def searched(params: dict) -> str:
    """The values of the search space's parameters in a trial's params, as one phrase (tune_jobs/space.py)."""
    from .space import SEARCHABLE

    shown = []
    for key, condition in SEARCHABLE.items():
        if key in params and (condition is None or str(params.get(condition[0])) == condition[1]):
            shown.append(f"{key} {params[key]}")
    return ", ".join(shown) if shown else "no searched parameter"


def runs_view() -> str:
    """The runs table's view as MLflow's share-view tag holds it: the best epoch's columns, best first."""
    return json.dumps({"orderByKey": f"metrics.`{layout.BEST_TOP1}`", "orderByAsc": False,
                       "selectedColumns": list(RUNS_COLUMNS), "columnOrder": [NAME_COLUMN, *RUNS_COLUMNS],
                       "columnWidths": {NAME_COLUMN: NAME_WIDTH}})


def experiment_tags(sweep: str) -> dict[str, str]:
    """The sweep experiment's tags for the UI: the machine-learning kind, its description and the runs view."""
    return {layout.EXPERIMENT_KIND: layout.ML_KIND, layout.NOTE: experiment_note(sweep),
            layout.SHARED_VIEW + layout.RUNS_VIEW: runs_view()}


def runs_address(base: str, experiment_id: str, view: bool = True) -> str:
    """The experiment's runs table in the MLflow UI at ``base`` (e.g. http://127.0.0.1:5000), in the machine-learning
    workflow, with the sweep's view (experiment_tags) when the experiment has it.

    MLflow 3.17's UI takes an experiment's kind from the workflow the browser last chose (the sidebar's GenAI / Model
    training switch, remembered in the browser, GenAI at first), not from its experimentKind tag; only the address's
    workflowType decides it for every browser.
    """
    address = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{address}&viewStateShareKey={layout.RUNS_VIEW}" if view else address


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's source tags for every run this process creates: the command and the git commit it ran.

    Read once per driver; no git, or no repository (a Ray job's unpacked working dir), leaves the commit out.
    """
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    command = sys.argv[1] if len(sys.argv) > 1 and program in ("attzoom", "cli.py", "__main__.py") else None
    tags = {layout.SOURCE_NAME: f"attzoom {command}" if command else program, layout.SOURCE_TYPE: "LOCAL"}
    commit = git_commit(ROOT)
    if commit:
        tags[layout.GIT_COMMIT] = commit
    return tags


def git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 trial", "3 trials", "1 study", "2 studies": the count a line shows, in the number it reads as."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"

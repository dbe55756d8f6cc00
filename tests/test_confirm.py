"""``attzoom confirm`` end to end: a finished tiny sweep, its best configs re-trained with seeds 1..K
through real Ray Tune, logged as confirm child runs, and the report's mean +- std over them."""

from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dashboards.report import build, to_markdown
from dashboards.verdict import Seeds, difference, noise_verdict
from tune_jobs.layout import (CHECKPOINT, CHECKPOINT_DIR, CONFIRM_ROLE, PARENT, SEED, STUDY, STUDY_ROLE, TRIAL_ROLE,
                              experiment_name, runs_filter)

pytestmark = pytest.mark.slow
SEEDS = 2  # the fewest a mean ± std and a confidence interval need; each seed more is two more runs to train


def cli(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "tune_jobs.cli", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def test_confirm_trains_k_seeds_per_study_and_the_report_shows_mean_std(tmp_path, few_digits_root):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
name = "c"
trials = 1
epochs = 2
seed = 2
data_root = "{few_digits_root}"
storage = "{tmp_path / 'ray_results'}"
tracking_uri = "sqlite:///{tmp_path / 'mlflow.db'}"
max_concurrent = 2
[matrix]
backbones = ["tiny_resnet"]
datasets = ["cluttered-digits"]
variants = ["baseline", "attzoom"]
[train]
augment = false
[search]
batch_sizes = [128]
lr = [1e-3, 1e-2]
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli("sweep", str(spec), cwd=tmp_path)
    shutil.rmtree(tmp_path / "ray_results" / "c")  # confirm reads the spec and the best configs from MLflow alone
    client = MlflowClient(uri)
    eid = client.get_experiment_by_name(experiment_name("c")).experiment_id

    # stopped (SIGTERM takes Ctrl-C's way) while a seed trains its second epoch: the rerun continues that trial from
    # its checkpoint in its own run (it trained the seed again in a new run: two "seed" runs, the killed one counted)
    first = subprocess.Popen([sys.executable, "-m", "tune_jobs.cli", "confirm", "c", "--seeds", str(SEEDS), "--storage",
                              str(tmp_path / "ray_results")], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not mid_epoch_confirm(client, eid):
        assert first.poll() is None and time.monotonic() < deadline, "no confirm run reached its second epoch"
        time.sleep(0.3)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 130 and "interrupted: " in out.rstrip().splitlines()[-1], out[-3000:]
    # its first line says how to go on, as a sweep's does (for a confirm killed without a word)
    [said] = [line for line in out.splitlines() if line.startswith("re-training each study's best config")]
    assert said.startswith("re-training each study's best config with seeds 1, 3 (4 runs to train)"), said
    continue_with = said.split("; if it stops, continue with: ", 1)[1]
    stopped = {r.info.run_id for r in client.search_runs([eid], runs_filter(CONFIRM_ROLE))
               if r.info.status == "KILLED"}
    assert stopped, "no confirm run was stopped mid-training"
    done = subprocess.run(continue_with, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout + done.stderr
    assert "continuing c-confirm-" in out and "the confirm that was stopped" in out
    assert "final  tiny_resnet.cluttered-digits.attzoom  done 2/2" in out  # progress: the final summary, per study
    assert "Failed to fetch metrics" not in out

    parents = {r.data.tags[STUDY]: r for r in client.search_runs([eid], runs_filter(STUDY_ROLE))}
    trials = {r.data.tags[STUDY]: r for r in client.search_runs([eid], runs_filter(TRIAL_ROLE))}
    confirms = client.search_runs([eid], runs_filter(CONFIRM_ROLE))
    assert len(confirms) == SEEDS * len(parents) == 2 * SEEDS
    by_study: dict[str, list] = {}
    for run in confirms:
        study = run.data.tags[STUDY]
        by_study.setdefault(study, []).append(run)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2]  # each epoch once
        assert run.data.tags[PARENT] == parents[study].info.run_id
        assert run.data.params["seed"] == run.data.tags[SEED]
        best = trials[study].data.params  # the only trial of its study is its best: same config but the seed
        assert {k: v for k, v in run.data.params.items() if k != "seed"} == \
               {k: v for k, v in best.items() if k != "seed"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, CHECKPOINT_DIR)] == [CHECKPOINT]
    for runs in by_study.values():  # never the sweep's own seed (2): its best trial trained with it
        assert sorted(int(r.data.tags[SEED]) for r in runs) == [1, 3]

    # the ended confirm trials keep best.pt, not the resume state (tune_jobs/reclaim.py)
    assert list((tmp_path / "ray_results").glob("c-confirm-*/*/checkpoint_*/best.pt"))
    assert not list((tmp_path / "ray_results").glob("c-confirm-*/*/checkpoint_*/last.pt"))

    # confirming again trains nothing new, and does not say it re-trains (a second demo said so)
    again = cli("confirm", "c", "--seeds", str(SEEDS), "--storage", str(tmp_path / "ray_results"), cwd=tmp_path)
    assert "trained seeds" not in again and "re-training" not in again
    assert len(client.search_runs([eid], runs_filter(CONFIRM_ROLE))) == 2 * SEEDS

    report = build(uri, "c", with_figures=False)
    assert [r["study"] for r in report.best_rows] == ["tiny_resnet.cluttered-digits.baseline",
                                                      "tiny_resnet.cluttered-digits.attzoom"]  # confirm runs no trials
    rows = {r["study"]: r for r in report.confirm}
    stats = {}
    for study, runs in by_study.items():
        top1 = [client.get_run(r.info.run_id).data.metrics["test_top1"] for r in runs]  # logged by the report
        stats[study] = (statistics.mean(top1), statistics.stdev(top1))
        assert rows[study]["test top-1 mean ± std"] == f"{stats[study][0]:.2f} ± {stats[study][1]:.2f}"
        assert rows[study]["seeds"] == "1, 3"
    base, att = stats["tiny_resnet.cluttered-digits.baseline"], stats["tiny_resnet.cluttered-digits.attzoom"]
    row = rows["tiny_resnet.cluttered-digits.attzoom"]
    assert row["Δ vs baseline [95 % CI]"].startswith(f"{att[0] - base[0]:+.2f} [")
    # the headline, first in the report, is the same comparison from the same seeds
    assert report.confirmed
    [headline] = report.verdict
    assert headline["AttZoom vs"] == "baseline" and headline["verdict"] in ("within noise", "beyond noise")
    assert headline["verdict"] == row["seed noise"] and headline["Δ [95 % CI]"] == row["Δ vs baseline [95 % CI]"]
    text = to_markdown(report)
    assert text.index("## Verdict") < text.index("## Best of N") < text.index("## Seed confirmation")
    assert "test top-1 mean ± std" in text


def test_a_stopped_confirm_is_restored_only_for_just_the_seeds_left_on_the_same_configs(tmp_path):
    import json

    from tune_jobs.confirm import CONFIRM_FILE, confirm_experiment
    from tune_jobs.layout import ROLE, SWEEP, TRIAL
    from tune_jobs.spec import Spec
    from tune_jobs.tracking import drop_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = Spec(name="c", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                trials=1, tracking_uri=uri, storage=str(tmp_path / "ray_results"))
    [study] = (s.name for s in spec.studies)
    params = {study: {"lr": 0.01, "batch_size": 128}}
    stopped = tmp_path / "ray_results" / "c-confirm-100"
    stopped.mkdir(parents=True)
    (stopped / "tuner.pkl").write_bytes(b"")  # what Tune restores from
    (stopped / CONFIRM_FILE).write_text(json.dumps({"pairs": [[study, 1], [study, 3]], "params": params}))
    (tmp_path / "ray_results" / "c-confirm-99").mkdir()  # an older one: only the latest is restored
    client = MlflowClient(uri)
    eid = client.create_experiment(experiment_name("c"))
    restored = ("c-confirm-100", {(study, 1), (study, 3)})
    assert confirm_experiment(spec, [(study, 3)], {(study, 1)}, params, eid) == restored
    for todo, done, configs in (([(study, 3)], {(study, 1)}, {study: {"lr": 0.1, "batch_size": 128}}),  # a new best
                                ([(study, 3), (study, 4)], {(study, 1)}, params),  # more seeds than it trains
                                ([(study, 3)], set(), params)):  # seed 1 is no longer done (nor wanted)
        name, restored = confirm_experiment(spec, todo, done, configs, eid)
        assert name != "c-confirm-100" and restored == set(), (todo, done)
    # its seed-3 trial started over from epoch 1 (a damaged checkpoint): the confirm deleted its first run itself, and
    # that kept the stopped confirm from being restored
    tags = {SWEEP: "c", STUDY: study, ROLE: CONFIRM_ROLE, SEED: "3", TRIAL: "x"}
    dropped = client.create_run(eid, tags=tags)
    drop_run(client, dropped.info.run_id, "restart")
    assert confirm_experiment(spec, [(study, 3)], {(study, 1)}, params, eid)[1] == {(study, 1), (study, 3)}
    # its seed-3 run finished, then was deleted in the UI: Tune would never run that ended trial again
    run = client.create_run(eid, tags=tags)
    client.delete_run(run.info.run_id)
    assert confirm_experiment(spec, [(study, 3)], {(study, 1)}, params, eid)[1] == set()


def mid_epoch_confirm(client, experiment_id) -> bool:
    """A confirm run is training its second epoch (its first logged) while another has finished."""
    runs = client.search_runs([experiment_id], runs_filter(CONFIRM_ROLE))
    return any(r.info.status == "FINISHED" for r in runs) and any(
        r.info.status == "RUNNING" and "val_top1" in r.data.metrics for r in runs)


def test_welch_interval_and_the_noise_words():
    diff, low, high = difference(Seeds((1.0, 2.0, 3.0)), Seeds((4.0, 5.0, 6.0)))
    # se = sqrt(1/3 + 1/3), 4 degrees of freedom, t(0.975, 4) = 2.7764
    assert (diff, low, high) == pytest.approx((-3.0, -3.0 - 2.7764 * 0.8165, -3.0 + 2.7764 * 0.8165), abs=1e-3)
    assert noise_verdict(low, high) == "beyond noise"
    assert noise_verdict(*difference(Seeds((1.0, 2.0, 3.0)), Seeds((1.5, 2.5, 3.5)))[1:]) == "within noise"
    unknown = "unknown (too few seeds, or no spread)"
    assert noise_verdict(*difference(Seeds((1.0,)), Seeds((1.5, 2.5)))[1:]) == unknown
    # two seeds each, identical scores: no estimate of the noise, not "beyond noise"
    assert noise_verdict(*difference(Seeds((3.0, 3.0)), Seeds((2.0, 2.0)))[1:]) == unknown


def test_confirm_never_trains_the_sweep_seed_again():
    """With `seed = 1` in the spec, confirm's seed 1 re-ran the selected trial itself (same config, same seed):
    its best-of-N luck came back as one of the seeds the verdict averages."""
    from tune_jobs.confirm import confirm_seeds

    assert confirm_seeds(0, 3) == [1, 2, 3]  # the default sweep seed is 0
    assert confirm_seeds(1, 3) == [2, 3, 4] and confirm_seeds(2, 3) == [1, 3, 4] and confirm_seeds(9, 2) == [1, 2]


def test_a_verdict_without_spread_shows_no_nan_interval():
    # identical seed scores on both sides (a small test split): the verdict row read "+1.00 [+nan, +nan]"
    from types import SimpleNamespace

    from dashboards.verdict import compare

    ours, theirs = (SimpleNamespace(name=f"tiny_resnet.cluttered-digits.{v}", backbone="tiny_resnet",
                                    dataset="cluttered-digits", variant=v) for v in ("attzoom", "baseline"))
    row = compare(ours, theirs, {ours.name: {1: 3.0, 2: 3.0}, theirs.name: {1: 2.0, 2: 2.0}}, {})
    assert row["Δ [95 % CI]"] == "+1.00" and row["verdict"] == "unknown (too few seeds, or no spread)"


def test_confirm_says_complete_only_when_every_seed_run_finished():
    """It said "complete" after any run, whatever failed; the demo then said "done" too."""
    from tune_jobs.confirm import confirm_closing
    from tune_jobs.spec import load_spec

    spec = load_spec(Path(__file__).parent.parent / "tune_jobs" / "specs" / "demo.toml")
    line, code = confirm_closing(spec, 3, [("tiny_resnet.cluttered-digits.attzoom", 2)])
    assert code == 1 and "complete (" not in line
    assert "incomplete: 1 failed (tiny_resnet.cluttered-digits.attzoom seed 2)" in line
    assert "attzoom confirm demo --storage" in line and "--seeds 3" in line
    line, code = confirm_closing(spec, 3, [], ["tiny_resnet.cluttered-digits.attzoom"])  # it said "complete"
    assert code == 1 and "tiny_resnet.cluttered-digits.attzoom has no finished trial" in line
    assert "attzoom resume demo --storage" in line
    line, code = confirm_closing(spec, 3, [])
    # it said "complete (2 seeds per study)" after `--seeds 2` where an earlier confirm had trained 3, which the
    # report then averaged
    assert code == 0 and "are complete (seeds 1, 2, 3 of each study finished); see the verdict, over every " \
        "finished seed, in" in line
    from tune_jobs.cli import attzoom_executable

    # the venv's attzoom, as every other hint names it: a bare one is not on PATH after `python3 dev.py demo`
    assert f"`{attzoom_executable()} report demo --tracking-uri" in line, line
    # a sweep of baselines only has no verdict to see (the line pointed at one)
    for variants, verdict in ((("baseline",), False), (("baseline", "zoom-only"), False),
                              (("attzoom", "zoom-only"), True)):  # the report's: AttZoom against baseline or control
        line, code = confirm_closing(replace(spec, variants=variants), 1, [])
        assert code == 0 and "complete (seed 1 of each study finished); see " in line
        assert ("see the verdict" in line) == verdict and ("mean and spread" in line) != verdict, (variants, line)


def test_a_confirm_stopped_before_it_runs_says_to_run_it_again(monkeypatch, capsys):
    # a SIGTERM while it read the sweep's stores printed "interrupted" alone, exit 130: no word of how to go on
    from tune_jobs import cli, confirm

    def stopped(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(confirm, "run_confirm_command", stopped)
    assert cli.main(["confirm", "t"]) == 130
    assert capsys.readouterr().err == "interrupted; run the same command again\n"

"""End to end: real Ray, a real MLflow SQLite store, real Optuna, the real CLI in its own process.

Slow by nature (each test starts Ray and trains small models); marked ``slow`` and run in CI.
"""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from gate import TcpGate
from tune_jobs.layout import (ERROR, FIT_STATUSES, GPU_IDS, OPTUNA_TRIAL, PRUNED_AT, PRUNED_STATUS, STATUS, STUDY,
                              TRIAL, STUDY_ROLE, TRIAL_ROLE, experiment_name, runs_filter)
from tune_jobs.cli import attzoom_executable
from tune_jobs.lease import lease_path
from tune_jobs.snapshots import snapshot_trials
from tune_jobs.logs import STOP_NOTICE
from tune_jobs.tracking import open_store
from tune_jobs.spec import optuna_storage_url
from tune_jobs.sweep import load_saved_spec, trial_id_of

pytestmark = pytest.mark.slow


def write_spec(path: Path, data_root: Path, *, name="t", trials=2, epochs=2, datasets=("cluttered-digits",),
               variants=("baseline", "attzoom"), max_concurrent=2, cpus=1, gpus=0, local_gpus=None,
               max_retries=1, patience=5, tracking_uri=None, outage_minutes=30, scheduler="") -> Path:
    local = f"local_gpus = {local_gpus}\n" if local_gpus is not None else ""
    path.write_text(f"""
name = "{name}"
trials = {trials}
epochs = {epochs}
patience = {patience}
data_root = "{data_root}"
storage = "{path.parent / 'ray_results'}"
tracking_uri = "{tracking_uri or f'sqlite:///{path.parent / "mlflow.db"}'}"
max_concurrent = {max_concurrent}
[matrix]
backbones = ["tiny_resnet"]
datasets = {list(datasets)!r}
variants = {list(variants)!r}
[resources]
cpus = {cpus}
gpus = {gpus}
{local}
[train]
augment = false
[search]
batch_sizes = [128]
lr = [1e-3, 1e-2]
[failure]
max_retries = {max_retries}
tracking_outage_minutes = {outage_minutes}
{scheduler}
""".replace("'", '"'))
    return path


def start(*args, cwd, stderr=subprocess.STDOUT, without_override=False, sigint_blocked=False) -> subprocess.Popen:
    """The CLI in a session of its own, so a 'crash' can take the driver and its local Ray down together.

    ``without_override``: as root, drop the capability that lets root write where permissions forbid it, so a
    folder made read-only is read-only for the sweep too (as for any other user). ``sigint_blocked``: as a Ray
    job's driver started by bash runs (Ray blocks SIGINT in its processes, and bash passes the mask on).
    """
    command = [sys.executable, "-m", "tune_jobs.cli", *args]
    if without_override and os.geteuid() == 0:
        command = ["capsh", "--drop=cap_dac_override", "--", "-c", 'exec "$0" "$@"', *command]
    block = (lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})) if sigint_blocked else None
    return subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, preexec_fn=block)


def crash(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session (its Ray instance and trial workers)."""
    victims = [p for p in psutil.process_iter() if _session(p.pid) == proc.pid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(victims, timeout=30)


def terminate_all(proc: subprocess.Popen) -> None:
    """SIGTERM to the driver and every process of its session, each by pid (as a cgroup-wide kill sends it)."""
    for p in [p for p in psutil.process_iter() if _session(p.pid) == proc.pid]:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def _session(pid: int):
    try:
        return os.getsid(pid)
    except OSError:
        return None


def finish(proc: subprocess.Popen, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def trial_runs(spec_dir: Path, sweep="t"):
    client = open_store(f"sqlite:///{spec_dir / 'mlflow.db'}")  # polls while the sweep may create the store
    experiment = client.get_experiment_by_name(experiment_name(sweep))
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id], runs_filter(TRIAL_ROLE))


def wait_for(condition, timeout=600, every=1.0):
    """Poll ``condition`` until it gives something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def statuses(spec_dir):
    try:
        _, runs = trial_runs(spec_dir)
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return []
    return [r.info.status for r in runs]


def sweep_folder(spec_dir: Path, storage: str | None = None):
    """(pyarrow file system, sweep t's folder in it), as Tune opens its storage: ``spec_dir/ray_results`` or a
    bucket alike."""
    from pyarrow.fs import FileSystem

    fs, base = FileSystem.from_uri(storage or str(spec_dir / "ray_results"))
    return fs, f"{base.rstrip('/')}/t"


def sweep_entries(spec_dir: Path, storage: str | None = None, kind=None) -> dict[str, str]:
    """{name: path} in the sweep's folder (only folders, or only files, with ``kind``)."""
    from pyarrow.fs import FileSelector

    fs, folder = sweep_folder(spec_dir, storage)
    return {Path(i.path).name: i.path for i in fs.get_file_info(FileSelector(folder)) if kind in (None, i.type)}


def read_sweep_file(spec_dir: Path, path: str, storage: str | None = None) -> bytes:
    fs, _ = sweep_folder(spec_dir, storage)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def assert_exactly_once(spec_dir: Path, trials_per_study: int, epochs: int, studies: int,
                        optuna_storage: str | None = None, storage: str | None = None) -> None:
    """Each trial one MLflow run and one Tune trial folder (in ``storage``, default spec_dir/ray_results), each
    epoch logged once, and the Optuna studies agreeing."""
    from pyarrow.fs import FileType

    client, runs = trial_runs(spec_dir)
    folders = {trial_id_of(name): path
               for name, path in sweep_entries(spec_dir, storage, FileType.Directory).items()}
    tune_trials = set(folders)
    trial_ids = [r.data.tags[TRIAL] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)), "a trial has two MLflow runs"
    assert set(trial_ids) == tune_trials, "MLflow runs and Tune trials differ"
    per_study = {}
    for run in runs:
        per_study.setdefault(run.data.tags[STUDY], []).append(run)
        assert run.info.status == "FINISHED"
        # how fit ended is what the trial itself reported last (trainable.py), not guessed from the epochs
        result = read_sweep_file(spec_dir, f"{folders[run.data.tags[TRIAL]]}/result.json", storage)
        last = json.loads(result.decode().splitlines()[-1])
        assert run.data.tags[STATUS] == last["fit_status"] and last["fit_status"] in (*FIT_STATUSES, PRUNED_STATUS)
        gated = run.data.tags["variant"] in ("attzoom", "attention-only")  # the gate's share open, every epoch
        for key in ("val_top1", "train_loss", "images_per_s", *(("gate_open", "gate_sigma") if gated else ())):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs_of(run, epochs) + 1)), f"{key} steps {steps}"
    assert len(per_study) == studies
    assert all(len(r) == trials_per_study for r in per_study.values())
    if storage is None:  # on a local storage no ended trial keeps its resume state (tune_jobs/reclaim.py)
        kept = [p for folder in folders.values() for p in Path(folder).glob("checkpoint_*/last.pt")]
        assert not kept and all(list(Path(f).glob("checkpoint_*")) for f in folders.values()), kept
    ran = load_saved_spec("t", storage or str(spec_dir / "ray_results"))  # as the sweep saved it, overrides applied
    default = optuna_storage_url(ran)  # beside a SQLite store, else in the Tune storage
    assert_studies_in_optuna(optuna_storage or default, per_study, epochs)


def epochs_of(run, epochs: int) -> int:
    """The epochs a finished run trained: all of them, or those before the scheduler pruned it."""
    if run.data.tags[STATUS] != PRUNED_STATUS:
        return epochs
    pruned_at = int(run.data.tags[PRUNED_AT])
    assert 1 <= pruned_at < epochs and run.data.metrics["epochs_done"] == pruned_at
    return pruned_at


def assert_studies_in_optuna(storage: str, per_study: dict, epochs: int) -> None:
    """Each study in the Optuna storage (default: beside the MLflow store): N finished trials (none left RUNNING by
    a killed driver), complete or, when the scheduler stopped them, pruned; each with its epochs as intermediate
    values and its MLflow run id; a complete one valued at its best epoch's val top-1, a pruned one at its last."""
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for study, runs in per_study.items():
        loaded = optuna.load_study(study_name=f"t/{study}", storage=storage)
        ended = [t for t in loaded.trials if t.state in finished]
        assert len(ended) == len(runs) and all(t.state.is_finished() for t in loaded.trials)
        by_run = {t.user_attrs["mlflow_run_id"]: t for t in ended}
        for run in runs:
            trial, trained = by_run[run.info.run_id], epochs_of(run, epochs)
            assert trial.user_attrs["tune_trial_id"] == run.data.tags[TRIAL]
            assert run.data.tags[OPTUNA_TRIAL] == str(trial.number)  # as optuna-dashboard numbers it
            assert sorted(trial.intermediate_values) == list(range(1, trained + 1))
            if run.data.tags[STATUS] == PRUNED_STATUS:
                assert trial.state == optuna.trial.TrialState.PRUNED
                assert trial.value == pytest.approx(trial.intermediate_values[trained])
            else:
                assert trial.state == optuna.trial.TrialState.COMPLETE
                assert trial.value == pytest.approx(run.data.metrics["best_val_top1"])


def lease_holder(storage: Path) -> int | None:
    """The pid in the sweep's lease, once a driver has written it."""
    try:
        return json.loads(lease_path(str(storage), "t").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def one_epoch_in(spec_dir: Path, since: float) -> Path | None:
    """The folder of a trial whose run is RUNNING with exactly one epoch checkpointed, that checkpoint written after
    ``since`` (a time.time()): one a killed driver left is no trial that has just begun its second epoch."""
    running = {r.data.tags[TRIAL] for r in trial_runs(spec_dir)[1] if r.info.status == "RUNNING"}
    for folder in sorted((spec_dir / "ray_results" / "t").glob("*-*")):
        first = folder / "checkpoint_000000"
        try:
            fresh = first.stat().st_mtime > since
        except OSError:
            continue
        if trial_id_of(folder) in running and fresh and [p.name for p in folder.glob("checkpoint_*")] == [
                first.name]:
            return folder
    return None


def epochs_in_snapshot(spec_dir: Path, trial_folder: Path) -> int:
    """The epochs of a trial that the newest published experiment snapshot holds (its last result's epoch)."""
    trials = snapshot_trials(str(spec_dir / "ray_results" / "t")) or {}
    trial = trials.get(trial_id_of(trial_folder))
    return trial.last_result.get("epoch", 0) if trial else 0


def test_killed_twice_and_resumed_runs_each_trial_once_and_logs_each_epoch_once(tmp_path, digits_root):
    spec = write_spec(tmp_path / "spec.toml", digits_root, trials=3, epochs=2)
    first = start("sweep", str(spec), "--continue", cwd=tmp_path)  # a new sweep: started
    wait_for(lambda: "FINISHED" in statuses(tmp_path) and "RUNNING" in statuses(tmp_path))
    # SIGTERM to every process by pid, as Slurm's scancel and systemd's stop of a unit's control group send it: Ray's
    # GCS closes its port, and the driver waited 60 s for it, then Ray's C++ ended it (exit 1) without a word
    sent = time.monotonic()
    terminate_all(first)
    out = first.communicate(timeout=300)[0]
    resume = f"{attzoom_executable()} resume t --storage {tmp_path / 'ray_results'}"
    assert first.returncode == 130 and time.monotonic() - sent < 40, (first.returncode, out[-3000:])
    # said by the watch of Ray's GCS, or, when a trial's lost result reached the driver first, by its stop
    assert re.fullmatch(rf"interrupted: (this machine's Ray ended with the driver \(a signal sent to every process\)|"
                        rf"stopped by a SIGTERM, which ended Ray's processes too \(.+\)); continue with: "
                        rf"{re.escape(resume)}", out.rstrip().splitlines()[-1]), out[-3000:]
    # a driver killed without a word (SIGKILL, the OOM killer, a lost head node) said how to go on as it started
    said = (f"sweep t: 2 studies x 3 trials of up to 2 epochs; results in {tmp_path / 'ray_results' / 't'}, runs in "
            f"sqlite:///{tmp_path / 'mlflow.db'}; if it stops, continue with: {resume}")
    assert said in out.splitlines()

    # the same command again (a job its scheduler runs again): continued as `resume` does; it was exit 2
    started = time.time()
    resumed = start("sweep", str(spec), "--continue", cwd=tmp_path)
    done_before = statuses(tmp_path).count("FINISHED")
    damaged = wait_for(lambda: statuses(tmp_path).count("FINISHED") > done_before and one_epoch_in(tmp_path, started),
                       every=0.3)
    # the experiment snapshot resume reads has that epoch, and so its checkpoint (Tune takes one once the driver has
    # the trial's result): a fixed 1.5 s wait was too short for a driver busy beside two training trials
    wait_for(lambda: epochs_in_snapshot(tmp_path, damaged) >= 1, every=0.1)
    crash(resumed)
    assert one_epoch_in(tmp_path, started) == damaged  # still one epoch in: its second had not ended
    last_pt = damaged / "checkpoint_000000" / "last.pt"
    last_pt.write_bytes(last_pt.read_bytes()[:1000])

    last = start("resume", str(tmp_path / "ray_results" / "t"), cwd=tmp_path)
    wait_for(lambda: lease_holder(tmp_path / "ray_results") == last.pid, every=0.2)
    # a second driver on the same sweep (a retried job, a second terminal) is turned away
    second = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "resume", "t", "--storage",
                             str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and second.stdout == "", second.stdout + second.stderr
    assert second.stderr.count("\n") == 1 and f"pid {last.pid}" in second.stderr, second.stderr
    out = finish(last)
    assert "| tiny_resnet.cluttered-digits.attzoom | 3 | 0 | 0 |" in out
    trial = trial_id_of(damaged)
    assert f"trial {trial}: cannot resume from" in out and "starts over from epoch 1" in out, out[-3000:]
    assert "Restored on" not in out  # Ray's line per resumed trial; the progress says "resumed after epoch N"
    assert_exactly_once(tmp_path, trials_per_study=3, epochs=2, studies=2)  # its new run holds each epoch once
    assert not (tmp_path / "ray_results" / "t.lease").exists()
    # the same sweep again (a script run twice): done, nothing run; it was exit 2, "continue it with ... resume"
    again = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "| tiny_resnet.cluttered-digits.attzoom | 3 | 0 | 0 |" in again.stdout, again
    assert again.stdout.splitlines()[-1].startswith("sweep t had finished already: nothing to run; see its runs")
    before = (tmp_path / "mlflow.db").read_bytes(), sweep_entries(tmp_path)
    # and resumed again: it wrote the studies' counts a second time and a new experiment snapshot
    again = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "resume", "t", "--storage",
                            str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "had finished already: nothing to run" in again.stdout.splitlines()[-1], again
    assert ((tmp_path / "mlflow.db").read_bytes(), sweep_entries(tmp_path)) == before
    assert_exactly_once(tmp_path, trials_per_study=3, epochs=2, studies=2)
    # the killed tries' working files lived in their trial folders, and the tries that ended removed them
    trials = [trial_id_of(d) for d in (tmp_path / "ray_results" / "t").iterdir() if d.is_dir()]
    assert not [p for t in trials for p in Path(tempfile.gettempdir()).glob(f"attzoom-{t}-*")]
    assert not list((tmp_path / "ray_results" / "t").glob("*/work"))


def test_a_sigterm_while_ray_starts_is_an_interrupt_with_its_line_and_leaves_no_process(tmp_path, few_digits_root):
    # ray.init puts its own handler in place (sys.exit(15)) while it starts: a scheduler's SIGTERM then ended the
    # driver with exit 15 and not a word
    spec = write_spec(tmp_path / "spec.toml", few_digits_root, trials=1, epochs=1)
    driver = start("sweep", str(spec), cwd=tmp_path)

    def ray_starting() -> bool:
        try:
            return any(p.name() == "gcs_server" for p in psutil.Process(driver.pid).children(recursive=True))
        except psutil.Error:
            return False
    wait_for(ray_starting, timeout=120, every=0.01)
    driver.send_signal(signal.SIGTERM)
    out = driver.communicate(timeout=120)[0]
    assert driver.returncode == 130, (driver.returncode, out[-3000:])
    assert re.fullmatch(r"interrupted.*(continue with: .*resume t --storage .*|run the same command again)",
                        out.rstrip().splitlines()[-1]), out[-3000:]
    wait_for(lambda: not [p for p in psutil.process_iter() if _session(p.pid) == driver.pid], timeout=60)


def load_rungs(spec_dir: Path, storage: str | None = None) -> dict:
    """The scheduler's state in the sweep's newest experiment snapshot (Tune's callback state file)."""
    # one file per driver, named by its start time (Tune copies them all again at the end: no use in mtimes)
    states = {name: path for name, path in sweep_entries(spec_dir, storage).items()
              if name.startswith("callback-states-") and name.endswith(".pkl")}
    newest = read_sweep_file(spec_dir, states[max(states)], storage)
    return next(state for state in pickle.loads(newest).values() if state and "pruned" in state)


def test_a_failing_trial_is_retried_marked_failed_and_the_sweep_goes_on(tmp_path, few_digits_root):

    from test_data import write_tinyimagenet

    data = tmp_path / "data"
    shutil.copytree(few_digits_root, data)
    image = next((write_tinyimagenet(data) / "val" / "images").glob("*.JPEG"))
    damage_huffman_table(image)  # its header and end are whole: found by the trial's decoding, not before
    spec = write_spec(tmp_path / "spec.toml", data, trials=1, epochs=1,
                      datasets=("tinyimagenet", "cluttered-digits"), variants=("baseline",), max_retries=2)
    sweep = start("sweep", str(spec), cwd=tmp_path)
    out, _ = sweep.communicate(timeout=900)
    last = out.strip().splitlines()[-1]  # a study without a finished trial: no comparison, so no "done", exit 1
    assert sweep.returncode == 1 and last.startswith("sweep t failed after"), out[-4000:]
    assert "no trial of tiny_resnet.tinyimagenet.baseline finished (1 of 2 trials failed)" in last
    assert f"`{attzoom_executable()} resume t --storage {tmp_path / 'ray_results'}` runs them again" in last, last
    client, runs = trial_runs(tmp_path)
    by_dataset = {r.data.tags["dataset"]: r for r in runs}
    failed, ok = by_dataset["tinyimagenet"], by_dataset["cluttered-digits"]
    assert failed.info.status == "FAILED" and f"Tiny-ImageNet image {image}" in failed.data.tags[ERROR]
    assert len(client.get_metric_history(failed.info.run_id, "failures")) == 3  # first try + 2 retries
    assert ok.info.status == "FINISHED" and ok.data.metrics["val_top1"] >= 0
    assert "| tiny_resnet.tinyimagenet.baseline | 0 | 1 | 0 |" in out
    # one line per failed try, naming its error file: Tune's own report of each was a page of Ray's traceback
    assert "Traceback" not in drivers_own(out) and "Trials did not complete" not in out, out[-6000:]
    assert len(re.findall(r"trial \w+  failed.*error\.txt", out)) == 3, out[-6000:]


def damage_huffman_table(jpeg: Path) -> None:
    """Overwrite the JPEG's first Huffman table: it opens, is 64x64 and ends as a JPEG does, but cannot be decoded."""
    raw = bytearray(jpeg.read_bytes())
    start = raw.index(b"\xff\xc4") + 4
    length = int.from_bytes(raw[start - 2:start], "big") - 2
    raw[start:start + length] = b"\xff" * length
    jpeg.write_bytes(bytes(raw))


def no_failure_recorded(spec_dir: Path) -> None:
    client, runs = trial_runs(spec_dir)
    for run in runs:
        assert run.info.status != "FAILED" and ERROR not in run.data.tags, run.data.tags
        assert client.get_metric_history(run.info.run_id, "failures") == []


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("capsh"), reason="root without capsh ignores permissions")
def test_storage_that_turns_read_only_stops_the_sweep_charges_no_trial_and_resume_is_exact(tmp_path,
                                                                                           few_digits_root):
    spec = write_spec(tmp_path / "spec.toml", few_digits_root, trials=2, epochs=4, variants=("baseline",))
    storage = tmp_path / "ray_results"
    sweep = start("sweep", str(spec), cwd=tmp_path, stderr=subprocess.PIPE, without_override=True)
    wait_for(lambda: any(storage.glob("t/*/checkpoint_000000")), every=0.2)
    subprocess.run(["chmod", "-R", "a-w", str(storage)], check=True)
    turned = time.monotonic()
    out, err = sweep.communicate(timeout=300)
    subprocess.run(["chmod", "-R", "u+w", str(storage)], check=True)
    assert sweep.returncode == 3, out[-2000:] + err[-3000:]
    assert time.monotonic() - turned < 60
    last = err.strip().splitlines()[-1]
    assert last.startswith("attzoom sweep: stopped: ") and "Permission denied" in last, err[-3000:]
    assert f"attzoom resume t --storage {storage}" in last and "Traceback" not in drivers_own(err), err[-3000:]
    assert "sweep t done" not in out
    no_failure_recorded(tmp_path)
    _, runs = trial_runs(tmp_path)
    assert {r.info.status for r in runs} <= {"RUNNING", "KILLED", "FINISHED"}  # stopped with the sweep, not charged

    out = finish(start("resume", "t", "--storage", str(storage), cwd=tmp_path))
    assert "| tiny_resnet.cluttered-digits.baseline | 2 | 0 | 0 |" in out
    assert_exactly_once(tmp_path, trials_per_study=2, epochs=4, studies=1)
    no_failure_recorded(tmp_path)


def drivers_own(stderr: str) -> str:
    """The driver's own lines, without those Ray forwards from trial processes (``(run_trial pid=N) ...``): a
    trial process that Ray stops at the end may print Python's "Exception ignored" notice with a traceback."""
    return "\n".join(line for line in stderr.splitlines() if "(run_trial pid=" not in line)


def start_tracking_server(folder: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                               str(folder / "mlartifacts")], cwd=folder, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              # as `attzoom ui` runs it: without the GenAI job runner's seven worker processes
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), timeout=120, every=0.3)
    return server


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def logged_epochs(spec_dir: Path) -> int:
    try:
        client, runs = trial_runs(spec_dir)
        return sum(len(client.get_metric_history(r.info.run_id, "val_top1")) for r in runs)
    except Exception:  # noqa: BLE001 - the server may not have created the store yet
        return 0


def epochs_checkpointed(storage: Path) -> int:
    """Epochs the trials have checkpointed so far (Tune keeps one checkpoint folder per trial, numbered)."""
    return sum(int(p.name.rsplit("_", 1)[1]) + 1 for p in storage.glob("t/*/checkpoint_*"))


def test_a_tracking_server_outage_is_waited_out_and_one_past_the_deadline_stops_cleanly(tmp_path, few_digits_root):
    port = free_port()
    server = start_tracking_server(tmp_path, port)
    gate = TcpGate(port, free_port())  # the sweep reaches the server through it: a cut gate is the outage
    spec = write_spec(tmp_path / "spec.toml", few_digits_root, trials=2, epochs=10, patience=10, variants=("baseline",),
                      tracking_uri=f"http://127.0.0.1:{gate.port}", outage_minutes=0.2)
    storage, err_file = tmp_path / "ray_results", tmp_path / "driver.err"
    with open(err_file, "w") as err:
        sweep = start("sweep", str(spec), cwd=tmp_path, stderr=err)

    def said(text: str) -> bool:
        return text in err_file.read_text()

    try:
        wait_for(lambda: logged_epochs(tmp_path) >= 1, every=0.5)
        gate.cut()  # an outage shorter than the deadline: waited out, training going on meanwhile
        trained = epochs_checkpointed(storage)
        wait_for(lambda: said("unreachable (") and epochs_checkpointed(storage) > trained, every=0.2)
        gate.open()
        wait_for(lambda: said("is back after"), every=0.2)  # and the writes kept meanwhile made
        gate.cut()  # this one outlasts the deadline
        out = sweep.communicate(timeout=300)[0]
    finally:
        crash(sweep)
    err = err_file.read_text()
    assert sweep.returncode == 3, out[-2000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("attzoom sweep: stopped: tracking store http://") and "unreachable for 0.2 min" in last
    assert "attzoom resume t --storage" in last and "Traceback" not in drivers_own(err), err[-3000:]
    assert "sweep t done" not in out
    assert "Retrying (" not in err, err[-3000:]  # urllib3's warning per request, every few seconds of the outage

    gate.open()
    try:
        out = finish(start("resume", "t", "--storage", str(storage), cwd=tmp_path))
        assert "| tiny_resnet.cluttered-digits.baseline | 2 | 0 | 0 |" in out
        assert f"ui t --tracking-uri http://127.0.0.1:{gate.port}" in out.splitlines()[-1]  # as a sweep's last says
        assert "View run" not in out  # MLflow's line per run a server store finishes (its URL may hold a password)
        assert_exactly_once(tmp_path, trials_per_study=2, epochs=10, studies=1)
        no_failure_recorded(tmp_path)
        assert (storage / "t" / "mlflow-outbox.jsonl").read_text() == ""  # every kept write was made
    finally:
        crash(server)


def test_four_quarter_gpu_trials_share_one_logical_gpu(tmp_path, digits_root):
    # long enough (6 epochs) that the last trial starts before the first ends on a busy 2-core machine; the test
    # stops the sweep once all four have reported an epoch side by side
    spec = write_spec(tmp_path / "spec.toml", digits_root, trials=4, epochs=6, variants=("baseline",),
                      max_concurrent=4, cpus=0.5, gpus=0.25, local_gpus=1)
    sweep = start("sweep", str(spec), cwd=tmp_path)
    seen = {}

    def four_run_side_by_side_on_gpu_0() -> bool:
        try:
            _, runs = trial_runs(tmp_path)
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return False
        seen.update(gpus={r.data.tags.get(GPU_IDS) for r in runs}, statuses=[r.info.status for r in runs])
        return len(runs) == 4 and all(r.info.status == "RUNNING" and GPU_IDS in r.data.tags for r in runs)

    try:
        wait_for(four_run_side_by_side_on_gpu_0, timeout=300, every=0.5)
    finally:
        crash(sweep)
    assert seen["gpus"] == {"0"}


def test_on_s3_studies_share_the_global_cap_asha_prunes_within_each_study_and_a_ctrl_c_resumes_exactly(
        tmp_path, few_digits_root, s3):
    # cloud storage: a real S3 server on loopback (conftest.s3); one ASHA rung, at epoch 1: a trial below the best
    # quarter of its own study's trials there is pruned
    client, bucket = s3
    storage = f"s3://{bucket}/results"
    spec = write_spec(tmp_path / "spec.toml", few_digits_root, trials=4, epochs=2, max_concurrent=2,
                      scheduler="[scheduler]\nkind = 'asha'\ngrace_period = 1\nreduction_factor = 4")
    first = start("sweep", str(spec), "--storage", storage, cwd=tmp_path, sigint_blocked=True)
    wait_for(lambda: "FINISHED" in statuses(tmp_path) and "RUNNING" in statuses(tmp_path), every=0.3)
    # SIGTERM (`ray job stop`, Kubernetes) takes Ctrl-C's way: Tune ends the run itself, and the sweep must not then
    # say "done"; Ray's handler in the driver printed a crash dump and died, exit -15, runs left RUNNING. Raising
    # SIGINT instead was lost where SIGINT is blocked, as in a Ray job's driver
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130 and "sweep t done" not in out and "Tuner.restore" not in out, out[-3000:]
    assert "Fatal Python error" not in out and "SIGABRT" not in out, out[-3000:]  # trials stopped between steps
    assert STOP_NOTICE in out and "Press CTRL+C" not in out, out[-3000:]  # Tune's notice, for SIGTERM too
    resume = f"{attzoom_executable()} resume t --storage {storage}"  # the venv's: it is seldom activated
    assert re.fullmatch(rf"interrupted: [1-7] of 8 trials ended; continue with: {re.escape(resume)}",
                        out.rstrip().splitlines()[-1]), out[-3000:]
    assert "RUNNING" not in statuses(tmp_path)  # the stopped trials' runs: KILLED, not "running" for ever
    # the spec beside the trials in the bucket (it went to a local folder named "s3:", which resume relied on)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.lock", "optuna.db",
                                                          "spec.toml"]
    out = finish(start("resume", "t", "--storage", storage, cwd=tmp_path))
    assert "Cannot tell" not in out  # no trial is told to Optuna twice
    # no traceback: a trial's working files were uploaded, and removed, under the driver's sync of its folder
    assert "Traceback" not in out and not [k for k in bucket_keys(client, bucket) if "/work/" in k], out[-3000:]
    # a pruned run: epochs 1..its last
    assert_exactly_once(tmp_path, trials_per_study=4, epochs=2, studies=2, storage=storage)
    _, runs = trial_runs(tmp_path)
    runs = sorted(runs, key=lambda r: r.info.start_time)
    assert len(runs) == 8
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    last_start = runs[-1].info.start_time
    running, peak, freed = 0, 0, None
    for when, change in events:
        running += change
        peak = max(peak, running)
        if change < 0 and running == 1 and when <= last_start:
            freed = when  # one of the cap's two slots came free
    assert peak == 2  # the cap holds across studies ...
    studies = [r.data.tags[STUDY] for r in runs]
    assert studies[:2] != [studies[0]] * 2  # ... both studies start at once, fewest trials first
    # ... and the last trial takes a slot as it comes free, not once the other trial has ended too: where that one
    # still ran 5 s after the slot came free, the last started before it ended. Trials that end close together
    # cannot tell the two apart (0.27 s apart failed an overlap check), and a bound on the empty slot (2.5 s) is a
    # timing: it failed at 2.6 s on a busy machine, the two trials having ended 1.6 s apart
    [other] = [r for r in runs[:-1] if r.info.start_time <= freed < r.info.end_time]
    assert other.info.end_time - freed < 5000 or last_start < other.info.end_time, (freed, last_start, other.info)

    # each study's parent: the counts each driver ended with, at the step of the trials closed then (all at step 0,
    # the interrupted driver's and the last one's, showed as two values of one step)
    store = open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for parent in store.search_runs([runs[0].info.experiment_id], runs_filter(STUDY_ROLE)):
        history = store.get_metric_history(parent.info.run_id, "trials_finished")
        assert len(history) == 2 and all(m.step == m.value for m in history), history  # no trial failed
        assert max(m.step for m in history) == 4

    # ASHA: some trials pruned, each study's rung holding its own trials only, the first driver's included
    pruned = {r.data.tags[TRIAL] for r in runs if r.data.tags[STATUS] == PRUNED_STATUS}
    assert pruned and len(pruned) < 8, [r.data.tags[STATUS] for r in runs]
    state = load_rungs(tmp_path, storage)
    assert set(state["pruned"]) == pruned
    for study in set(studies):
        [(milestone, recorded)] = state["studies"][study]._brackets[0]._rungs  # noqa: SLF001 - Tune's ASHA
        assert milestone == 1 and set(recorded) == {r.data.tags[TRIAL] for r in runs if r.data.tags[STUDY] == study}


def bucket_keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# Ports every Ray node binds whatever ports it is given: GCS, dashboard, client, the dashboard's metrics server and
# the dashboard agent. A test port that lands on one of them (44227 is inside the kernel's ephemeral range) loses it
# to Ray, and the dashboard's HTTP server then fails to start.
RAY_FIXED_PORTS = {6379, 8265, 10001, 44227, 52365}


def free_port() -> int:
    """A free loopback port that none of Ray's fixed default ports can take."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_FIXED_PORTS:
            return port

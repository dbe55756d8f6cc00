"""The training loop: metrics, checkpoints, exact resume, early stopping, divergence."""

import dataclasses
import errno
import math
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from attzoom.config import ConfigError, TrainConfig
from attzoom.data import ImageSet, Splits
from attzoom.names import GATE_METRICS, METRICS
from attzoom import train
from attzoom.cli import main
from attzoom.train import EarlyStopping, evaluate, fit, load_checkpoint_model, make_runtime, best_test_metrics

TIMING = {"epoch_time", "images_per_s"}


def small_splits(n_train=96, n_val=32, n_test=32, classes=4, size=32, seed=0, random_labels=False) -> Splits:
    """A learnable toy task: the class sets the brightness of one quadrant."""
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(classes, (n,), generator=gen)
        images = torch.randint(0, 60, (n, 3, size, size), generator=gen, dtype=torch.uint8)
        half = size // 2
        for i, y in enumerate(labels.tolist()):
            r, c = divmod(y % 4, 2)
            images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
        if random_labels:
            labels = torch.randint(classes, (n,), generator=gen)
        return ImageSet(images, labels)

    return Splits(make(n_train), make(n_val), make(n_test), classes, (0.3, 0.3, 0.3), (0.25, 0.25, 0.25))


def config(**overrides) -> TrainConfig:
    base = dict(backbone="tiny_resnet", dataset="cluttered-digits", batch_size=16, lr=3e-3, epochs=4, patience=50)
    return TrainConfig(**{**base, **overrides})


def without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


class Killed(Exception):
    """What kill_after raises: the process stopping after an epoch's report."""


def kill_after(epoch: int):
    """A callback that stops training once ``epoch`` is reported (its checkpoint is on disk by then)."""
    def callback(metrics, _):
        if metrics["epoch"] == epoch:
            raise Killed
    return callback


def test_callback_gets_every_metric_each_epoch_after_the_checkpoint(tmp_path):
    seen = []

    def callback(metrics, ckpt_dir):
        assert (ckpt_dir / "last.pt").exists()
        saved = torch.load(ckpt_dir / "last.pt", weights_only=True)
        assert saved["history"][-1]["epoch"] == metrics["epoch"]  # checkpoint written before the report
        seen.append(metrics)

    result = fit(config(epochs=3), small_splits(), callback=callback, checkpoint_dir=tmp_path)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    for m in seen:
        assert set(METRICS) - set(GATE_METRICS) <= set(m) and not set(GATE_METRICS) & set(m)  # a baseline: no gate
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 100
        assert m["images_per_s"] > 0 and m["epoch_time"] > 0 and m["train_loss"] > 0
    assert result.status == "completed" and result.epochs == 3
    assert result.best["val_top1"] == max(m["val_top1"] for m in seen)


@pytest.mark.parametrize("variant", ["attzoom", "attention-only"])
def test_a_gated_variant_reports_how_open_its_gate_was_each_epoch(variant):
    result = fit(config(epochs=2, variant=variant, position="stem"), small_splits())
    for m in result.history:
        assert 0.0 <= m["gate_open"] <= 100.0 and 0.0 < m["gate_sigma"] < 1.0


def test_training_learns_a_learnable_task():
    result = fit(config(epochs=6, augment=False), small_splits())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best["val_top1"] > 50  # chance is 25 %


@pytest.mark.parametrize("optimizer,scheduler", [
    ("adam", "cosine"), ("sgd", "step"), ("adam", "plateau"), ("sgd", "onecycle")])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, optimizer, scheduler):
    cfg = config(optimizer=optimizer, scheduler=scheduler, step_size=1, epochs=4)
    data = small_splits()
    straight = fit(cfg, data, checkpoint_dir=tmp_path / "straight")

    with pytest.raises(Killed):
        fit(cfg, data, callback=kill_after(2), checkpoint_dir=tmp_path / "resumed")
    torch.manual_seed(12345)  # a different global RNG state must not matter: it is restored from the checkpoint
    resumed = fit(cfg, data, checkpoint_dir=tmp_path / "resumed")

    assert without_timing(resumed.history) == without_timing(straight.history)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_between_two_steps_keeps_the_last_finished_epoch_and_the_resume_is_exact(tmp_path):
    # a sweep's trial stops so when its process exits (tune_jobs/trainable.py): mid-epoch, not after a report
    cfg, data, calls = config(epochs=3), small_splits(), []

    def stop_in_epoch_two():  # 96 images in batches of 16: six steps per epoch
        calls.append(1)
        if len(calls) == 9:
            raise Killed

    straight = fit(cfg, data, checkpoint_dir=tmp_path / "straight")
    with pytest.raises(Killed):
        fit(cfg, data, checkpoint_dir=tmp_path / "stopped", between_steps=stop_in_epoch_two)
    assert [m["epoch"] for m in torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["history"]] == [1]
    resumed = fit(cfg, data, checkpoint_dir=tmp_path / "stopped")
    assert without_timing(resumed.history) == without_timing(straight.history)


EXITING_TRIAL = """
import os, signal, sys, threading
from tune_jobs import trainable
TERM_AT_EXIT = len(sys.argv) > 1
if TERM_AT_EXIT:  # as a Ray worker has it: SIGTERM raises SystemExit, wherever the main thread is
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
trainable.stop_training_at_exit()  # what run_trial does first, before fit's modules are imported
from attzoom.config import TrainConfig
from attzoom.train import fit
from tests.test_train import small_splits

steps, ended = [], []

def step():
    steps.append(1)
    if TERM_AT_EXIT and trainable._exiting.is_set() and not ended:  # Ray's raylet ending a worker slow to exit
        ended.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    trainable.stop_if_exiting()

def train():  # as Tune runs a trial: in a daemon thread, which it leaves running when the process exits
    try:
        fit(TrainConfig(backbone="tiny_resnet", dataset="cluttered-digits", batch_size=16, epochs=10_000),
            small_splits(), between_steps=step)
    except trainable.ProcessExiting:
        print("stopped between two steps", flush=True)

thread = threading.Thread(target=train, daemon=True)
trainable._training.add(thread)
thread.start()
while len(steps) < 3 and thread.is_alive():
    thread.join(0.05)
sys.exit(0)
"""


@pytest.mark.parametrize("sigterm", [False, True], ids=["exit", "sigterm-while-exiting"])
def test_a_trials_exiting_process_stops_its_training_thread_between_two_steps(sigterm):
    # Tune let the process exit while its daemon thread trained: Python ended the thread inside torch, which
    # aborted the process with a crash dump in the sweep's output. A SIGTERM from Ray's raylet to a worker still
    # exiting raised SystemExit in the wait for that thread (or in a callback: "Exception ignored ... SystemExit")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", EXITING_TRIAL, *(["term"] if sigterm else [])], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "stopped between two steps\n", done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


TERM_IN_A_CALLBACK = """
import weakref
from tune_jobs import trainable

trainable.stop_training_at_exit()  # as each trial does

class Thing:
    pass

def raises(kind):
    def callback(ref):  # Ray's SIGTERM handler raising where the main thread is: in a weakref's callback
        raise kind(1)
    return callback

a, b = Thing(), Thing()
refs = [weakref.ref(a, raises(SystemExit)), weakref.ref(b, raises(ValueError))]
del a, b
print("went on", flush=True)
"""


def test_a_sigterm_landing_in_a_callback_of_an_exiting_trial_process_prints_nothing():
    # the demo's confirm printed 9 lines, "Exception ignored in: <function WeakSet...> ... SystemExit: 1"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", TERM_IN_A_CALLBACK], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "went on\n", done.stderr[-3000:]
    assert "SystemExit" not in done.stderr and "ValueError: 1" in done.stderr, done.stderr  # others: as before


def test_resume_false_starts_over(tmp_path):
    data = small_splits()
    fit(config(epochs=2), data, checkpoint_dir=tmp_path)
    again = fit(config(epochs=2), data, checkpoint_dir=tmp_path, resume=False)
    assert [m["epoch"] for m in again.history] == [1, 2]


def test_finished_run_resumes_to_nothing(tmp_path):
    data, calls = small_splits(), []
    first = fit(config(epochs=2), data, checkpoint_dir=tmp_path)
    second = fit(config(epochs=2), data, checkpoint_dir=tmp_path, callback=lambda m, c: calls.append(m))
    assert calls == [] and without_timing(second.history) == without_timing(first.history)


def test_an_io_error_while_resuming_is_raised_as_it_is_not_called_a_damaged_checkpoint(tmp_path):
    """An EIO from a sick network mount says nothing about last.pt: raised as it is, the sweep retries the trial from
    the same checkpoint, where a CheckpointError starts it over from epoch 1; the CLI says run again, not --restart."""
    from attzoom.config import CheckpointError

    last = tmp_path / "last.pt"
    last.symlink_to("/proc/self/mem")  # reading its offset 0 fails with EIO, as a mount that lost its server does
    with pytest.raises(OSError) as raised:
        fit(config(epochs=1), small_splits(), checkpoint_dir=tmp_path, resume=True)
    assert raised.value.errno == errno.EIO
    with pytest.raises(ConfigError, match="run again") as refused:
        train.check_resumable(last)
    assert not isinstance(refused.value, CheckpointError) and "--restart" not in str(refused.value)


@pytest.mark.parametrize("cut", [10, 0.5])
def test_a_small_checkpoint_cut_short_is_damaged_whatever_the_zip_reader_raises(tmp_path, cut):
    """Cut near its end, a small last.pt makes torch.load raise OSError(EINVAL), not the usual RuntimeError: it is
    still a damaged file (start over), not a passing I/O error (which would be retried on the same bytes)."""
    from attzoom.config import CheckpointError

    last = tmp_path / "last.pt"
    torch.save({"model": torch.zeros(10_000)}, last)  # 40 kB
    whole = last.read_bytes()
    last.write_bytes(whole[:len(whole) - cut] if cut > 1 else whole[:int(len(whole) * cut)])
    with pytest.raises(CheckpointError, match="--restart"):
        fit(config(epochs=2), small_splits(), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="--restart"):
        train.check_resumable(last)


def test_no_memory_while_resuming_is_raised_as_it_is_not_called_a_damaged_checkpoint(tmp_path):
    """The same for a checkpoint that does not fit in memory now (a GPU or host full of packed trials)."""
    path = tmp_path / "last.pt"
    torch.save({"model": torch.zeros(50_000_000)}, path)  # 200 MB
    script = textwrap.dedent(f"""
        import re, resource
        from attzoom.config import CheckpointError
        from attzoom.train import resume_training_state
        used = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 50 * 2**20, resource.RLIM_INFINITY))
        try:
            resume_training_state({str(path)!r}, *[None] * 6)
        except CheckpointError:
            print("damaged")
        except (RuntimeError, MemoryError):
            print("no memory")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "no memory", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("scheduler", ["cosine", "step", "plateau", "onecycle"])
def test_checkpoints_load_weights_only_and_rebuild_the_model(tmp_path, scheduler):
    data = small_splits()
    cfg = config(epochs=1, scheduler=scheduler, variant="attzoom")
    fit(cfg, data, checkpoint_dir=tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "early_stopping", "rng", "history", "config"} <= set(last)
    model, loaded_cfg, metrics = load_checkpoint_model(tmp_path / "best.pt")
    assert loaded_cfg == cfg and metrics["epoch"] == 1
    rt = make_runtime(cfg, data)
    assert evaluate(model, data.val, rt)["top1"] == pytest.approx(metrics["val_top1"])
    assert 0 <= best_test_metrics(tmp_path, data)["top1"] <= 100


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    result = fit(config(epochs=15, patience=2, lr=1e-6, augment=False), small_splits(random_labels=True))
    assert result.status == "early_stopped"
    best_epoch = result.best["epoch"]
    assert result.epochs == best_epoch + 2
    assert all(m["val_top1"] <= result.best["val_top1"] for m in result.history)


def test_early_stopping_state():
    stop = EarlyStopping(patience=2)
    assert stop.update(1, 10.0) and not stop.update(2, 10.0)  # a tie is no improvement
    assert not stop.should_stop and not stop.update(3, 5.0) and stop.should_stop
    restored = EarlyStopping(2)
    restored.load_state_dict(stop.state_dict())
    assert restored.should_stop and restored.best_epoch == 1


def test_nan_loss_stops_the_run_with_a_status(tmp_path):
    """A normalisation std of ~0 turns every input into inf, so the very first loss is NaN."""
    data = small_splits()
    data.std = (1e-45, 1e-45, 1e-45)
    reported = []
    result = fit(config(epochs=50, augment=False), data, callback=lambda m, c: reported.append(m),
                 checkpoint_dir=tmp_path)
    assert result.status == "diverged"
    assert result.epochs == 0 and reported == [] and not (tmp_path / "last.pt").exists()  # not 50 epochs


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config key 'lrate'"):
        TrainConfig.from_dict({"lrate": 0.1})
    with pytest.raises(ConfigError, match="scheduler"):
        TrainConfig.from_dict({"scheduler": "linear"})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ConfigError, match="kernel_size"):
        TrainConfig.from_dict({"kernel_size": 4})
    assert TrainConfig.from_dict(TrainConfig(lr=0.5).to_dict()).lr == 0.5


def test_runtime_picks_cpu_defaults_without_cuda():
    rt = make_runtime(config(), small_splits())
    if not torch.cuda.is_available():
        assert rt.device.type == "cpu" and rt.amp_dtype is None and not rt.channels_last
    x = rt.prepare(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.full_like(x, (1 - 0.3) / 0.25))


def test_bf16_autocast_and_channels_last_paths_run_on_cpu():
    """The CUDA defaults (mixed precision, channels_last) are code paths of their own; run them here."""
    result = fit(config(epochs=1, amp=True, channels_last=True, variant="attzoom"), small_splits())
    assert result.status == "completed" and math.isfinite(result.history[0]["val_loss"])


def test_the_next_epoch_trains_while_the_last_one_is_reported(tmp_path, monkeypatch):
    """A report that waits (Tune waits for its driver) no longer holds up training: epoch 2 validates while
    epoch 1's report is still waiting, and the reports still come in order, each after its checkpoint."""
    validated, reported = threading.Semaphore(0), []
    real_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        validated.release()
        return result

    def report(metrics, ckpt_dir):
        if metrics["epoch"] == 1:
            validated.acquire(timeout=60)  # epoch 1's own validation
            assert validated.acquire(timeout=60), "epoch 2 did not train while epoch 1 was being reported"
        assert torch.load(ckpt_dir / "last.pt", weights_only=True)["history"][-1]["epoch"] == metrics["epoch"]
        reported.append(metrics["epoch"])

    monkeypatch.setattr(train, "evaluate", evaluate)
    result = fit(config(epochs=3), small_splits(), callback=report, checkpoint_dir=tmp_path)
    assert reported == [1, 2, 3] and result.epochs == 3


@pytest.mark.parametrize("stop", [RuntimeError("disk full"), SystemExit(0)])  # SystemExit: how Tune stops a trial
def test_a_failed_report_stops_training_within_the_next_epoch_and_saves_nothing_after_it(tmp_path, stop,
                                                                                          monkeypatch):
    validations = []
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: validations.append(1) or real_evaluate(*a, **k))

    def report(metrics, _):
        raise stop

    with pytest.raises(type(stop)):
        fit(config(epochs=4), small_splits(n_train=1600), callback=report, checkpoint_dir=tmp_path)
    assert len(validations) == 1  # epoch 2 stopped between steps, before its validation
    assert [m["epoch"] for m in torch.load(tmp_path / "last.pt", weights_only=True)["history"]] == [1]


def test_the_compiled_path_trains_like_eager_and_resumes_exactly(tmp_path):
    """torch.compile (inductor on the CPU; on CUDA its steps also replay as CUDA graphs: test_cuda.py),
    the gates' counts taken through the compiled validation too."""
    cfg, data = dict(epochs=3, variant="attzoom", augment=False, lr=1e-3), small_splits()
    eager = fit(config(**cfg), data)
    compiled = fit(config(compile=True, **cfg), data, checkpoint_dir=tmp_path / "straight")
    for a, b in zip(eager.history, compiled.history, strict=True):
        for key in ("train_loss", "val_loss", "gate_sigma"):
            assert b[key] == pytest.approx(a[key], rel=0.05), key
        assert b["gate_open"] == pytest.approx(a["gate_open"], abs=2)
        assert b["val_top1"] == pytest.approx(a["val_top1"], abs=100 * 2 / len(data.val))  # two images of 32
    assert compiled.best["val_top1"] > 50  # chance is 25 %

    with pytest.raises(Killed):
        fit(config(compile=True, **cfg), data, callback=kill_after(1), checkpoint_dir=tmp_path / "resumed")
    resumed = fit(config(compile=True, **cfg), data, checkpoint_dir=tmp_path / "resumed")
    assert without_timing(resumed.history) == without_timing(compiled.history)


@pytest.mark.parametrize("changed", [dict(lr=1e-3), dict(optimizer="sgd"), dict(seed=7, batch_size=32),
                                     dict(augment=False), dict(epochs=3)])  # cosine: its schedule is built from epochs
def test_another_configs_last_pt_is_refused_naming_the_difference(tmp_path, changed):
    """Resuming it would go on with the other config's weights and schedule and report them as this config's."""
    from attzoom.config import CheckpointError

    data = small_splits(n_train=32, n_val=16)
    fit(config(epochs=1), data, checkpoint_dir=tmp_path)
    calls = []
    with pytest.raises(CheckpointError, match="--restart") as refused:
        fit(config(**{"epochs": 1, **changed}), data, checkpoint_dir=tmp_path, callback=lambda m, c: calls.append(m))
    assert all(f"{key}: " in str(refused.value) for key in changed) and calls == []
    with pytest.raises(CheckpointError, match="another --checkpoint-dir"):
        train.check_resumable(tmp_path / "last.pt", config(**{"epochs": 1, **changed}))


def test_a_resume_may_change_where_it_runs_and_what_the_config_does_not_use(tmp_path):
    """A sweep's trial resumes on another node (device, data_root, GPU share); Adam ignores momentum; a step schedule
    is not built from epochs, so a finished run continues exactly with more."""
    data = small_splits(n_train=32, n_val=16)
    cfg = dict(scheduler="step", step_size=1, optimizer="adam")
    straight = fit(config(epochs=2, **cfg), data)
    fit(config(epochs=1, **cfg), data, checkpoint_dir=tmp_path)
    moved = dict(device="cpu", data_root=str(tmp_path / "elsewhere"), gpu_memory_fraction=0.5, momentum=0.5,
                 patience=7, cuda_graphs=False)
    train.check_resumable(tmp_path / "last.pt", config(epochs=2, **cfg, **moved))
    resumed = fit(config(epochs=2, **cfg, **moved), data, checkpoint_dir=tmp_path)
    assert without_timing(resumed.history) == without_timing(straight.history)


@pytest.mark.parametrize("device,expected", [("tpu", "unknown device 'tpu'"), ("cuda:99", "this machine has")])
def test_a_device_this_machine_lacks_is_a_config_error(device, expected):
    with pytest.raises(ConfigError, match=expected):
        fit(config(epochs=1, device=device), small_splits(n_train=32, n_val=16))


def test_a_file_in_place_of_the_checkpoint_dir_is_a_config_error_before_training(tmp_path):
    (tmp_path / "afile").write_text("")
    calls = []
    for ckpt in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match="afile is a file"):
            fit(config(epochs=1), small_splits(n_train=32, n_val=16), checkpoint_dir=ckpt,
                callback=lambda m, c: calls.append(m))
    assert calls == []


def test_a_second_fit_on_a_checkpoint_dir_in_use_is_refused_at_once_and_the_first_goes_on(tmp_path):
    """Two trainings on one folder both trained and both wrote last.pt and best.pt, without a word."""
    from attzoom.config import CheckpointError

    data, refused, second = small_splits(n_train=32, n_val=16), [], []

    def start_another(metrics, _):  # while the first holds the folder (the callback runs in another thread)
        if metrics["epoch"] == 1:
            with pytest.raises(ConfigError) as info:
                fit(config(epochs=2), data, checkpoint_dir=tmp_path, callback=lambda m, c: second.append(m))
            refused.append(info.value)

    first = fit(config(epochs=2), data, checkpoint_dir=tmp_path, callback=start_another)
    assert first.epochs == 2 and second == [] and len(refused) == 1
    message = str(refused[0])
    assert str(tmp_path) in message and "another training writes there now" in message, message
    assert "--checkpoint-dir" in message and "\n" not in message
    assert not isinstance(refused[0], CheckpointError)  # nothing is wrong with its files: a trial must not start over
    assert fit(config(epochs=2), data, checkpoint_dir=tmp_path, resume=False).epochs == 2  # freed as fit ended


def test_a_restored_trial_folder_drops_the_lock_file_copied_with_the_tune_checkpoint(tmp_path):
    """Tune copies the trial's folder, lock file included, into each checkpoint: the copy is never a live lock (the
    next try's folder is its own), and a lock that is a marker file (where the storage lacks flock) would refuse it."""
    from ray import tune

    from tune_jobs.trainable import restore

    saved, work = tmp_path / "saved", tmp_path / "work"
    saved.mkdir()
    (saved / "last.pt").write_bytes(b"state")
    (saved / ".attzoom-train.lock").write_text("pid 1 on another node")
    work.mkdir()
    restore(tune.Checkpoint.from_directory(saved), work)
    assert sorted(p.name for p in work.iterdir()) == ["last.pt"]


FLOAT_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_option_refuses_nan_and_infinity_naming_it(key, value):
    """NaN fails every comparison a range check makes: --lr nan ended in torch's traceback, --threshold nan trained."""
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number"):
        config(**{key: value}).validate()


@pytest.mark.parametrize("option", ["--lr", "--momentum", "--threshold", "--weight-decay", "--val-fraction"])
def test_a_nan_option_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, option):
    monkeypatch.chdir(tmp_path)
    # cifar100 from a folder that lacks it: had NaN passed, that would be the error (not a 50-epoch training)
    assert main(["train", option, "nan", "--optimizer", "sgd", "--variant", "attzoom", "--dataset", "cifar100",
                 "--data-root", "nowhere"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{option[2:].replace('-', '_')} must be a finite number" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # no runs/, no data/


def diverging(data: Splits) -> Splits:
    """The same data normalised by a std of ~0: every input is inf, so the first loss is NaN."""
    return dataclasses.replace(data, std=(1e-45, 1e-45, 1e-45))


def test_train_that_diverges_in_epoch_1_says_so_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    """It ended in FileNotFoundError for best.pt: no epoch finished, so there is none to test."""
    monkeypatch.setattr("attzoom.data.load", lambda *a: diverging(small_splits(n_train=32, n_val=16)))
    (tmp_path / "run").mkdir()
    torch.save({}, tmp_path / "run" / "best.pt")  # another run's: not this run's result
    args = ["train", "--checkpoint-dir", str(tmp_path / "run"), "--batch-size", "16", "--no-augment", "--restart"]
    assert main(args) == 1
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "in epoch 1" in lines[0] and "no best checkpoint" in lines[0], out.err
    assert "--lr" in lines[0] and "Traceback" not in out.err and out.out == ""


def test_train_that_diverges_later_reports_its_best_epoch_and_where_it_diverged(tmp_path, monkeypatch, capsys):
    data = small_splits(n_train=32, n_val=16)
    monkeypatch.setattr("attzoom.data.load", lambda *a: data)
    args = ["train", "--checkpoint-dir", str(tmp_path / "run"), "--batch-size", "16", "--no-augment",
            "--scheduler", "step", "--epochs"]
    assert main([*args, "1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("attzoom.data.load", lambda *a: diverging(data))  # resumes epoch 1's state, then diverges
    assert main([*args, "3"]) == 1
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "in epoch 2" in lines[0] and "--restart" in lines[0], out.err
    assert "best epoch 1" in out.out and "test top-1" in out.out


def test_a_corrupt_last_pt_is_told_in_whole_words_not_cut_mid_sentence(tmp_path):
    """torch's message for a truncated zip runs on for several sentences: a [:160] cut ended '...there is a high)'."""
    from attzoom.config import CheckpointError

    data, last = small_splits(n_train=32, n_val=16), tmp_path / "last.pt"
    torch.save({"model": torch.zeros(1_000_000)}, last)  # 4 MB, cut in half: torch's long RuntimeError, not EINVAL
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    for load in (lambda: fit(config(epochs=1), data, checkpoint_dir=tmp_path), lambda: train.check_resumable(last)):
        with pytest.raises(CheckpointError) as refused:
            load()
        message = str(refused.value)
        assert re.search(r"\(RuntimeError: [^()]*central directory\); it is truncated", message), message
    assert train.first_line(RuntimeError("word " * 100)).endswith("word ...")


# --- each field's type is checked before any data loads ----------------------------------

@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "2", "an integer"), ("epochs", 1.5, "an integer"), ("batch_size", 64.0, "an integer"),
    ("epochs", True, "an integer"), ("lr", "1e-3", "a finite number"), ("threshold", "0.5", "a finite number"),
    ("cifar_stem", "yes", "True or False"), ("augment", 0, "True or False"), ("data_root", 5, "a string"),
    ("amp", "on", "True, False or None"), ("gpu_memory_fraction", "0.5", "a finite number or None"),
])
def test_a_value_of_the_wrong_type_is_a_config_error_naming_it_before_any_data_loads(monkeypatch, key, value,
                                                                                      expected):
    """They passed validate and failed after the data loaded, as a bare TypeError (epochs="2": 'can only
    concatenate str'), or trained silently (cifar_stem="yes")."""
    monkeypatch.setattr(train, "load", lambda *a: pytest.fail("the data loaded before the config was checked"))
    with pytest.raises(ConfigError, match=rf"^{key} must be {expected}, got {re.escape(repr(value))} "):
        fit({"epochs": 1, key: value})
    with pytest.raises(ConfigError, match=rf"^{key} must be {expected}"):
        config(**{key: value}).validate()


def test_a_run_configured_with_numpy_values_resumes_from_its_checkpoint(tmp_path):
    import numpy as np

    numpy_values = dict(lr=np.float64(1e-3), batch_size=np.int64(32), augment=np.False_)
    data = small_splits(n_train=32, n_val=16)
    fit(config(epochs=1, **numpy_values), data, checkpoint_dir=tmp_path)
    train.check_resumable(tmp_path / "last.pt", config(epochs=1, **numpy_values))  # "damaged": weights_only refused


def test_ints_for_floats_and_a_sweeps_numpy_numbers_pass_the_type_check():
    import numpy as np

    config(lr=1, threshold=0, gpu_memory_fraction=1, amp=None).validate()
    config(lr=np.float64(0.01), batch_size=np.int64(32), momentum=np.float32(0.5), step_size=np.int32(3),
           amp=True, channels_last=False, augment=np.bool_(False), cifar_stem=np.True_).validate()
    assert TrainConfig.from_dict(config(lr=0.5).to_dict()).lr == 0.5

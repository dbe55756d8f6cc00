"""Cloud storage (s3://) a sweep cannot use is one line before any work. A sweep, its Ctrl-C and its resume on S3
run end to end in test_sweep_e2e.py (the ASHA test), against the real S3 server of conftest.s3."""

import subprocess
import sys

import pytest
from test_sweep_e2e import write_spec
from tune_jobs.cli import attzoom_executable


@pytest.mark.parametrize("storage,expected", [
    ("s3://no-such-bucket/results", "there is no bucket no-such-bucket"),
    ("gopher://host/results", "Unrecognized filesystem type"),
])
def test_storage_that_cannot_be_reached_is_one_line_exit_2_before_any_work(s3, tmp_path, digits_root, storage,
                                                                            expected):
    # Tune's traceback came once Ray had started and the store was made
    spec = write_spec(tmp_path / "spec.toml", digits_root)
    done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec), "--storage", storage],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert f"storage {storage} cannot be reached" in done.stderr and expected in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_a_password_in_a_url_is_refused_with_cloud_storage(s3, tmp_path, digits_root):
    # the saved spec, which resume reads the password from, would sit in the bucket for anyone who reads it
    spec = write_spec(tmp_path / "spec.toml", digits_root, tracking_uri="postgresql://u:secret@127.0.0.1:1/db")
    done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec), "--storage", "s3://sweeps/r"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "secret" not in done.stderr, done.stderr
    assert "holds a password, which would be saved with the sweep in s3://sweeps/r" in done.stderr


def test_a_secret_key_in_the_storage_uri_is_refused_and_never_printed(tmp_path, digits_root):
    # s3://KEY:SECRET@bucket works with pyarrow, and the secret went into the saved spec, the MLflow tag and every
    # printed resume command
    spec = write_spec(tmp_path / "spec.toml", digits_root)
    done = subprocess.run([sys.executable, "-m", "tune_jobs.cli", "sweep", str(spec), "--storage",
                           "s3://AKIAEXAMPLE:topsecret@sweeps/r"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "topsecret" not in done.stderr, done.stderr
    assert "holds a secret key" in done.stderr and "AWS_SECRET_ACCESS_KEY" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_commands_and_artifacts_keep_a_storage_uris_query_intact():
    # pasted into a shell, '&' in ?endpoint_override=...&scheme=http backgrounded the command; MLflow got a path
    # after the query
    from tune_jobs.spec import Spec
    from tune_jobs.sweep import resume_command
    from tune_jobs.tracking import artifact_location

    storage = "s3://b/r?endpoint_override=h:9000&scheme=http"
    spec = Spec(name="t", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                storage=storage)
    assert resume_command(spec) == f"{attzoom_executable()} resume t --storage '{storage}'"
    assert artifact_location("postgresql://h/db", "t", storage) == "s3://b/r/mlartifacts/t"


def test_a_checkpoint_on_an_s3_compatible_store_is_found_again_through_the_storage_uris_endpoint():
    # with --storage 's3://b/r?endpoint_override=...' the driver opened each finished trial's checkpoint on AWS
    # itself ("Could not resolve host: b.s3.us-east-1.amazonaws.com") and stopped the sweep, exit 3
    from pyarrow.fs import S3FileSystem
    from ray import tune

    from tune_jobs.mlflow_callback import checkpoint_uri

    storage = "s3://b/r?endpoint_override=127.0.0.1:9&scheme=http"
    checkpoint = tune.Checkpoint("b/r/t/trial/checkpoint_000001",
                                 filesystem=S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http"))
    uri = checkpoint_uri(checkpoint, storage)
    assert uri == "s3://b/r/t/trial/checkpoint_000001?endpoint_override=127.0.0.1:9&scheme=http"
    reopened = tune.Checkpoint(uri).filesystem.__reduce__()[1][0]  # as the driver opens it again
    assert (reopened["endpoint_override"], reopened["scheme"]) == ("127.0.0.1:9", "http")
    assert checkpoint_uri(tune.Checkpoint("/tmp/r/t/trial/checkpoint_000001"), "/tmp/r") == (
        "/tmp/r/t/trial/checkpoint_000001")


def test_a_killed_drivers_orphan_trial_folders_go_from_cloud_storage_as_from_a_folder(s3):
    # a driver killed before its experiment snapshot leaves a trial folder whose epochs the trial suggested in its
    # place trains again: on S3 it stayed, so the bucket held those epochs twice
    from tune_jobs.spec import Spec
    from tune_jobs.sweep import drop_orphan_folders

    client, bucket = s3
    spec = Spec(name="t", backbones=("tiny_resnet",), datasets=("cluttered-digits",), variants=("baseline",),
                storage=f"s3://{bucket}/r")
    study = spec.studies[0].name
    kept = [f"r/t/{study}-a/result.json", "r/t/experiment_state-1.json", "r/t/other-b/result.json"]
    for key in [*kept, f"r/t/{study}-b/result.json", f"r/t/{study}-b/work/best.pt"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    drop_orphan_folders(spec, {f"{study}-a"})
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(k for k in keys if not k.endswith("/")) == sorted(kept)  # pyarrow leaves a folder marker

"""Ray for a sweep's driver: a private local instance kept on 127.0.0.1, or a cluster; and Tune's settings.

Used by ``sweep``, ``resume`` and ``confirm``; the trials' own processes start in this Ray.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import psutil

from .infra import sigterm_as_interrupt
from .spec import Spec, SpecError, check_cluster_cpus, check_cluster_gpus


def tune_settings(spec: Spec) -> dict[str, str]:
    """The environment variables that change how Ray, Tune and the driver's MLflow client run a sweep (a user's
    own values win)."""
    return {
        # (The experiment snapshot's period is set from its cost: snapshots.py, _period_from_cost.)
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        "RAY_AIR_NEW_OUTPUT": "0",  # Tune's table output; StudyProgress prints per study instead
        # Tune's default TensorBoard logger costs a second of imports before the first trial and duplicates
        # MLflow; the sweep adds the CSV and JSON loggers back.
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        # Tune lets a custom searcher keep only one trial pending; let it fill every slot of the cap at once.
        "TUNE_MAX_PENDING_TRIALS_PG": str(spec.max_concurrent),
        # The driver's MLflow calls fail within seconds when the server does not answer (MLflow's own retries take
        # minutes); its outbox tries again, in order, until the spec's tracking_outage_minutes (outbox.py).
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        # MLflow prints "View run ... at: <server URL>" for every run a server-backed store finishes: one line per
        # trial, and the URL may carry a password
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        # Tune logs each failed try with Ray's traceback, a page each; the progress says it in one line that names
        # the trial's error.txt, which holds the traceback
        "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    }


def apply_tune_settings(spec: Spec) -> None:
    """Set tune_settings once, when a sweep starts and before Tune is imported (it reads some at import)."""
    for key, value in tune_settings(spec).items():
        os.environ.setdefault(key, value)
    quiet_metrics_fetch_warning()
    from .snapshots import whole_file_snapshots

    whole_file_snapshots()


def quiet_metrics_fetch_warning() -> None:
    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_not_a_metrics_fetch)
    logging.getLogger("ray.tune.tune").addFilter(_not_a_trials_list)


def _not_a_trials_list(record: logging.LogRecord) -> bool:
    """Drop Tune's "Trials did not complete: [run_trial_9318885a, ...]": the sweep's closing line says which studies
    lack finished trials, and the progress which trials failed, with their error files."""
    return not record.getMessage().startswith("Trials did not complete")


def _not_a_metrics_fetch(record: logging.LogRecord) -> bool:
    """Drop Tune's "Failed to fetch metrics ... result.json ... not found" for trials a stop caught before their first
    epoch: its results are never read here (the runs are), and the progress lines already say which trials ended."""
    return not record.getMessage().startswith("Failed to fetch metrics")


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A cluster address that nothing answers at, or something that is not Ray: one line at once (ray.init would
    wait a minute and more on the GCS, printing warnings, or hang on a dashboard's port). "local" is left to Ray."""
    import socket

    if not address or address == "local":
        return
    if address.startswith(("http://", "https://")):
        raise SpecError(f"--address {address} is a Jobs API address, which `attzoom submit` takes; sweep, resume and "
                        "confirm join the cluster itself: pass the GCS address of its head, HOST:6379 (or "
                        "ray://HOST:10001)")
    where = _resolved(address).split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"--address {address!r} is no Ray cluster address; pass HOST:PORT of its head (e.g. "
                        "10.0.0.5:6379), ray://HOST:10001, or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as connection:
            answer = grpc_answer(connection)
    except OSError as e:
        raise SpecError(f"no Ray cluster answers at --address {address} ({e.strerror or e}); start it "
                        "(`ray start --head`) or fix --address") from None
    if answer is not None:
        raise SpecError(f"--address {address} answers, but not as a Ray cluster ({answer}); pass the GCS address of "
                        "its head, HOST:6379 (the dashboard's HOST:8265 is for `attzoom submit`), or ray://HOST:10001")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def grpc_answer(connection) -> str | None:
    """None when the server speaks gRPC (Ray's GCS and client server do: it answers HTTP/2's preface with its
    SETTINGS frame), else what it did instead. A TLS cluster (RAY_USE_TLS) is left to Ray."""
    import socket

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    connection.sendall(HTTP2_PREFACE)
    reply = b""
    try:
        while len(reply) < 4 and (chunk := connection.recv(64)):
            reply += chunk
    except socket.timeout:
        return f"no answer to gRPC's handshake within {connection.gettimeout():.0f} s"
    if len(reply) >= 4 and reply[3] == 4:
        return None
    return "it closed the connection" if not reply else "it does not speak gRPC: a dashboard's or web server's port?"


def _resolved(address: str) -> str:
    """``auto`` as Ray resolves it (RAY_ADDRESS, else the instance `ray start` last started here); SpecError when
    there is none (ray.init raised a ConnectionError after the sweep had stored its spec and runs)."""
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise SpecError("--address auto found no Ray instance on this machine; start one (`ray start --head`, or "
                        "cluster/local.sh start) or pass its HOST:PORT") from None


def start_ray(spec: Spec, address: str | None) -> None:
    """Connect to a cluster, or start a private local instance bound to 127.0.0.1."""
    import ray

    if address:
        with sigterm_stays_an_interrupt():
            join_cluster(address)
        where = f"the cluster at {address}"
    else:
        quiet_token_auth_notice()
        private_auth_token()
        with sigterm_stays_an_interrupt(), loopback_only(), process_groups_of_their_own():
            ray.init(address="local", num_gpus=spec.local_gpus, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
        _private_gcs[:] = gcs_of_private_ray()
        where = "this machine"
    resources = ray.cluster_resources()
    if not address:  # a cluster's autoscaler may yet add bigger nodes; this machine is all a local run has
        check_cluster_cpus(spec, resources.get("CPU", 0.0), where)
    gpus = resources.get("GPU", 0.0)
    if wait := check_cluster_gpus(spec, gpus, where, gpu_ceiling() if address and spec.gpus > gpus else None):
        print(f"attzoom: {wait}", file=sys.stderr, flush=True)


@contextmanager
def sigterm_stays_an_interrupt():
    """ray.init puts its own SIGTERM handler in place (sys.exit(15); once connected, a crash dump): a SIGTERM while
    Ray started ended the driver with exit 15 and no word. It is the interrupt it is, and the sweep's handler is put
    back once Ray has started."""
    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        raise KeyboardInterrupt from None
    finally:
        sigterm_as_interrupt()


def gpu_ceiling() -> float | None:
    """The most GPUs the connected cluster's autoscaler may start: Ray's autoscaler v2 stores its node groups'
    limits in the GCS; v1 only reports its node types (inf: no limit known). None: no autoscaler (a fixed
    cluster), or none that Ray's private state API (pinned Ray) can show."""
    import json
    import math

    try:
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get

        limits = state.get_max_resources_from_cluster_config()
        if limits is not None:
            return float(limits.get("GPU", 0))
        status = _internal_kv_get(AUTOSCALING_STATUS)
        return math.inf if status and scales(json.loads(status).get("autoscaler_report") or {}) else None
    except Exception:  # noqa: BLE001 - an API that moved: the check refuses as for a fixed cluster
        return None


def scales(report: dict) -> bool:
    """Whether a v1 autoscaler report is a real autoscaler's. Every head (`ray start --head`) runs the v1 monitor;
    without an autoscaling config it reports a read-only one, whose node types are its nodes' ids (node_<hex>):
    a fixed cluster. A configured one names its own types (head, gpu-workers)."""
    types = {kind for part in ("active_nodes", "idle_nodes", "pending_launches") for kind in report.get(part) or {}}
    return any(not READONLY_TYPE.fullmatch(kind) for kind in types)


AUTOSCALING_STATUS = "__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS, the v1 monitor's
READONLY_TYPE = re.compile(r"node_[0-9a-f]+")  # ray.autoscaler._private.util.format_readonly_node_type


def send_token_when_given() -> None:
    """A token given in the environment (RAY_AUTH_TOKEN_PATH, as cluster/local.sh prints, or RAY_AUTH_TOKEN) is
    sent to the cluster: without RAY_AUTH_MODE=token Ray sent none, and a token cluster refused the driver after
    twenty lines of retries. Ray reads the mode once, as it is imported: call this first."""
    if os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def join_cluster(address: str) -> None:
    """Connect this driver to a running cluster (send_token_when_given); Ray's INFO lines follow `attzoom -v`."""
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, AuthenticationError) as e:
        raise SpecError(f"cannot join the Ray cluster at --address {address} ({str(e).splitlines()[0]}); if it "
                        "uses token authentication, set RAY_AUTH_TOKEN_PATH to its token file") from None


def private_auth_token(out=sys.stderr) -> None:
    """A new local Ray turns token auth on and saves a token in ~/.ray/auth_token, with the user's umask: readable
    by every local user, who could then run code as this one through the instance's loopback ports. The file is
    made here first, private; one that others can read is made private, with a line saying so."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or os.environ.get("RAY_AUTH_TOKEN") or \
            os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # no token, or one the user chose to give: Ray reads neither from this file
    path = Path.home() / ".ray" / "auth_token"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32))  # as Ray makes one: 256 random bits
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)
            print(f"attzoom: {path} (Ray's token) was readable by other users; made it private", file=out)
    except OSError:
        pass  # a home that cannot be written, or another driver made the file just now: Ray goes on as before


def quiet_token_auth_notice() -> None:
    """Drop Ray's start-up warning that token auth is on and how to opt out: auth stays on (Ray's default for a
    new local instance), and a sweep should not open by telling users how to turn it off."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_an_opt_out_hint)


def _not_an_opt_out_hint(record: logging.LogRecord) -> bool:
    return "RAY_AUTH_MODE=disabled" not in record.getMessage()


def stop_ray() -> None:
    import ray

    if not private_ray_lost():  # lost: the watch ends the driver (infra._end_if_ray_ends) while this hangs on it
        _private_gcs.clear()  # its end from here on is this driver's doing
    ray.shutdown()


_private_gcs: list = []  # the GCS process of the private Ray this driver started, until it stops that Ray


def gcs_of_private_ray() -> list:
    """[the GCS process] of the Ray this driver just started (a child of it), or [] when none is found."""
    for child in psutil.Process().children():
        try:
            if child.name() == "gcs_server":
                return [child]
        except psutil.Error:  # a child that ended meanwhile
            continue
    return []


def private_ray_running() -> bool:
    """This driver started a private Ray (not a cluster's) and has not stopped it."""
    return bool(_private_gcs)


def private_ray_lost() -> bool:
    """The private Ray's GCS no longer serves, though this driver did not stop it: it ended, or a SIGTERM began its
    shutdown (it closes its port at once, then lingers; the driver's Ray client waits 60 s for it)."""
    try:
        gcs = _private_gcs[0]
        serving = gcs.status() != psutil.STATUS_ZOMBIE and any(
            c.status == psutil.CONN_LISTEN for c in gcs.net_connections())
    except IndexError:
        return False
    except psutil.NoSuchProcess:  # a zombie too
        serving = False
    except psutil.Error:  # its sockets are not this user's to see (macOS): it cannot tell, so the stop goes on
        return False
    return not serving and bool(_private_gcs)


@contextmanager
def process_groups_of_their_own():
    """Start the private Ray's processes (GCS, raylet and the trial workers it starts, agents) each in a process
    group of its own. A SIGTERM to the driver's group (`timeout`, `kill -TERM -PGID`) then reaches the driver alone,
    which stops the trials and Ray as for a SIGTERM to its pid; it ended Ray's processes under the driver, which
    waited 60 s and died in Ray's C++. They still end with the driver: Ray's parent-death signal (Linux). Where the
    kernel has none (macOS), Ray's reaper ends them by their shared group, which is then left as it was."""
    from ray._private import services, utils

    if not utils.detect_fate_sharing_support():
        yield
        return
    popen = services.ConsolePopen
    services.ConsolePopen = lambda *args, **kwargs: popen(*args, process_group=0, **kwargs)
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextmanager
def loopback_only():
    """Keep every service of a private local Ray on 127.0.0.1.

    Ray swaps 127.0.0.1 for the machine's network address (so that other nodes could join)
    unless it believes the platform cannot cluster, its macOS/Windows default. Saying so
    while the instance starts binds the GCS, raylet, object manager and agents to loopback;
    the processes it starts inherit the setting, nothing after ray.init sees it.
    """
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved, saved_flag = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved

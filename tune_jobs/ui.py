"""``attzoom ui``: the MLflow UI and optuna-dashboard side by side on 127.0.0.1, started and stopped together.

The MLflow UI shows the runs (one parent per study, one child per trial); optuna-dashboard shows
the same studies as Optuna sees them (``<sweep>/<study>`` in the sweep's Optuna storage: the
search's history, parameter importances, intermediate values). What is printed are the
addresses to open: each sweep's runs table in MLflow's machine-learning view (MLflow 3.17
opens an experiment on its GenAI overview otherwise; tune_jobs/naming.py) and the dashboard. An
``mlflow server`` (an http(s) tracking URI) has a UI of its own: its addresses are printed, and only
optuna-dashboard starts (nothing at all without an Optuna storage).

Both servers run in their own process groups, so stopping one stops every process it started;
Ctrl-C (or SIGTERM) stops both, and when one of them ends the other is stopped and the command
exits non-zero. A watchdog process (``python -m tune_jobs.ui``) stops them and removes the private
folder when this one dies without doing so (kill -9, out of memory). Without -v the servers print
only their warnings and errors, as the libraries in this process do (tune_jobs/logs.py; gunicorn,
under optuna-dashboard, only its errors). A reader: no store, database or folder is created (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import layout, naming
from .spec import SpecError, check_store_exists, hide_password, split_login, sqlite_file

HOST = "127.0.0.1"
START_S = 180  # how long a server may take to answer (MLflow imports a lot: a minute on a busy small machine)
STOP_S = 10  # how long a server may take to stop after SIGTERM before it is killed
DONE = "done\n"  # what this process tells its watchdog once it has stopped the servers itself
# MLflow's own import of a Starlette module; nothing a user of the UI can act on
QUIET_WARNINGS = "ignore:starlette.middleware.wsgi is deprecated:UserWarning"
# MLflow's start-up hint on how to open its server to other hosts: this one stays on 127.0.0.1 (README: Security)
NOISE = ("[MLflow] Security middleware enabled",)


def default_optuna_storage(tracking_uri: str) -> str | None:
    """optuna.db beside a sqlite:/// MLflow store (where a sweep keeps its studies by default: spec.optuna_storage_url),
    or None for any other store."""
    database = sqlite_file(tracking_uri)
    return f"sqlite:///{database.expanduser().resolve().parent / 'optuna.db'}" if database else None


def sweep_addresses(tracking_uri: str, sweep: str | None, base: str) -> dict[str, str]:
    """{sweep: the address of its runs table} for one sweep, or every sweep in the store."""
    from .tracking import named_sweep, open_store

    client = open_store(tracking_uri)
    experiments = [e for e in client.search_experiments() if layout.sweep_of(e.name) is not None]
    if sweep:
        experiments = named_sweep(client, sweep, tracking_uri, experiments)
    # an experiment an older version made has no saved view until a sweep, resume or confirm prepares it again
    return {layout.sweep_of(e.name): naming.runs_address(base, e.experiment_id,
                                                         view=layout.SHARED_VIEW + layout.RUNS_VIEW in e.tags)
            for e in sorted(experiments, key=lambda e: e.name)}


def run_ui(tracking_uri: str, sweep: str | None, port: int, optuna_storage: str | None, optuna_port: int) -> int:
    check_store_exists(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return run_beside_server(tracking_uri, sweep, optuna_storage, optuna_port)
    storage = optuna_storage or default_optuna_storage(tracking_uri)
    if (database := absent_database(storage)) is not None:
        check_given_storage(optuna_storage)
        print(f"no Optuna storage at {database} (a sweep keeps its studies there); starting only the MLflow UI",
              flush=True)
        storage = None
    elif storage is None:
        print("no Optuna storage beside a store that is not a sqlite:/// file: pass --optuna-storage URL to see the "
              "studies in optuna-dashboard; starting only the MLflow UI", flush=True)
    ports = {"MLflow UI": port, **({"optuna-dashboard": optuna_port} if storage else {})}
    if len(set(ports.values())) < len(ports):
        raise SpecError(f"--port and --optuna-port are both {port}; give optuna-dashboard another")
    check_free(ports)
    base = f"http://{HOST}:{port}"
    addresses = sweep_addresses(tracking_uri, sweep, base)  # migrates a store a sweep has just made, under its lock

    bin_dir = Path(sys.executable).parent
    verbose = logging.getLogger().isEnabledFor(logging.INFO)  # attzoom -v (tune_jobs/logs.py)
    # One worker is plenty for one person and starts in a quarter of the time of MLflow's four (it then serves the
    # page's requests from a thread pool)
    servers = {"MLflow UI": [str(bin_dir / "mlflow"), "ui", "--host", HOST, "--port", str(port), "--workers", "1",
                             *([] if verbose else ["--uvicorn-opts", "--log-level warning"])]}
    with tempfile.TemporaryDirectory(prefix="attzoom-ui-") as private:  # mode 700; the watchdog's to remove if need be
        if storage:
            servers["optuna-dashboard"] = dashboard_command(storage, private, optuna_port, verbose)
        return supervise(servers, ports, lambda: print_addresses(base, addresses, storage, optuna_port),
                         private, server_environment(tracking_uri, private, verbose), () if verbose else NOISE)


def run_beside_server(tracking_uri: str, sweep: str | None, optuna_storage: str | None, optuna_port: int) -> int:
    """An MLflow server shows its runs in its own UI (a local `mlflow ui` cannot serve an http(s) store: MLflow
    refuses it for the model registry): its addresses, without the login, and only optuna-dashboard to start."""
    check_given_storage(optuna_storage)
    if optuna_storage:
        check_free({"optuna-dashboard": optuna_port})
    base = split_login(tracking_uri)[0].rstrip("/")
    addresses = sweep_addresses(tracking_uri, sweep, base)
    title = "MLflow UI (the tracking server's own)"
    if not optuna_storage:
        print_addresses(base, addresses, None, optuna_port, title, "no Optuna storage given (pass --optuna-storage URL "
                        "to see the studies in optuna-dashboard): nothing to start; open the addresses above")
        return 0
    verbose = logging.getLogger().isEnabledFor(logging.INFO)  # attzoom -v (tune_jobs/logs.py)
    with tempfile.TemporaryDirectory(prefix="attzoom-ui-") as private:  # mode 700; the watchdog's to remove if need be
        servers = {"optuna-dashboard": dashboard_command(optuna_storage, private, optuna_port, verbose)}
        return supervise(servers, {"optuna-dashboard": optuna_port},
                         lambda: print_addresses(base, addresses, optuna_storage, optuna_port, title,
                                                 "Ctrl-C stops optuna-dashboard."),
                         private, dashboard_environment(private, verbose))


def absent_database(storage: str | None) -> Path | None:
    """The SQLite file an Optuna storage URL names, where there is none."""
    database = sqlite_file(storage) if storage else None
    return database if database is not None and not database.is_file() else None


def check_given_storage(optuna_storage: str | None) -> None:
    """An --optuna-storage given by hand must be there (the default one may be missing: only MLflow's UI starts)."""
    if (database := absent_database(optuna_storage)) is not None:
        raise SpecError(f"no Optuna storage at {database}; pass --optuna-storage with the sweep's storage URL")


OPTIONS = {"MLflow UI": "--port", "optuna-dashboard": "--optuna-port"}  # the option that sets each server's port


def check_free(ports: dict[str, int]) -> None:
    for name, number in ports.items():
        if not free(number):
            raise SpecError(f"port {number} on {HOST} is in use (another `attzoom ui`?); pass {OPTIONS[name]} with a "
                            "free one")


def dashboard_command(storage: str, private: str, optuna_port: int, verbose: bool) -> list[str]:
    """optuna-dashboard's command line. The stores' URLs (a password in them) stay off the servers' command lines,
    which every local user can read: MLflow takes its store from the environment, optuna-dashboard from a file only
    this user can read."""
    config = Path(private) / "optuna-dashboard.toml"
    config.write_text(f"[optuna_dashboard]\nstorage = {json.dumps(storage, ensure_ascii=False)}\n")
    return [str(Path(sys.executable).parent / "optuna-dashboard"), "--from-config", str(config), "--host", HOST,
            "--port", str(optuna_port), *([] if verbose else ["--quiet"])]  # gunicorn's errors only


def server_environment(tracking_uri: str, private: str, verbose: bool) -> dict[str, str]:
    """The servers' environment: the MLflow store (off the command line), and what optuna-dashboard needs."""
    env = {**dashboard_environment(private, verbose), "MLFLOW_BACKEND_STORE_URI": tracking_uri}
    env.setdefault("MLFLOW_REGISTRY_STORE_URI", tracking_uri)  # as MLflow does, without printing that it does
    # MLflow's job runner serves GenAI features only (and keeps files of its own)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def dashboard_environment(private: str, verbose: bool) -> dict[str, str]:
    """gunicorn's control socket in the private folder, not in ~/.gunicorn (optuna-dashboard cannot switch it off);
    without -v, no warning meant for the libraries' authors."""
    env = {**os.environ, "XDG_RUNTIME_DIR": private}
    if not verbose:
        env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))
    return env


def print_addresses(base: str, addresses: dict[str, str], storage: str | None, optuna_port: int,
                    title: str = "MLflow UI", ending: str | None = None) -> None:
    print(f"{title}: {base}")
    width = max(map(len, addresses), default=0)
    for sweep, address in addresses.items():
        print(f"  {sweep:<{width}}  runs table: {address}")
    if not addresses:
        print("  (no sweep in this store yet)")
    if storage:
        print(f"optuna-dashboard: http://{HOST}:{optuna_port}/dashboard/  (studies <sweep>/<study> in "
              f"{hide_password(storage)})")
    print(ending or ("Ctrl-C stops both." if storage else "Ctrl-C stops it."), flush=True)


def supervise(servers: dict[str, list[str]], ports: dict[str, int], ready, private: str, env: dict[str, str],
              drop: tuple[str, ...] = ()) -> int:
    """Run the servers until Ctrl-C (0) or until one ends (the others are stopped; 1); ``ready`` once all answer.
    ``drop``: the beginnings of the servers' stderr lines not to pass on."""
    # Ctrl-C, `kill` or a closed terminal stop the servers (a shell starts a background job with SIGINT ignored)
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _interrupt, signal.SIGHUP: _interrupt}
    handlers = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        with watchdog(private) as guard:
            return run_servers(servers, ports, ready, env, guard, drop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_servers(servers: dict[str, list[str]], ports: dict[str, int], ready, env: dict[str, str], guard,
                drop: tuple[str, ...] = ()) -> int:
    """Start the servers, each in a process group of its own (in this session) that ``guard`` learns, and watch
    them; stop them all however this ends."""
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in servers.items():
            processes[name] = subprocess.Popen(command, env=env, process_group=0, text=True,
                                               stderr=subprocess.PIPE if drop else None)
            guard(processes[name].pid)
            if drop:
                threading.Thread(target=_pass_on, args=(processes[name].stderr, drop), daemon=True).start()
        waiting = dict.fromkeys(processes)
        deadline = time.monotonic() + START_S
        while True:
            ended = next((name for name, p in processes.items() if p.poll() is not None), None)
            if ended:
                others = [name for name in processes if name != ended]
                print(f"attzoom ui: {ended} stopped (exit code {processes[ended].returncode})"
                      + (f"; stopping {', '.join(others)}" if others else ""), file=sys.stderr, flush=True)
                return 1
            if waiting:
                waiting = {name: None for name in waiting if not answers(ports[name])}
                if not waiting:
                    ready()
                elif time.monotonic() > deadline:
                    print(f"attzoom ui: {', '.join(waiting)} did not answer within {START_S} s; stopping",
                          file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"stopping {' and '.join(processes)}", file=sys.stderr, flush=True)
        return 0
    finally:
        end({process.pid: process.poll for process in processes.values()})


def _pass_on(stream, drop: tuple[str, ...]) -> None:
    """A server's stderr to ours, line by line, but for the lines ``drop`` begins."""
    for line in stream:
        if not line.startswith(drop):
            sys.stderr.write(line)
            sys.stderr.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def watchdog(private: str):
    """A process of its own (Ctrl-C does not reach it) that stops the servers' groups it is told of and removes
    ``private`` if this one dies before telling it that it stopped them: nothing else ties the servers, in their
    own groups, to this process. Its stdin is a pipe only this process writes, so it learns of the death at once."""
    process = subprocess.Popen([sys.executable, "-m", __name__, private], stdin=subprocess.PIPE, text=True,
                               process_group=0)
    try:
        yield lambda group: tell(process, f"{group}\n")
    finally:
        tell(process, DONE)
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.wait()


def tell(process: subprocess.Popen, line: str) -> None:
    try:
        process.stdin.write(line)
        process.stdin.flush()
    except OSError:  # the watchdog is gone (killed): stopping the servers is this process's alone
        pass


def watch(private: str) -> None:
    """The watchdog: the process groups come as lines on stdin; at its end without DONE, stop them, remove
    ``private``."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # the ui's to handle; it tells this one what follows
        signal.signal(sig, signal.SIG_IGN)
    groups = []
    for line in sys.stdin:
        if line == DONE:  # the ui stopped them, unless a second Ctrl-C cut its stop short: what is left, stopped
            end(dict.fromkeys(groups, lambda: None))
            return
        groups.append(int(line))
    end(dict.fromkeys(groups, lambda: None))
    shutil.rmtree(private, ignore_errors=True)


def end(groups: dict[int, Callable[[], object]]) -> None:
    """Stop the servers and everything they started (their process groups, each with its ``running`` reaper) at once:
    SIGTERM, then SIGKILL to a group of which any process lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [group for group, reap in groups.items() if running(group, reap)]
        for group in alive:
            with contextlib.suppress(ProcessLookupError):  # the whole group is gone
                os.killpg(group, sig)
        deadline = time.monotonic() + STOP_S
        while alive and time.monotonic() < deadline and any(running(group, groups[group]) for group in alive):
            time.sleep(0.1)


def running(group: int, reap: Callable[[], object]) -> bool:
    """Whether a process of the group still runs. A zombie does not, though killpg counts it: ``reap`` reaps the
    leader when it is this process's child; orphans are their init's to reap, which some containers' never does."""
    reap()
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    if not Path("/proc/self/stat").is_file():  # no /proc to tell a zombie from a process
        return True
    return any(live_member(stat, group) for stat in Path("/proc").glob("[0-9]*/stat"))


def live_member(stat: Path, group: int) -> bool:
    try:
        state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (command name)"
    except (OSError, IndexError):  # ended meanwhile
        return False
    return state != "Z" and int(pgrp) == group


def free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a closed port's TIME_WAIT is free
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


if __name__ == "__main__":
    watch(sys.argv[1])

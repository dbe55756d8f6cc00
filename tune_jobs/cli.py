"""The ``attzoom`` command: ``train`` (from attzoom.cli) plus the sweep service.

    attzoom sweep SPEC      run a sweep (local Ray on 127.0.0.1, or --address)
    attzoom resume SWEEP    continue an interrupted sweep, running only what is missing
    attzoom submit SPEC     submit a sweep to a cluster as a Ray job
    attzoom status [SWEEP]  progress of local sweeps (MLflow) or of a submitted job
    attzoom logs JOB_ID     follow a submitted job's output
    attzoom ui [SWEEP]      the MLflow UI and optuna-dashboard on 127.0.0.1; prints each sweep's addresses
    attzoom demo            the embedded demo sweep, then the comparison table
    attzoom report SWEEP    comparison report (CSV, Markdown, HTML) from MLflow alone (dashboards/)

Every error a user can cause is one line on stderr and exit code 2, before any work. A
storage or tracking store that fails under a running sweep stops it with one line and exit
code 3 (tune_jobs/infra.py); an interrupt exits 130. Both are continued with ``resume``.
Output cut short by its reader (``attzoom status | head -1``) ends quietly, exit code 141 (attzoom/cli.py).
Other libraries' INFO logs (Optuna, MLflow, alembic) are off; ``-v`` brings them back (tune_jobs/logs.py).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from attzoom.cli import Parser, add_train_command, run
from attzoom.config import ConfigError, DataError

from .infra import INFRA_EXIT, RUN_AGAIN, InfrastructureError, sigterm_as_interrupt
from .logs import add_verbose_flag, configure_logging, plain_ray_lines
from .ray_session import send_token_when_given
from .spec import SCHEDULER_KINDS, SpecError, has_password, hide_password

SPECS = Path(__file__).parent / "specs"
DEMO_SEEDS = 3  # the demo ends with seed re-runs of each study's best config (attzoom confirm)


def main(argv: list[str] | None = None) -> int:
    # MLflow 3 sends usage telemetry from every process that opens a store and, at exit, waits up to a
    # second for it; clusters often have no egress. Opt in with MLFLOW_DISABLE_TELEMETRY=false.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    configure_logging(verbose=False)  # -v, once parsed, turns the libraries' INFO lines back on
    plain_ray_lines()  # before Ray starts: its workers' lines get no colour codes in a log file
    send_token_when_given()  # before anything imports Ray
    sigterm_as_interrupt()  # a scheduler's SIGTERM before a sweep starts: as Ctrl-C, not a silent end
    # sweep, resume, demo and confirm say their own resume command on Ctrl-C (infra.stops_on_problems), train its own
    return run(build_parser(), argv, (SpecError, ConfigError, DataError), on_interrupt="interrupted",
               stops=(InfrastructureError, INFRA_EXIT))


def build_parser() -> Parser:
    parser = Parser(prog="attzoom", description="AttZoom sweeps: does the AttZoom layer really help your CNN?")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_train_command(sub)

    sweep = sub.add_parser("sweep", help="run a sweep spec (TOML) to the end")
    sweep.add_argument("spec", type=Path)
    add_overrides(sweep)
    sweep.add_argument("--check", action="store_true", help="check the spec, stores and data, print what the sweep "
                       "would run, and exit without starting or storing anything")
    sweep.add_argument("--continue", dest="go_on", action="store_true",
                       help="if this sweep was started already (the same spec, name and storage), continue it as "
                            "`resume` does, else start it: one command for a job that its scheduler may run again")
    sweep.set_defaults(run=run_sweep_command, on_interrupt=RUN_AGAIN)

    resume = sub.add_parser("resume", help="continue an interrupted sweep")
    resume.add_argument("sweep", help="the sweep's name (under --storage) or its folder")
    resume.add_argument("--storage", default="ray_results", help="where the sweep's folder is (default: ray_results)")
    resume.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    resume.add_argument("--data-root", default=None, help="where the data sets are now, if they moved")
    resume.set_defaults(run=run_resume_command, on_interrupt=RUN_AGAIN)

    demo = sub.add_parser("demo", help="the embedded demo sweep: cluttered digits, baseline vs AttZoom")
    add_overrides(demo)
    demo.set_defaults(run=run_demo_command, spec=SPECS / "demo.toml", on_interrupt=RUN_AGAIN)

    status = sub.add_parser("status", help="per-study progress of sweeps, or of a submitted job")
    status.add_argument("sweep", nargs="?", help="a sweep name (default: every sweep in the store)")
    status.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    status.add_argument("--job", default=None, help="also show a submitted job's state (needs --address)")
    status.add_argument("--address", default=None, help="the Jobs API of --job's cluster, e.g. http://HEAD:8265")
    status.add_argument("--json", action="store_true",
                        help="one JSON object for scripts: each sweep's state, its studies' counts and states, and "
                             "the command that continues it when no driver does")
    status.set_defaults(run=run_status_command)

    submit = sub.add_parser("submit", help="submit a sweep, or the resume of a stopped one, to a Ray cluster as a job")
    submit.add_argument("spec", type=Path, nargs="?", help="the spec to run (inside this folder, which is shipped as "
                        "the job's working dir)")
    submit.add_argument("--address", required=True, help="the Jobs API, e.g. http://HEAD:8265")
    submit.add_argument("--resume", metavar="SWEEP", default=None,
                        help="continue this stopped sweep on the cluster instead (with --storage as the cluster sees "
                             "it, and --data-root if the data sets moved)")
    add_overrides(submit, address=False)
    submit.set_defaults(run=run_submit_command)

    logs = sub.add_parser("logs", help="follow a submitted job's output")
    logs.add_argument("job_id")
    logs.add_argument("--address", required=True)
    logs.set_defaults(run=run_logs_command)

    ui = sub.add_parser("ui", help="the MLflow UI and optuna-dashboard on 127.0.0.1 (beside an MLflow server: its "
                        "address, and optuna-dashboard only); prints the addresses to open")
    ui.add_argument("sweep", nargs="?", help="a sweep name: print its runs table's address (default: every sweep's)")
    ui.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ui.add_argument("--port", type=port, default=5000, help="the MLflow UI's port, for a database store (default 5000)")
    ui.add_argument("--optuna-storage", default=None,
                    help="SQLAlchemy URL of the sweep's Optuna studies (default: sqlite:///optuna.db beside a "
                         "sqlite:/// MLflow store; none there: only the MLflow UI starts)")
    ui.add_argument("--optuna-port", type=port, default=8080, help="optuna-dashboard's port (default 8080)")
    ui.set_defaults(run=run_ui_command)

    # The CLI is the one place allowed to reach up a layer: dashboards sits above tune_jobs.
    from dashboards.cli import add_explain_command, add_report_command

    add_report_command(sub)
    add_explain_command(sub)
    from .confirm import add_confirm_command

    add_confirm_command(sub)
    add_verbose_flag(parser, *sub.choices.values())
    return parser


def port(text: str) -> int:
    """argparse type of a TCP port: 1..65535, else a usage error (one line, exit 2) before anything starts."""
    from argparse import ArgumentTypeError

    number = int(text) if text.strip().lstrip("+-").isdigit() else 0
    if not 1 <= number <= 65535:
        raise ArgumentTypeError(f"invalid port {text!r}: give a number from 1 to 65535")
    return number


def add_overrides(p, address: bool = True) -> None:
    if address:
        p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray on 127.0.0.1)")
    # each defaults to the spec's own value: the spec's comments say what it is when the spec leaves it out
    p.add_argument("--storage", default=None, help="Tune storage: a folder, shared file system path or cloud URI "
                   "(default: the spec's storage)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the spec's tracking_uri, else sqlite:///mlflow.db)")
    p.add_argument("--optuna-storage", default=None,
                   help="SQLAlchemy URL of the Optuna studies (default: the spec's optuna_storage, else "
                        "sqlite:///optuna.db beside a sqlite:/// MLflow store)")
    p.add_argument("--trials", type=int, default=None, help="trials per study (default: the spec's trials)")
    p.add_argument("--epochs", type=int, default=None, help="most epochs per trial (default: the spec's epochs)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="global cap on concurrent trials (default: the spec's max_concurrent)")
    p.add_argument("--data-root", default=None, help="the folder holding the data sets (default: the spec's "
                   "data_root)")
    p.add_argument("--local-gpus", type=int, default=None, help="logical GPUs for a local Ray instance")
    p.add_argument("--scheduler", choices=SCHEDULER_KINDS, default=None,
                   help="early stopping of hopeless trials, rungs per study (default: [scheduler] kind, else none)")


def spec_from_args(args):
    from .spec import load_spec

    return load_spec(args.spec, storage=args.storage, tracking_uri=args.tracking_uri, trials=args.trials,
                     epochs=args.epochs, max_concurrent=args.max_concurrent, local_gpus=args.local_gpus,
                     data_root=args.data_root, optuna_storage=args.optuna_storage, scheduler=args.scheduler)


def run_sweep_command(args) -> int:
    from .summary import print_summary
    from .sweep import (check_continuable, check_continues_search, check_new_sweep, finished_already, preflight,
                        run_sweep, started_in)

    spec = preflight(spec_from_args(args))
    if (summary := finished_already(spec)) is not None:  # the same sweep again: done, nothing to run
        return print_finished_already(spec, summary)
    go_on = args.go_on and started_in(spec.storage, spec.name)
    if go_on:  # on the search as it began: refused before any work when this spec changes it
        check_continues_search(spec, args.spec)
    else:
        check_new_sweep(spec, args.spec)
    if args.check:
        from .plan import sweep_plan
        from .ray_session import check_address

        check_address(args.address)
        if go_on:  # what the resume would check before its work: the stores it began in, and no driver at work
            check_continuable(spec)
        print(sweep_plan(preflight(spec, local=not args.address), args.address, continues=go_on))
        return 0
    started = time.time()
    summary = run_sweep(spec, address=args.address, resume=go_on)
    print_summary(spec, summary)
    return print_closing(spec, summary, started, args.address)


def print_finished_already(spec, summary: dict) -> int:
    """A sweep run or resumed again after it finished with no failed trial: its table, and nothing run or written."""
    from .summary import print_summary

    print_summary(spec, summary)
    print(f"\nsweep {spec.name} had finished already: nothing to run; see its runs and studies with "
          f"`{ui_command(spec)}`")
    return 0


def run_resume_command(args) -> int:
    from .summary import print_summary
    from .sweep import finished_already, load_saved_spec, preflight, run_sweep

    spec = preflight(load_saved_spec(args.sweep, args.storage, data_root=args.data_root))
    if (summary := finished_already(spec)) is not None:  # it wrote the studies' counts again, and a new snapshot
        return print_finished_already(spec, summary)
    started = time.time()
    summary = run_sweep(spec, address=args.address, resume=True)
    print_summary(spec, summary)
    return print_closing(spec, summary, started, args.address)


def print_closing(spec, summary: dict, started: float, address: str | None) -> int:
    """A sweep's or resume's last line, with where to look at the runs; returns the exit code it says."""
    from .summary import closing

    line, code = closing(spec, summary, time.time() - started, address)
    print(f"\n{line}; see its runs (MLflow UI) and studies (optuna-dashboard) with `{ui_command(spec)}`, which "
          "prints the addresses to open")
    return code


def run_demo_command(args) -> int:
    from dashboards.report import comparison_markdown  # the CLI may reach up to dashboards (see build_parser)

    from .sweep import check_name_in_store, check_name_in_studies, preflight, run_sweep, saved_spec

    from .confirm import confirm_sweep

    spec = preflight(spec_from_args(args))
    if saved_spec(spec.storage, spec.name) is None:  # a first demo here: its name must be free in the stores
        check_name_in_store(spec, None)
        check_name_in_studies(spec, None)
    started = time.time()
    summary = run_sweep(spec, address=args.address, resume=True)  # a second demo finishes (or just shows) the first
    print(file=sys.stderr)
    confirmed = confirm_sweep(spec, DEMO_SEEDS, args.address)  # says what it re-trains, if anything (a second demo)
    print()
    print(comparison_markdown(spec.tracking_uri, spec.name))
    line, code = demo_closing(spec, summary, *confirmed, time.time() - started, address=args.address)
    print(f"\n{line}")
    return code


def demo_closing(spec, summary: dict, failed: list, unfinished: list, elapsed_s: float,
                 address: str | None = None) -> tuple[str, int]:
    """The demo's last lines: "done" and where to look only when the sweep and its confirm runs both are; else the
    first one's closing line, since the comparison above then stands on less than it shows. ``address``: the
    driver's --address, which a hint to go on names."""
    from .confirm import confirm_closing
    from .summary import closing, complete

    if not complete(spec, summary):
        return closing(spec, summary, elapsed_s, address)[0], 1
    if failed or unfinished:
        return confirm_closing(spec, DEMO_SEEDS, failed, unfinished, address=address)[0], 1
    return (f"demo done in {elapsed_s:.0f} s. Compare the runs in the MLflow UI:\n"
            f"    {ui_command(spec)}    # prints the addresses of its runs table and of optuna-dashboard\n"
            f"Tune results and checkpoints: {spec.storage}/{spec.name}\n"
            f"Full report (CSV, Markdown, HTML with curves): {attzoom_executable()} report {spec.name} "
            f"--tracking-uri {hide_password(spec.tracking_uri)}"), 0


def run_status_command(args) -> int:
    from .layout import EXPERIMENT_PREFIX, sweep_of
    from .spec import check_store_exists
    from .status import print_sweep_status, sweep_status
    from .tracking import named_sweep, open_store

    if args.job and not (args.address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")):
        # Ray would look for a local cluster instead, for ~40 s, then a traceback
        raise SpecError("--job needs --address, the Jobs API of the cluster that runs it (e.g. --address "
                        "http://127.0.0.1:8265)")
    job = {"job": {"id": args.job, "state": str(job_status(jobs_client(args.address), args.job, args.address))}} \
        if args.job else {}
    if job and not args.json:
        print(f"job {args.job}: {job['job']['state']}")
    try:
        check_store_exists(args.tracking_uri)
    except SpecError:
        if not job:
            raise
        experiments, client = [], None  # the job's state is all there is to show from this machine
    else:
        client = open_store(args.tracking_uri)  # a sweep starting beside it may be creating the store
        experiments = [e for e in client.search_experiments() if sweep_of(e.name) is not None]
    if args.sweep and client:
        experiments = named_sweep(client, args.sweep, args.tracking_uri, experiments)
    statuses = [sweep_status(client, experiment, args.tracking_uri) for experiment in experiments]
    if args.json:
        print(json.dumps({"sweeps": statuses, **job}, indent=2))
        return 0
    if client and not experiments:  # it printed nothing, as if the command had not run
        print(f"no sweep in {hide_password(args.tracking_uri)} yet (a sweep's experiments are named "
              f"{EXPERIMENT_PREFIX}NAME); pass --tracking-uri to read another store")
    for status in statuses:
        print_sweep_status(status)
    return 0


def jobs_client(address: str):
    """A Ray Jobs client. The token, when the cluster uses one, comes from RAY_AUTH_TOKEN, the file named
    by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token - never from the command line, and it is never printed."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from .logs import quiet_ray

    quiet_ray()
    token = auth_token()
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    except AuthenticationError:
        raise SpecError(f"the Ray cluster at {address} refused the request: it needs its token; set RAY_AUTH_TOKEN "
                        "or RAY_AUTH_TOKEN_PATH (the token file of the head node)") from None
    except ConnectionError as e:
        raise SpecError(f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}); start the cluster or "
                        "fix --address (e.g. http://127.0.0.1:8265)") from None


def auth_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return path.read_text().strip() if path.is_file() else None


def run_submit_command(args) -> int:
    """Ship the project folder as the job's working dir; local paths go as absolute overrides."""
    import shlex

    from .layout import SWEEP

    root = Path(__file__).resolve().parent.parent
    name, command, note = resume_job(args) if args.resume else sweep_job(args, root)
    runtime_env = {"working_dir": str(root), "excludes": [".venv/", ".git/", "ray_results/", "mlartifacts/",
                                                          "mlruns/", "data/", "runs/", "*.db", "*.pt"],
                   # `ray job stop` sends SIGTERM, which the sweep takes as Ctrl-C (trials stopped, snapshot saved,
                   # runs KILLED), then SIGKILL after this many seconds: Ray's 3 s cut that short
                   "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "60")}}
    job_id = submit_when_ready(jobs_client(args.address), entrypoint=shlex.join(command), runtime_env=runtime_env,
                               metadata={SWEEP: name})
    print(job_id)
    print(f"follow it with `attzoom logs {job_id} --address {args.address}`" + (f" ({note})" if note else ""),
          file=sys.stderr)
    return 0


SPEC_ONLY = ("tracking_uri", "optuna_storage", "trials", "epochs", "max_concurrent", "local_gpus", "scheduler")


def resume_job(args) -> tuple[str, list[str], str]:
    """`attzoom resume` as the job's command: the sweep's storage as the cluster sees it (nothing here can check
    it, so it must be absolute or a URI); the saved spec says the rest. No note."""
    if args.spec is not None or (given := [k for k in SPEC_ONLY if getattr(args, k) is not None]):
        what = f"a spec ({args.spec})" if args.spec is not None else f"--{given[0].replace('_', '-')}"
        raise SpecError(f"--resume continues a sweep as it began, from its saved spec: leave out {what}")
    if not args.storage or not (args.storage.startswith("/") or "://" in args.storage):
        raise SpecError(f"--resume needs --storage: the sweep's storage as an absolute path or URI on the cluster "
                        f"(e.g. /mnt/shared/ray_results), got {args.storage!r}")
    if args.data_root and not args.data_root.startswith("/"):  # the job would read it in its working dir's copy
        raise SpecError(f"--data-root with --resume is the data sets' absolute path on the cluster (e.g. /data), "
                        f"got {args.data_root!r}")
    command = ["python", "-m", "tune_jobs.cli", "resume", args.resume, "--storage", args.storage, "--address", "auto"]
    return args.resume, command + (["--data-root", args.data_root] if args.data_root else []), ""


def sweep_job(args, root: Path) -> tuple[str, list[str], str]:
    """`attzoom sweep` as the job's command, the spec's local paths made absolute (and a note saying so)."""
    from .sweep import absolute

    if args.spec is None:
        raise SpecError("give the spec to run, or --resume SWEEP to continue a stopped sweep")
    spec_path = args.spec.resolve()
    if not spec_path.is_relative_to(root):
        raise SpecError(f"{args.spec}: a submitted spec must live inside {root}, which is shipped as the job's "
                        "working dir; copy it into tune_jobs/specs/")
    given = spec_from_args(args)
    spec = absolute(given)
    refuse_passwords(spec)
    moved = [f"{key} {getattr(spec, key)}" for key in ("storage", "tracking_uri", "data_root")
             if getattr(spec, key) != getattr(given, key)]  # not relative to the job's working dir, a temporary copy
    note = (f"relative paths were made absolute on this machine: {', '.join(moved)}; on a cluster that does not "
            "share this file system, give them as the cluster sees them") if moved else ""
    options = {"storage": spec.storage, "tracking-uri": spec.tracking_uri, "data-root": spec.data_root,
               "trials": spec.trials, "epochs": spec.epochs, "max-concurrent": spec.max_concurrent}
    if spec.optuna_storage:
        options["optuna-storage"] = spec.optuna_storage
    if args.scheduler:
        options["scheduler"] = args.scheduler
    command = ["python", "-m", "tune_jobs.cli", "sweep", str(spec_path.relative_to(root)), "--address", "auto"]
    return spec.name, command + [part for key, value in options.items() for part in (f"--{key}", str(value))], note


def refuse_passwords(spec) -> None:
    """A URL's password would ride on the job's command line, which anyone who can list the cluster's jobs reads."""
    for key, url in (("tracking_uri", spec.tracking_uri), ("optuna_storage", spec.optuna_storage)):
        if has_password(url):
            raise SpecError(f"{key} {hide_password(url)} holds a password, which would travel on the job's command "
                            "line: leave it out and give it to the cluster as PGPASSWORD or in ~/.pgpass (a tracking "
                            "server's as MLFLOW_TRACKING_PASSWORD)")


def submit_when_ready(client, wait_s: float = 120, **job) -> str:
    """Submit; a head that has just started answers 'no available agent, try again later' for a while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def run_logs_command(args) -> int:
    import asyncio

    client = jobs_client(args.address)
    job_status(client, args.job_id, args.address)  # a job id the cluster does not know: one line, not aiohttp's 404

    async def follow():
        async for lines in client.tail_job_logs(args.job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    print(f"job {args.job_id}: {client.get_job_status(args.job_id)}", file=sys.stderr)
    return 0


def job_status(client, job_id: str, address: str | None):
    """The job's state; SpecError naming the job id and how to list the cluster's jobs when it has no such job
    (Ray raised a RuntimeError, and tailing its logs an aiohttp handshake error: tracebacks)."""
    try:
        return client.get_job_info(job_id).status
    except RuntimeError as e:
        if "404" not in str(e) and "does not exist" not in str(e):
            raise
    where = address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    import shlex

    raise SpecError(f"the Ray cluster at {where} has no job {job_id!r}; list its jobs with "
                    f"`{executable('ray')} job list --address {shlex.quote(str(where))}`")


def run_ui_command(args) -> int:
    from .ui import run_ui

    return run_ui(args.tracking_uri, args.sweep, args.port, args.optuna_storage, args.optuna_port)


def attzoom_executable() -> str:
    """The `attzoom` of this environment (executable)."""
    return executable("attzoom")


def executable(name: str) -> str:
    """A command of this environment, as a path that works from any folder (the demo runs in the project's, and a
    user copies its hints into a shell that may be elsewhere), quoted for a shell; the plain name when it is not
    installed, or in a Ray job's driver, whose hints are read (`attzoom logs`) on another machine."""
    import shlex

    installed = Path(sys.executable).parent / name
    return shlex.quote(str(installed)) if installed.is_file() and not in_ray_job() else name


def in_ray_job() -> bool:
    """Whether this is a submitted job's driver (Ray sets the variable for it), which runs on the cluster's head."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def ui_command(spec) -> str:
    """The `attzoom ui` line that shows a sweep: its store, and its Optuna storage when not the default one."""
    from .spec import optuna_storage_url
    from .ui import default_optuna_storage

    command = f"{attzoom_executable()} ui {spec.name} --tracking-uri {shlex.quote(hide_password(spec.tracking_uri))}"
    storage = optuna_storage_url(spec)
    if storage and storage != default_optuna_storage(spec.tracking_uri):  # a server URL may hold a password
        command += f" --optuna-storage {shlex.quote(storage) if storage.startswith('sqlite:') else 'URL'}"
    return command


if __name__ == "__main__":
    sys.exit(main())

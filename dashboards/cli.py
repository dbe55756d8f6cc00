"""``attzoom report SWEEP [--tracking-uri URI] [--out DIR] [--data-root DIR]`` and
``attzoom explain RUN_ID [RUN_ID2] [--images N] [--out DIR] [--tracking-uri URI] [--data-root DIR]``.

Registered by tune_jobs/cli.py through a lazy import; this module itself never imports
``tune_jobs`` or Ray, so the report runs on a laptop with only the tracking URI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from attzoom.cli import EXIT_USAGE

from .errors import ReportError


def add_report_command(sub) -> None:
    report = sub.add_parser("report", help="comparison report of a sweep (CSV, Markdown, self-contained HTML)")
    report.add_argument("sweep", help="the sweep's name (its MLflow experiment is attzoom-<name>)")
    report.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    report.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<sweep>)")
    report.add_argument("--data-root", default=None,
                        help="where the test splits are, when not where the trials ran (to score best checkpoints)")
    report.set_defaults(run=run_report_command)


def add_explain_command(sub) -> None:
    explain = sub.add_parser("explain", help="Grad-CAM, AttZoom attention and zoom view of a trained run (PNG grid)")
    explain.add_argument("run_ids", nargs="+", metavar="RUN_ID",
                         help="a trial run's id (or the Tune trial id in its name); a second one is shown side by "
                              "side (e.g. baseline vs attzoom)")
    explain.add_argument("--images", type=int, default=8, help="validation images, one row each (default 8)")
    explain.add_argument("--out", type=Path, default=None, help="output folder (default: reports/explain/<run_id>)")
    explain.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    explain.add_argument("--data-root", default=None, help="where the data set is, when not where the run trained")
    explain.set_defaults(run=run_explain_command)


def run_explain_command(args) -> int:
    from .explain import resolve_run, write_explanations

    try:
        if len(args.run_ids) > 2 or args.images < 1:
            raise ReportError("give one run id, or two to compare side by side, and --images of at least 1")
        check_out(args.out, Path("reports") / "explain" / args.run_ids[0])
        check_store(args.tracking_uri)
        run_ids = [resolve_run(args.tracking_uri, ref) for ref in args.run_ids]
        if len(set(run_ids)) < len(run_ids):
            raise ReportError(f"the same run twice ({run_ids[0]}): give two different run ids to compare, or one "
                              "to explain alone")
        check_data_root(args.data_root)
        path = write_explanations(args.tracking_uri, run_ids, args.images, args.out, args.data_root)
    except ReportError as e:
        print(f"attzoom explain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path} and logged it to the run(s) under explain/")
    return 0


def run_report_command(args) -> int:
    from .report import write_report

    try:
        check_out(args.out, Path("reports") / args.sweep)
        check_store(args.tracking_uri)
        check_data_root(args.data_root)
        text, paths = write_report(args.tracking_uri, args.sweep, args.out, args.data_root)
    except ReportError as e:
        print(f"attzoom report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(text)
    print(f"wrote {paths['csv']}, {paths['md']} and {paths['html']} (open it in a browser; it needs no network)")
    return 0


def check_out(out: Path | None, default: Path) -> None:
    """The output folder can be made and written, checked before any work and leaving nothing behind (a probe
    folder is made and removed): a file in its place or a folder the user cannot write would otherwise end the
    finished work in a traceback."""
    import os
    import tempfile

    folder, where = (out, "--out") if out else (default, "the default output folder")
    for existing in (folder, *folder.parents):
        if os.path.exists(existing):  # False, never an error, below a folder the user cannot search
            break
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ReportError(f"{where} {folder}: {existing} is a broken symbolic link; pass --out with a folder")
    if not existing.is_dir():
        raise ReportError(f"{where} {folder}: {existing} is not a folder; pass --out with a folder")
    try:  # make a folder there and remove it: permission bits say nothing of /proc, a read-only mount, or root
        os.rmdir(tempfile.mkdtemp(prefix=".attzoom-probe-", dir=existing))
    except OSError as e:
        raise ReportError(f"{where} {folder}: cannot make a folder in {existing.resolve()} ({e.strerror}); pass "
                          "--out with a folder you can write") from None


def check_data_root(data_root: str | None) -> None:
    """A --data-root typed is a folder that exists: else every best trial got a long note of its own, and the
    embedded data set would have been generated there, making the folder."""
    if data_root is None:
        return
    path = Path(data_root).expanduser()
    if not path.is_dir():
        why = "is not a folder" if path.exists() else "does not exist"
        raise ReportError(f"--data-root {path} {why}; pass the folder that holds the data sets (cifar-100-python/, "
                          "tiny-imagenet-200/), or leave it out to score them where the trials ran")


def check_store(tracking_uri: str) -> None:
    """A missing SQLite file is a typo, not a new store: MLflow would silently create an empty one."""
    from tune_jobs.spec import SpecError, check_store_exists

    try:
        check_store_exists(tracking_uri)
    except SpecError as e:
        raise ReportError(str(e)) from None

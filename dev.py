#!/usr/bin/env python3
"""Project set-up and entry points; needs only Python 3.11.

    python3 dev.py demo          set up, then run the embedded demo
    python3 dev.py test [ARGS]   set up, then run the test suite (ARGS go to pytest)
    python3 dev.py setup         only create or update the virtual environment

The virtual environment lives in .venv and is (re)installed only when pyproject.toml
changed since the last install, so repeated runs start at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".attzoom-installed"


def setup() -> Path:
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"dev.py: error: Python 3.11 is required, this is {sys.version.split()[0]}; run it with python3.11")
    if not PYTHON.exists():
        print("creating .venv ...", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        print("installing dependencies into .venv (first run: a few minutes) ...", file=sys.stderr)
        subprocess.run([str(PYTHON), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                        "-e", f"{ROOT}[test]"], check=True)
        STAMP.write_text(wanted)
    return PYTHON


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("help", [])
    if command not in ("demo", "test", "setup"):
        print(__doc__, file=sys.stderr)
        return 0 if command in ("help", "-h", "--help") else 2
    python = setup()
    if command == "setup":
        return 0
    if command == "demo":
        return subprocess.call([str(VENV / "bin" / "attzoom"), "demo", *args], cwd=ROOT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.call([str(python), "-m", "pytest", *args], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

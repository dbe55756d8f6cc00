"""The MLflow store under concurrency: processes that open one new SQLite store at once."""

import subprocess
import sys

OPEN = """
import sys
from tune_jobs.tracking import open_store
open_store(sys.argv[1]).search_experiments()
"""


def test_processes_creating_one_new_sqlite_store_at_once_all_open_it(tmp_path):
    # Unserialised, all but one fail ("table ... already exists") and leave the file unmigratable.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    openers = [subprocess.Popen([sys.executable, "-c", OPEN, uri], stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in openers]
    assert [p.returncode for p in openers] == [0] * 4, "\n".join(e[-800:] for e in errors)

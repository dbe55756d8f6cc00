"""The sweep service: specs to Ray Tune + Optuna, every run in MLflow."""

import os

# MLflow 3 sends usage telemetry from every process that opens a store and, at exit, waits
# up to a second for it; trials run on clusters without egress. Opt in with "false".
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

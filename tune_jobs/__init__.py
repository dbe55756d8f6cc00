"""The sweep service: specs to Ray Tune + Optuna, every run in MLflow (the layout: tune_jobs/layout.py)."""

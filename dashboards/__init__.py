"""Reports on sweeps, read from MLflow alone: ``attzoom report`` (tables, figures, one HTML page).

Layered above ``tune_jobs`` and ``attzoom``; never imports Ray (tests/test_dashboards.py checks),
so a report runs on a laptop that has only the tracking URI.
"""

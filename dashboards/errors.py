"""The one error type of the reports, importable without MLflow so the CLI starts fast."""


class ReportError(Exception):
    """A problem the user can fix (unknown sweep, missing store); the message says how."""

"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URIs.

No script, no web font, no external link: the page opens offline, from a mail attachment or
an artifact store, and shows the same thing everywhere.
"""

from __future__ import annotations

import base64
import re
from html import escape

from tune_jobs.layout import experiment_name
from tune_jobs.spec import hide_password

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: .5em 1em; }
.note { color: #555; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figcaption { font-size: .85em; color: #555; }
img { max-width: 100%; }
.scroll { overflow-x: auto; }
"""


def table(rows: list[dict], id: str | None = None) -> str:
    if not rows:
        return "<p class='note'>(none)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    attr = f" id='{escape(id)}'" if id else ""
    return f"<div class='scroll'><table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def markdown_code(text: str) -> str:
    """Escaped text with the Markdown the report's sentences use: `code` and **bold**."""
    html = escape(text)
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", html)


def image(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def figures(report, section: str) -> str:
    """A section's figures, or the section's own reason for having none."""
    from .report import no_figure

    shown = [image(caption, png) for kind, caption, png in report.images if kind == section and png]
    return "".join(shown) or f"<p class='note'>({escape(no_figure(report, section))})</p>"


def page(report) -> str:
    sweep = report.sweep
    parts = [f"<h1>AttZoom sweep report: {escape(sweep.name)}</h1>",
             f"<p class='note'>Tracking store <code>{escape(hide_password(sweep.tracking_uri))}</code>, experiment "
             f"<code>{escape(experiment_name(sweep.name))}</code>, generated {escape(report.generated)}.</p>"]
    if report.unfinished:  # first: every number below may still change
        parts += [f"<div class='warn' id='unfinished'><strong>Unfinished studies ({len(report.unfinished)}):"
                  "</strong> partial results below.", table(report.unfinished), "</div>"]
    if report.verdict:
        from .report import verdict_intro

        parts += ["<h2>Verdict: does AttZoom help?</h2>", f"<p>{markdown_code(verdict_intro(report))}</p>",
                  table(report.verdict, id="verdict")]
    parts += [f"<div class='warn gate'><strong>Warning:</strong> {escape(w)}</div>" for w in report.warnings]
    from .report import GATES, best_of_n_note

    parts += ["<h2>Best of N single-seed trials</h2>", f"<p class='note'>{escape(best_of_n_note(report))}</p>"]
    for dataset, rows in report.tables.items():
        parts += [f"<h3>{escape(dataset)}</h3>", table(rows, id=f"comparison-{dataset}")]
    if report.gates:
        parts += ["<h2>AttZoom's gate</h2>", f"<p class='note'>{escape(GATES)}</p>", table(report.gates, id="gates")]
    parts += ["<h2>Best trial per study</h2>", table(report.best_rows, id="best-trials"),
              "<h2>Learning curves of the best trials</h2>", figures(report, "curves"),
              "<h2>Optimisation history</h2>", figures(report, "history"),
              "<h2>Hyperparameter importance</h2>", table(report.importance), figures(report, "importance"),
              "<h2>Chosen configs</h2>", table(report.configs, id="configs"),
              "<h2>Compute spent</h2>",
              "<p class='note'>Hours are summed epoch times as logged (training and validation); GPU hours weigh them "
              "by each trial's GPU share (its memory fraction or GPU ids), unknown where a run lacks both.</p>",
              table(report.compute, id="compute")]
    if any(kind == "explain" for kind, _, _ in report.images):
        parts += ["<h2>Where the networks look</h2>", "<p class='note'>Grids written by <code>attzoom explain</code> "
                  "for best trials: Grad-CAM, AttZoom's f(A) and the attention-guided zoom view.</p>",
                  figures(report, "explain")]
    if report.confirm:
        from .verdict import RULE

        parts += ["<h2>Seed confirmation</h2>", f"<p class='note'>{markdown_code(RULE)}</p>",
                  table(report.confirm, id="confirm")]
    if report.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{markdown_code(n)}</li>" for n in report.notes] + ["</ul>"]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>AttZoom report: {escape(sweep.name)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")

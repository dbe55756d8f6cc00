"""The report's figures, drawn with matplotlib and returned as PNG bytes ready to embed.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so no GUI backend
and no global figure state is involved: safe in a headless process and in tests.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def learning_curves(title: str, curves: dict[str, dict[str, dict[int, float]]],
                    others: dict[str, list[dict[int, float]]] | None = None) -> bytes:
    """Validation top-1 and training loss per epoch of each variant's best trial, side by side.

    ``others``: every other trial's validation top-1 per variant, drawn faint in the variant's
    colour, so trials that stalled or diverged are seen beside the best one.
    """
    fig = Figure(figsize=(9, 3.4), layout="constrained")  # the title once above both: two long titles overlapped
    fig.suptitle(title)
    top1, loss = fig.subplots(1, 2)
    for variant, metrics in curves.items():
        colour = None
        for ax, key in ((top1, "val_top1"), (loss, "train_loss")):
            points = sorted(metrics.get(key, {}).items())
            if points:
                colour = ax.plot(*zip(*points), marker=".", linewidth=2, label=f"{variant} (best trial)",
                                 color=colour)[0].get_color()
        for history in (others or {}).get(variant, []):
            points = sorted(history.items())
            if points:
                top1.plot(*zip(*points), color=colour, alpha=0.25, linewidth=0.8)
    for ax in (top1, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top1.set(xlabel="epoch", ylabel="validation top-1 (%)", title="validation top-1")
    loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for ax in (top1, loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run that logged no training loss has nothing to label
            ax.legend(fontsize=8)
    return png(fig)


def optimisation_history(title: str, histories: dict[str, list[tuple[int, float, float]]]) -> bytes:
    """Each trial's best validation top-1 (dots) and the best so far (steps) against trial number."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for variant, rows in histories.items():
        if not rows:
            continue
        numbers, values, best = zip(*rows)
        line = ax.step(numbers, best, where="post", label=f"{variant} best so far")[0]
        ax.scatter(numbers, values, s=12, alpha=0.6, color=line.get_color())
    ax.set(xlabel="trial (by start time)", ylabel="validation top-1 (%)", title=f"{title}: optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def importance_bars(title: str, scores: dict[str, float]) -> bytes:
    """Horizontal bars of fANOVA importance, the most important hyperparameter on top."""
    names = sorted(scores, key=scores.get)
    fig = Figure(figsize=(4.5, 0.45 * len(names) + 1.0))
    ax = fig.subplots()
    ax.barh(names, [scores[n] for n in names], color="#4c72b0")
    ax.set(xlabel="importance (fANOVA)", title=title, xlim=(0, 1))
    ax.title.set_fontsize(9)
    return png(fig)

"""Evaluation plots drawn with matplotlib: the confusion matrix and per-class accuracy.

Both return a `matplotlib.figure.Figure` built without pyplot (no global state, no GUI backend: a
bare Figure renders with Agg), so tasks running in threads or on headless nodes can draw them.
`png_bytes` renders one, `image` makes it a PIL image for `tracking.log_image`; `report` embeds them.
Class names come from users: `$` is escaped so matplotlib draws them as plain text, never mathtext.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_ANNOTATED = 30  # classes up to which the confusion matrix prints its counts and names every class
MAX_NAME = 28  # characters of a class name shown on an axis


def _plain(text: str) -> str:
    """`text` drawn literally: a pair of `$` would otherwise switch matplotlib to mathtext."""
    return str(text).replace("$", r"\$")


def _short(name: str) -> str:
    return _plain(name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def confusion_matrix(labels: Sequence[str], counts: Sequence[Sequence[int]], title: str = "Confusion matrix") -> Figure:
    """Rows = true class, columns = predicted; each cell is shaded by its share of the row (recall), and
    with up to MAX_ANNOTATED classes shows its count, so the diagonal reads as per-class accuracy."""
    import numpy as np

    n = len(labels)
    matrix = np.asarray(counts, dtype=float).reshape(n, n)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(12.0, max(4.5, 2.5 + 0.38 * n))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's test images")
    if n <= MAX_ANNOTATED:
        names = [_short(lab) for lab in labels]
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    index = "" if n <= MAX_ANNOTATED else " (index in classes.json)"
    ax.set_xlabel(f"predicted class{index}")
    ax.set_ylabel(f"true class{index}")
    ax.set_title(_plain(title))
    return fig


def per_class_accuracy(labels: Sequence[str], accuracies: Mapping[str, Sequence[float | None]],
                       title: str = "Per-class test accuracy") -> Figure:
    """Horizontal bars: one row per class, one bar per setting (`accuracies` maps a setting's label to
    its per-class accuracies in `labels` order; None = no test images), as percentages."""
    import numpy as np

    settings = list(accuracies)
    n, k = len(labels), max(1, len(settings))
    fig = _figure(8.0, min(40.0, max(3.0, 1.2 + n * (0.18 + 0.16 * k))))
    ax = fig.add_subplot()
    rows = np.arange(n)
    height = 0.8 / k
    for s, setting in enumerate(settings):
        values = [np.nan if v is None else 100 * v for v in accuracies[setting]]
        ax.barh(rows + (s - (k - 1) / 2) * height, values, height=height, label=_plain(setting))
    ax.set_yticks(rows, [_short(lab) for lab in labels])
    ax.invert_yaxis()  # first class on top, like the tables
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("class")
    ax.set_title(_plain(title))
    ax.grid(axis="x", alpha=0.3)
    if len(settings) > 1:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def image(fig: Figure):
    """The figure as a PIL image (e.g. for `tracking.log_image`)."""
    from PIL import Image

    return Image.open(io.BytesIO(png_bytes(fig)))

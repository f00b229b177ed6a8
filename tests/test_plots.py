"""The matplotlib evaluation plots: labelled, titled, user text drawn literally, PNGs that decode."""

from __future__ import annotations

import io

from PIL import Image

from datadream import plots

LABELS = ["circle", "star $5$", "x" * 40]
COUNTS = [[8, 2, 0], [0, 10, 0], [5, 0, 5]]



def test_confusion_matrix_is_labelled_and_annotated():
    fig = plots.confusion_matrix(LABELS, COUNTS, "Confusion matrix: synthetic")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted class", "true class",
                                                                  "Confusion matrix: synthetic")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["circle", r"star \$5\$", "x" * 27 + "…"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["8", "2", "10", "5", "5"])  # zeros left blank
    shares = ax.images[0].get_array()
    assert shares[0][0] == 0.8 and shares[2][2] == 0.5  # shaded by the row's share
    png = Image.open(io.BytesIO(plots.png_bytes(fig)))
    assert png.format == "PNG" and png.width >= 500 and png.height >= 400

    big = plots.confusion_matrix([f"c{i}" for i in range(100)], [[1] * 100 for _ in range(100)])
    assert not big.axes[0].texts and big.axes[0].get_xlabel() == "predicted class (index in classes.json)"
    assert max(Image.open(io.BytesIO(plots.png_bytes(big))).size) <= 1400


def test_per_class_accuracy_bars_per_setting():
    fig = plots.per_class_accuracy(LABELS, {"synthetic": [0.8, 1.0, None], "real": [0.5, 0.25, 0.0]})
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_title()) == ("test accuracy (%)", "Per-class test accuracy")
    widths = [round(p.get_width(), 6) for p in ax.patches]
    assert widths[:2] == [80.0, 100.0] and widths[3:] == [50.0, 25.0, 0.0]  # percentages, per setting
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["synthetic", "real"]
    assert Image.open(io.BytesIO(plots.png_bytes(fig))).format == "PNG"

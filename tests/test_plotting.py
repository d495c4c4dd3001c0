"""Plots from metrics.jsonl: a valid PNG of the expected size, one panel per metric present, runs overlaid."""

import json

import pytest

from trl_selfplay.plotting import available_panels, plot_run, plot_runs


def _lines(offset: float):
    return [
        {"iteration": -1, "train": {}, "eval": {"accuracy": 0.3 + offset, "length": 4.0, "self_bleu": 0.6}},
        {
            "iteration": 0,
            "train": {"rewards/margins": 2.0, "iris/alpha": 2.0},
            "eval": {"accuracy": 0.4 + offset, "win_rate": 0.6, "length": 4.1, "self_bleu": 0.7},
        },
        {
            "iteration": 1,
            "train": {"rewards/margins": 3.0, "iris/alpha": 1.2},
            "eval": {"accuracy": 0.5 + offset, "win_rate": 0.55, "length": 4.0, "self_bleu": float("nan")},
        },
    ]


def _read_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_panels_are_the_metrics_present():
    keys = [key for key, _ in available_panels({"a": _lines(0.0)})]
    assert keys == ["accuracy", "win_rate", "length", "self_bleu", "rewards/margins", "iris/alpha"]


def test_plot_run_writes_png_next_to_metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for line in _lines(0.0):
            f.write(json.dumps({**line, "method": "iris"}) + "\n")
    path = plot_run(tmp_path)
    assert path == tmp_path / "metrics.png"
    image = _read_png(path)
    # 6 panels in 3 columns of 4x3 inches at 100 dpi: 2 rows -> 600 x 1200 pixels, RGBA.
    assert image.shape == (600, 1200, 4)
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_overlay_of_several_runs(tmp_path):
    path = plot_runs(
        {"spin": _lines(0.0), "sft": _lines(0.1)}, tmp_path / "cmp.png", panels=["accuracy", "win_rate"], dpi=50
    )
    image = _read_png(path)
    assert image.shape == (150, 400, 4)  # 1 row x 2 columns of 4x3 inches at 50 dpi


def test_nothing_to_plot_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Nothing to plot"):
        plot_runs({"a": [{"iteration": 0, "train": {}, "eval": {"unknown": 1.0}}]}, tmp_path / "x.png")

"""The PNG pictures: with matplotlib a file, without it a note (the loss curve) or a clear
ImportError (the attention maps)."""

import sys

import numpy as np
import pytest

from microattn.demo import plots


def test_loss_plot_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    note = plots.save_loss_plot([3.0, 2.0, 1.0], tmp_path / "loss.png")
    assert "matplotlib" in note and not (tmp_path / "loss.png").exists()


def test_loss_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert plots.save_loss_plot([3.0, 2.0, 1.0], tmp_path / "loss.png") is None
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"



def test_attention_maps_without_matplotlib_is_an_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="microattn\\[plot\\]"):
        plots.save_attention_maps([np.ones((1, 1, 2, 2))], ["a", "b"], tmp_path / "map.png", title="t")


def test_attention_maps_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    maps = [np.full((1, 2, 3, 3), 1 / 3)] * 2
    plots.save_attention_maps(maps, ["a", "b", "c"], tmp_path / "map.png", title="t", drops=np.zeros((2, 2)))
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"

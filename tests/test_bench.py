"""The benchmark's plot (the timing itself needs a GPU and runs on the device)."""

from __future__ import annotations

import sys

import pytest

from comfy_sage import bench

RESULTS = [
    {"shape": [1, 24, n, d], "causal": causal, "what": "", "tops": {"a": 100.0 + n / 100, "b": None}}
    for n, d, causal in ((4096, 64, False), (4608, 128, False), (16384, 128, False), (16384, 128, True))
]


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = tmp_path / "bench.png"
    bench.plot(RESULTS, str(path), "title")
    assert "needs matplotlib" in capsys.readouterr().out
    assert not path.exists()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib)")
    path = tmp_path / "bench.png"
    bench.plot(RESULTS, str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The benchmark's plot (the timing itself needs a GPU and runs on the device)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import comfy_sage
from comfy_sage import bench, dispatch

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


def test_a_peer_is_timed_only_if_it_computes_attention_in_the_bench_layout():
    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def other_layout(q, k, v, causal):  # reads [B, H, N, D] as [B, N, H, D]
        return sdpa(*(t.transpose(1, 2) for t in (q, k, v)), causal).transpose(1, 2)

    def broken(q, k, v, causal):
        raise RuntimeError("no kernel for this GPU")

    assert bench._agrees_with_sdpa(sdpa, device="cpu")
    assert not bench._agrees_with_sdpa(other_layout, device="cpu")
    assert not bench._agrees_with_sdpa(broken, device="cpu")


@pytest.mark.parametrize(("cc", "mma_sync"), [((9, 0), ["int8_fp8", "int8_int8"]), ((8, 9), []), ((8, 0), [])])
def test_hopper_also_times_the_mma_sync_family_of_each_wgmma_mode(monkeypatch, cc, mma_sync):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: cc)
    monkeypatch.setattr(bench, "_peer", lambda module, attr: None)  # no installed peer changes the list
    modes = ["int8_fp8", "int8_int8", "int8_fp16"]
    impls = bench.implementations(modes)
    ours = [f"comfy_sage {m}" for m in modes] + [f"comfy_sage {m} mma.sync" for m in mma_sync]
    assert list(impls) == [*ours, "SDPA cuDNN", "SDPA flash"]

    calls = []
    monkeypatch.setattr(
        comfy_sage, "sageattn", lambda q, k, v, is_causal, mode: calls.append((mode, dispatch._preferred_family))
    )
    for name in ours:
        impls[name](None, None, None, False)
    assert calls == [(m, None) for m in modes] + [(m, "sm80") for m in mma_sync]

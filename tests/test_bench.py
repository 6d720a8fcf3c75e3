"""The benchmark's plot, implementations and timing logic (the timing itself needs a GPU)."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import comfy_sage
from comfy_sage import bench, dispatch
from comfy_sage.modes import Mode

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
        comfy_sage,
        "sageattn",
        lambda q, k, v, attn_mask, is_causal, mode: calls.append((mode, dispatch._preferred_family)),
    )
    for name in ours:
        impls[name](None, None, None, False)
    assert calls == [(m, None) for m in modes] + [(m, "sm80") for m in mma_sync]


class FakeClock:
    """Stands in for CUDA events: `fn` advances a clock, events read it, and every synchronization is logged."""

    def __init__(self):
        self.now, self.log = 0.0, []
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = clock.now

            def synchronize(self):
                clock.log.append("sync")

            def elapsed_time(self, end):
                return end.at - self.at

        self.Event = Event

    def call(self, ms):
        self.now += ms
        self.log.append("call")


@pytest.mark.parametrize("timing", bench.TIMINGS)
def test_time_call_issues_and_synchronizes_as_its_timing_says(monkeypatch, timing):
    clock = FakeClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: clock.log.append("sync"))
    durations = iter([9.0, 9.0, 1.0, 5.0, 2.0])  # two warm-ups, then three timed calls: median 2 ms
    seconds = bench.time_call(lambda: clock.call(next(durations)), (), warmup=2, repeat=3, timing=timing)
    assert seconds == pytest.approx(0.002)
    if timing == "queued":  # issued back to back, synchronized once at the end
        assert clock.log == ["call"] * 5 + ["sync"]
    else:  # each timed call synchronized before the next is issued
        assert clock.log == ["call", "call", "sync"] + ["call", "sync"] * 3 + ["sync"]


def test_unknown_timing_is_a_value_error():
    with pytest.raises(ValueError, match="timing must be one of"):
        bench.time_call(lambda: None, (), warmup=0, repeat=1, timing="fast")
    with pytest.raises(ValueError, match="timing must be one of"):
        bench.run(["int8_fp8"], timing="fast")


def test_step_shapes_name_n_kv_only_where_it_differs():
    for shape in bench.STEP_SHAPES:
        _, _, n, n_kv, _, causal, what = bench.shape_sizes(shape)
        assert len(shape) == (6 if n_kv == n else 7) and not causal and what
    assert bench.shape_sizes((1, 24, 4608, 128, False, "Flux 1024²")) == (1, 24, 4608, 4608, 128, False, "Flux 1024²")


def test_sdpa_backends_are_chosen_around_the_timed_calls_not_in_each(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 9))
    monkeypatch.setattr(bench, "_peer", lambda module, attr: None)
    impls = bench.implementations([])
    flags = {}
    for name, backend_on in (("SDPA cuDNN", torch.backends.cuda.cudnn_sdp_enabled),
                             ("SDPA flash", torch.backends.cuda.flash_sdp_enabled)):  # fmt: skip
        with impls[name].context():
            flags[name] = (backend_on(), torch.backends.cuda.math_sdp_enabled())
    assert flags == {"SDPA cuDNN": (True, False), "SDPA flash": (True, False)}
    # Outside the context a call is plain SDPA (PyTorch's own choice): what a model calling SDPA pays.
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    assert torch.equal(impls["SDPA flash"](q, k, v, False), F.scaled_dot_product_attention(q, k, v))


def test_run_enters_an_implementations_context_once_per_shape(monkeypatch):
    log = []

    @contextlib.contextmanager
    def context():
        log.append("enter")
        yield
        log.append("exit")

    def timed(q, k, v, causal):
        log.append(("call", tuple(q.shape), tuple(k.shape)))

    timed.context = context
    monkeypatch.setattr(bench, "implementations", lambda modes: {"x": timed, "y": lambda *a: log.append("y")})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, dtype=None: real_randn(*size, dtype=dtype))

    def time_call(fn, args, warmup, repeat, timing):
        for _ in range(warmup + repeat):
            fn(*args)
        return 1e-3

    monkeypatch.setattr(bench, "time_call", time_call)
    rows = bench.run([], [(1, 2, 64, 8, False, "cross", 16)], warmup=1, repeat=2)
    call = ("call", (1, 2, 64, 8), (1, 2, 16, 8))
    assert log == ["enter", call, call, call, "exit", "y", "y", "y"]
    assert rows[0]["seq_kv"] == 16 and rows[0]["us"] == {"x": pytest.approx(1000.0), "y": pytest.approx(1000.0)}
    assert rows[0]["tops"]["x"] == pytest.approx(4 * 2 * 64 * 16 * 8 / 1e-3 / 1e12)


def test_run_marks_the_shapes_where_a_mode_ran_pytorch_attention(monkeypatch, capsys):
    """Hopper's `auto` runs PyTorch attention below 4,096 tokens: the table marks those cells and the JSON keeps
    the plan's reason, so that no one reads them as the kernel's speed."""
    asked = []

    def plan(
        mode,
        device,
        head_dim,
        dtype,
        has_mask,
        seq_kv=0,
        *,
        seq_q=0,
        is_causal=False,
        return_lse=False,
        heads_q=0,
        key_mask=False,
    ):
        asked.append((mode, head_dim, dtype, has_mask, seq_q, seq_kv, is_causal))
        reason = "faster there" if mode is Mode.AUTO and seq_q < 100 else None
        return dispatch.Plan(mode, Mode.SDPA if reason else mode, None if reason else "a kernel", reason)

    monkeypatch.setattr(dispatch, "plan", plan)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setattr(bench, "_peer", lambda module, attr: None)
    impls = bench.implementations(["auto", "int8_fp8"])
    monkeypatch.setattr(bench, "implementations", lambda modes: impls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, dtype=None: real_randn(*size, dtype=dtype))
    monkeypatch.setattr(bench, "time_call", lambda fn, args, warmup, repeat, timing: 1e-3)
    rows = bench.run([], [(1, 2, 64, 8, False, "short", 16), (1, 2, 128, 8, True, "long")], warmup=1, repeat=1)
    assert rows[0]["pytorch_attention"] == {"comfy_sage auto": "faster there"}
    assert "pytorch_attention" not in rows[1]
    assert (Mode.AUTO, 8, torch.bfloat16, False, 64, 16, False) in asked
    assert (Mode.INT8_FP8, 8, torch.bfloat16, False, 128, 128, True) in asked
    out = capsys.readouterr().out
    assert "*" in out.splitlines()[2] and "*" not in out.splitlines()[3]
    assert out.rstrip().endswith("* PyTorch attention ran: faster there")


def test_each_row_compares_the_fastest_of_ours_with_the_best_peer():
    row = {"tops": {"comfy_sage auto": 660.0, "comfy_sage int8_fp8": 690.0, "SDPA cuDNN": 600.0, "SDPA flash": None}}
    assert bench._versus_best_peer(row) == "1.15 × SDPA cuDNN"
    assert row["best_peer"] == "SDPA cuDNN"
    assert row["vs_best_peer"] == {"comfy_sage auto": pytest.approx(1.1), "comfy_sage int8_fp8": pytest.approx(1.15)}
    routed = {"tops": {"comfy_sage auto": 590.0, "SDPA cuDNN": 600.0}, "pytorch_attention": {"comfy_sage auto": "why"}}
    assert bench._versus_best_peer(routed) == "0.98* × SDPA cuDNN"
    assert bench._versus_best_peer({"tops": {"comfy_sage auto": 1.0, "SDPA cuDNN": None}}) == ""
    assert bench._versus_best_peer({"tops": {"SDPA cuDNN": 1.0}}) == ""


def test_a_masked_run_times_what_takes_a_key_mask(monkeypatch, capsys):
    """`key_mask_pad`: every call gets the text-padding mask HunyuanVideo passes ([1, 1, 1, N_kv], -finfo.max on
    the last keys, the first key always kept); the peers are PyTorch's attention with the mask; causal shapes,
    which a mask cannot join, are left out."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 9))
    monkeypatch.setattr(bench, "_peer", lambda module, attr: lambda *a, **kw: None)  # every peer "installed"
    impls = bench.implementations(["auto"], masked=True)
    assert list(impls) == ["comfy_sage auto", "SDPA", "SDPA cuDNN"]
    seen = []

    def timed(q, k, v, causal, mask=None):
        seen.append((tuple(q.shape), causal, mask))

    monkeypatch.setattr(bench, "implementations", lambda modes, masked=False: {"x": timed} if masked else {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    real_randn, real_zeros = torch.randn, torch.zeros
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, dtype=None: real_randn(*size, dtype=dtype))
    monkeypatch.setattr(torch, "zeros", lambda *size, device=None, dtype=None: real_zeros(*size, dtype=dtype))
    monkeypatch.setattr(bench, "time_call", lambda fn, args, warmup, repeat, timing: fn(*args) or 1e-3)
    shapes = [(1, 2, 64, 8, False, "text", 300), (1, 2, 64, 8, True, "causal"), (1, 2, 64, 8, False, "short", 2)]
    rows = bench.run([], shapes, warmup=0, repeat=1, key_mask_pad=200)
    assert [r["what"] for r in rows] == ["text", "short"]
    (_, _, mask), (_, _, short) = seen
    assert mask.shape == (1, 1, 1, 300) and (mask[..., :100] == 0).all()
    assert (mask[..., 100:] == -torch.finfo(torch.bfloat16).max).all()
    assert short[..., 0] == 0 and short[..., 1] < 0  # the first key stays
    assert "causal, left out of a masked run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="key_mask_pad"):
        bench.run([], shapes, key_mask_pad=-1)

"""The public API: exports, modes, return values, logging each fallback reason once, a clean import."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_sage
from comfy_sage import Mode, _log, api, capability, dispatch, fallback, ops, sageattn
from comfy_sage._inputs import Problem
from comfy_sage.capability import KernelStatus
from comfy_sage.testing import make_qkv
from comfy_sage.tiling import SM80

MODE_STRINGS = ["auto", "int8_fp8", "int4_fp8", "int8_fp16", "int4_fp16", "int8_int8", "sdpa"]


def small(gen, **kwargs):
    return make_qkv(1, 2, 24, 64, generator=gen, **kwargs)


def test_exports():
    assert comfy_sage.sageattn is sageattn
    assert comfy_sage.Mode is Mode
    assert set(comfy_sage.__all__) == {"Mode", "__version__", "sageattn"}
    assert isinstance(comfy_sage.__version__, str) and comfy_sage.__version__


def test_mode_values():
    assert [m.value for m in Mode] == MODE_STRINGS
    assert str(Mode.INT8_FP8) == "int8_fp8"


@pytest.mark.parametrize("text", MODE_STRINGS)
def test_mode_parse(text):
    mode = Mode.parse(text)
    assert mode.value == text
    assert Mode.parse(text.upper()) is mode
    assert Mode.parse(f"  {text.title()} ") is mode
    assert Mode.parse(mode) is mode


@pytest.mark.parametrize("mode", [*MODE_STRINGS, *Mode, "INT8_FP8", "Sdpa", "Auto"])
def test_every_mode_is_accepted_and_runs_here(mode, gen, fresh_state):
    q, k, v = small(gen)
    out = sageattn(q, k, v, mode=mode)
    # No CUDA kernel runs on this machine: every mode is PyTorch attention, bit for bit.
    if q.device.type != "cuda":
        torch.testing.assert_close(out, sageattn(q, k, v, mode="sdpa"), atol=0, rtol=0)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("bad", ["int8", "fp8", "int8-fp8", "", "flash", None, 8, Mode])
def test_unknown_mode(bad, gen):
    with pytest.raises(ValueError) as info:
        sageattn(*small(gen), mode=bad)
    message = str(info.value)
    assert message.startswith("mode must be one of ")
    for name in MODE_STRINGS:
        assert repr(name) in message
    assert message.endswith(f"got {bad!r}")


def test_mode_properties():
    assert [m for m in Mode if m.is_quantized] == [
        Mode.INT8_FP8, Mode.INT4_FP8, Mode.INT8_FP16, Mode.INT4_FP16, Mode.INT8_INT8
    ]  # fmt: skip
    assert Mode.INT4_FP8.qk_bits == 4 and Mode.INT4_FP8.pv_fp8 and Mode.INT4_FP8.pv == "fp8"
    assert Mode.INT8_FP16.qk_bits == 8 and not Mode.INT8_FP16.pv_fp8 and Mode.INT8_FP16.pv == "fp16"
    assert Mode.INT8_INT8.qk_bits == 8 and not Mode.INT8_INT8.pv_fp8 and Mode.INT8_INT8.pv == "int8"
    assert Mode.INT4_FP8.with_qk_bits(8) is Mode.INT8_FP8
    assert Mode.INT8_FP8.with_pv("fp16") is Mode.INT8_FP16
    assert Mode.INT4_FP16.with_pv("fp8") is Mode.INT4_FP8
    assert Mode.INT8_FP8.with_pv("int8") is Mode.INT8_INT8
    with pytest.raises(ValueError, match="no such"):
        Mode.INT8_INT8.with_qk_bits(4)
    with pytest.raises(KeyError):
        _ = Mode.SDPA.qk_bits


def test_return_values(gen):
    q, k, v = small(gen)
    out = sageattn(q, k, v)
    assert isinstance(out, torch.Tensor)
    result = sageattn(q, k, v, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2
    out2, lse = result
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    assert lse.shape == (1, 2, 24) and lse.dtype == torch.float32 and lse.device == q.device


def test_drop_in_for_sdpa(gen):
    # The HND call of an SDPA user gives SDPA's answer, with SDPA's arguments by position or by name.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = small(gen)
    mask = torch.rand(1, 1, 24, 24, generator=gen) > 0.3
    for causal in (False, True):
        expected = sdpa(q, k, v, is_causal=causal)
        torch.testing.assert_close(sageattn(q, k, v, is_causal=causal), expected, atol=0, rtol=0)
        args = (q, k, v, None, 0.0, causal)  # SDPA's positional arguments
        torch.testing.assert_close(sageattn(*args, scale=0.3), sdpa(*args, scale=0.3), atol=0, rtol=0)
    torch.testing.assert_close(sageattn(q, k, v, mask), sdpa(q, k, v, mask), atol=0, rtol=0)
    kw = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(sageattn(q, k[:, :1], v[:, :1], **kw), sdpa(q, k[:, :1], v[:, :1], **kw))
    assert torch.equal(sageattn(q, k, v, scale=0.2), sageattn(q, k, v, sm_scale=0.2))


def test_leading_dimensions_as_sdpa_takes_them(gen):
    # [heads, tokens, head_dim] and more than one leading batch dimension, as SDPA takes them: each the 4-D call
    # on the same values, shaped back; the mask and the LSE follow.
    q, k, v = make_qkv(6, 2, 24, 64, heads_kv=1, seq_kv=30, generator=gen)
    mask = torch.rand(3, 1, 1, 24, 30, generator=gen) > 0.3
    out, lse = sageattn(q, k, v, mask.reshape(3, 1, 24, 30).repeat_interleave(2, 0), return_lse=True)
    five = sageattn(*(t.reshape(3, 2, *t.shape[1:]) for t in (q, k, v)), mask, return_lse=True)
    assert five[0].shape == (3, 2, 2, 24, 64) and five[1].shape == (3, 2, 2, 24)
    assert torch.equal(five[0], out.reshape(3, 2, 2, 24, 64)) and torch.equal(five[1], lse.reshape(3, 2, 2, 24))
    three = sageattn(q[0], k[0], v[0], is_causal=True)
    assert three.shape == (2, 24, 64)
    assert torch.equal(three, sageattn(q[:1], k[:1], v[:1], is_causal=True)[0])
    empty = sageattn(*(t.reshape(1, 6, *t.shape[1:])[:0] for t in (q, k, v)))
    assert empty.shape == (0, 6, 2, 24, 64)


def test_stands_in_for_sdpa_inside_torch(gen, fresh_state, monkeypatch):
    # A program that replaces F.scaled_dot_product_attention with sageattn: torch's own callers (here
    # nn.MultiheadAttention, which passes its arguments by position) get the same answer, and a call that falls
    # back to PyTorch attention reaches PyTorch's function, not sageattn again.
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x, mem = torch.randn(2, 24, 64, generator=gen), torch.randn(2, 30, 64, generator=gen)
    calls = []

    def recorded(*args, **kwargs):
        calls.append(len(args))
        return sageattn(*args, **kwargs)

    with torch.no_grad():
        expected, _ = mha(x, mem, mem, need_weights=False)  # cross attention: not MHA's fused fast path
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
        got, _ = mha(x, mem, mem, need_weights=False)
    assert calls == [6]  # q, k, v, attn_mask, dropout_p, is_causal
    torch.testing.assert_close(got, expected)


def test_dropout_runs_pytorch_attention(gen, fresh_state, caplog, kernel_plan, kernel_calls):
    # The kernels have no dropout: a call with dropout_p > 0 runs PyTorch attention with it (the same draws as
    # calling SDPA under the same seed) and says why once; dropout_p = 0 runs the kernel.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    q, k, v = small(gen)
    for _ in range(3):
        torch.manual_seed(7)
        got = sageattn(q, k, v, dropout_p=0.5, mode="int8_int8")
        torch.manual_seed(7)
        assert torch.equal(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(got, pytorch_attention(q, k, v)[0])
    assert not kernel_calls
    sageattn(q, k, v, None, 0.0, mode="int8_int8")
    assert len(kernel_calls) == 1
    assert reasons(caplog) == [api.DROPOUT_REASON]


# --- logging each reason once ---------------------------------------------------------------------------


def reasons(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "comfy_sage"]


def test_fallback_reason_logged_once(gen, fresh_state, caplog):
    caplog.set_level(logging.INFO, logger="comfy_sage")
    q, k, v = small(gen)
    for _ in range(50):
        sageattn(q, k, v, mode="int8_fp8")
    expected = "int8_fp8 falls back to PyTorch attention: the inputs are on cpu, the kernels need a CUDA GPU"
    assert reasons(caplog) == [expected]
    assert caplog.records[0].levelno == logging.WARNING


def test_distinct_reasons_each_once(gen, fresh_state, caplog):
    caplog.set_level(logging.INFO, logger="comfy_sage")
    q, k, v = small(gen)
    for _ in range(20):
        for mode in ("auto", "int8_fp8", "int4_fp16", "sdpa"):
            sageattn(q, k, v, mode=mode)
            sageattn(q, k, v, mode=mode, is_causal=True)  # same reason: not logged again
    assert reasons(caplog) == [
        "mode 'auto' uses PyTorch attention: no CUDA device",
        "int8_fp8 falls back to PyTorch attention: the inputs are on cpu, the kernels need a CUDA GPU",
        "int4_fp16 falls back to PyTorch attention: the inputs are on cpu, the kernels need a CUDA GPU",
    ]  # "sdpa" was asked for: nothing to explain


def test_reason_logged_again_after_forget(gen, fresh_state, caplog):
    caplog.set_level(logging.INFO, logger="comfy_sage")
    q, k, v = small(gen)
    sageattn(q, k, v)
    sageattn(q, k, v)
    _log.forget_logged()
    sageattn(q, k, v)
    assert reasons(caplog) == ["mode 'auto' uses PyTorch attention: no CUDA device"] * 2


def test_notes_are_logged_once(gen, fresh_state, caplog, monkeypatch):
    # A plan with a note (INT4 asked on Hopper) logs the note once; fake the plan, the call still falls back.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    note = "INT4 tensor cores are emulated on sm_90, so INT8 Q·Kᵀ runs instead"
    fake = dispatch.Plan(Mode.INT4_FP8, Mode.SDPA, None, "a reason", note)
    monkeypatch.setattr(dispatch, "plan", lambda *args, **kwargs: fake)
    q, k, v = small(gen)
    for _ in range(10):
        sageattn(q, k, v, mode="int4_fp8")
    assert reasons(caplog) == ["a reason", note]


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_plan_sees_the_token_counts_causality_lse_and_heads(gen, fresh_state, monkeypatch, layout):
    # INT8 P·V changes plan past INT8_PV_MAX_KEYS keys, Hopper's `auto` below HOPPER_AUTO_MIN_TOKENS query or key
    # tokens (twice that causal, never with the LSE), every mode past MAX_KERNEL_HEADS query heads, and a key mask
    # leaves the wgmma kernel out, so the call hands the plan all six.
    seen = []
    real = dispatch.plan

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "plan", spy)
    q, _, _ = make_qkv(1, 6, 24, 64, generator=gen)
    k = torch.randn(q.shape[0], 3, 37, q.shape[3], generator=gen).to(q.dtype)
    q, k = (t.transpose(1, 2) if layout == "NHD" else t for t in (q, k))
    for causal, lse in ((False, False), (True, True)):
        sageattn(q, k, k.clone(), tensor_layout=layout, mode="int8_int8", is_causal=causal, return_lse=lse)
        args, kwargs = seen[-1]
        assert args[-1] == 37
        assert kwargs == {"seq_q": 24, "is_causal": causal, "return_lse": lse, "heads_q": 6, "key_mask": False}


def test_log_once_levels_and_return_value(fresh_state, caplog):
    caplog.set_level(logging.DEBUG, logger="comfy_sage")
    assert _log.log_once("hello") is True
    assert _log.log_once("hello") is False
    assert _log.log_once("hello", logging.INFO) is True  # another level is another message
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "hello"),
        (logging.INFO, "hello"),
    ]


def test_log_once_is_thread_safe(fresh_state, caplog):
    from concurrent.futures import ThreadPoolExecutor

    caplog.set_level(logging.INFO, logger="comfy_sage")
    with ThreadPoolExecutor(8) as pool:
        logged = list(pool.map(lambda i: _log.log_once(f"reason {i % 5}"), range(400)))
    assert sum(logged) == 5
    assert sorted(reasons(caplog)) == [f"reason {i}" for i in range(5)]


def test_fallback_with_kernels_loaded_still_explains_cpu(gen, fresh_state, caplog, monkeypatch):
    # Even with kernels, CPU tensors fall back, and the reason says it is the device.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    monkeypatch.setattr(capability, "kernel_status", lambda: KernelStatus(True, None, ("sm_89",)))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
    dispatch.clear_cache()
    sageattn(*small(gen), mode="int8_fp16")
    assert reasons(caplog) == [
        "int8_fp16 falls back to PyTorch attention: the inputs are on cpu, the kernels need a CUDA GPU"
    ]


# --- importing without a GPU or the extension ---------------------------------------------------------


IMPORT_PROBE = """
import json, sys, time
import torch
before = set(sys.modules)
t0 = time.perf_counter()
import comfy_sage
elapsed = time.perf_counter() - t0
added = set(sys.modules) - before
modules = sorted(m for m in added if m.startswith("comfy_sage"))
q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
out = comfy_sage.sageattn(q, q, q, mode="int8_fp8")
from comfy_sage import capability
print(json.dumps({
    "modules_at_import": modules,
    "modules_after_call": sorted(m for m in sys.modules if m.startswith("comfy_sage")),
    "import_s": elapsed,
    "dynamo_added": "torch._dynamo" in added,
    "shape": list(out.shape),
    "status": [capability.kernel_status().loaded, capability.kernel_status().reason],
}))
"""


def test_import_without_gpu_or_extension():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["shape"] == [1, 2, 8, 64]
    # The reference (a big, test-only package) and the extension are not imported by `import comfy_sage`.
    assert not any(m.startswith("comfy_sage.reference") for m in info["modules_at_import"]), info
    assert "comfy_sage._C" not in info["modules_at_import"]
    assert not any(m.startswith("comfy_sage.reference") for m in info["modules_after_call"]), info
    # Nothing heavy beyond torch itself: torch._dynamo (pulled in by torch.nn.attention.bias) is imported
    # only when a call needs it, not by `import comfy_sage`.
    assert not info["dynamo_added"]
    if info["status"][0] is False:
        assert info["status"][1]  # a reason is always kept
    print(f"import comfy_sage took {info['import_s']:.2f} s after torch")
    # The one fallback warning reached stderr through logging's last-resort handler.
    assert "int8_fp8 falls back to PyTorch attention" in result.stderr
    assert result.stderr.count("falls back") == 1


def test_plan_for_is_the_plan_sageattn_runs(gen, fresh_state, monkeypatch):
    """`plan_for` hands `dispatch.plan` what a call would, in either layout, and checks the layout as `sageattn`
    does."""
    seen = []
    real = dispatch.plan

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "plan", spy)
    q, k, v = small(gen)
    sageattn(q, k, v, is_causal=True, mode="int8_fp8")
    p = api.plan_for(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), tensor_layout="NHD", is_causal=True,
                     mode="int8_fp8")  # fmt: skip
    assert seen[0] == seen[1] and p.fallback and "the inputs are on cpu" in p.reason
    with pytest.raises(ValueError, match="tensor_layout"):
        api.plan_for(q, k, v, tensor_layout="BNHD")


@pytest.fixture
def kernel_plan(monkeypatch):
    """Every call planned onto the mma.sync INT8+INT8 kernel, whatever the device (the op itself is faked)."""
    kernel = dispatch.Plan(Mode.INT8_INT8, Mode.INT8_INT8, dispatch.KernelSpec("sm80", Mode.INT8_INT8, SM80))
    monkeypatch.setattr(dispatch, "plan", lambda *args, **kwargs: kernel)


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The shapes of Q that reached the (faked) kernel op, which returns zeros."""
    ran = []

    def attention(q, *args, **kwargs):
        ran.append(q.shape)
        return torch.zeros_like(q), None

    monkeypatch.setattr(ops, "attention", attention)
    return ran


def pytorch_attention(q, k, v):
    """PyTorch's attention as `sageattn` runs it for `small`'s HND inputs: (out, LSE)."""
    return fallback.attention(
        q, k, v, Problem(*q.shape[:2], k.shape[1], q.shape[2], k.shape[2], q.shape[3], "HND"), is_causal=False,
        scale=q.shape[-1] ** -0.5, attn_mask=None, return_lse=True,
    )  # fmt: skip


def test_kernel_out_of_memory_runs_pytorch_attention(gen, fresh_state, caplog, monkeypatch, kernel_plan):
    # The op's allocations failing (its error says how many bytes the call needs): the call runs PyTorch attention
    # and says so once; calls of the same sizes then go straight there (no failing try) until that much memory
    # is available again, while other sizes still try the kernel.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    tries, available = [], [0]
    need = 5_000_000

    def attention(q, *args, **kwargs):
        tries.append(q.shape[2])
        if available[0] < need:
            raise RuntimeError(f"attention, binding.cpp:120, {ops.OUT_OF_MEMORY}: {need} bytes for the output and ...")
        return torch.ones_like(q), None

    monkeypatch.setattr(ops, "attention", attention)
    monkeypatch.setattr(api, "_available_bytes", lambda device: available[0])
    q, k, v = small(gen)
    expected = pytorch_attention(q, k, v)[0]
    for _ in range(3):
        assert torch.equal(sageattn(q, k, v, mode="int8_int8"), expected)
    assert tries == [24]  # tried once
    sageattn(q[:, :, :20], k, v, mode="int8_int8")  # other sizes: tried
    assert tries == [24, 20]
    available[0] = need
    assert torch.equal(sageattn(q, k, v, mode="int8_int8"), torch.ones_like(q))
    assert torch.equal(sageattn(q, k, v, mode="int8_int8"), torch.ones_like(q))
    assert tries == [24, 20, 24, 24]
    assert reasons(caplog) == [api.OUT_OF_MEMORY_REASON]
    assert caplog.records[0].levelno == logging.WARNING


def test_torch_out_of_memory_runs_pytorch_attention(gen, fresh_state, caplog, monkeypatch, kernel_plan):
    # torch's own OutOfMemoryError (float32 inputs converted in Python) says no size: each call tries again.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    tries = []

    def attention(q, *args, **kwargs):
        tries.append(q.shape)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ops, "attention", attention)
    q, k, v = small(gen)
    out, lse = sageattn(q, k, v, mode="int8_int8", return_lse=True)
    nhd = sageattn(*(t.transpose(1, 2) for t in (q, k, v)), tensor_layout="NHD", mode="int8_int8")
    expected, expected_lse = pytorch_attention(q, k, v)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse) and torch.equal(nhd, expected.transpose(1, 2))
    assert len(tries) == 2 and not api._short_of_memory
    assert reasons(caplog) == [api.OUT_OF_MEMORY_REASON]


def test_other_kernel_errors_are_raised(gen, fresh_state, monkeypatch, kernel_plan):

    def fails(*args, **kwargs):
        raise RuntimeError("attention, binding.cpp:230, comfy_sage attention launch failed: invalid argument")

    monkeypatch.setattr(ops, "attention", fails)
    q, k, v = small(gen)
    with pytest.raises(RuntimeError, match="launch failed"):
        sageattn(q, k, v, mode="int8_int8")


def test_calls_that_need_gradients_run_pytorch_attention(gen, fresh_state, caplog, kernel_plan, kernel_calls):
    # The kernels have no backward pass: with grad mode on and an input that requires gradients, the call runs
    # PyTorch's attention (differentiable: the same output and gradients as calling it) and says why once;
    # without grad mode, or without an input that requires gradients, the kernel runs.
    caplog.set_level(logging.INFO, logger="comfy_sage")
    q, k, v = (t.float().requires_grad_() for t in small(gen))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for layout in ("HND", "NHD"):
        args = [t.transpose(1, 2) if layout == "NHD" else t for t in (q, k, v)]
        out = sageattn(*args, tensor_layout=layout, mode="int8_int8", is_causal=True)
        out = out.transpose(1, 2) if layout == "NHD" else out
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not kernel_calls
    with torch.no_grad():
        sageattn(q, k, v, mode="int8_int8")
    sageattn(q.detach(), k.detach(), v.detach(), mode="int8_int8")
    assert len(kernel_calls) == 2
    sageattn(q, k, v, mode="sdpa")  # asked for PyTorch attention: nothing to explain
    assert reasons(caplog) == [api.NEEDS_GRAD_REASON]


def test_out_of_memory_marker_is_the_bindings():
    """ops.OUT_OF_MEMORY and the byte count after it are what csrc/binding.cpp's allocation error says."""
    binding = Path(__file__).parents[1] / "csrc" / "binding.cpp"
    if not binding.is_file():
        pytest.skip("needs the source tree (csrc/binding.cpp)")
    source = binding.read_text()
    assert f'kOutOfMemory = "{ops.OUT_OF_MEMORY}";' in source
    assert 'std::string(kOutOfMemory) + ": " + std::to_string(call_bytes) +' in source
    assert (
        ops.out_of_memory_bytes(RuntimeError(f"attention, binding.cpp:70, {ops.OUT_OF_MEMORY}: 123 bytes for")) == 123
    )


@pytest.mark.parametrize("shape", [(2, 1, 1, 30), (1, 30), (1, 1, 30)])
def test_key_masks_reach_the_kernel_as_a_bias(gen, fresh_state, monkeypatch, shape):
    # A mask with one value per key (text padding) is planned as a key mask and sent to the op as the kernel's
    # bias; any other mask is planned as a mask (PyTorch attention).
    asked, sent = [], []
    real = dispatch.plan

    def spy(*args, **kwargs):
        asked.append((args[4], kwargs["key_mask"]))
        return real(*args, **kwargs)

    def attention(q, k, v, *args, key_bias=None, **kwargs):
        sent.append(key_bias)
        return torch.zeros_like(q), None

    monkeypatch.setattr(dispatch, "plan", spy)
    q, k, v = make_qkv(2, 4, 20, 64, seq_kv=30, generator=gen)
    keep = torch.rand(shape, generator=gen) > 0.3
    sageattn(q, k, v, keep)
    assert asked == [(False, True)]  # on this CPU it still falls back: no kernel op reached
    kernel = dispatch.Plan(Mode.INT8_INT8, Mode.INT8_INT8, dispatch.KernelSpec("sm80", Mode.INT8_INT8, SM80))
    monkeypatch.setattr(dispatch, "plan", lambda *args, **kwargs: kernel)
    monkeypatch.setattr(ops, "attention", attention)
    sageattn(q, k, v, keep)
    rows = shape[0] if len(shape) == 4 else 1
    assert torch.equal(sent[0], ops.key_bias(keep, rows, 30))


def test_masks_per_query_row_or_head_are_not_key_masks(gen, fresh_state, monkeypatch):
    asked = []
    real = dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda *a, **kw: asked.append((a[4], kw["key_mask"])) or real(*a, **kw))
    q, k, v = make_qkv(2, 4, 20, 64, seq_kv=30, generator=gen)
    for shape in ((20, 30), (2, 4, 1, 30), (4, 1, 30)):
        sageattn(q, k, v, torch.rand(shape, generator=gen) > 0.3)
    assert asked == [(True, False)] * 3

"""Checks shared by the kernel families' GPU tests: inputs, poisoned outputs, and the comparison with the reference.

Error is relative L1 against float64 attention; a kernel passes when its error is at most 1.5 × the
reference's own error (same mode and tiling) + 1e-3. Outputs are poisoned with NaN before each call (the
allocator hands the poisoned block to the op's output, which `check` verifies), so any element the kernel
leaves unwritten shows.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_sage
from comfy_sage import api, dispatch, ops, reference
from comfy_sage.modes import Mode
from comfy_sage.testing import make_qkv

ROOT = Path(__file__).resolve().parents[2]


def seed() -> int:
    return random.randrange(2**31)


def inputs(seed, *, heads_q, heads_kv, nq, nkv, d, dtype, layout, kind="normal", batch=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(
        batch, heads_q, nq, d, heads_kv=heads_kv, seq_kv=nkv, dtype=dtype, device="cuda", layout=layout,
        kind=kind, generator=g,
    )  # fmt: skip
    return q, k, v


def poisoned(like: torch.Tensor, fn, *args, **kwargs):
    """Call `fn` after freeing a NaN-filled block the size of its output; (result, whether it reused it)."""
    poison = torch.full_like(like, math.nan)
    ptr = poison.data_ptr()
    del poison
    result = fn(*args, **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    return result, out.data_ptr() == ptr


def exact_lse(q, k, layout, causal):
    """Natural-log LSE of the scaled logits in float64, [B, H_q, N_q] (bottom-right causal)."""
    qh, kh = (t.transpose(1, 2) if layout == "NHD" else t for t in (q, k))
    kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], 1).double()
    s = (qh.double() @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5
    if causal:
        nq, nkv = s.shape[-2:]
        visible = torch.arange(nkv, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None] + nkv - nq
        s = s.masked_fill(~visible, -math.inf)
    return torch.logsumexp(s, -1)


def assert_as_accurate_as_reference(out, lse, q, k, v, mode, tiling, layout, causal, where):
    """Output and LSE errors against float64 at most 1.5 × the reference's own (same mode, tiling and ΔS
    arithmetic) + 1e-3; the output's alone where `lse` is None (a call without the LSE)."""
    truth = reference.exact.attention(q, k, v, tensor_layout=layout, is_causal=causal)
    ref, ref_lse = reference.sageattn(
        q, k, v, mode=mode, tensor_layout=layout, is_causal=causal, tiling=tiling, delta_s="int8", return_lse=True
    )
    err, ref_err = reference.relative_l1(out, truth), reference.relative_l1(ref, truth)
    assert err <= 1.5 * ref_err + 1e-3, f"kernel rel L1 {err:.5f} vs reference {ref_err:.5f} ({where})"
    if lse is None:
        return
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), where
    true_lse = exact_lse(q, k, layout, causal)
    lse_err = (lse[seen].double() - true_lse[seen]).abs().mean()
    ref_lse_err = (ref_lse[seen].double() - true_lse[seen]).abs().mean()
    assert lse_err <= 1.5 * ref_lse_err + 1e-3, f"LSE error {lse_err:.5f} vs reference {ref_lse_err:.5f} ({where})"


def check_call(q, k, v, plan, *, layout, causal, return_lse, where):
    """One kernel call of `plan` through `sageattn` with its output poisoned: every element written, finite, as
    accurate as the reference, rows that see no key 0. Returns (out, LSE or None)."""
    call = dict(mode=plan.requested, is_causal=causal, tensor_layout=layout, return_lse=return_lse)
    like = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    result, reused = poisoned(like, comfy_sage.sageattn, q, k, v, **call)
    out, lse = result if return_lse else (result, None)
    assert reused, f"the poisoned block was not reused: the check would be blind ({where})"
    assert out.shape == q.shape and out.dtype == q.dtype, where
    assert torch.isfinite(out).all(), f"unwritten or non-finite output ({where})"
    assert_as_accurate_as_reference(out, lse, q, k, v, plan.mode, plan.kernel.tiling, layout, causal, where)
    nq, nkv = (t.shape[1 if layout == "NHD" else 2] for t in (q, k))
    if causal and nq > nkv:  # rows that see no key
        rows = out.transpose(1, 2) if layout == "NHD" else out
        assert (rows[:, :, : nq - nkv] == 0).all(), where
    return out, lse


def check(mode, d, causal, layout, gqa, dtype, nq, nkv, batch=1, kind="normal", family="sm80"):
    """One kernel call through `sageattn` (poisoned output) against the reference, with `family`'s tiling."""
    s = seed()
    q, k, v = inputs(
        s, heads_q=2 * gqa, heads_kv=2, nq=nq, nkv=nkv, d=d, dtype=dtype, layout=layout, batch=batch, kind=kind
    )
    plan = dispatch.plan(mode, q.device, d, dtype, False)
    assert not plan.fallback, plan.reason
    assert plan.kernel.family == family, plan
    where = f"seed {s}, {plan.kernel.name} D={d} causal={causal} {layout} gqa={gqa} {dtype} Nq={nq} Nkv={nkv} {kind}"
    check_call(q, k, v, plan, layout=layout, causal=causal, return_lse=True, where=where)


def check_opcheck(family: str) -> None:
    """`torch.library.opcheck` of the attention op run by kernel `family` ("sm80" or "sm90"): schema, fake
    kernel and autograd registration, with and without the LSE and the causal mask, and the key mask."""
    q, k, v = inputs(seed(), heads_q=4, heads_kv=2, nq=130, nkv=70, d=64, dtype=torch.float16, layout="HND")
    for layout, causal, lse in ((0, False, True), (0, True, False)):
        for pv in ("fp8", "int8"):
            args = (q, k, v, layout, 8, ops.PV_CODES[pv], causal, 0.125, lse, ops.FAMILY_CODES[family])
            torch.library.opcheck(torch.ops.comfy_sage.attention.default, args)
            if family == "sm80" and not causal:  # with a key mask (the mma.sync kernel's only)
                bias = ops.key_bias(torch.rand(1, 70, device=q.device) > 0.3, 1, 70)
                torch.library.opcheck(torch.ops.comfy_sage.attention.default, (*args, bias))


def check_compile() -> None:
    """torch.compile of a function calling `sageattn`, as compile nodes use it, bit for bit as eager (in the kernel
    family the caller's `dispatch.prefer_family` selects): `fullgraph=True`; dynamic shapes over three sequence
    lengths; and mode "reduce-overhead", whose CUDA graphs replay the op on new inputs copied into their buffers."""

    # The kernel family is chosen when the op runs, so a CUDA graph that "reduce-overhead" recorded in the other
    # family's test (the same function code) would replay that family's kernels: start from nothing.
    torch._dynamo.reset()

    def fn(q, k, v):
        return comfy_sage.sageattn(q, k, v, mode="int8_fp8")

    def qkv(n):
        return inputs(seed(), heads_q=2, heads_kv=2, nq=n, nkv=n, d=128, dtype=torch.bfloat16, layout="HND")

    q, k, v = qkv(256)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), atol=0, rtol=0)
    dynamic = torch.compile(fn, fullgraph=True, dynamic=True)
    for n in (300, 1000, 4097):
        q, k, v = qkv(n)
        torch.testing.assert_close(dynamic(q, k, v), fn(q, k, v), atol=0, rtol=0, msg=f"dynamic, N={n}")
    graphs = torch.compile(fn, mode="reduce-overhead")
    for call in range(4):  # warm-up, recording, then replays
        q, k, v = qkv(700)
        got = graphs(q, k, v).clone()  # a replay's output is overwritten by the next
        torch.testing.assert_close(got, fn(q, k, v), atol=0, rtol=0, msg=f"reduce-overhead, call {call}")


def check_sdpa_calling_conventions(family: str, mode: Mode) -> None:
    """SDPA's ways of calling, on the kernel: its positional arguments and `scale`/`enable_gqa`, [heads, tokens,
    head_dim] inputs and more than one leading batch dimension each give the 4-D call's output bit for bit; a call
    with dropout gives PyTorch attention's with the same draws."""
    q, k, v = inputs(seed(), heads_q=8, heads_kv=2, nq=700, nkv=900, d=128, dtype=torch.bfloat16, layout="HND", batch=4)
    assert dispatch.plan(mode, q.device, 128, q.dtype, False).kernel.family == family
    out, lse = comfy_sage.sageattn(q, k, v, mode=mode, return_lse=True)
    sdpa_style = comfy_sage.sageattn(q, k, v, None, 0.0, False, scale=128**-0.5, enable_gqa=True, mode=mode)
    assert torch.equal(sdpa_style, out)
    five_out, five_lse = comfy_sage.sageattn(
        *(t.view(2, 2, *t.shape[1:]) for t in (q, k, v)), mode=mode, return_lse=True
    )
    assert torch.equal(five_out, out.view(2, 2, 8, 700, 128)) and torch.equal(five_lse, lse.view(2, 2, 8, 700))
    # A batch entry alone: on sm_90 the split of a short last wave depends on the whole call, so compare with the
    # 4-D call of that entry alone.
    alone = comfy_sage.sageattn(q[3:4], k[3:4], v[3:4], mode=mode)
    assert torch.equal(comfy_sage.sageattn(q[3], k[3], v[3], mode=mode), alone[0])
    torch.manual_seed(11)
    dropped = comfy_sage.sageattn(q, k, v, None, 0.25, mode=mode)
    torch.manual_seed(11)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.25, enable_gqa=True)
    assert torch.equal(dropped, expected)


def check_int8_pv_long_rows(family: str) -> None:
    """INT8 P·V's int32 row accumulator at its largest: at 75,600 keys (Wan 14B 720p, where P̃'s range p_max is
    221) every key weighs the same (Q = 0) and every V value is its channel's maximum, so each row sums
    p_max · 127 · N_kv; and ordinary inputs of that length against the reference."""
    seq_kv = 75_600
    q = torch.zeros(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, seq_kv, 128, device="cuda", dtype=torch.bfloat16)
    signs = torch.where(torch.arange(128, device="cuda") % 2 == 0, 3.0, -3.0)
    v = signs.expand(1, 2, seq_kv, 128).to(torch.bfloat16).contiguous()
    out = comfy_sage.sageattn(q, k, v, mode="int8_int8")
    assert dispatch.plan(Mode.INT8_INT8, q.device, 128, q.dtype, False).kernel.family == family
    torch.testing.assert_close(out, v[:, :, :64], rtol=1e-2, atol=0)
    check(Mode.INT8_INT8, 128, False, "HND", 1, torch.bfloat16, 200, seq_kv, family=family)


def check_deterministic(family: str, modes) -> None:
    """The same inputs give the same output and LSE bit for bit, call after call: K's channel sums over the
    64 kv_stats CTAs of each head are added in a fixed order, not in the order the CTAs finish. (With float
    atomics there, the second call of this check already differed, in both kernel families.) Channel-biased
    K, whose large sums round at every addition."""
    q, k, v = inputs(
        seed(), heads_q=8, heads_kv=8, nq=512, nkv=16384, d=128, dtype=torch.bfloat16, layout="HND", kind="biased"
    )
    for mode in modes:
        assert dispatch.plan(mode, q.device, 128, q.dtype, False).kernel.family == family
        first_out, first_lse = comfy_sage.sageattn(q, k, v, mode=mode, return_lse=True)
        for call in range(1, 12):
            out, lse = comfy_sage.sageattn(q, k, v, mode=mode, return_lse=True)
            assert torch.equal(out, first_out) and torch.equal(lse, first_lse), f"{mode}: call {call} differs"


def check_empty_inputs(family: str, modes) -> None:
    """Calls with nothing to compute (an empty batch, no query heads, no query tokens) return empty results, with
    or without a key mask, and calls without keys zeros and an LSE of −inf, in the kernel modes and in "sdpa", in
    both layouts: no grid of size 0 is launched, and PyTorch's attention, which returns None for an empty batch
    on CUDA, is not asked."""
    shapes = {  # (batch, heads_q, heads_kv, seq_q, seq_kv)
        "empty batch": (0, 4, 2, 16, 16),
        "no query heads": (1, 0, 2, 16, 16),
        "no query tokens": (2, 4, 2, 0, 16),
        "no keys": (2, 4, 2, 16, 0),
    }
    for (name, (b, hq, hkv, nq, nkv)), layout in itertools.product(shapes.items(), ("HND", "NHD")):
        q, k, v = make_qkv(
            b, hq, nq, 64, heads_kv=hkv, seq_kv=nkv, dtype=torch.bfloat16, device="cuda", layout=layout
        )  # fmt: skip
        for mode in (*modes, Mode.SDPA):
            plan = dispatch.plan(mode, q.device, 64, q.dtype, False)
            assert mode is Mode.SDPA or plan.kernel.family == family, plan
            where = f"{name}, {mode.value}, {layout}"
            out, lse = comfy_sage.sageattn(q, k, v, mode=mode, tensor_layout=layout, return_lse=True)
            assert out.shape == q.shape and out.dtype == q.dtype, where
            assert lse.shape == (b, hq, nq) and lse.dtype == torch.float32, where
            assert (out == 0).all() and (lse == -math.inf).all(), where
            assert comfy_sage.sageattn(q, k, v, mode=mode, tensor_layout=layout).shape == q.shape, where
            if nkv:  # with a key mask too (every key kept): its conversion has no rows for an empty batch
                keep = torch.ones(b, 1, 1, nkv, dtype=torch.bool, device="cuda")
                out = comfy_sage.sageattn(q, k, v, attn_mask=keep, mode=mode, tensor_layout=layout)
                assert out.shape == q.shape and (out == 0).all(), f"{where}, key mask"


def check_beyond_grid_limits(family: str, mode: Mode) -> None:
    """Batch × heads above 65,535 (the quantization's grid y) and batch above 65,535 (the attention grid's z),
    as factorized video models' temporal attention over every latent position has: the call runs in batch
    chunks that fit. Against the reference (poisoned output), and the rows around the chunk boundaries bit for
    bit against calls on them alone."""
    cases = (  # (batch, heads_q, heads_kv, seq_q, seq_kv, layout); chunks of 65,535 // heads_q batch entries
        (8_200, 16, 8, 5, 9, "HND"),  # chunks 4,095 + 4,095 + 10: batch × heads_kv 65,600
        (66_000, 1, 1, 4, 9, "NHD"),  # chunks 65,535 + 465
    )
    for b, hq, hkv, nq, nkv, layout in cases:
        s = seed()
        q, k, v = inputs(
            s, heads_q=hq, heads_kv=hkv, nq=nq, nkv=nkv, d=64, dtype=torch.bfloat16, layout=layout, batch=b
        )
        plan = dispatch.plan(mode, q.device, 64, q.dtype, False)
        assert plan.kernel.family == family, plan
        where = f"seed {s}, {plan.kernel.name} B={b} H={hq}/{hkv} {layout}"
        out, lse = check_call(q, k, v, plan, layout=layout, causal=False, return_lse=True, where=where)
        call = dict(mode=mode, tensor_layout=layout, return_lse=True)
        chunk = 65_535 // hq
        for lo in range(chunk - 3, b, chunk):  # three rows before each boundary and three after
            part = slice(lo, min(lo + 6, b))
            alone_out, alone_lse = comfy_sage.sageattn(q[part], k[part], v[part], **call)
            assert torch.equal(alone_out, out[part]) and torch.equal(alone_lse, lse[part]), f"{where}, rows {part}"
    # More query heads than a grid dimension takes: PyTorch's attention, with the reason.
    q, k, v = inputs(seed(), heads_q=65_536, heads_kv=2, nq=2, nkv=3, d=64, dtype=torch.bfloat16, layout="HND")
    assert api.plan_for(q, k, v, mode=mode).reason.endswith("at most 65,535 query heads a call")
    pytorch = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(comfy_sage.sageattn(q, k, v, mode=mode), pytorch)


def check_past_2_31_elements(family: str, modes) -> None:
    """Q, K, V and O of more than 2^31 elements each (and INT8 copies of more than 2^31 bytes): the first and
    last batch entries bit for bit as calls on them alone, and within the reference's error. Needs ~30 GB of
    free GPU memory."""
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs ~30 GB of free GPU memory; {free / 2**30:.0f} GB free")
    b, s = 64, seed()
    g = torch.Generator("cuda").manual_seed(s)  # drawn on the GPU: 6.4e9 values
    q, k, v = (torch.randn(b, 64, 4100, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert q.numel() > 2**31
    for mode in modes:
        plan = dispatch.plan(mode, q.device, 128, q.dtype, False)
        assert plan.kernel.family == family, plan
        out, lse = comfy_sage.sageattn(q, k, v, mode=mode, return_lse=True)
        for i in (0, b - 1):
            alone_out, alone_lse = comfy_sage.sageattn(
                q[i : i + 1], k[i : i + 1], v[i : i + 1], mode=mode, return_lse=True
            )
            where = f"seed {s}, {plan.kernel.name}, batch entry {i}"
            assert torch.equal(alone_out, out[i : i + 1]) and torch.equal(alone_lse, lse[i : i + 1]), where
            two = slice(0, 2)  # the reference on two heads of the entry
            entry = (t[i : i + 1, two] for t in (q, k, v))
            assert_as_accurate_as_reference(
                out[i : i + 1, two], lse[i : i + 1, two], *entry, plan.mode, plan.kernel.tiling, "HND", False, where
            )


_OUT_OF_MEMORY_SCRIPT = """
import sys, torch, comfy_sage
from comfy_sage import api, dispatch
from comfy_sage.modes import Mode
family, seed = sys.argv[1], int(sys.argv[2])
with dispatch.prefer_family(family):
    g = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, 24, 32768, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert dispatch.plan(Mode.INT8_INT8, q.device, 128, q.dtype, False).kernel.family == family
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    kernel_out = comfy_sage.sageattn(q, k, v, mode=Mode.INT8_INT8)
    assert not torch.equal(kernel_out, expected), "the kernel's output should differ from PyTorch attention's"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    # Room for the output (201 MB) and PyTorch attention's own needs, not for the copies (+300 MB).
    ballast = torch.empty(free - 300 * 2**20, dtype=torch.uint8, device="cuda")
    fell_back = torch.equal(comfy_sage.sageattn(q, k, v, mode=Mode.INT8_INT8), expected)
    remembered = len(api._short_of_memory) == 1
    again = torch.equal(comfy_sage.sageattn(q, k, v, mode=Mode.INT8_INT8), expected)
    del ballast
    torch.cuda.empty_cache()
    assert fell_back and remembered and again, (fell_back, remembered, again)
    assert torch.equal(comfy_sage.sageattn(q, k, v, mode=Mode.INT8_INT8), kernel_out), "no kernel once memory is free"
    assert not api._short_of_memory
print("ok")
"""


def check_out_of_memory_runs_pytorch_attention(family: str) -> None:
    """With the GPU so full that a call's output fits but not its quantized copies of Q, K and V, the call runs
    PyTorch attention (which needs no copies: the same output as calling it, bit for bit) instead of failing, and
    so does the next call of those sizes, without trying; once the memory is free again, the kernel runs. In a
    fresh process, whose allocator holds no blocks from other tests that the copies could fit into."""
    _run_in_fresh_process(_OUT_OF_MEMORY_SCRIPT, family, str(seed()))


def _run_in_fresh_process(script: str, *args: str) -> None:
    """Runs `script` in a new Python process (the repository and this folder importable, after $PYTHONPATH, which
    may name an installed comfy_sage to test instead of the checkout's); it must print "ok"."""
    path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT), str(Path(__file__).parent))))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# Cycles `torch.cuda._sleep` spins before a stream writes a call's inputs (~30 ms): far longer than the host takes
# to issue the call, so a launch on any other stream would run first and read the NaN the inputs held.
_SLEEP_CYCLES = 50_000_000


def _written_late(sources, device: torch.device):
    """NaN-filled tensors like `sources`, which the current stream of `device` overwrites with them after a sleep;
    the host returns at once."""
    late = [torch.full_like(t, math.nan) for t in sources]
    with torch.cuda.device(device):
        torch.cuda._sleep(_SLEEP_CYCLES)
        for dst, src in zip(late, sources, strict=True):
            dst.copy_(src)
    return late


def check_runs_on_the_current_stream(family: str, modes) -> None:
    """A call on a side stream whose inputs that stream writes only after a long sleep gives the output of the
    inputs written, bit for bit: the memset, the quantization and the attention launches all go to the caller's
    current stream, behind its earlier work."""
    q, k, v = inputs(seed(), heads_q=4, heads_kv=2, nq=700, nkv=900, d=128, dtype=torch.bfloat16, layout="HND")
    for mode in modes:
        assert dispatch.plan(mode, q.device, 128, q.dtype, False).kernel.family == family
        expected = comfy_sage.sageattn(q, k, v, mode=mode, return_lse=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            late = _written_late((q, k, v), q.device)
            out = comfy_sage.sageattn(*late, mode=mode, return_lse=True)
        side.synchronize()
        for got, want in zip(out, expected, strict=True):
            assert torch.equal(got, want), f"{mode}: the call did not wait for its stream's earlier work"


_OTHER_DEVICE_SCRIPT = """
import math, sys, torch, comfy_sage
from comfy_sage import dispatch
from comfy_sage.modes import Mode
from kernel_checks import _written_late, assert_as_accurate_as_reference, inputs
family, seed, modes = sys.argv[1], int(sys.argv[2]), [Mode(m) for m in sys.argv[3].split(",")]
torch.cuda.set_device(0)
first, second = torch.device("cuda:0"), torch.device("cuda:1")
props = [torch.cuda.get_device_properties(i) for i in (0, 1)]
same_gpu = len({(p.name, p.multi_processor_count) for p in props}) == 1
with dispatch.prefer_family(family):
    # 12 query heads of 1,000 tokens over 1,500 keys: a short last wave on an H100 (split tiles on sm_90).
    q, k, v = inputs(seed, heads_q=12, heads_kv=4, nq=1000, nkv=1500, d=128, dtype=torch.bfloat16, layout="NHD")
    there = [t.to(second) for t in (q, k, v)]
    torch.cuda.synchronize(second)
    for mode in modes:
        plan = dispatch.plan(mode, second, 128, torch.bfloat16, False)
        assert not plan.fallback and plan.kernel.family == family, plan
        call = dict(mode=mode, tensor_layout="NHD", return_lse=True)
        # The process's first call of each kernel on the second GPU, the first GPU current.
        out, lse = comfy_sage.sageattn(*_written_late(there, second), **call)
        assert torch.cuda.current_device() == 0, "the call changed the current device"
        assert out.device == second and lse.device == second, (out.device, lse.device)
        here_out, here_lse = comfy_sage.sageattn(q, k, v, **call)
        if same_gpu:  # the kernels are deterministic: the same GPU model gives the same bits
            assert torch.equal(out.cpu(), here_out.cpu()) and torch.equal(lse.cpu(), here_lse.cpu()), mode
        assert torch.isfinite(out).all(), mode
        assert_as_accurate_as_reference(out, lse, *there, plan.mode, plan.kernel.tiling, "NHD", False, str(mode))
print("ok")
"""


def check_second_gpu(family: str, modes) -> None:
    """Inputs on the second GPU while the first is current (a model placed on another card): every launch goes to
    that GPU and its current stream, the kernels' per-device set-up runs there on first use (a fresh process),
    the current device is left as it was, and the output is the same bit for bit as on the first GPU (the same
    model) and as accurate as the reference."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA GPUs; {torch.cuda.device_count()} here")
    if torch.cuda.get_device_capability(1) != torch.cuda.get_device_capability(0):
        pytest.skip("the two GPUs differ in compute capability")
    _run_in_fresh_process(_OTHER_DEVICE_SCRIPT, family, str(seed()), ",".join(m.value for m in modes))


_EDGE_LENGTHS = (1, 2, 7, 16, 63, 64, 65, 77, 127, 128, 129, 191, 192, 193, 255, 256, 257, 383, 385, 511, 513, 1000)


def check_random_calls(family: str, modes, head_dims, cases: int = 200) -> None:
    """Calls drawn at random (a fresh seed each run, printed on failure): lengths around every block size,
    GQA, causal, the LSE, both layouts and dtypes, both input kinds, and strided views into larger tensors
    (extra heads and tokens around the ones used). Each against the reference, its output poisoned."""
    rng = random.Random(seed())
    for _ in range(cases):
        mode, d, case_seed = rng.choice(modes), rng.choice(head_dims), rng.randrange(2**31)
        b, hkv = rng.randint(1, 3), rng.randint(1, 3)
        hq = hkv * rng.choice((1, 1, 2, 3, 8))
        nq, nkv = (rng.choice((*_EDGE_LENGTHS, rng.randint(1, 2000))) for _ in range(2))
        causal, lse, strided = rng.random() < 0.4, rng.random() < 0.5, rng.random() < 0.3
        layout, dtype = rng.choice(("HND", "NHD")), rng.choice((torch.float16, torch.bfloat16))
        kind = rng.choice(("normal", "biased"))
        where = (
            f"seed {case_seed}: {mode} B={b} H={hq}/{hkv} Nq={nq} Nkv={nkv} D={d} causal={causal} lse={lse} "
            f"{layout} {dtype} {kind} strided={strided}"
        )
        g = torch.Generator().manual_seed(case_seed)
        if strided:
            qb, kb, vb = make_qkv(
                b, hq + 1, nq + 3, d, heads_kv=hkv + 1, seq_kv=nkv + 5, dtype=dtype, device="cuda", kind=kind,
                generator=g,
            )  # fmt: skip
            q, k, v = qb[:, 1:, 2 : 2 + nq], kb[:, 1:, 3 : 3 + nkv], vb[:, :hkv, 1 : 1 + nkv]
            if layout == "NHD":
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = make_qkv(
                b, hq, nq, d, heads_kv=hkv, seq_kv=nkv, dtype=dtype, device="cuda", layout=layout, kind=kind,
                generator=g,
            )  # fmt: skip
        plan = api.plan_for(q, k, v, tensor_layout=layout, mode=mode, is_causal=causal, return_lse=lse)
        assert not plan.fallback and plan.kernel.family == family, f"{plan} ({where})"
        check_call(q, k, v, plan, layout=layout, causal=causal, return_lse=lse, where=where)

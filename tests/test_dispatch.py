"""The dispatch table: which kernel (or the fallback) runs each (GPU, mode, head dim, dtype, mask).

No GPU is needed: the compute capability and the kernel status are faked, and `plan` is asked about a
`torch.device("cuda")` that is never touched.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_sage import capability, dispatch
from comfy_sage.capability import KernelStatus
from comfy_sage.modes import QUANTIZED_MODES, Mode
from comfy_sage.reference import quant
from comfy_sage.tiling import SM80, SM80_WIDE, SM90

pytestmark = pytest.mark.usefixtures("fresh_state")

CUDA = torch.device("cuda")
LOADED = KernelStatus(True, None, ("sm_80", "sm_89", "sm_90a", "sm_120a"))
NOT_LOADED = KernelStatus(False, "this install has no compiled kernels (pure-Python package)")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a CUDA GPU of the given compute capability, with the given kernel status."""

    def fake(cc: tuple[int, int], status: KernelStatus = LOADED) -> None:
        monkeypatch.setattr(capability, "device_capability", lambda device: cc if device.type == "cuda" else None)
        monkeypatch.setattr(capability, "kernel_status", lambda: status)
        monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
        dispatch.clear_cache()

    return fake


def plan(mode="auto", head_dim=128, dtype=torch.bfloat16, has_mask=False, device=CUDA):
    return dispatch.plan(Mode.parse(mode), device, head_dim, dtype, has_mask)


@pytest.mark.parametrize(
    "cc, expected",
    [
        ((8, 0), Mode.INT8_INT8),
        ((8, 6), Mode.INT8_INT8),
        ((8, 7), Mode.INT8_INT8),
        ((8, 9), Mode.INT8_INT8),
        ((10, 0), Mode.INT8_INT8),
        ((12, 0), Mode.INT8_INT8),
    ],
)
def test_auto_per_gpu(gpu, cc, expected):
    gpu(cc)
    p = plan("auto")
    assert p.requested is Mode.AUTO
    assert p.mode is expected and not p.fallback
    assert p.kernel.mode is expected and p.kernel.family == "sm80" and p.kernel.tiling == SM80
    assert p.kernel.name == f"sm80_{expected.value}"
    assert p.reason is None and p.note is None
    assert dispatch.auto_mode(cc) is dispatch.auto_mode(cc, 64) is expected


def test_auto_on_hopper_is_the_wgmma_kernel(gpu):
    gpu((9, 0))
    p = plan("auto")
    assert p.mode is Mode.INT8_INT8 and p.kernel.family == "sm90" and p.kernel.tiling == SM90
    assert p.kernel.name == "sm90_int8_int8" and p.note is None


def routed_for_speed(p: dispatch.Plan, why: str) -> bool:
    """Whether `p` is Hopper's `auto` leaving a call to PyTorch attention as the faster, for the reason `why`."""
    return (
        p.fallback
        and p.mode is Mode.SDPA
        and p.faster
        and p.log_level == logging.INFO
        and p.note is None
        and p.reason == f"mode 'auto' runs PyTorch attention on sm_90 for {why}: faster there"
    )


WIDE_ON_HOPPER = "head dims above 128, where only the mma.sync kernel runs"


@pytest.mark.parametrize("head_dim", [160, 256])
def test_auto_on_hopper_beyond_the_wgmma_head_dims_is_pytorch_attention(gpu, head_dim):
    """Only the mma.sync kernel computes head dims above 128 on Hopper, 1.6-2.4× slower than cuDNN there; an
    explicit mode (and `auto` asked for the LSE) still runs it, INT8 P·V for `auto`: mma.sync FP8 is FP16 HMMA
    plus conversions on Hopper, INT8 is native."""
    gpu((9, 0))
    assert routed_for_speed(plan("auto", head_dim=head_dim), WIDE_ON_HOPPER)
    for p in (
        plan("int8_int8", head_dim=head_dim),
        dispatch.plan(Mode.AUTO, CUDA, head_dim, torch.bfloat16, False, 4096, seq_q=4096, return_lse=True),
    ):
        assert p.mode is Mode.INT8_INT8 and p.kernel.family == "sm80" and p.kernel.tiling == SM80_WIDE
    with dispatch.prefer_family("sm80"):  # a benchmark comparing the families gets the kernel it asks for
        p = plan("auto", head_dim=head_dim)
    assert p.mode is Mode.INT8_INT8 and p.kernel.family == "sm80"


def test_auto_on_hopper_without_wgmma_code_is_pytorch_attention(gpu, monkeypatch):
    gpu((9, 0))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": family == "sm80")
    dispatch.clear_cache()
    assert routed_for_speed(plan("auto"), "a build without sm_90a code, where only the mma.sync kernel runs")
    p = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 4096, seq_q=4096, return_lse=True)
    assert p.mode is Mode.INT8_INT8 and p.kernel.family == "sm80"


FEW_TOKENS = "calls with fewer than 4,096 query or key tokens (8,192 when causal)"


@pytest.mark.parametrize(
    "seq_q, seq_kv, causal, kernel",
    [
        (4096, 4096, False, True),  # SDXL 1024²'s 64×64 level, and every other anchor shape: the kernel
        (4608, 4608, False, True),
        (75_600, 75_600, False, True),
        (4096, 4095, False, False),
        (4095, 4096, False, False),
        (1024, 1024, False, False),  # SDXL's 32×32 level
        (4096, 77, False, False),  # cross attention over text tokens
        (32_760, 512, False, False),  # Wan's cross attention
        (1024, 8192, False, False),
        (8192, 8192, True, True),
        (8191, 8192, True, False),
        (4096, 4096, True, False),
    ],
)
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_auto_on_hopper_leaves_calls_with_few_tokens_to_pytorch_attention(gpu, seq_q, seq_kv, causal, kernel, head_dim):
    """Below 4,096 query or key tokens (8,192 causal) cuDNN measured faster than the wgmma kernel on an H100
    (docs/hopper-notes.md, "Shorter K/V"); the call then runs PyTorch attention and says so at INFO."""
    gpu((9, 0))

    def auto(**kw):
        return dispatch.plan(Mode.AUTO, CUDA, head_dim, torch.bfloat16, False, seq_kv, seq_q=seq_q, **kw)

    p = auto(is_causal=causal)
    if kernel:
        assert p == plan("auto", head_dim=head_dim) and p.kernel.family == "sm90" and not p.faster
        assert p.log_level == logging.WARNING
    else:
        assert routed_for_speed(p, FEW_TOKENS)
    # The LSE keeps the kernel (PyTorch attention computes it in a second pass), and so does an explicit mode.
    assert auto(is_causal=causal, return_lse=True) == plan("auto", head_dim=head_dim)
    for mode in ("int8_fp8", "int8_int8"):
        explicit = dispatch.plan(Mode(mode), CUDA, head_dim, torch.bfloat16, False, seq_kv, seq_q=seq_q)
        assert explicit == plan(mode, head_dim=head_dim) and explicit.kernel.family == "sm90"


@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (12, 0)])
def test_auto_elsewhere_runs_the_kernels_at_any_token_count(gpu, cc):
    """The crossover is measured on the H100 alone: the mma.sync GPUs keep the kernels."""
    gpu(cc)
    p = dispatch.plan(Mode.AUTO, CUDA, 64, torch.bfloat16, False, 77, seq_q=1024)
    assert p == plan("auto", head_dim=64) and not p.fallback


def test_few_tokens_route_only_what_the_kernels_would_run(gpu):
    """Unknown token counts (0), float32 inputs (PyTorch would run them in float32) and a preferred kernel family
    keep the kernel; a mask falls back for its own reason."""
    gpu((9, 0))
    assert not dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False).fallback
    assert not dispatch.plan(Mode.AUTO, CUDA, 128, torch.float32, False, 77, seq_q=77).fallback
    with dispatch.prefer_family("sm90"):
        assert dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 77, seq_q=77).kernel.family == "sm90"
    masked = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, True, 77, seq_q=77)
    assert masked.fallback and not masked.faster and dispatch.MASK_REASON in masked.reason


def test_few_tokens_key_the_cache_by_one_bool(gpu):
    gpu((9, 0))
    short = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 77, seq_q=1024)
    assert dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 4095, seq_q=9000) is short
    long = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 4096, seq_q=4096)
    assert dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 9000, seq_q=5000) is long
    assert short.fallback and not long.fallback


LONG = dispatch.INT8_PV_MAX_KEYS + 1  # one key past what INT8 P·V's int32 row sums can take


@pytest.mark.parametrize(
    "cc, mode, head_dim, expected, family",
    [
        ((8, 9), "auto", 128, Mode.INT8_FP8, "sm80"),
        ((12, 0), "int8_int8", 64, Mode.INT8_FP8, "sm80"),
        ((8, 6), "auto", 128, Mode.INT8_FP16, "sm80"),  # no FP8 tensor cores: FP16 P·V
        ((9, 0), "int8_int8", 128, Mode.INT8_FP8, "sm90"),
        ((9, 0), "int8_int8", 256, Mode.INT8_FP8, "sm80"),
    ],
)
def test_rows_too_long_for_int8_pv_run_another_pv(gpu, cc, mode, head_dim, expected, family):
    gpu(cc)
    p = dispatch.plan(Mode.parse(mode), CUDA, head_dim, torch.bfloat16, False, LONG)
    assert p.mode is expected and p.kernel.family == family and not p.fallback
    assert f"takes at most {dispatch.INT8_PV_MAX_KEYS:,} keys, so longer rows run {expected.value}" in p.note
    # At the limit itself INT8 P·V runs, and the two plans are cached apart.
    at_limit = dispatch.plan(Mode.parse(mode), CUDA, head_dim, torch.bfloat16, False, LONG - 1)
    assert at_limit.mode is Mode.INT8_INT8 and at_limit.note is None


@pytest.mark.parametrize("mode", ["int8_fp8", "int8_fp16", "int4_fp8"])
def test_long_rows_leave_other_pv_alone(gpu, mode):
    gpu((8, 9))
    assert dispatch.plan(Mode.parse(mode), CUDA, 128, torch.bfloat16, False, LONG) == plan(mode)


def test_int8_pv_limit_is_the_bindings():
    """INT8_PV_MAX_KEYS is csrc/attention/params.h kInt8PvMaxKeys (the binding refuses longer rows)."""
    header = Path(__file__).parents[1] / "csrc" / "attention" / "params.h"
    if not header.is_file():
        pytest.skip("needs the source tree (csrc/attention/params.h)")
    params = header.read_text()
    budget = re.search(r"kInt8PvBudget = \(int64_t\{1\} << (\d+)\) - \(int64_t\{1\} << (\d+)\);", params)
    assert budget and "kInt8PvMaxKeys = kInt8PvBudget / 127;" in params
    assert (2 ** int(budget[1]) - 2 ** int(budget[2])) // 127 == dispatch.INT8_PV_MAX_KEYS
    assert quant.INT8_PV_BUDGET // quant.INT_MAX[8] == dispatch.INT8_PV_MAX_KEYS
    assert quant.int8_p_max(dispatch.INT8_PV_MAX_KEYS) == 1


@pytest.mark.parametrize(
    "head_dim, expected",
    [(32, Mode.INT8_FP8), (40, Mode.INT8_FP8), (64, Mode.INT8_FP8), (72, Mode.INT8_INT8), (128, Mode.INT8_INT8)],
)
def test_auto_on_hopper_runs_fp8_pv_up_to_head_dim_64_and_int8_pv_above(gpu, head_dim, expected):
    """The wgmma kernel's INT8 P·V is level with FP8 P·V or faster at head dim 128 (and more accurate), 10-15%
    slower at 64."""
    gpu((9, 0))
    p = plan("auto", head_dim=head_dim)
    assert p.mode is expected and p.kernel.family == "sm90" and p.kernel.tiling == SM90 and p.note is None
    assert dispatch.auto_mode((9, 0), head_dim) is expected
    # At any row length up to INT8 P·V's limit.
    assert dispatch.plan(Mode.AUTO, CUDA, head_dim, torch.bfloat16, False, 75_600) == p
    too_long = dispatch.plan(Mode.AUTO, CUDA, head_dim, torch.bfloat16, False, LONG)
    assert too_long.mode is Mode.INT8_FP8 and too_long.kernel.family == "sm90"
    assert (too_long.note is None) == (expected is Mode.INT8_FP8)  # a note where INT8 P·V had to give way


def test_long_rows_key_the_cache_by_one_bool(gpu):
    gpu((8, 9))
    short = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, 4608)
    assert dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, LONG - 1) is short
    assert dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, LONG).mode is Mode.INT8_FP8


@pytest.mark.parametrize("cc", [(7, 5), (7, 0), (6, 1)])
def test_auto_on_pre_ampere_is_sdpa(gpu, cc):
    gpu(cc)
    p = plan("auto")
    assert p.fallback and p.mode is Mode.SDPA
    assert p.reason == f"mode 'auto' uses PyTorch attention: sm_{cc[0]}{cc[1]} is older than sm_80"
    assert dispatch.auto_mode(cc) is Mode.SDPA


@pytest.mark.parametrize("mode", QUANTIZED_MODES)
def test_explicit_mode_on_pre_ampere_falls_back(gpu, mode):
    gpu((7, 5))
    p = plan(mode)
    assert p.fallback and p.requested is mode
    assert p.reason == (
        f"{mode.value} falls back to PyTorch attention: sm_75 is older than sm_80 (Ampere), "
        "the oldest GPU the kernels support"
    )


def test_auto_never_int4():
    for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert dispatch.auto_mode(cc).qk_bits == 8
    assert dispatch.auto_mode(None) is Mode.SDPA


@pytest.mark.parametrize("cc", [(9, 0), (10, 0), (12, 0)])
@pytest.mark.parametrize("mode, runs", [(Mode.INT4_FP8, Mode.INT8_FP8), (Mode.INT4_FP16, Mode.INT8_FP16)])
def test_int4_runs_int8_where_emulated(gpu, cc, mode, runs):
    gpu(cc)
    p = plan(mode)
    assert p.requested is mode and p.mode is runs and p.kernel.mode is runs
    sm = f"sm_{cc[0]}{cc[1]}"
    assert p.note == f"INT4 tensor cores are emulated on {sm}, so INT8 Q·Kᵀ runs instead"
    assert p.reason is None


@pytest.mark.parametrize("cc", [(8, 0), (8, 6)])
def test_fp8_runs_fp16_on_ampere(gpu, cc):
    gpu(cc)
    sm = f"sm_{cc[0]}{cc[1]}"
    p = plan(Mode.INT8_FP8)
    assert p.mode is Mode.INT8_FP16 and not p.fallback
    assert p.note == f"{sm} has no FP8 tensor cores, so P·V runs in FP16"
    # INT4 stays (native here); only P·V changes.
    p = plan(Mode.INT4_FP8)
    assert p.mode is Mode.INT4_FP16
    assert p.note == f"{sm} has no FP8 tensor cores, so P·V runs in FP16"


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9)])
def test_int4_native_on_ampere_and_ada(gpu, cc):
    gpu(cc)
    p = plan(Mode.INT4_FP16)
    assert p.mode is Mode.INT4_FP16 and p.kernel.mode is Mode.INT4_FP16 and p.note is None


def test_int4_fp8_native_only_on_ada(gpu):
    gpu((8, 9))
    p = plan(Mode.INT4_FP8)
    assert p.mode is Mode.INT4_FP8 and p.note is None


@pytest.mark.parametrize("cc", [(8, 9), (9, 0), (12, 0)])
@pytest.mark.parametrize("mode", [Mode.INT8_FP8, Mode.INT8_FP16])
def test_int8_native_from_ada_on(gpu, cc, mode):
    gpu(cc)
    p = plan(mode)
    assert p.mode is mode and p.note is None and p.reason is None


def test_both_notes_together(gpu):
    # No such GPU today, but the two rules must compose: INT4 emulated and no FP8.
    assert dispatch.native_mode(Mode.INT4_FP8, (8, 0)) == (
        Mode.INT4_FP16,
        "sm_80 has no FP8 tensor cores, so P·V runs in FP16",
    )
    assert dispatch.native_mode(Mode.INT8_FP16, (9, 0)) == (Mode.INT8_FP16, None)


def test_sdpa_mode_never_has_a_reason(gpu):
    for cc in [(7, 5), (8, 0), (9, 0)]:
        gpu(cc)
        p = plan("sdpa")
        assert p.fallback and p.mode is Mode.SDPA and p.reason is None and p.note is None
        assert plan("sdpa", has_mask=True).reason is None


@pytest.mark.parametrize("mode", ["auto", "int8_fp8", "int4_fp16"])
def test_mask_falls_back(gpu, mode):
    gpu((8, 9))
    p = plan(mode, has_mask=True)
    assert p.fallback
    asked = "int8_int8" if mode == "auto" else mode  # "auto" names the mode it picked
    assert p.reason == f"{asked} falls back to PyTorch attention: {dispatch.MASK_REASON}"


@pytest.mark.parametrize("cc", [(8, 9), (9, 0)])
def test_more_query_heads_than_the_grids_take_fall_back(gpu, cc):
    """Past 65,535 query heads (a grid dimension's limit; the binding runs larger batches in chunks but cannot
    split the heads) every mode falls back, keyed by one bool: any head count up to the limit shares a plan."""
    gpu(cc)
    for mode in ("auto", "int8_fp8", "int8_int8"):

        def ask(heads: int, mode=mode) -> dispatch.Plan:
            return dispatch.plan(Mode.parse(mode), CUDA, 128, torch.bfloat16, False, 8192, seq_q=8192, heads_q=heads)

        at_limit, over = ask(65_535), ask(65_536)
        assert not at_limit.fallback and ask(24) is at_limit
        assert over.fallback and over.mode is Mode.SDPA
        why = "the kernels take at most 65,535 query heads a call"
        assert over.reason == f"{at_limit.mode.value} falls back to PyTorch attention: {why}"


def test_query_head_limit_is_the_bindings():
    """MAX_KERNEL_HEADS is the binding's grid limit (csrc/attention/params.h kMaxGridYZ; csrc/binding.cpp refuses
    more query heads than that)."""
    csrc = Path(__file__).parents[1] / "csrc"
    if not (csrc / "binding.cpp").is_file():
        pytest.skip("needs the source tree (csrc/binding.cpp)")
    limit = re.search(r"constexpr int kMaxGridYZ = (\d+);", (csrc / "attention" / "params.h").read_text())
    assert limit and int(limit[1]) == dispatch.MAX_KERNEL_HEADS
    assert "STD_TORCH_CHECK(dq.h <= kMaxGridYZ" in (csrc / "binding.cpp").read_text()


@pytest.mark.parametrize("head_dim", [1, 16, 31, 257, 512])
def test_head_dims_outside_the_range_fall_back(gpu, head_dim):
    gpu((8, 9))
    p = plan("auto", head_dim=head_dim)
    assert p.fallback and p.mode is Mode.SDPA
    assert p.reason.startswith(f"int8_int8 falls back to PyTorch attention: head_dim {head_dim} ")


@pytest.mark.parametrize("head_dim", [32, 40, 64, 80, 96, 128])
def test_head_dims_of_sd_and_flux_run_a_kernel(gpu, head_dim):
    gpu((8, 9))
    p = plan("auto", head_dim=head_dim)
    assert not p.fallback and p.reason is None


@pytest.mark.parametrize("head_dim", [136, 160, 192, 256])
def test_large_head_dims_follow_the_kernel_range(gpu, head_dim):
    # 129..256 run once a head-dim-256 kernel is built (MAX_HEAD_DIM says whether it is).
    gpu((9, 0))
    p = plan("int8_int8", head_dim=head_dim)
    if head_dim <= dispatch.MAX_HEAD_DIM:
        assert not p.fallback
    else:
        assert p.fallback and f"head_dim {head_dim} " in p.reason
    assert dispatch.MAX_HEAD_DIM in (128, 256)


def test_head_dim_range_constants():
    assert dispatch.MIN_HEAD_DIM == 32
    assert 128 <= dispatch.MAX_HEAD_DIM <= 256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_run_a_kernel(gpu, dtype):
    gpu((9, 0))
    assert not plan("auto", dtype=dtype).fallback


@pytest.mark.parametrize("mode", ["auto", "int8_fp16", "int4_fp8"])
def test_kernels_not_loaded_fall_back_with_the_load_reason(gpu, mode):
    gpu((8, 9), NOT_LOADED)
    p = plan(mode)
    assert p.fallback and p.mode is Mode.SDPA
    asked = "int8_int8" if mode == "auto" else mode
    assert p.reason == f"{asked} falls back to PyTorch attention: {NOT_LOADED.reason}"


def test_broken_extension_reason_is_kept(gpu):
    broken = KernelStatus(False, "the compiled kernels failed to load: libcudart.so.13: cannot open shared object")
    gpu((9, 0), broken)
    assert plan("int8_fp8").reason.endswith(broken.reason)


@pytest.mark.parametrize("mode", ["auto", *[m.value for m in QUANTIZED_MODES]])
def test_cpu_falls_back(gpu, mode):
    gpu((9, 0))  # a GPU exists, but the tensors are on the CPU
    p = plan(mode, device=torch.device("cpu"))
    assert p.fallback and p.mode is Mode.SDPA
    if mode == "auto":
        assert p.reason == "mode 'auto' uses PyTorch attention: no CUDA device"
    else:
        assert p.reason == (
            f"{mode} falls back to PyTorch attention: the inputs are on cpu, the kernels need a CUDA GPU"
        )


def test_cpu_falls_back_without_faking(fresh_state):
    # The real capability module on this machine: a CPU tensor never reaches a kernel.
    p = plan("int8_fp8", device=torch.device("cpu"))
    assert p.fallback and "the kernels need a CUDA GPU" in p.reason


def test_plan_is_cached(gpu):
    gpu((8, 9))
    a = plan("int8_fp8", head_dim=64)
    assert plan("int8_fp8", head_dim=64) is a
    assert plan("int8_fp8", head_dim=128) is not a
    dispatch.clear_cache()
    b = plan("int8_fp8", head_dim=64)
    assert b == a and b is not a


def test_plan_does_not_reload_the_extension(gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(capability, "device_capability", lambda device: (8, 9))
    monkeypatch.setattr(capability, "kernel_status", lambda: calls.append(1) or LOADED)
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
    dispatch.clear_cache()
    for _ in range(100):
        plan("int8_fp8")
    assert len(calls) == 1


def test_plan_of_an_indexed_device_is_one_lookup(gpu, monkeypatch):
    """What every call asks (tensors' devices have an index): no capability query once the plan is known."""
    gpu((9, 0))
    asked = []
    monkeypatch.setattr(capability, "device_capability", lambda device: asked.append(device) or (9, 0))
    cuda0 = torch.device("cuda", 0)
    first = plan("int8_fp8", device=cuda0)
    for _ in range(100):
        assert plan("int8_fp8", device=torch.device("cuda:0")) is first
    assert asked == [cuda0] and first.kernel.family == "sm90"


def test_plan_of_the_current_device_follows_it(gpu, monkeypatch):
    """`torch.device("cuda")` means whichever GPU is current, so its plan is not cached by the device."""
    gpu((8, 0))
    assert plan("auto").mode is Mode.INT8_INT8
    monkeypatch.setattr(capability, "device_capability", lambda device: (7, 5))  # an sm_75 made current
    assert plan("auto").fallback


def test_tiling_follows_the_head_dim(gpu):
    gpu((8, 9))
    assert plan(head_dim=128).kernel.tiling == SM80
    assert plan(head_dim=160).kernel.tiling == SM80_WIDE  # padded to 256: 64-row Q blocks


def test_hopper_families(gpu):
    gpu((9, 0))
    kernel = plan("int8_fp8").kernel
    assert kernel.family == "sm90" and kernel.tiling == SM90
    assert plan("int8_fp8", head_dim=40).kernel.family == "sm90"  # padded to 64
    assert plan("int8_fp8", head_dim=160).kernel.family == "sm80"  # wgmma: head dims up to 128
    assert plan("int8_fp16").kernel.family == "sm80"  # the wgmma kernel is INT8+FP8 and INT8+INT8 only
    assert plan("int8_int8").kernel.family == "sm90" and plan("int8_int8", head_dim=256).kernel.family == "sm80"
    with dispatch.prefer_family("sm80"):
        p = plan("int8_fp8")
        assert p.kernel.family == "sm80" and p.kernel.tiling == SM80
        assert plan("auto").mode is Mode.INT8_INT8  # auto without wgmma on Hopper
    assert plan("int8_fp8").kernel.family == "sm90"
    with dispatch.prefer_family("sm90"):
        p = plan("int8_fp16")
        assert p.kernel.family == "sm80" and "wgmma kernel can't run int8_fp16" in p.note
    gpu((12, 0))
    assert plan("int8_fp8").kernel.family == "sm80"  # consumer Blackwell is mma.sync either way
    with dispatch.prefer_family("sm90"):
        assert plan("int8_fp8").kernel.family == "sm80" and plan("int8_fp8").note is None


def test_prefer_family_rejects_unknown_names():
    with pytest.raises(ValueError, match="family must be one of"), dispatch.prefer_family("sm75"):
        pass


def test_private_plan_with_a_fake_cc(fresh_state, monkeypatch):
    monkeypatch.setattr(capability, "kernel_status", lambda: LOADED)
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
    p = dispatch._plan(Mode.INT4_FP8, "cuda", (9, 0), 128, torch.float16, False)
    assert p.mode is Mode.INT8_FP8 and "emulated on sm_90" in p.note


def test_kernels_without_code_for_this_gpu_fall_back(gpu, monkeypatch):
    """A build that lacks this GPU's architecture (e.g. a newer GPU) must fall back, not fail at launch."""
    gpu((10, 0))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": False)
    dispatch.clear_cache()
    p = plan("int8_fp8")
    assert p.fallback and "no code for sm_100" in p.reason


# --- capability: what the kernel status says on this machine -----------------------------------------


def test_kernel_status_without_the_extension(fresh_state):
    if "comfy_sage._C" in sys.modules or importlib.util.find_spec("comfy_sage._C") is not None:
        pytest.skip("the compiled extension is installed here")
    status = capability.kernel_status()
    assert status == KernelStatus(False, "this install has no compiled kernels (pure-Python package)")
    assert capability.kernel_status() is status  # loaded once


def test_kernel_status_keeps_the_load_error(fresh_state, tmp_path, monkeypatch):
    # An extension that exists but cannot be loaded (wrong CUDA, ABI, a broken file) must say why.
    import comfy_sage

    if importlib.util.find_spec("comfy_sage._C") is not None:
        pytest.skip("the compiled extension is installed here")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / f"_C{suffix}").write_bytes(b"not an ELF file")
    monkeypatch.setattr(comfy_sage, "__path__", [*comfy_sage.__path__, str(tmp_path)])
    status = capability.kernel_status()
    assert not status.loaded
    assert status.reason.startswith("the compiled kernels failed to load: ")
    assert str(tmp_path) in status.reason
    assert "comfy_sage._C" not in sys.modules


def test_kernel_status_never_raises(fresh_state, monkeypatch):
    def boom(name):
        raise RuntimeError("operator comfy_sage::attention already registered")

    monkeypatch.setattr(capability, "importlib", SimpleNamespace(import_module=boom))
    status = capability.kernel_status()
    assert not status.loaded and "already registered" in status.reason


def test_device_capability_of_non_cuda_devices():
    assert capability.device_capability(torch.device("cpu")) is None
    assert capability.device_capability(torch.device("meta")) is None
    assert capability.sm_name((12, 0)) == "sm_120"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_capability(fresh_state):  # pragma: no cover - GPU only
    cc = capability.device_capability(torch.device("cuda"))
    assert cc == torch.cuda.get_device_capability()
    for head_dim in (64, 128):
        p = plan("auto", head_dim=head_dim)
        assert p.mode is dispatch.auto_mode(cc, head_dim) or p.fallback


def test_kernel_status_load_error_named_like_the_extension(fresh_state, monkeypatch):
    # dlopen failures raise a plain ImportError that may carry the module's name: not "no kernels".
    def fail(name):
        raise ImportError("libcudart.so.13: cannot open shared object file", name=name)

    monkeypatch.setattr(capability, "importlib", SimpleNamespace(import_module=fail))
    status = capability.kernel_status()
    assert status.reason == "the compiled kernels failed to load: libcudart.so.13: cannot open shared object file"


def test_kernel_status_missing_dependency_of_the_extension(fresh_state, monkeypatch):
    def fail(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(capability, "importlib", SimpleNamespace(import_module=fail))
    assert capability.kernel_status().reason == "the compiled kernels failed to load: No module named 'triton'"


# --- key masks: one value per key (text padding), which both kernel families take with INT8 Q·Kᵀ ----------------


def key_plan(mode="auto", cc_seq=8192, head_dim=128):
    return dispatch.plan(Mode.parse(mode), CUDA, head_dim, torch.bfloat16, False, cc_seq, seq_q=cc_seq, key_mask=True)


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (12, 0)])
@pytest.mark.parametrize("mode", ["auto", "int8_fp8", "int8_fp16", "int8_int8"])
def test_key_masks_run_the_mma_sync_kernel(gpu, cc, mode):
    gpu(cc)
    p = key_plan(mode)
    assert not p.fallback and p.kernel.family == "sm80" and p.mode.qk_bits == 8


@pytest.mark.parametrize("mode", ["int4_fp8", "int4_fp16"])
def test_key_masks_with_int4_run_int8_and_say_so(gpu, mode):
    gpu((8, 9))  # INT4 native here: only the key mask moves it to INT8
    p = key_plan(mode)
    assert not p.fallback and p.mode.qk_bits == 8 and "key masks run with INT8" in p.note


def test_key_masks_on_hopper(gpu):
    # The wgmma kernel takes them as the mma.sync kernel does, so Hopper plans them as it plans unmasked calls.
    gpu((9, 0))
    for mode in ("auto", "int8_fp8", "int8_int8"):
        p = key_plan(mode)
        assert not p.fallback and p.kernel.family == "sm90", mode
    with dispatch.prefer_family("sm80"):
        assert key_plan("int8_fp8").kernel.family == "sm80"
    assert key_plan("int8_fp16").kernel.family == "sm80"
    # With a key mask `auto` keeps the kernel down to 2,560 tokens (4,096 without): PyTorch's masked attention
    # leaves cuDNN.
    for seq_q, seq_kv, kernel in ((1000, 1000, False), (2559, 9000, False), (9000, 2559, False), (2560, 2560, True)):
        masked = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, seq_kv, seq_q=seq_q, key_mask=True)
        unmasked = dispatch.plan(Mode.AUTO, CUDA, 128, torch.bfloat16, False, seq_kv, seq_q=seq_q)
        assert unmasked.fallback and unmasked.faster, (seq_q, seq_kv)
        if kernel:
            assert not masked.fallback and masked.kernel.family == "sm90", (seq_q, seq_kv)
        else:
            assert routed_for_speed(masked, "key-masked calls with fewer than 2,560 query or key tokens")
    assert key_plan("auto", head_dim=256).fallback  # only the mma.sync kernel, slower than cuDNN there


def test_other_masks_still_fall_back(gpu):
    gpu((8, 9))
    p = dispatch.plan(Mode.INT8_FP8, CUDA, 128, torch.bfloat16, True, 100, seq_q=100)
    assert p.fallback and dispatch.MASK_REASON in p.reason

"""Which implementation runs a call: a table from (GPU, mode, head dim, dtype, mask, and where they matter the
token counts) to a kernel or the fallback.

`plan` answers once per distinct key (it is cached) and never touches tensor data, so dispatching costs a
dictionary lookup per call. A plan whose `kernel` is None runs PyTorch's FP16/BF16 attention; its
`reason` says why, and the API logs each distinct reason once.

Native support follows the SASS nvcc emits for each architecture (ALGORITHM.md):
- FP8 tensor cores exist from sm_89 on; below that an FP8 P·V request runs in FP16.
- INT4 tensor cores exist on sm_80..sm_89 only; elsewhere they are emulated (53 TOPS on an H100 against
  1,246 for INT8), so an INT4 request runs the INT8 kernel there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import capability
from .modes import INT8_PV_MAX_KEYS, Mode  # past INT8_PV_MAX_KEYS `plan` moves INT8 P·V to FP8 or FP16
from .tiling import SM90, Tiling, sm80_tiling

MIN_CC = (8, 0)  # Ampere: the first INT8 mma.sync with the m16n8k32 shape
HOPPER = (9, 0)  # the one GPU the wgmma kernel runs on
FP8_MIN_CC = (8, 9)  # Ada: the first FP8 tensor cores
INT4_CCS = frozenset({(8, 0), (8, 6), (8, 7), (8, 9)})  # native INT4 tensor cores
NATIVE_HEAD_DIMS = (64, 128, 256)
# Others in this range are zero-padded to the next native one inside the quantization (SD1.5's 40, 80, 160);
# head dims that are not a multiple of 8 fall back.
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
HEAD_DIM_MULTIPLE = 8
# Hopper's `auto` runs FP8 P·V up to this head dim (the wgmma kernel's INT8 P·V is 10-15% slower there) and
# INT8 P·V above it (docs/hopper-notes.md a1, i7).
HOPPER_FP8_PV_MAX_HEAD_DIM = 64
# Hopper's `auto` runs PyTorch's attention (cuDNN on an H100) where that measured faster than the kernels
# (docs/hopper-notes.md, "Shorter K/V"): calls with fewer than HOPPER_AUTO_MIN_TOKENS query or key tokens (twice
# that when causal), where the wgmma kernel's fixed costs (host time, the quantization's launches, each query
# tile's start and end) outweigh its faster K loop, and calls the wgmma kernel cannot run (head dims above
# SM90_MAX_HEAD_DIM), which only the mma.sync kernel computes there, 1.6-2.4× slower than cuDNN. Explicit modes
# and calls asking for the LSE (which PyTorch's attention computes in a second pass) keep the kernels.
HOPPER_AUTO_MIN_TOKENS = 4096
# With a key mask the line is lower: PyTorch's attention leaves cuDNN for a slower path (1.4-1.6× its unmasked
# time) while the kernels add the bias only in the blocks that have one, and the kernel measured faster from
# 2,048 tokens at head dim 128 and 2,560 at 64 (docs/hopper-notes.md x10).
HOPPER_AUTO_MIN_TOKENS_KEY_MASK = 2560
# Why a call with a mask that is not a key mask (one value per key for every head and query row) falls back.
MASK_REASON = "the kernels take key masks only (one value per key, the same for every head and query row)"
# The kernels' grids carry the query heads in a dimension of at most 65,535 (csrc/binding.cpp runs larger
# batches in chunks that fit, but cannot split the heads).
MAX_KERNEL_HEADS = 65_535


KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled kernel family and the tiling the reference must use to check it."""

    family: str  # "sm80": mma.sync (Ampere, Ada, Blackwell); "sm90": wgmma (Hopper)
    mode: Mode
    tiling: Tiling

    @property
    def name(self) -> str:
        return f"{self.family}_{self.mode.value}"


@dataclass(frozen=True)
class Plan:
    """What runs one call. `kernel` None means the PyTorch fallback; `reason` says why.

    `note` is set when the kernel runs a different mode than asked (e.g. INT4 on Hopper runs INT8).
    """

    requested: Mode
    mode: Mode
    kernel: KernelSpec | None
    reason: str | None = None
    note: str | None = None
    faster: bool = False  # `auto` runs PyTorch attention because it is faster here, not for want of a kernel

    @property
    def fallback(self) -> bool:
        return self.kernel is None

    @property
    def log_level(self) -> int:
        """The level to log `reason` and `note` at: a choice made for speed is news, not a warning."""
        return logging.INFO if self.faster else logging.WARNING


def auto_mode(cc: tuple[int, int] | None, head_dim: int = 128) -> Mode:
    """The fastest accurate mode for a GPU and head dim: INT8 Q·Kᵀ always (INT4 costs image quality); P·V in
    INT8, except on Hopper at head dims up to HOPPER_FP8_PV_MAX_HEAD_DIM (`plan` also moves those to INT8 P·V
    where the wgmma kernel cannot run them: FP8 P·V pays on Hopper only through it).

    INT8 P·V (exact int32 sums) is more accurate than FP8 P·V (rel L1 0.024 against 0.038 on random-normal
    inputs) and runs on INT8 tensor cores: twice the FP16 rate on Ampere (four times on GeForce cards, whose
    FP16 products with fp32 sums run at half rate), and twice the rate of FP8 with fp32 sums on GeForce Ada
    and Blackwell. On an H100 the mma.sync kernel measures 443 TOPS with it against 342 (FP16 P·V) and 321
    (FP8, emulated there) at N = 16k. Hopper's wgmma kernel runs INT8 P·V at head dim 128 as fast as FP8 P·V
    or faster (0.995-1.075× over 4.6k-75k keys: its accumulator needs no fresh tile per block, and a consumer's
    softmax runs under its P̃·V), but at head dim 64 10-15% slower, so `plan` keeps FP8 P·V there.
    """
    if cc is None or cc < MIN_CC:
        return Mode.SDPA
    return Mode.INT8_FP8 if cc == HOPPER and head_dim <= HOPPER_FP8_PV_MAX_HEAD_DIM else Mode.INT8_INT8


def native_mode(mode: Mode, cc: tuple[int, int]) -> tuple[Mode, str | None]:
    """The mode that runs natively for a quantized `mode` on `cc`, and a note when it differs."""
    sm = capability.sm_name(cc)
    notes = []
    if mode.qk_bits == 4 and cc not in INT4_CCS:
        mode = mode.with_qk_bits(8)
        notes.append(f"INT4 tensor cores are emulated on {sm}, so INT8 Q·Kᵀ runs instead")
    if mode.pv_fp8 and cc < FP8_MIN_CC:
        mode = mode.with_pv("fp16")
        notes.append(f"{sm} has no FP8 tensor cores, so P·V runs in FP16")
    return mode, "; ".join(notes) or None


FAMILIES = ("sm80", "sm90")
SM90_MODES = frozenset({Mode.INT8_FP8, Mode.INT8_INT8})  # what the wgmma kernel computes
SM90_MAX_HEAD_DIM = 128


def wgmma_fits(cc: tuple[int, int], mode: Mode, head_dim: int) -> bool:
    """Whether the wgmma (Hopper) kernel computes this call: sm_90, INT8+FP8 or INT8+INT8, head dim up to 128."""
    return cc == HOPPER and mode in SM90_MODES and head_dim <= SM90_MAX_HEAD_DIM


_preferred_family: str | None = None

# Plans by `plan`'s own arguments: one dictionary lookup per call, where `_plan`'s key needs the device's
# compute capability first (the device's type alone costs a string per call). A device with an index
# always has the same capability, which `capability` caches for good too.
_plans: dict[tuple, Plan] = {}


@contextlib.contextmanager
def prefer_family(family: str | None) -> Iterator[None]:
    """Within the block, run kernel family `family` ("sm80": mma.sync, "sm90": wgmma) wherever it can
    compute the call, also where Hopper's `auto` would leave it to PyTorch attention for speed; None restores
    the default choice. For benchmarks and tests that compare the two."""
    global _preferred_family
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None; got {family!r}")
    previous, _preferred_family = _preferred_family, family
    try:
        yield
    finally:
        _preferred_family = previous


def hopper_auto_min_tokens(is_causal: bool, key_mask: bool) -> int:
    """The fewest query or key tokens for which Hopper's `auto` runs the kernel (a key mask and `is_causal` are
    never combined)."""
    if key_mask:
        return HOPPER_AUTO_MIN_TOKENS_KEY_MASK
    return 2 * HOPPER_AUTO_MIN_TOKENS if is_causal else HOPPER_AUTO_MIN_TOKENS


def plan(
    mode: Mode,
    device: torch.device,
    head_dim: int,
    dtype: torch.dtype,
    has_mask: bool,
    seq_kv: int = 0,
    *,
    seq_q: int = 0,
    is_causal: bool = False,
    return_lse: bool = False,
    heads_q: int = 0,
    key_mask: bool = False,
) -> Plan:
    """The plan for one call's static properties (cached; never reads tensor data). The token counts (0:
    unknown) matter only past INT8_PV_MAX_KEYS keys, where INT8 P·V's int32 row sums could overflow, and to
    Hopper's `auto` below `hopper_auto_min_tokens`, with `is_causal` and `return_lse`; the query heads (0:
    unknown) only past MAX_KERNEL_HEADS. `key_mask`: the call's mask depends on the key alone (`has_mask` is then
    False), which both kernel families take with INT8 Q·Kᵀ."""
    long_rows = seq_kv > INT8_PV_MAX_KEYS
    auto_lse = return_lse and mode is Mode.AUTO
    few_tokens = (
        mode is Mode.AUTO and not return_lse and 0 < min(seq_q, seq_kv) < hopper_auto_min_tokens(is_causal, key_mask)
    )
    many_heads = heads_q > MAX_KERNEL_HEADS
    key = (
        mode, device, head_dim, dtype, has_mask, _preferred_family, long_rows, few_tokens, auto_lse, many_heads,
        key_mask,
    )  # fmt: skip
    found = _plans.get(key)
    if found is not None:
        return found
    cc = capability.device_capability(device)
    found = _plan(
        mode, device.type, cc, head_dim, dtype, has_mask, device.index, _preferred_family, long_rows, few_tokens,
        auto_lse, many_heads, key_mask,
    )  # fmt: skip
    if device.index is not None or device.type != "cuda":  # "cuda" alone means the current device: it may change
        _plans[key] = found
    return found


@functools.cache
def _plan(
    mode: Mode,
    device_type: str,
    cc: tuple[int, int] | None,
    head_dim: int,
    dtype: torch.dtype,
    has_mask: bool,
    device_index: int | None = None,
    preferred_family: str | None = None,
    long_rows: bool = False,
    few_tokens: bool = False,
    return_lse: bool = False,
    many_heads: bool = False,
    key_mask: bool = False,
) -> Plan:
    requested = mode
    if mode is Mode.SDPA:
        return Plan(requested, Mode.SDPA, None)
    if mode is Mode.AUTO:
        mode = auto_mode(cc, head_dim)
        if mode is Mode.SDPA:
            why = "no CUDA device" if cc is None else f"{capability.sm_name(cc)} is older than sm_80"
            return Plan(requested, Mode.SDPA, None, f"mode 'auto' uses PyTorch attention: {why}")

    def fallback(why: str) -> Plan:
        return Plan(requested, Mode.SDPA, None, f"{mode.value} falls back to PyTorch attention: {why}")

    if device_type != "cuda":
        return fallback(f"the inputs are on {device_type}, the kernels need a CUDA GPU")
    if cc < MIN_CC:
        return fallback(f"{capability.sm_name(cc)} is older than sm_80 (Ampere), the oldest GPU the kernels support")
    if has_mask:
        return fallback(MASK_REASON)
    if many_heads:
        return fallback(f"the kernels take at most {MAX_KERNEL_HEADS:,} query heads a call")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % HEAD_DIM_MULTIPLE:
        return fallback(
            f"head_dim {head_dim} is not supported by the kernels "
            f"(multiples of {HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
        )
    if dtype not in KERNEL_DTYPES and dtype != torch.float32:
        return fallback(f"dtype {dtype} is not supported by the kernels")
    status = capability.kernel_status()
    if not status.loaded:
        return fallback(status.reason)
    device = torch.device(device_type, device_index)
    if not capability.kernels_run_on(device):
        return fallback(f"the compiled kernels have no code for {capability.sm_name(cc)}; reinstall a build for it")
    hopper = cc == HOPPER

    def runs_wgmma(m: Mode) -> bool:
        return wgmma_fits(cc, m, head_dim) and preferred_family != "sm80" and capability.kernels_run_on(device, "sm90")

    if requested is Mode.AUTO and hopper and dtype in KERNEL_DTYPES and not return_lse and preferred_family is None:
        sm = capability.sm_name(cc)
        if not runs_wgmma(mode):  # only the mma.sync kernel could: 1.6-2.4× slower than cuDNN there
            where = (
                f"head dims above {SM90_MAX_HEAD_DIM}"
                if head_dim > SM90_MAX_HEAD_DIM
                else "a build without sm_90a code"
            )
            why = f"{where}, where only the mma.sync kernel runs"
        elif few_tokens and key_mask:
            why = f"key-masked calls with fewer than {HOPPER_AUTO_MIN_TOKENS_KEY_MASK:,} query or key tokens"
        elif few_tokens:
            fewest = HOPPER_AUTO_MIN_TOKENS
            why = f"calls with fewer than {fewest:,} query or key tokens ({2 * fewest:,} when causal)"
        else:
            why = None
        if why:
            return Plan(
                requested, Mode.SDPA, None, f"mode 'auto' runs PyTorch attention on {sm} for {why}: faster there",
                faster=True,
            )  # fmt: skip

    if requested is Mode.AUTO and hopper and not runs_wgmma(mode):
        mode = Mode.INT8_INT8  # see auto_mode
    mode, note = native_mode(mode, cc)
    if key_mask and mode.qk_bits == 4:
        mode = mode.with_qk_bits(8)
        note = "; ".join(filter(None, (note, "key masks run with INT8 Q·Kᵀ, so INT8 Q·Kᵀ runs instead")))
    if long_rows and mode.pv == "int8":
        mode, fp16_note = native_mode(mode.with_pv("fp8"), cc)
        long_note = (
            f"INT8 P·V sums a row in int32 and takes at most {INT8_PV_MAX_KEYS:,} keys, so longer rows run {mode.value}"
        )
        note = "; ".join(filter(None, (note, long_note, fp16_note)))
    if runs_wgmma(mode):
        return Plan(requested, mode, KernelSpec("sm90", mode, SM90), None, note)
    if hopper and preferred_family == "sm90":
        note = "; ".join(filter(None, (note, f"the wgmma kernel can't run {mode.value} at head_dim {head_dim} here")))
    return Plan(requested, mode, KernelSpec("sm80", mode, sm80_tiling(head_dim)), None, note)


def clear_cache() -> None:
    """Forget cached plans (after the extension or the device set changes; for tests)."""
    _plans.clear()
    _plan.cache_clear()

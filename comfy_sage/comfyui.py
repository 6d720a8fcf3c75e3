"""The ComfyUI adapter behind the "Patch Sage Attention" node: pure functions and small classes, no ComfyUI import.

How a model gets patched (`patch_model`)
- The node clones the ModelPatcher and sets `model_options["transformer_options"]["optimized_attention_override"]`
  on the clone: ComfyUI's attention backends then call `override(func, *args, **kwargs)` for every attention
  call that carries `transformer_options` (ComfyUI ≥ 0.3.60). Module globals are never touched, so the patch
  belongs to that clone alone: bypassing the node restores stock attention on the next run, and two models in
  one workflow can run different modes. An override already set (another node's) becomes our fallback; our
  own earlier patch is replaced, never stacked. The model holds one override: a node that sets it after ours
  (ComfyUI 0.33's own `ModelPatcher.set_model_optimized_attention` writes the same key) replaces ours.
- `SageOverride` is immutable configuration; `__deepcopy__` returns itself, so the deep copy that every
  `ModelPatcher.clone()` makes of `model_options` (a LoRA node after ours) keeps the same object, the same
  one-time log and the same link to the step wrapper.

What one attention call runs (`SageOverride.__call__`), in this order
1. An evaluation being recomputed by the non-finite guard: ComfyUI's `attention_pytorch`, every call.
2. `low_precision_attention=False` at the call site (Wan I2V image cross-attention, SAM3, ...): the fallback.
3. The step's mode (the node's mode, or the edge mode during the first/last N steps); "off (PyTorch)" runs
   `attention_pytorch`.
4. Shapes `comfy_sage.sageattn` does not take (k/v head dims unlike q's, batch or dtype mismatches) and
   calls that need a backward pass go to the fallback (`kernel_blocker`), logged once per reason and model.
5. `dispatch.plan(mode, device, head_dim, dtype, has_mask, tokens)` (cached, no tensor reads): a plan no kernel
   can run (no CUDA, an old GPU, head dim, dtype, a mask other than a key mask, kernels not installed; a key
   mask, one value per key as HunyuanVideo's text padding is, runs on the kernels) goes to the fallback and logs
   its reason once per patched model, and so does a call that `auto` leaves to PyTorch attention because it
   is faster there (on Hopper: fewer than 4,096 tokens, head dims above 128; logged at INFO); otherwise
   `comfy_sage.sageattn` runs the kernel. Kernels that load later are picked up without change: the plan
   says so.
The fallback is the previous override if there was one, else ComfyUI's `attention_pytorch`, never `func`
(ComfyUI's global default, which is itself SageAttention under `--use-sage-attention`). Calls arrive with
`_inside_attn_wrapper` set, so calling a decorated backend does not re-enter the override. ComfyUI 0.38's
call sites wrap q/k/v in tensor containers and pass a layer's `preferred_attention`; ComfyUI drops that keyword
and unwraps the containers before it calls an override without a `container_function` attribute, which
`SageOverride` must therefore never have (it receives plain tensors, as from older releases).

Layouts: q/k/v are [b, tokens, heads·dim] (heads from `heads`, K/V heads from their width: GQA) or, with
`skip_reshape`, [b, heads, tokens, dim]; the output is [b, tokens, heads·dim] or, with
`skip_output_reshape`, [b, heads, tokens, dim]. `scale` is the softmax scale; float32 inputs are accepted
(computed in bf16, returned in float32). `attn_precision` is ignored, as `attention_pytorch` ignores it.

The quality guard (`StepWrapper`, an APPLY_MODEL wrapper on the clone: one call per model evaluation)
- Precision schedule: the wrapper finds the step from the sampler's `sample_sigmas` and the current sigma
  (an evaluation at σ_i, or between σ_i and σ_i+1 like a midpoint, is step i) and puts the step's mode
  into a fresh `StepState` in a shallow copy of `transformer_options`, which reaches every attention call
  of that evaluation. This costs one read of sigma per evaluation, and only with edge_steps > 0.
- Non-finite protection without a device-to-host sync per attention call: each kernel output adds
  `~isfinite(out).all()` to a 0-dim device flag in the StepState (a reduction queued on the stream, never
  read there). The wrapper reads the flag once, after the evaluation, and only if a kernel ran in it. If it
  is set, the evaluation is recomputed with every attention call on `attention_pytorch`, and this is logged
  once per patched model. Without the wrapper (a model run outside a sampler) calls use the node's mode and
  go unguarded.
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__, capability, dispatch, doctor
from ._inputs import key_mask_rows
from .api import sageattn
from .modes import Mode

logger = logging.getLogger("comfy_sage")

# Pinned: saved workflows store node ids, input names and option strings (tests/comfyui/test_comfyui_nodes.py).
PATCH_NODE_ID = "ComfySagePatchAttention"
PATCH_DISPLAY_NAME = "Patch Sage Attention"
INFO_NODE_ID = "ComfySageInfo"
INFO_DISPLAY_NAME = "Sage Attention Info"
CATEGORY = "model/patch"
MODE_CHOICES: dict[str, Mode] = {
    "auto": Mode.AUTO,
    "int8+fp8": Mode.INT8_FP8,
    "int4+fp8": Mode.INT4_FP8,
    "int8+fp16": Mode.INT8_FP16,
    "int8+int8": Mode.INT8_INT8,
    "off (PyTorch)": Mode.SDPA,
}
EDGE_MODE_CHOICES: dict[str, Mode] = {"int8+fp16": Mode.INT8_FP16, "off (PyTorch)": Mode.SDPA}
MAX_EDGE_STEPS = 1000

OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's per-model hook
STATE_KEY = "comfy_sage_step"  # our StepState inside one evaluation's transformer_options
WRAPPER_KEY = "comfy_sage"  # our APPLY_MODEL wrapper's key on the ModelPatcher
MIN_COMFYUI = "0.3.60"  # the first release with optimized_attention_override

# The attention backend signature every ComfyUI backend shares, in positional order.
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_SIGMA_RTOL = 1e-4  # a sigma this close to a schedule entry is that entry (float32 round trips)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PatchSettings:
    """What one node instance asked for, validated once."""

    mode: Mode = Mode.AUTO
    edge_steps: int = 0
    edge_mode: Mode = Mode.INT8_FP16
    nonfinite_guard: bool = True

    @classmethod
    def from_node(
        cls,
        mode: str = "auto",
        edge_steps: int = 0,
        edge_mode: str = "int8+fp16",
        nonfinite_guard: bool = True,
    ) -> PatchSettings:
        """Settings from the node's widget values; `ValueError`/`TypeError` naming the input at fault."""
        if isinstance(edge_steps, bool) or not isinstance(edge_steps, int):
            raise TypeError(f"edge_steps must be an int; got {type(edge_steps).__name__}")
        if not 0 <= edge_steps <= MAX_EDGE_STEPS:
            raise ValueError(f"edge_steps must be in 0..{MAX_EDGE_STEPS}; got {edge_steps}")
        if not isinstance(nonfinite_guard, bool):
            raise TypeError(f"nonfinite_guard must be a bool; got {type(nonfinite_guard).__name__}")
        return cls(
            _choice("mode", mode, MODE_CHOICES),
            edge_steps,
            _choice("edge_mode", edge_mode, EDGE_MODE_CHOICES),
            nonfinite_guard,
        )

    @property
    def uses_kernels(self) -> bool:
        return self.mode is not Mode.SDPA

    def step_mode(self, step: int | None, steps: int | None) -> Mode:
        """The mode of sampling step `step` of `steps` (both None when unknown: the node's mode)."""
        if self.mode is Mode.SDPA or not self.edge_steps or step is None or steps is None:
            return self.mode
        return self.edge_mode if step < self.edge_steps or step >= steps - self.edge_steps else self.mode


def _choice(name: str, value: object, choices: dict[str, Mode]) -> Mode:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return choices[value]


# ------------------------------------------------------------------------------------------- ComfyUI glue


@dataclass(frozen=True)
class ComfyHooks:
    """The few pieces of ComfyUI the patch uses, looked up once (the tests pass a stand-in)."""

    pytorch_attention: Callable[..., torch.Tensor]
    override_supported: bool  # False before ComfyUI 0.3.60: the override key would be ignored
    apply_model_wrapper: str | None  # WrappersMP.APPLY_MODEL, None where ComfyUI has no wrapper system

    @classmethod
    def from_comfy(cls) -> ComfyHooks:
        """Import ComfyUI's attention module and wrapper registry (only inside a running ComfyUI)."""
        from comfy.ldm.modules import attention

        try:
            from comfy.patcher_extension import WrappersMP

            apply_model = WrappersMP.APPLY_MODEL
        except (ImportError, AttributeError):
            apply_model = None
        return cls(attention.attention_pytorch, hasattr(attention, "wrap_attn"), apply_model)


class Reporter:
    """Logs each kind of event once per patched model (a ModelPatcher clone and its own clones)."""

    def __init__(self, label: str):
        self.label = label
        self._seen: set[str] = set()

    def once(self, key: str, message: str, level: int = logging.WARNING) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        logger.log(level, "Patch Sage Attention [%s]: %s", self.label, message)
        return True


@dataclass(frozen=True)
class AttentionCall:
    """The parts of one ComfyUI attention call the override reads (the call itself is passed on untouched)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: torch.Tensor | None
    skip_reshape: bool
    skip_output_reshape: bool
    scale: float | None
    head_dim: int


def bind_call(args: Sequence[Any], kwargs: dict[str, Any]) -> AttentionCall:
    """Read a backend call `(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, **kwargs)`; `TypeError`/`ValueError` on what no backend could run."""
    if len(args) > len(_POSITIONAL):
        raise TypeError(f"attention takes at most {len(_POSITIONAL)} positional arguments; got {len(args)}")
    bound = dict(zip(_POSITIONAL, args, strict=False))
    for name in _POSITIONAL:
        if name in kwargs:
            if name in bound:
                raise TypeError(f"attention got multiple values for argument {name!r}")
            bound[name] = kwargs[name]
    for name in ("q", "k", "v", "heads"):
        if name not in bound:
            raise TypeError(f"attention is missing the argument {name!r}")
    q, k, v, heads = bound["q"], bound["k"], bound["v"], bound["heads"]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    try:
        heads = operator.index(heads) if not isinstance(heads, bool) else 0
    except TypeError:
        heads = 0
    if heads < 1:
        raise ValueError(f"heads must be a positive int; got {bound['heads']!r}")
    skip_reshape = bool(bound.get("skip_reshape", False))
    want = 4 if skip_reshape else 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            shape = "[batch, heads, tokens, dim]" if skip_reshape else "[batch, tokens, heads·dim]"
            raise ValueError(
                f"{name} must be {want}-D {shape} with skip_reshape={skip_reshape}; got shape {tuple(t.shape)}"
            )
    if skip_reshape:
        head_dim = q.shape[-1]
    else:
        if q.shape[-1] % heads:
            raise ValueError(f"q's last dim {q.shape[-1]} is not a multiple of heads={heads}")
        head_dim = q.shape[-1] // heads
    mask = bound.get("mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    scale = kwargs.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    return AttentionCall(
        q, k, v, heads, mask, skip_reshape, bool(bound.get("skip_output_reshape", False)), scale, head_dim
    )


def kernel_blocker(call: AttentionCall) -> str | None:
    """Why `comfy_sage.sageattn` cannot take this call as it is (ComfyUI's PyTorch attention may), or None."""
    q, k, v, d = call.q, call.k, call.v, call.head_dim
    if not call.skip_reshape:
        if d == 0 or k.shape[-1] % d or v.shape[-1] != k.shape[-1]:
            return f"k/v widths {k.shape[-1]}/{v.shape[-1]} are not heads × q's head dim {d}"
        heads_kv = k.shape[-1] // d
    else:
        if k.shape[-1] != d or v.shape[-1] != d:
            return f"k/v head dims {k.shape[-1]}/{v.shape[-1]} differ from q's {d}"
        if k.shape[1] != v.shape[1]:
            return f"k and v have different head counts ({k.shape[1]}, {v.shape[1]})"
        heads_kv = k.shape[1]
    heads_q = q.shape[1] if call.skip_reshape else call.heads
    if heads_kv == 0 or heads_q % heads_kv:
        return f"q's {heads_q} heads are not a multiple of k/v's {heads_kv}"
    seq = 2 if call.skip_reshape else 1
    if not q.shape[0] == k.shape[0] == v.shape[0] or k.shape[seq] != v.shape[seq]:
        return "q, k and v disagree on batch size or k/v token count"
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        return "q, k and v differ in dtype or device"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "the kernels have no backward pass (training needs PyTorch attention)"
    if call.scale is not None and not 0 < call.scale < float("inf"):
        return f"scale {call.scale} is not a positive finite number"
    return None


def key_mask(call: AttentionCall) -> torch.Tensor | None:
    """The call's mask as ComfyUI's `attention_pytorch` hands it to SDPA ([n_q, n_kv] and [b, n_q, n_kv] get the
    missing batch and heads dimensions) when it depends on the key alone, which the kernels take; else None."""
    mask = call.mask
    if mask is None or not (mask.dtype == torch.bool or mask.dtype.is_floating_point) or mask.device != call.q.device:
        return None
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    seq = 2 if call.skip_reshape else 1
    if mask.dim() != 4 or key_mask_rows(mask, call.q.shape[0], call.k.shape[seq]) is None:
        return None
    return mask


def kernel_attention(call: AttentionCall, mode: Mode, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`comfy_sage.sageattn` on a ComfyUI call, in ComfyUI's output layout (no copies but the output's), with a
    key mask from `key_mask`."""
    if call.skip_reshape:
        q, k, v, layout = call.q, call.k, call.v, "HND"
    else:  # [b, n, h·d] → [b, n, h, d] views; K/V may have fewer heads (GQA)
        d = call.head_dim
        q = call.q.unflatten(-1, (call.heads, d))
        k, v = (t.unflatten(-1, (t.shape[-1] // d, d)) for t in (call.k, call.v))
        layout = "NHD"
    out = sageattn(q, k, v, mask, tensor_layout=layout, sm_scale=call.scale, mode=mode)
    if call.skip_output_reshape:
        return out if layout == "HND" else out.transpose(1, 2)
    return (out.transpose(1, 2) if layout == "HND" else out).flatten(2)


# --------------------------------------------------------------------------------------------- the patch


class StepState:
    """One model evaluation: its mode, whether it is a recomputation, and the device-side non-finite flag."""

    __slots__ = ("_nonfinite", "kernel_calls", "mode", "recovering")

    def __init__(self, mode: Mode, recovering: bool = False):
        self.mode = mode
        self.recovering = recovering
        self.kernel_calls = 0
        self._nonfinite: torch.Tensor | None = None

    def note_output(self, out: torch.Tensor) -> None:
        """Fold `out`'s finiteness into the flag: queued on the device, never read here."""
        bad = torch.logical_not(torch.isfinite(out).all())
        if self._nonfinite is None:
            self._nonfinite = bad
        else:
            self._nonfinite = torch.logical_or(self._nonfinite, bad.to(self._nonfinite.device, non_blocking=True))

    def saw_nonfinite(self) -> bool:
        """Read the flag: the one device-to-host sync of an evaluation, and none when no kernel ran."""
        return self._nonfinite is not None and bool(self._nonfinite)


class SageOverride:
    """ComfyUI's `optimized_attention_override` for one patched model (see the module docstring)."""

    __slots__ = ("hooks", "previous", "reporter", "settings")

    def __init__(self, settings: PatchSettings, hooks: ComfyHooks, previous: Callable | None, reporter: Reporter):
        self.settings = settings
        self.hooks = hooks
        self.previous = previous
        self.reporter = reporter

    def __deepcopy__(self, memo: dict) -> SageOverride:
        return self  # immutable; clones of the patched model share it (and its one-time log)

    @property
    def fallback_name(self) -> str:
        return "the previous attention override" if self.previous is not None else "ComfyUI's PyTorch attention"

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = bind_call(args, kwargs)
        options = kwargs.get("transformer_options") or {}
        state = options.get(STATE_KEY) if isinstance(options, dict) else None
        if state is not None and state.recovering:
            return self.hooks.pytorch_attention(*args, **kwargs)
        if kwargs.get("low_precision_attention", True) is False:
            why = "a call site asked for full precision (low_precision_attention=False)"
            return self._fallback(why, func, args, kwargs, level=logging.INFO)
        mode = state.mode if state is not None else self.settings.mode
        if mode is Mode.SDPA:
            return self.hooks.pytorch_attention(*args, **kwargs)
        blocker = kernel_blocker(call)
        if blocker is not None:
            return self._fallback(blocker, func, args, kwargs)
        seq = 2 if call.skip_reshape else 1
        mask = key_mask(call)
        plan = dispatch.plan(
            mode, call.q.device, call.head_dim, call.q.dtype, call.mask is not None and mask is None,
            call.k.shape[seq], seq_q=call.q.shape[seq], key_mask=mask is not None,
        )  # fmt: skip
        if plan.fallback:
            why = plan.reason or f"{mode.value} has no kernel here"
            return self._fallback(why, func, args, kwargs, level=plan.log_level)
        out = kernel_attention(call, mode, mask)
        if state is not None:
            state.kernel_calls += 1
            if self.settings.nonfinite_guard:
                state.note_output(out)
        return out

    def _fallback(self, why: str, func: Callable, args: tuple, kwargs: dict, level: int = logging.WARNING):
        self.reporter.once(why, f"{why}; using {self.fallback_name} for those calls", level)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return self.hooks.pytorch_attention(*args, **kwargs)


def step_of(sample_sigmas: object, sigma: object) -> tuple[int, int] | None:
    """(step, steps) of the sampler step whose interval [σ_i, σ_i+1) holds `sigma`; None when unknown.

    `sample_sigmas` is the sampler's schedule (steps + 1 values, decreasing); `sigma` the current sigma (a
    tensor of one value per batch item, or a number). Reads `sigma` on the host: one sync per evaluation.
    """
    if not isinstance(sample_sigmas, torch.Tensor) or sample_sigmas.dim() != 1 or sample_sigmas.numel() < 2:
        return None
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 0:
            return None
        sigma = sigma.reshape(-1)[0]
    schedule = sample_sigmas.detach().float().cpu()
    s = float(sigma)
    steps = schedule.numel() - 1
    reached = schedule[:steps] >= s - abs(s) * _SIGMA_RTOL
    step = int(reached.sum()) - 1
    return min(max(step, 0), steps - 1), steps


class StepWrapper:
    """The APPLY_MODEL wrapper: sets each evaluation's mode and recomputes one that produced NaN/Inf."""

    __slots__ = ("reporter", "settings")

    def __init__(self, settings: PatchSettings, reporter: Reporter):
        self.settings = settings
        self.reporter = reporter

    def __deepcopy__(self, memo: dict) -> StepWrapper:
        return self

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        # BaseModel._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if "transformer_options" in kwargs:
            options, where = kwargs["transformer_options"], "kwarg"
        elif len(args) > 5:
            options, where = args[5], 5
        else:
            return executor(*args, **kwargs)
        if not isinstance(options, dict):
            return executor(*args, **kwargs)
        step = None
        if self.settings.edge_steps and self.settings.uses_kernels:
            sigma = args[1] if len(args) > 1 else kwargs.get("t")
            step = step_of(options.get("sample_sigmas"), sigma)
            if step is None:
                self.reporter.once(
                    "no-schedule",
                    "this sampler passes no sample_sigmas, so edge_steps cannot tell the step; all steps use the "
                    "node's mode",
                )
        mode = self.settings.step_mode(*(step or (None, None)))

        def run(state: StepState) -> Any:
            new_options = {**options, STATE_KEY: state}
            if where == "kwarg":
                return executor(*args, **{**kwargs, "transformer_options": new_options})
            return executor(*args[:5], new_options, *args[6:], **kwargs)

        state = StepState(mode)
        out = run(state)
        if self.settings.nonfinite_guard and state.kernel_calls and state.saw_nonfinite():
            step = step or step_of(options.get("sample_sigmas"), args[1] if len(args) > 1 else kwargs.get("t"))
            where_text = f"step {step[0] + 1} of {step[1]}" if step else "a step"
            self.reporter.once(
                "nonfinite",
                f"quantized attention produced NaN/Inf in {where_text}; that evaluation was recomputed with "
                "ComfyUI's PyTorch attention (logged once; later recoveries are silent)",
            )
            out = run(StepState(mode, recovering=True))
        return out


def model_label(model: object) -> str:
    """A short name for log lines: the model class (Flux, WAN21, SDXL, ...)."""
    inner = getattr(model, "model", None)
    return type(inner if inner is not None else model).__name__


def patch_model(model: Any, settings: PatchSettings, hooks: ComfyHooks) -> Any:
    """A clone of the ModelPatcher `model` whose attention runs through comfy_sage (the module docstring)."""
    if not callable(getattr(model, "clone", None)) or not isinstance(getattr(model, "model_options", None), dict):
        raise TypeError(f"model must be a ComfyUI MODEL (a ModelPatcher); got {type(model).__name__}")
    if not hooks.override_supported:
        logger.warning(
            "Patch Sage Attention: this ComfyUI has no per-model attention override (ComfyUI >= %s has it); "
            "the model is left unchanged. Update ComfyUI to use the node.",
            MIN_COMFYUI,
        )
        return model
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if isinstance(previous, SageOverride):  # patched twice: replace ours, keep what ours fell back to
        previous = previous.previous
    reporter = Reporter(model_label(patched))
    options[OVERRIDE_KEY] = SageOverride(settings, hooks, previous, reporter)

    if hooks.apply_model_wrapper is not None:
        remove = getattr(patched, "remove_wrappers_with_key", None)
        if callable(remove):
            remove(hooks.apply_model_wrapper, WRAPPER_KEY)
        if settings.uses_kernels and (settings.edge_steps or settings.nonfinite_guard):
            patched.add_wrapper_with_key(hooks.apply_model_wrapper, WRAPPER_KEY, StepWrapper(settings, reporter))
    elif settings.uses_kernels and (settings.edge_steps or settings.nonfinite_guard):
        reporter.once("no-wrappers", "this ComfyUI has no model wrappers: edge_steps and nonfinite_guard are off")
    return patched


# ------------------------------------------------------------------------------------------ node schema


@dataclass(frozen=True)
class InputSpec:
    """One node input, described once for both the V1 dict and the V3 schema."""

    name: str
    kind: str  # "MODEL", "COMBO", "INT" or "BOOLEAN"
    tooltip: str
    options: tuple[str, ...] = ()
    default: object = None
    min: int | None = None
    max: int | None = None


MODE_TOOLTIP = (
    "Precision of the two attention matmuls (Q·Kᵀ + P·V).\n"
    "auto: the fastest accurate mode this GPU runs: int8+int8 (int8+fp8 at head dim 64, e.g. SDXL, on "
    "H100/H200); PyTorch on GPUs older than RTX 30/A100, and on H100/H200 for calls under 4,096 tokens (text "
    "cross attention, small latents) and head dims above 128, where PyTorch is faster.\n"
    "int8+fp8: native on sm_89/90/120 (RTX 40, H100/H200, RTX 50); the fastest mode at head dim 64 on "
    "H100/H200, FP8 P·V costs a little accuracy. Runs as int8+fp16 on RTX 30/A100.\n"
    "int4+fp8: native on sm_89 (RTX 40, L40) only; fastest there, lossiest (video first). Runs as the "
    "nearest 8-bit mode elsewhere.\n"
    "int8+fp16: native on any sm_80+ GPU (RTX 30 and newer, A100); the most accurate quantized mode.\n"
    "int8+int8: native on any sm_80+ GPU (RTX 30 and newer, A100, H100/H200); INT8 P·V with exact integer "
    "sums: more accurate than int8+fp8, faster than int8+fp16; on H100/H200 as fast as int8+fp8 or faster "
    "at head dim 128 (Flux, Wan), 10-15% slower at 64.\n"
    "off (PyTorch): ComfyUI's PyTorch attention, no quantization.\n"
    "Whatever a GPU cannot run natively runs the nearest mode it can; anything no kernel runs (head dim, "
    "mask, no CUDA) runs PyTorch attention, with one log line saying why."
)
EDGE_STEPS_TOOLTIP = (
    "Run the first N and the last N sampling steps in edge_mode: the first steps set the composition, the "
    "last the fine detail, where quantization error shows most. 0 = off. Counted per sampler run."
)
EDGE_MODE_TOOLTIP = (
    "What the edge steps run: int8+fp16 (the most accurate kernel) or off (PyTorch) (no quantization). On "
    "H100/H200, off (PyTorch) is both: int8+fp16 runs on the RTX-class kernel there, slower than PyTorch."
)
GUARD_TOOLTIP = (
    "If quantized attention produces NaN or Inf (black images), recompute that step with PyTorch attention "
    "and log it once. Costs one small check per step, no sync per attention call."
)
PATCH_DESCRIPTION = (
    "Runs this model's attention through SageAttention2 low-bit kernels (comfy_sage), on a copy of the model: "
    "bypass the node to get stock attention back. Anything the kernels cannot run uses ComfyUI's PyTorch "
    "attention, with one log line saying why."
)
INFO_DESCRIPTION = "What this machine gets from comfy_sage: GPU, kernels, and the mode each head dim runs."

PATCH_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("model", "MODEL", "The diffusion model to patch (a patched copy is returned)."),
    InputSpec("mode", "COMBO", MODE_TOOLTIP, tuple(MODE_CHOICES), "auto"),
    InputSpec("edge_steps", "INT", EDGE_STEPS_TOOLTIP, default=0, min=0, max=MAX_EDGE_STEPS),
    InputSpec("edge_mode", "COMBO", EDGE_MODE_TOOLTIP, tuple(EDGE_MODE_CHOICES), "int8+fp16"),
    InputSpec("nonfinite_guard", "BOOLEAN", GUARD_TOOLTIP, default=True),
)


def v1_input_types(specs: Sequence[InputSpec]) -> dict:
    """The V1 `INPUT_TYPES()` dict."""
    required = {}
    for spec in specs:
        extra: dict[str, object] = {"tooltip": spec.tooltip}
        if spec.default is not None:
            extra["default"] = spec.default
        if spec.kind == "INT":
            extra.update(min=spec.min, max=spec.max, step=1)
        kind = list(spec.options) if spec.kind == "COMBO" else spec.kind
        required[spec.name] = (kind, extra)
    return {"required": required}


def v3_inputs(io: Any, specs: Sequence[InputSpec]) -> list:
    """The V3 schema inputs, built with ComfyUI's `comfy_api.latest.io` module (passed in)."""
    inputs = []
    for spec in specs:
        if spec.kind == "MODEL":
            inputs.append(io.Model.Input(spec.name, tooltip=spec.tooltip))
        elif spec.kind == "COMBO":
            inputs.append(
                io.Combo.Input(spec.name, options=list(spec.options), default=spec.default, tooltip=spec.tooltip)
            )
        elif spec.kind == "INT":
            inputs.append(
                io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=1, tooltip=spec.tooltip)
            )
        elif spec.kind == "BOOLEAN":
            inputs.append(io.Boolean.Input(spec.name, default=spec.default, tooltip=spec.tooltip))
        else:
            raise ValueError(f"unknown input kind {spec.kind!r} for {spec.name!r}")
    return inputs


# ------------------------------------------------------------------------------------------ node bodies


def execute_patch(
    model: Any,
    mode: str = "auto",
    edge_steps: int = 0,
    edge_mode: str = "int8+fp16",
    nonfinite_guard: bool = True,
    *,
    hooks: ComfyHooks | None = None,
) -> Any:
    """The "Patch Sage Attention" node: both the V1 and the V3 class call this."""
    settings = PatchSettings.from_node(mode, edge_steps, edge_mode, nonfinite_guard)
    return patch_model(model, settings, hooks if hooks is not None else ComfyHooks.from_comfy())


def info_report() -> str:
    """The "Sage Attention Info" node: the `doctor` report."""
    return doctor.render(doctor.summary())


def startup_line() -> str:
    """One line for ComfyUI's start-up log: the kernel status, without touching the GPU."""
    status = capability.kernel_status()
    where = os.path.dirname(os.path.abspath(__file__))
    if status.loaded:
        archs = ", ".join(status.archs) or "?"
        return f"comfy_sage {__version__} ({where}): kernels loaded, built for {archs}"
    return (
        f"comfy_sage {__version__} ({where}): kernels not loaded ({status.reason}); Patch Sage Attention runs "
        "ComfyUI's PyTorch attention until they are. The Sage Attention Info node shows details."
    )

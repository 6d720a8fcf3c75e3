"""The attention override, call by call: layouts, heads, GQA, masks, scale, dtypes, fallbacks, chaining, logs."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from comfy_stub import attention, patcher
from conftest import make_model, model_inputs
from fake_kernels import FakeKernels

from comfy_sage import capability, comfyui
from comfy_sage.modes import Mode

LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]


def make_qkv(skip_reshape, *, b=2, h=4, n=24, m=None, d=32, hkv=None, dtype=torch.float32, seed=0):
    """ComfyUI-layout q, k, v: [b, n, h·d] or, with skip_reshape, [b, h, n, d]."""
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    hkv = h if hkv is None else hkv
    q, k, v = (torch.randn(b, hh, nn, d, generator=g) for hh, nn in ((h, n), (hkv, m), (hkv, m)))
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def expected(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, scale=None):
    """Exact attention in float64 for a ComfyUI call, written from the layout contract alone."""
    if skip_reshape:
        qh, kh, vh = q, k, v
    else:
        d = q.shape[-1] // heads
        qh, kh, vh = (t.unflatten(-1, (t.shape[-1] // d, d)).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 3 else mask
        mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
        # In float64 (SDPA on the CPU gave float64 inputs with a float32 mask a wrong result, torch 2.13).
        mask = mask if mask.dtype == torch.bool else mask.double()
    out = F.scaled_dot_product_attention(
        qh.double(), kh.double(), vh.double(), attn_mask=mask, scale=scale, enable_gqa=qh.shape[1] != kh.shape[1]
    ).to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def patched(hooks, mode="auto", **options):
    return comfyui.execute_patch(make_model(), mode, hooks=hooks, **options)


def attend(model, *args, **kwargs):
    """Call attention as a ComfyUI model does: the global default backend, with transformer_options."""
    return attention.optimized_attention(
        *args, transformer_options=model.model_options["transformer_options"], **kwargs
    )


@pytest.mark.parametrize("skip_reshape,skip_output_reshape", LAYOUTS)
@pytest.mark.parametrize("gqa", [False, True])
def test_kernel_path_handles_both_layouts_and_gqa(hooks, kernels, skip_reshape, skip_output_reshape, gqa):
    model = patched(hooks)
    q, k, v = make_qkv(skip_reshape, h=4, hkv=2 if gqa else 4, n=24, m=40)
    out = attend(model, q, k, v, 4, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, enable_gqa=gqa)
    want = expected(q, k, v, 4, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    assert out.shape == want.shape == ((2, 4, 24, 32) if skip_output_reshape else (2, 24, 128))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    (call,) = kernels.calls
    assert call["layout"] == ("HND" if skip_reshape else "NHD")
    assert call["k"] == ((2, 2 if gqa else 4, 40, 32) if skip_reshape else (2, 40, 2 if gqa else 4, 32))
    assert call["mode"] is Mode.AUTO
    assert not attention.CALLS  # neither PyTorch attention nor the global default ran


def test_heads_can_be_a_keyword_and_scale_is_passed(hooks, kernels):
    model = patched(hooks)
    q, k, v = make_qkv(False, h=2, d=64)
    out = attend(model, q, k, v, heads=2, scale=0.05)
    torch.testing.assert_close(out, expected(q, k, v, 2, scale=0.05), rtol=1e-5, atol=1e-5)
    assert kernels.calls[0]["scale"] == 0.05
    attend(model, q, k, v, heads=2)
    assert kernels.calls[1]["scale"] is None  # the kernel's default 1/sqrt(d)


@pytest.mark.parametrize("mode", ["auto", "off (PyTorch)"])
def test_newer_comfyui_call_sites_containers_and_preferred_attention(hooks, kernels, mode):
    """ComfyUI 0.38's call sites wrap q/k/v in tensor containers and pass `preferred_attention`: the override is
    a plain callable (no `container_function`), so ComfyUI hands it tensors, and either path gives attention."""
    model = patched(hooks, mode)
    assert not hasattr(model.model_options["transformer_options"][comfyui.OVERRIDE_KEY], "container_function")
    q, k, v = make_qkv(True, m=40)
    wrapped = [attention.AttentionTensorContainer(t) for t in (q, k, v)]
    out = attend(model, *wrapped, 4, skip_reshape=True, preferred_attention=object())
    torch.testing.assert_close(out, expected(q, k, v, 4, skip_reshape=True), rtol=1e-5, atol=1e-5)
    if mode == "auto":
        assert len(kernels.calls) == 1 and not attention.CALLS
    else:
        assert attention.CALLS == {"pytorch": 1} and not kernels.calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_are_kept(hooks, kernels, dtype):
    model = patched(hooks)
    q, k, v = make_qkv(True, dtype=dtype)
    out = attend(model, q, k, v, 4, skip_reshape=True)
    assert out.dtype == dtype
    assert kernels.calls[0]["dtype"] == dtype
    torch.testing.assert_close(out.float(), expected(q, k, v, 4, skip_reshape=True).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mask_shape", [(24, 40), (2, 24, 40), (2, 1, 24, 40)])
def test_masks_run_pytorch_attention_and_log_once(hooks, kernels, caplog, mask_shape):
    model = patched(hooks)
    q, k, v = make_qkv(False, m=40)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True  # every row sees a key
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        for _ in range(3):
            out = attend(model, q, k, v, 4, mask)
    torch.testing.assert_close(out, expected(q, k, v, 4, mask), rtol=1e-5, atol=1e-5)
    assert attention.CALLS == {"pytorch": 3} and not kernels.calls
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "key masks only" in lines[0] and "ComfyUI's PyTorch attention" in lines[0]


@pytest.mark.parametrize("mask_shape", [(1, 1, 40), (2, 1, 40), (1, 40), (2, 1, 1, 40)])
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_key_masks_run_the_kernel(hooks, kernels, caplog, mask_shape, skip_reshape):
    # HunyuanVideo-style text padding: one additive value per key (0, or -finfo.max on padding), [1, 1, n_kv];
    # ComfyUI's attention_pytorch gives 2-D and 3-D masks batch and heads dimensions as it hands them to SDPA.
    model = patched(hooks)
    q, k, v = make_qkv(skip_reshape, m=40)
    mask = torch.zeros(mask_shape)
    mask[..., 30:] = -torch.finfo(torch.float32).max
    mask[-1, ..., 25:] = -torch.finfo(torch.float32).max  # the last batch row (where there is one) pads more
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        out = attend(model, q, k, v, 4, mask, skip_reshape=skip_reshape)
    torch.testing.assert_close(out, expected(q, k, v, 4, mask, skip_reshape=skip_reshape), rtol=1e-5, atol=1e-5)
    assert attention.CALLS == {} and len(kernels.calls) == 1 and not caplog.records
    sent = kernels.calls[0]["mask"]
    rows = mask_shape[0] if len(mask_shape) > 2 else 1
    assert sent.shape == (rows, 1, 1, 40) and torch.equal(sent.reshape(rows, 40), mask.reshape(rows, 40))


@pytest.mark.parametrize("dtype", [torch.int64, None])
def test_key_masks_the_kernels_cannot_take_run_pytorch_attention(hooks, kernels, dtype):
    # An integer mask (SDPA rejects it too) and a mask of a batch the call does not have.
    model = patched(hooks)
    q, k, v = make_qkv(False, m=40)
    mask = torch.zeros((1, 1, 40), dtype=dtype) if dtype else torch.zeros((3, 1, 40))
    with contextlib.suppress(RuntimeError):  # PyTorch's own verdict on the mask: what matters is who was asked
        attend(model, q, k, v, 4, mask)
    assert attention.CALLS == {"pytorch": 1} and not kernels.calls


@pytest.mark.parametrize("head_dim", [16, 160, 256])
def test_head_dims_without_a_kernel_fall_back(hooks, kernels, caplog, head_dim):
    model = patched(hooks)
    q, k, v = make_qkv(True, h=2, d=head_dim)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        out = attend(model, q, k, v, 2, skip_reshape=True)
    torch.testing.assert_close(out, expected(q, k, v, 2, skip_reshape=True), rtol=1e-5, atol=1e-5)
    assert attention.CALLS == {"pytorch": 1} and not kernels.calls
    assert f"head_dim {head_dim}" in caplog.text


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_auto_leaves_calls_with_few_tokens_to_pytorch_attention_and_says_so_once_at_info(
    hooks, kernels, caplog, skip_reshape
):
    """Where `auto`'s plan says PyTorch attention is faster (Hopper below 4,096 tokens), the call runs it: the
    plan is told the call's query and key token counts in either layout, and the choice is news, not a warning."""
    kernels.min_tokens = 30
    model = patched(hooks)
    short_q, cross, long = (make_qkv(skip_reshape, n=n, m=m) for n, m in ((24, 40), (40, 7), (40, 36)))
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        for qkv in (short_q, cross, short_q, long):
            out = attend(model, *qkv, 4, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape)
    torch.testing.assert_close(
        out, expected(*long, 4, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape), rtol=1e-5, atol=1e-5
    )
    assert attention.CALLS == {"pytorch": 3} and len(kernels.calls) == 1
    assert kernels.planned[:4] == [(24, 40), (40, 7), (24, 40), (40, 36)]
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"Patch Sage Attention [BaseModel]: {kernels.FEW_TOKENS_REASON}; using ComfyUI's PyTorch "
         "attention for those calls")
    ]  # fmt: skip
    explicit = patched(hooks, "int8+fp8")  # an explicit mode keeps the kernel
    attend(explicit, *short_q, 4, skip_reshape=skip_reshape, skip_output_reshape=skip_reshape)
    assert len(kernels.calls) == 2 and attention.CALLS == {"pytorch": 3}


def test_auto_on_an_h100_runs_short_calls_on_pytorch_attention_and_long_ones_on_the_kernel(hooks, caplog):
    """The real plan and kernels on sm_90: a 1,024-token call runs ComfyUI's PyTorch attention (faster there),
    a 4,096-token one the wgmma kernel."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100/H200): the routing by token count is Hopper's")
    if not capability.kernels_run_on(torch.device("cuda"), "sm90"):
        pytest.skip("needs the compiled kernels with sm_90a code")
    model = patched(hooks)
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        for n in (1024, 4096, 1024):
            q, k, v = (t.cuda() for t in make_qkv(False, b=1, h=4, n=n, d=64, dtype=torch.bfloat16))
            out = attend(model, q, k, v, 4)
            torch.testing.assert_close(out.float(), expected(q, k, v, 4).float(), rtol=0, atol=2e-2)
    assert attention.CALLS == {"pytorch": 2}
    (record,) = caplog.records
    assert (
        record.levelno == logging.INFO and "for calls with fewer than 4,096 query or key tokens" in record.getMessage()
    )


def test_low_precision_attention_false_is_honoured(hooks, kernels, caplog):
    model = patched(hooks, "int8+fp8")
    q, k, v = make_qkv(False)
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        out = attend(model, q, k, v, 4, low_precision_attention=False)
        attend(model, q, k, v, 4, low_precision_attention=False)
    torch.testing.assert_close(out, expected(q, k, v, 4), rtol=1e-5, atol=1e-5)
    assert attention.CALLS == {"pytorch": 2} and not kernels.calls
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "low_precision_attention=False" in record.getMessage()
    attend(model, q, k, v, 4, low_precision_attention=True)
    assert len(kernels.calls) == 1


def test_off_mode_runs_pytorch_attention_even_with_kernels(hooks, kernels, caplog):
    model = patched(hooks, "off (PyTorch)")
    q, k, v = make_qkv(False)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        out = attend(model, q, k, v, 4)
    torch.testing.assert_close(out, expected(q, k, v, 4), rtol=1e-5, atol=1e-5)
    assert attention.CALLS == {"pytorch": 1} and not kernels.calls and not caplog.records


@pytest.mark.parametrize("mode", list(comfyui.MODE_CHOICES))
def test_each_mode_reaches_the_kernel_as_its_enum(hooks, kernels, mode):
    model = patched(hooks, mode)
    q, k, v = make_qkv(True)
    attend(model, q, k, v, 4, skip_reshape=True)
    if mode == "off (PyTorch)":
        assert not kernels.calls
    else:
        assert kernels.calls[0]["mode"] is comfyui.MODE_CHOICES[mode]


def test_without_kernels_every_call_runs_pytorch_attention_never_the_global_default(hooks):
    """On this CPU no plan has a kernel: the whole tiny model runs ComfyUI's PyTorch attention."""
    model = patched(hooks)
    x, ctx = model_inputs()
    t = torch.ones(2)
    stock = make_model().model.apply_model(x, t, None, ctx, None, {})
    assert attention.CALLS == {"default": 10}
    attention.CALLS.clear()
    out = model.model.apply_model(x, t, None, ctx, None, dict(model.model_options["transformer_options"]))
    assert attention.CALLS == {"pytorch": 10}
    torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-5)


def test_kernels_that_load_later_are_picked_up(hooks, monkeypatch):
    """The decision is per call (the plan), never frozen when the node runs."""
    model = patched(hooks)
    q, k, v = make_qkv(True)
    attend(model, q, k, v, 4, skip_reshape=True)
    assert attention.CALLS == {"pytorch": 1}
    fake = FakeKernels().install(monkeypatch.setattr)
    attend(model, q, k, v, 4, skip_reshape=True)
    assert len(fake.calls) == 1 and attention.CALLS == {"pytorch": 1}


def test_quantized_kernel_path_matches_stock_within_the_modes_error(hooks, monkeypatch):
    """The whole tiny model through the reference's INT8+FP8 quantization vs stock attention."""
    fake = FakeKernels(quantized=True).install(monkeypatch.setattr)
    x, ctx = model_inputs()
    t = torch.ones(2)
    stock = make_model().model.apply_model(x, t, None, ctx, None, {})
    model = patched(hooks, "int8+fp8")
    out = model.model.apply_model(x, t, None, ctx, None, dict(model.model_options["transformer_options"]))
    assert len(fake.calls) == 6  # 3 kernel-eligible calls per block, 2 blocks
    rel = ((out - stock).norm() / (stock - x).norm()).item()
    assert 0 < rel < 0.05


def test_chains_to_a_previous_override(hooks, kernels, caplog):
    seen = []

    def previous(func, *args, **kwargs):
        seen.append((func, args, kwargs))
        return func(*args, **kwargs)

    base = make_model()
    base.model_options["transformer_options"][comfyui.OVERRIDE_KEY] = previous
    model = comfyui.execute_patch(base, "auto", hooks=hooks)
    q, k, v = make_qkv(False)
    mask = torch.ones(24, 24, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        out = attend(model, q, k, v, 4, mask)
    assert len(seen) == 1 and seen[0][0] is attention.attention_default.__wrapped__
    assert seen[0][1][3] == 4 and seen[0][1][4] is mask and seen[0][2]["_inside_attn_wrapper"] is True
    assert attention.CALLS == {"default": 1}
    torch.testing.assert_close(out, expected(q, k, v, 4, mask), rtol=1e-5, atol=1e-5)
    assert "the previous attention override" in caplog.text
    attend(model, q, k, v, 4, low_precision_attention=False)
    assert len(seen) == 2 and seen[1][2]["low_precision_attention"] is False
    attend(model, q, k, v, 4)  # what a kernel runs never reaches the previous override
    assert len(seen) == 2 and len(kernels.calls) == 1


def test_patching_twice_replaces_ours_and_keeps_the_previous(hooks):
    def previous(func, *args, **kwargs):
        return func(*args, **kwargs)

    base = make_model()
    base.model_options["transformer_options"][comfyui.OVERRIDE_KEY] = previous
    once = comfyui.execute_patch(base, "int8+fp8", hooks=hooks)
    twice = comfyui.execute_patch(once, "int8+fp16", hooks=hooks)
    override = twice.model_options["transformer_options"][comfyui.OVERRIDE_KEY]
    assert override.previous is previous and override.settings.mode is Mode.INT8_FP16
    assert len(twice.wrappers[patcher.WrappersMP.APPLY_MODEL][comfyui.WRAPPER_KEY]) == 1
    assert once.model_options["transformer_options"][comfyui.OVERRIDE_KEY].settings.mode is Mode.INT8_FP8


def test_each_reason_is_logged_once_per_model(hooks, caplog):
    base = make_model()
    first = comfyui.execute_patch(base, "int8+fp8", hooks=hooks)
    second = comfyui.execute_patch(base, "int8+fp8", hooks=hooks)
    q, k, v = make_qkv(True)
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        for model in (first, second, first, second):
            attend(model, q, k, v, 4, skip_reshape=True)
            attend(model, q, k, v, 4, skip_reshape=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0] == lines[1]
    assert "int8_fp8 falls back to PyTorch attention: the inputs are on cpu" in lines[0]
    assert lines[0].startswith("Patch Sage Attention [BaseModel]: ")
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        attend(first, q, k, v, 4, low_precision_attention=False, skip_reshape=True)  # a new reason: one more line
        attend(first, q, k, v, 4, low_precision_attention=False, skip_reshape=True)
    assert len(caplog.records) == 3


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("q", "k", "v", 4), {}, TypeError, "q must be a torch.Tensor"),
        ((None, None, None, 0), {}, TypeError, "q must be"),
        ((), {}, TypeError, "missing the argument 'q'"),
        ((1, 2, 3, 4, None, None, False, False, 9), {}, TypeError, "at most 8 positional"),
        ((0, 0, 0), {"heads": 4, "q": 0}, TypeError, "multiple values for argument 'q'"),
    ],
)
def test_bad_calls_raise_clear_errors(hooks, args, kwargs, error, match):
    model = patched(hooks)
    with pytest.raises(error, match=match):
        model.model_options["transformer_options"][comfyui.OVERRIDE_KEY](None, *args, **kwargs)


def test_bad_tensors_raise_clear_errors(hooks):
    model = patched(hooks)
    q, k, v = make_qkv(False)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        attend(model, q, k, v, 0)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        attend(model, q, k, v, True)
    with pytest.raises(ValueError, match="not a multiple of heads=5"):
        attend(model, q, k, v, 5)
    with pytest.raises(ValueError, match="must be 4-D"):
        attend(model, q, k, v, 4, skip_reshape=True)
    with pytest.raises(ValueError, match="must be 3-D"):
        attend(model, q.unsqueeze(0), k, v, 4)
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor"):
        attend(model, q, k, v, 4, [[True]])
    with pytest.raises(TypeError, match="scale must be a float"):
        attend(model, q, k, v, 4, scale="0.1")


def _call(q, k, v, heads=4, **kwargs):
    return comfyui.bind_call((q, k, v, heads), kwargs)


def test_kernel_blockers_name_what_the_kernels_cannot_take():
    q, k, v = make_qkv(True, m=40)
    assert comfyui.kernel_blocker(_call(q, k, v, skip_reshape=True)) is None
    assert "k/v head dims 32/16 differ from q's 32" in comfyui.kernel_blocker(
        _call(q, k, v[..., :16], skip_reshape=True)
    )
    assert "different head counts" in comfyui.kernel_blocker(_call(q, k, v[:, :2], skip_reshape=True))
    assert "4 heads are not a multiple of k/v's 3" in comfyui.kernel_blocker(
        _call(q, k[:, :3], v[:, :3], skip_reshape=True)
    )
    assert "batch size" in comfyui.kernel_blocker(_call(q, k[:1], v[:1], skip_reshape=True))
    assert "token count" in comfyui.kernel_blocker(_call(q, k, v[:, :, :39], skip_reshape=True))
    assert "dtype or device" in comfyui.kernel_blocker(_call(q, k.half(), v, skip_reshape=True))
    assert "not a positive finite number" in comfyui.kernel_blocker(_call(q, k, v, skip_reshape=True, scale=-1.0))
    qf, kf, vf = make_qkv(False, m=40)
    assert comfyui.kernel_blocker(_call(qf, kf, vf)) is None
    assert "k/v widths 100/128 are not heads × q's head dim 32" in comfyui.kernel_blocker(_call(qf, kf[..., :100], vf))
    assert "k/v widths 128/64" in comfyui.kernel_blocker(_call(qf, kf, vf[..., :64]))
    assert comfyui.bind_call((qf, kf, vf, torch.tensor(4).item()), {}).heads == 4


def test_calls_the_kernels_cannot_take_run_pytorch_attention(hooks, kernels, caplog):
    model = patched(hooks)
    q, k, v = make_qkv(True, m=40)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        out = attend(model, q, k, v[..., :16], 4, skip_reshape=True)
    torch.testing.assert_close(out, expected(q, k, v[..., :16], 4, skip_reshape=True), rtol=1e-5, atol=1e-5)
    assert "differ from q's 32" in caplog.text and not kernels.calls and attention.CALLS == {"pytorch": 1}


def test_training_runs_pytorch_attention_with_gradients(hooks, kernels):
    model = patched(hooks)
    q, k, v = (t.requires_grad_() for t in make_qkv(True))
    out = attend(model, q, k, v, 4, skip_reshape=True)
    out.sum().backward()
    assert q.grad is not None and not kernels.calls
    with torch.no_grad():
        attend(model, q, k, v, 4, skip_reshape=True)
    assert len(kernels.calls) == 1

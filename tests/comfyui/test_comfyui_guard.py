"""The quality guard: the first/last-N-steps precision schedule and the non-finite recovery."""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_stub import attention, patcher
from conftest import make_model, model_inputs

from comfy_sage import comfyui
from comfy_sage.comfyui import PatchSettings, StepState, step_of
from comfy_sage.modes import Mode

SIGMAS = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.0])  # 4 steps
KERNEL_CALLS_PER_EVAL = 6  # TinyDiT: 3 kernel-eligible calls per block (one masked, one full precision), 2 blocks


@pytest.mark.parametrize(
    "sigma,want",
    [
        (5.0, (0, 4)),
        (3.0, (1, 4)),
        (2.5, (1, 4)),  # a midpoint evaluation counts as its step
        (1.0, (3, 4)),
        (0.5, (3, 4)),
        (9.0, (0, 4)),  # above the schedule: the first step
        (torch.tensor([2.0, 2.0]), (2, 4)),  # one sigma per batch item
        (torch.tensor(3.0, dtype=torch.float16), (1, 4)),
    ],
)
def test_step_of_finds_the_interval(sigma, want):
    assert step_of(SIGMAS, sigma) == want


def test_step_of_tolerates_a_float32_round_trip():
    schedule = torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64)
    assert step_of(schedule, torch.tensor(1 / 3, dtype=torch.float32)) == (1, 2)


@pytest.mark.parametrize(
    "schedule,sigma", [(None, 1.0), ([5.0, 0.0], 1.0), (torch.tensor([1.0]), 1.0), (SIGMAS, torch.tensor([]))]
)
def test_step_of_without_a_usable_schedule(schedule, sigma):
    assert step_of(schedule, sigma) is None


def test_step_mode_schedule():
    s = PatchSettings(Mode.INT8_FP8, edge_steps=2, edge_mode=Mode.INT8_FP16)
    assert [s.step_mode(i, 10) for i in range(10)] == [Mode.INT8_FP16] * 2 + [Mode.INT8_FP8] * 6 + [Mode.INT8_FP16] * 2
    assert s.step_mode(None, None) is Mode.INT8_FP8
    assert all(s.step_mode(i, 3) is Mode.INT8_FP16 for i in range(3))  # edges cover short runs entirely
    assert PatchSettings(Mode.INT8_FP8, edge_steps=0).step_mode(0, 10) is Mode.INT8_FP8
    assert PatchSettings(Mode.SDPA, edge_steps=3, edge_mode=Mode.INT8_FP16).step_mode(0, 10) is Mode.SDPA


def test_edge_steps_run_the_edge_mode(hooks, kernels):
    model = comfyui.execute_patch(make_model(), "int8+fp8", 1, "int8+fp16", hooks=hooks)
    x, ctx = model_inputs()
    patcher.sample(model, x, SIGMAS, ctx)
    modes = [c["mode"] for c in kernels.calls]
    n = KERNEL_CALLS_PER_EVAL
    assert modes == [Mode.INT8_FP16] * n + [Mode.INT8_FP8] * 2 * n + [Mode.INT8_FP16] * n


def test_edge_steps_in_pytorch(hooks, kernels):
    model = comfyui.execute_patch(make_model(), "auto", 1, "off (PyTorch)", hooks=hooks)
    x, ctx = model_inputs()
    patcher.sample(model, x, SIGMAS, ctx)
    assert [c["mode"] for c in kernels.calls] == [Mode.AUTO] * 2 * KERNEL_CALLS_PER_EVAL
    assert attention.CALLS == {"pytorch": 2 * 10 + 2 * 4}  # edge evaluations all PyTorch; masked/full-precision
    assert "default" not in attention.CALLS


def test_second_order_samplers_count_midpoints_as_their_step(hooks, kernels):
    model = comfyui.execute_patch(make_model(), "int8+fp8", 1, "int8+fp16", hooks=hooks)
    x, ctx = model_inputs()
    patcher.sample(model, x, SIGMAS, ctx, second_order=True)
    n = KERNEL_CALLS_PER_EVAL
    evals = [kernels.calls[i]["mode"] for i in range(0, len(kernels.calls), n)]
    # steps 0..3 at sigma 5, 3, 2, 1, each with a second evaluation at the next sigma (none after the last)
    assert evals == [
        Mode.INT8_FP16,
        Mode.INT8_FP8,
        Mode.INT8_FP8,
        Mode.INT8_FP8,
        Mode.INT8_FP8,
        Mode.INT8_FP16,
        Mode.INT8_FP16,
    ]


def test_without_a_schedule_the_nodes_mode_runs_and_it_says_so_once(hooks, kernels, caplog):
    model = comfyui.execute_patch(make_model(), "int8+fp8", 2, "int8+fp16", hooks=hooks)
    x, ctx = model_inputs()
    options = patcher.sampling_options(model, SIGMAS)
    del options["sample_sigmas"]
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        for _ in range(2):
            model.model.apply_model(x, torch.ones(2), None, ctx, None, dict(options))
    assert {c["mode"] for c in kernels.calls} == {Mode.INT8_FP8}
    assert caplog.text.count("passes no sample_sigmas") == 1


def _run_evaluations(model, x, ctx, poison_at=(), kernels=None):
    """One evaluation per step of SIGMAS, poisoning the first kernel call of the listed evaluations."""
    options = patcher.sampling_options(model, SIGMAS)
    outs = []
    for i, sigma in enumerate(SIGMAS[:-1]):
        if i in poison_at:
            kernels.poison = 1
        outs.append(patcher.evaluate(model, x, sigma, ctx, options))
    return outs


def test_nonfinite_output_is_recomputed_with_pytorch_and_logged_once(hooks, kernels, caplog):
    x, ctx = model_inputs()
    guarded = comfyui.execute_patch(make_model(), "int8+fp8", hooks=hooks)
    pytorch_only = comfyui.execute_patch(make_model(), "off (PyTorch)", hooks=hooks)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        outs = _run_evaluations(guarded, x, ctx, poison_at=(1, 3), kernels=kernels)
    want = _run_evaluations(pytorch_only, x, ctx)
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.equal(outs[1], want[1]) and torch.equal(outs[3], want[3])  # recomputed with PyTorch attention
    torch.testing.assert_close(outs[0], want[0], rtol=1e-4, atol=1e-4)  # untouched steps ran the kernels
    assert not torch.equal(outs[0], want[0])
    assert len(kernels.calls) == 4 * KERNEL_CALLS_PER_EVAL  # no kernel call while recomputing
    (record,) = [r for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert "step 2 of 4" in record.getMessage() and "recomputed with ComfyUI's PyTorch attention" in record.getMessage()


def test_recovery_never_uses_the_previous_override_or_the_global_default(hooks, kernels):
    calls = []

    def previous(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    base = make_model()
    base.model_options["transformer_options"][comfyui.OVERRIDE_KEY] = previous
    model = comfyui.execute_patch(base, "int8+fp8", hooks=hooks)
    x, ctx = model_inputs()
    _run_evaluations(model, x, ctx, poison_at=(0,), kernels=kernels)
    # the previous override gets the masked and full-precision calls (2 per block) of the 4 evaluations only
    assert len(calls) == 4 * 2 * 2 and attention.CALLS["pytorch"] == 10


def test_guard_off_lets_nonfinite_output_through(hooks, kernels):
    model = comfyui.execute_patch(make_model(), "int8+fp8", nonfinite_guard=False, hooks=hooks)
    assert patcher.WrappersMP.APPLY_MODEL not in model.wrappers or not model.wrappers[patcher.WrappersMP.APPLY_MODEL]
    x, ctx = model_inputs()
    outs = _run_evaluations(model, x, ctx, poison_at=(0,), kernels=kernels)
    assert torch.isnan(outs[0]).any() and torch.isfinite(outs[1]).all()


class _SyncCounter:
    """Counts host reads of tensors (bool() and .item()) while installed."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("__bool__", "item"):
            original = getattr(torch.Tensor, name)

            def spy(t, _original=original):
                self.count += 1
                return _original(t)

            monkeypatch.setattr(torch.Tensor, name, spy)


def test_one_host_read_per_evaluation_not_per_attention_call(hooks, kernels, monkeypatch):
    model = comfyui.execute_patch(make_model(), "int8+fp8", hooks=hooks)
    x, ctx = model_inputs()
    options = patcher.sampling_options(model, SIGMAS)
    t = torch.full((2,), 3.0)
    counter = _SyncCounter(monkeypatch)
    model.model.apply_model(x, t, None, ctx, None, {**options, "sigmas": t})
    assert len(kernels.calls) == KERNEL_CALLS_PER_EVAL
    assert counter.count == 1


def test_no_host_read_when_no_kernel_ran(hooks, monkeypatch):
    model = comfyui.execute_patch(make_model(), "int8+fp8", hooks=hooks)  # this CPU: every call falls back
    x, ctx = model_inputs()
    options = patcher.sampling_options(model, SIGMAS)
    t = torch.full((2,), 3.0)
    counter = _SyncCounter(monkeypatch)
    model.model.apply_model(x, t, None, ctx, None, {**options, "sigmas": t})
    assert counter.count == 0 and attention.CALLS == {"pytorch": 10}


def test_step_state_flag_accumulates_on_the_device():
    state = StepState(Mode.INT8_FP8)
    assert not state.saw_nonfinite()
    state.note_output(torch.ones(3))
    assert isinstance(state._nonfinite, torch.Tensor) and not state.saw_nonfinite()
    state.note_output(torch.tensor([1.0, float("inf")]))
    state.note_output(torch.ones(2))
    assert state.saw_nonfinite()


def test_wrapper_passes_through_calls_it_cannot_read(hooks):
    wrapper = comfyui.StepWrapper(PatchSettings(Mode.INT8_FP8, edge_steps=1), comfyui.Reporter("m"))
    seen = []

    def executor(*args, **kwargs):
        seen.append((args, kwargs))
        return "out"

    assert wrapper(executor, "x", "t") == "out"  # no transformer_options at all
    assert wrapper(executor, "x", "t", None, None, None, "not a dict") == "out"
    assert seen == [(("x", "t"), {}), (("x", "t", None, None, None, "not a dict"), {})]
    for sigma, mode in ((5.0, Mode.INT8_FP16), (3.0, Mode.INT8_FP8), (1.0, Mode.INT8_FP16)):
        wrapper(executor, "x", torch.tensor([sigma]), transformer_options={"sample_sigmas": SIGMAS})
        assert seen[-1][1]["transformer_options"][comfyui.STATE_KEY].mode is mode

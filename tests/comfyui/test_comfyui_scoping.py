"""The patch lives on a clone: the input model, bypassing the node and other models stay stock."""

from __future__ import annotations

import copy
import logging

import torch
from comfy_stub import attention, patcher
from conftest import make_model, model_inputs

from comfy_sage import comfyui
from comfy_sage.modes import Mode

SIGMAS = torch.tensor([2.0, 1.0, 0.0])
APPLY = patcher.WrappersMP.APPLY_MODEL


def test_the_input_model_is_left_untouched(hooks):
    base = make_model()
    before = copy.deepcopy(base.model_options)
    model = comfyui.execute_patch(base, "auto", 2, hooks=hooks)
    assert model is not base and model.model is base.model  # a clone sharing the weights
    assert base.model_options == before and not base.wrappers
    assert isinstance(model.model_options["transformer_options"][comfyui.OVERRIDE_KEY], comfyui.SageOverride)
    assert list(model.wrappers[APPLY]) == [comfyui.WRAPPER_KEY]


def test_bypassing_the_node_restores_stock_attention(hooks):
    base = make_model()
    x, ctx = model_inputs()
    model = comfyui.execute_patch(base, "auto", hooks=hooks)
    patched_out = patcher.sample(model, x, SIGMAS, ctx)
    assert attention.CALLS == {"pytorch": 20}
    attention.CALLS.clear()
    stock_out = patcher.sample(base, x, SIGMAS, ctx)  # the node bypassed: the workflow samples the input
    assert attention.CALLS == {"default": 20}
    torch.testing.assert_close(patched_out, stock_out, rtol=1e-4, atol=1e-4)


def test_two_models_in_one_workflow_run_their_own_modes(hooks, kernels):
    x, ctx = model_inputs()
    fp8 = comfyui.execute_patch(make_model(seed=0), "int8+fp8", hooks=hooks)
    fp16 = comfyui.execute_patch(make_model(seed=1), "int8+fp16", hooks=hooks)
    patcher.sample(fp8, x, SIGMAS, ctx)
    patcher.sample(fp16, x, SIGMAS, ctx)
    modes = [c["mode"] for c in kernels.calls]
    assert modes == [Mode.INT8_FP8] * 12 + [Mode.INT8_FP16] * 12


def test_later_clones_keep_the_patch_and_its_one_time_log(hooks, caplog):
    """A LoRA node after ours clones the model (a deep copy of model_options): same override, same log."""
    model = comfyui.execute_patch(make_model(), "int8+fp8", 1, hooks=hooks)
    lora = model.clone()
    override = model.model_options["transformer_options"][comfyui.OVERRIDE_KEY]
    assert lora.model_options["transformer_options"][comfyui.OVERRIDE_KEY] is override
    assert copy.deepcopy(override) is override
    assert lora.wrappers[APPLY][comfyui.WRAPPER_KEY] == model.wrappers[APPLY][comfyui.WRAPPER_KEY]
    x, ctx = model_inputs()
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        patcher.sample(model, x, SIGMAS, ctx)
        patcher.sample(lora, x, SIGMAS, ctx)
    assert caplog.text.count("inputs are on cpu") == 1


def test_off_mode_and_disabled_guards_add_no_wrapper(hooks):
    off = comfyui.execute_patch(make_model(), "off (PyTorch)", 3, hooks=hooks)
    bare = comfyui.execute_patch(make_model(), "auto", 0, nonfinite_guard=False, hooks=hooks)
    for model in (off, bare):
        assert not model.wrappers.get(APPLY)
        assert comfyui.OVERRIDE_KEY in model.model_options["transformer_options"]


def test_repatching_with_off_removes_our_wrapper(hooks):
    model = comfyui.execute_patch(make_model(), "auto", 2, hooks=hooks)
    off = comfyui.execute_patch(model, "off (PyTorch)", hooks=hooks)
    assert not off.wrappers[APPLY] and model.wrappers[APPLY]


def test_old_comfyui_without_the_override_leaves_the_model_unchanged(caplog):
    old = comfyui.ComfyHooks(attention.attention_pytorch, False, APPLY)
    base = make_model()
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        assert comfyui.execute_patch(base, "auto", hooks=old) is base
    assert "no per-model attention override" in caplog.text and comfyui.MIN_COMFYUI in caplog.text
    assert comfyui.OVERRIDE_KEY not in base.model_options["transformer_options"]


def test_comfyui_without_wrappers_still_patches_attention(caplog):
    no_wrappers = comfyui.ComfyHooks(attention.attention_pytorch, True, None)
    base = patcher.OldModelPatcher(make_model().model)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        model = comfyui.execute_patch(base, "auto", 2, hooks=no_wrappers)
    assert comfyui.OVERRIDE_KEY in model.model_options["transformer_options"] and not model.wrappers
    assert "no model wrappers: edge_steps and nonfinite_guard are off" in caplog.text


def test_model_label_names_the_model_class():
    assert comfyui.model_label(make_model()) == "BaseModel"
    assert comfyui.model_label(object()) == "object"

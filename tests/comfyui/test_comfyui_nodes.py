"""The node pack as ComfyUI loads it: pinned ids and options, V1 and V3 exports, the info node, start-up.

Node ids, input names and option strings are stored in users' saved workflows: the pins below may only
ever grow, never change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest
from comfy_stub import attention
from conftest import REPO, make_model

from comfy_sage import comfyui
from comfy_sage.modes import Mode

PINNED_MODES = ["auto", "int8+fp8", "int4+fp8", "int8+fp16", "int8+int8", "off (PyTorch)"]
PINNED_INPUTS = ["model", "mode", "edge_steps", "edge_mode", "nonfinite_guard"]


def test_pinned_ids_names_and_options():
    assert comfyui.PATCH_NODE_ID == "ComfySagePatchAttention"
    assert comfyui.PATCH_DISPLAY_NAME == "Patch Sage Attention"
    assert comfyui.INFO_NODE_ID == "ComfySageInfo"
    assert comfyui.CATEGORY == "model/patch"
    assert list(comfyui.MODE_CHOICES) == PINNED_MODES
    assert list(comfyui.EDGE_MODE_CHOICES) == ["int8+fp16", "off (PyTorch)"]
    assert [s.name for s in comfyui.PATCH_INPUTS] == PINNED_INPUTS
    enums = [Mode.AUTO, Mode.INT8_FP8, Mode.INT4_FP8, Mode.INT8_FP16, Mode.INT8_INT8, Mode.SDPA]
    assert list(comfyui.MODE_CHOICES.values()) == enums


def test_mode_tooltip_names_the_gpus_of_each_mode():
    tip = comfyui.MODE_TOOLTIP
    for option in PINNED_MODES:
        assert f"{option}:" in tip
    for gpu in ("RTX 30", "RTX 40", "RTX 50", "A100", "H100", "sm_89"):
        assert gpu in tip


def test_v1_input_types():
    types = comfyui.v1_input_types(comfyui.PATCH_INPUTS)
    req = types["required"]
    assert list(req) == PINNED_INPUTS
    assert req["model"][0] == "MODEL"
    assert req["mode"][0] == PINNED_MODES and req["mode"][1]["default"] == "auto"
    assert req["edge_steps"] == ("INT", req["edge_steps"][1]) and req["edge_steps"][1]["min"] == 0
    assert req["edge_steps"][1]["default"] == 0 and req["edge_steps"][1]["max"] == comfyui.MAX_EDGE_STEPS
    assert req["edge_mode"][0] == ["int8+fp16", "off (PyTorch)"] and req["edge_mode"][1]["default"] == "int8+fp16"
    assert req["nonfinite_guard"] == ("BOOLEAN", req["nonfinite_guard"][1]) and req["nonfinite_guard"][1]["default"]
    assert all(spec[1]["tooltip"] for spec in req.values())


def test_unknown_input_kind_is_rejected():
    from comfy_stub import io

    with pytest.raises(ValueError, match="unknown input kind 'FLOAT'"):
        comfyui.v3_inputs(io, [comfyui.InputSpec("x", "FLOAT", "t")])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mode": "int8"}, ValueError, r"mode must be one of \['auto'"),
        ({"mode": "int8_fp8"}, ValueError, "mode must be one of"),  # the API's name, not the node's option
        ({"mode": 3}, TypeError, "mode must be a string"),
        ({"edge_mode": "int8+fp8"}, ValueError, "edge_mode must be one of"),
        ({"edge_steps": -1}, ValueError, "edge_steps must be in 0..1000"),
        ({"edge_steps": 1001}, ValueError, "edge_steps must be in 0..1000"),
        ({"edge_steps": "2"}, TypeError, "edge_steps must be an int"),
        ({"edge_steps": True}, TypeError, "edge_steps must be an int"),
        ({"nonfinite_guard": "yes"}, TypeError, "nonfinite_guard must be a bool"),
    ],
)
def test_bad_node_inputs_raise_clear_errors(hooks, kwargs, error, match):
    with pytest.raises(error, match=match):
        comfyui.execute_patch(make_model(), hooks=hooks, **kwargs)


def test_a_model_that_is_not_a_model_patcher_is_rejected(hooks):
    with pytest.raises(TypeError, match="model must be a ComfyUI MODEL"):
        comfyui.execute_patch(object(), hooks=hooks)


def test_v1_pack(comfy_env, load_pack, caplog, monkeypatch):
    comfy_env(with_v3=False)
    without_kernels(monkeypatch)  # what the start-up line says on a machine without them (a GPU machine has them)
    with caplog.at_level(logging.INFO, logger="comfy_sage"):
        pack = load_pack()
    assert not hasattr(pack, "comfy_entrypoint")
    assert set(pack.NODE_CLASS_MAPPINGS) == {"ComfySagePatchAttention", "ComfySageInfo"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["ComfySagePatchAttention"] == "Patch Sage Attention"
    assert "kernels not loaded" in caplog.text  # the start-up line
    node_cls = pack.NODE_CLASS_MAPPINGS["ComfySagePatchAttention"]
    assert node_cls.RETURN_TYPES == ("MODEL",) and node_cls.CATEGORY == "model/patch"
    assert list(node_cls.INPUT_TYPES()["required"]) == PINNED_INPUTS
    base = make_model()
    (model,) = getattr(node_cls(), node_cls.FUNCTION)(
        base, mode="int8+fp16", edge_steps=1, edge_mode="off (PyTorch)", nonfinite_guard=True
    )
    override = model.model_options["transformer_options"][comfyui.OVERRIDE_KEY]
    assert override.settings == comfyui.PatchSettings(Mode.INT8_FP16, 1, Mode.SDPA, True)
    assert override.hooks.pytorch_attention is attention.attention_pytorch  # found through "import comfy"
    info_cls = pack.NODE_CLASS_MAPPINGS["ComfySageInfo"]
    assert info_cls.OUTPUT_NODE and info_cls.INPUT_TYPES() == {"required": {}}
    result = getattr(info_cls(), info_cls.FUNCTION)()
    assert result["result"][0] == result["ui"]["text"][0] and "kernels:" in result["result"][0]


def test_v3_pack(comfy_env, load_pack):
    comfy_env(with_v3=True)
    pack = load_pack()
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
    extension = asyncio.run(pack.comfy_entrypoint())
    patch_cls, info_cls = asyncio.run(extension.get_node_list())
    schema = patch_cls.GET_SCHEMA()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "ComfySagePatchAttention",
        "Patch Sage Attention",
        "model/patch",
    )
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == PINNED_INPUTS
    assert inputs["model"].io_type == "MODEL" and inputs["mode"].options == PINNED_MODES
    assert inputs["mode"].default == "auto" and inputs["edge_steps"].max == comfyui.MAX_EDGE_STEPS
    assert inputs["nonfinite_guard"].io_type == "BOOLEAN" and inputs["nonfinite_guard"].default is True
    assert [o.io_type for o in schema.outputs] == ["MODEL"]
    output = patch_cls.execute(
        model=make_model(), mode="int8+fp8", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=False
    )
    (model,) = output.args
    assert model.model_options["transformer_options"][comfyui.OVERRIDE_KEY].settings.mode is Mode.INT8_FP8
    info = info_cls.GET_SCHEMA()
    assert info.node_id == "ComfySageInfo" and info.is_output_node and not info.inputs
    result = info_cls.execute()
    assert result.args[0] == result.ui["text"][0] and "mode 'auto' picks" in result.args[0]


def test_pack_on_comfyui_without_the_override(comfy_env, load_pack, caplog):
    comfy_env(with_v3=False, with_override=False)
    pack = load_pack()
    node_cls = pack.NODE_CLASS_MAPPINGS["ComfySagePatchAttention"]
    base = make_model()
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        (model,) = node_cls().patch(base, mode="auto", edge_steps=0, edge_mode="int8+fp16", nonfinite_guard=True)
    assert model is base and "Update ComfyUI" in caplog.text


def test_pack_imports_without_comfyui(load_pack, monkeypatch):
    """Outside ComfyUI (no `comfy`, no `comfy_api`) the pack still imports, exporting V1 classes."""
    for name in ("comfy", "comfy_api", "comfy_api.latest"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    pack = load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == {"ComfySagePatchAttention", "ComfySageInfo"}


def test_v3_entrypoint_refuses_without_v3(load_pack, monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_api", None)
    pack = load_pack()
    with pytest.raises(RuntimeError, match="no V3 node API"):
        asyncio.run(sys.modules[pack.__name__ + ".nodes"].comfy_entrypoint())


def test_pack_finds_its_own_comfy_sage_when_none_is_installed(tmp_path):
    """A plain clone in custom_nodes (no pip install): the pack imports comfy_sage from its own folder."""
    script = f"""
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO)!r})]
try:
    import comfy_sage
    raise SystemExit("comfy_sage is still importable: " + comfy_sage.__file__)
except ModuleNotFoundError:
    pass
spec = importlib.util.spec_from_file_location("custom_pack", {str(REPO / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules["custom_pack"] = pack
spec.loader.exec_module(pack)
print(sorted(pack.NODE_CLASS_MAPPINGS), sys.modules["comfy_sage"].__file__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "['ComfySageInfo', 'ComfySagePatchAttention']" in done.stdout
    assert str(REPO / "comfy_sage" / "__init__.py") in done.stdout


def without_kernels(monkeypatch):
    from comfy_sage import capability

    status = capability.KernelStatus(False, "this install has no compiled kernels (pure-Python package)")
    monkeypatch.setattr(capability, "kernel_status", lambda: status)


def test_startup_line_reports_the_kernel_status(monkeypatch):
    from comfy_sage import capability

    without_kernels(monkeypatch)
    line = comfyui.startup_line()
    assert "kernels not loaded" in line and "Patch Sage Attention runs ComfyUI's PyTorch attention" in line
    monkeypatch.setattr(capability, "kernel_status", lambda: capability.KernelStatus(True, None, ("sm_80", "sm_90")))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device: True)
    assert "kernels loaded, built for sm_80, sm_90" in comfyui.startup_line()


def test_hooks_from_comfy_read_the_real_names(comfy_env):
    comfy_env()
    hooks = comfyui.ComfyHooks.from_comfy()
    assert hooks == comfyui.ComfyHooks(attention.attention_pytorch, True, "apply_model")

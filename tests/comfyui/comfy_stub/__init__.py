"""A minimal STAND-IN for the ComfyUI interfaces comfy_sage relies on. This is not ComfyUI.

Written for these tests from the contract in shared/design/COMFYUI.md (no ComfyUI code): the attention
backend signature and `wrap_attn` hook (`attention`), ModelPatcher cloning, wrappers and a tiny sampler
(`patcher`), a tiny diffusion transformer that calls attention the ways real models do (`model`), and the V3
node API surface (`io`). `comfy_modules()` maps ComfyUI's module names to these stand-ins, for tests that
must import "comfy" the way the node pack does inside ComfyUI. Tests against real ComfyUI live in
test_real_comfyui.py.
"""

from __future__ import annotations

import types

from . import attention, io, patcher


def comfy_modules(with_v3: bool = True, with_override: bool = True) -> dict[str, types.ModuleType]:
    """sys.modules entries that make `import comfy...` / `import comfy_api.latest` find the stand-ins.

    with_override=False imitates ComfyUI before 0.3.60 (no per-model attention override).
    """
    comfy = types.ModuleType("comfy")
    ldm = types.ModuleType("comfy.ldm")
    modules = types.ModuleType("comfy.ldm.modules")
    if with_override:
        attention_module = attention
    else:
        attention_module = types.ModuleType("comfy.ldm.modules.attention")
        attention_module.attention_pytorch = attention.attention_pytorch.__wrapped__
    comfy.ldm, ldm.modules, modules.attention = ldm, modules, attention_module
    comfy.patcher_extension = patcher
    entries = {
        "comfy": comfy,
        "comfy.ldm": ldm,
        "comfy.ldm.modules": modules,
        "comfy.ldm.modules.attention": attention_module,
        "comfy.patcher_extension": patcher,
    }
    if with_v3:
        comfy_api = types.ModuleType("comfy_api")
        latest = types.ModuleType("comfy_api.latest")
        latest.io, latest.ComfyExtension = io, io.ComfyExtension
        comfy_api.latest = latest
        entries |= {"comfy_api": comfy_api, "comfy_api.latest": latest}
    return entries

"""comfy-sage as a ComfyUI custom node pack: "Patch Sage Attention" and "Sage Attention Info".

ComfyUI imports this file as custom_nodes/<this folder>/__init__.py. It uses an installed `comfy_sage`
(pip, or a wheel with compiled kernels) if there is one, else the copy in this folder, then exports the
nodes: a V3 `comfy_entrypoint` where ComfyUI has `comfy_api.latest`, V1 `NODE_CLASS_MAPPINGS` otherwise.
Importing needs no GPU and no kernels.
"""

import importlib
import importlib.util
import logging
import os
import sys


def _import_comfy_sage():
    try:
        import comfy_sage
    except ModuleNotFoundError as exc:
        if exc.name != "comfy_sage":
            raise
    else:
        return comfy_sage
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_sage")
    spec = importlib.util.spec_from_file_location(
        "comfy_sage", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_sage"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["comfy_sage"]
        raise
    return module


_import_comfy_sage()

from comfy_sage import comfyui as _adapter  # noqa: E402


def _import_nodes():
    """nodes.py: relative to the pack where ComfyUI imports it as a package; by path where this file is
    imported as a plain module (pytest collecting a checkout whose folder name is not a Python name)."""
    if __package__:
        return importlib.import_module(".nodes", __package__)
    spec = importlib.util.spec_from_file_location(
        "comfy_sage_pack_nodes", os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodes.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_nodes = _import_nodes()

if _nodes.V3_NODES:
    comfy_entrypoint = _nodes.comfy_entrypoint
    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS = _nodes.V1_NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _nodes.V1_NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

logging.getLogger("comfy_sage").info(_adapter.startup_line())

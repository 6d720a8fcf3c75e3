"""The node classes ComfyUI loads: thin shells over `comfy_sage.comfyui`, which holds all the behaviour.

V3 classes (`comfy_api.latest`, ComfyUI from July 2025) where ComfyUI has them, V1 classes otherwise; both
call the same `execute_patch` / `info_report`. Node ids, input names and option strings are pinned in
`comfy_sage.comfyui` (saved workflows store them).
"""

from __future__ import annotations

from comfy_sage import comfyui as adapter


class PatchSageAttention:
    """V1 "Patch Sage Attention"."""

    DESCRIPTION = adapter.PATCH_DESCRIPTION
    CATEGORY = adapter.CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return adapter.v1_input_types(adapter.PATCH_INPUTS)

    def patch(self, model, **options) -> tuple:
        return (adapter.execute_patch(model, **options),)


class SageAttentionInfo:
    """V1 "Sage Attention Info"."""

    DESCRIPTION = adapter.INFO_DESCRIPTION
    CATEGORY = adapter.CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {}}

    def report(self) -> dict:
        text = adapter.info_report()
        return {"ui": {"text": [text]}, "result": (text,)}


V1_NODE_CLASS_MAPPINGS = {adapter.PATCH_NODE_ID: PatchSageAttention, adapter.INFO_NODE_ID: SageAttentionInfo}
V1_NODE_DISPLAY_NAME_MAPPINGS = {
    adapter.PATCH_NODE_ID: adapter.PATCH_DISPLAY_NAME,
    adapter.INFO_NODE_ID: adapter.INFO_DISPLAY_NAME,
}


def _v3_nodes() -> tuple[type, list[type]] | None:
    """(the ComfyExtension class, the V3 node classes), or None where ComfyUI has no V3 node API."""
    try:
        from comfy_api.latest import ComfyExtension, io

        base, schema, output = io.ComfyNode, io.Schema, io.NodeOutput
        model_out, string_out = io.Model.Output, io.String.Output
    except (ImportError, AttributeError):
        return None

    class PatchSageAttentionV3(base):
        @classmethod
        def define_schema(cls):
            return schema(
                node_id=adapter.PATCH_NODE_ID,
                display_name=adapter.PATCH_DISPLAY_NAME,
                category=adapter.CATEGORY,
                description=adapter.PATCH_DESCRIPTION,
                inputs=adapter.v3_inputs(io, adapter.PATCH_INPUTS),
                outputs=[model_out()],
            )

        @classmethod
        def execute(cls, model, **options):
            return output(adapter.execute_patch(model, **options))

    class SageAttentionInfoV3(base):
        @classmethod
        def define_schema(cls):
            return schema(
                node_id=adapter.INFO_NODE_ID,
                display_name=adapter.INFO_DISPLAY_NAME,
                category=adapter.CATEGORY,
                description=adapter.INFO_DESCRIPTION,
                inputs=[],
                outputs=[string_out(display_name="report")],
                is_output_node=True,
            )

        @classmethod
        def execute(cls):
            text = adapter.info_report()
            return output(text, ui={"text": [text]})

    node_list = [PatchSageAttentionV3, SageAttentionInfoV3]

    class ComfySageExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return list(node_list)

    return ComfySageExtension, node_list


_V3 = _v3_nodes()
V3_NODES: list[type] = _V3[1] if _V3 else []


async def comfy_entrypoint():
    """ComfyUI's V3 entry point (exported by the pack only where V3 exists)."""
    if _V3 is None:
        raise RuntimeError("this ComfyUI has no V3 node API (comfy_api.latest); use NODE_CLASS_MAPPINGS")
    return _V3[0]()

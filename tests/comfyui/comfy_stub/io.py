"""Stand-in for `comfy_api.latest.io` and `ComfyExtension`: the V3 node API surface the pack uses.

Inputs and outputs keep what they were given (`as_dict()` for assertions); `ComfyNode.GET_SCHEMA()` calls
`define_schema()` as ComfyUI does; `NodeOutput` keeps its values and `ui`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ComfyExtension:
    async def get_node_list(self):
        raise NotImplementedError


class _Input:
    io_type = ""

    def __init__(self, id, tooltip=None, default=None, options=None, min=None, max=None, step=None, optional=False):
        self.id, self.tooltip, self.default, self.optional = id, tooltip, default, optional
        self.options, self.min, self.max, self.step = options, min, max, step

    def as_dict(self):
        return {k: v for k, v in vars(self).items() if v is not None} | {"io_type": self.io_type}


class _Output:
    io_type = ""

    def __init__(self, id=None, display_name=None, tooltip=None):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _io_type(name):
    return type(
        name,
        (),
        {"Input": type("Input", (_Input,), {"io_type": name}), "Output": type("Output", (_Output,), {"io_type": name})},
    )


Model, Combo, Int, Boolean, String = (_io_type(n) for n in ("MODEL", "COMBO", "INT", "BOOLEAN", "STRING"))


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        return cls.define_schema()

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

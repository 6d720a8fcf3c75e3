"""The pack's files: example workflows, install.py, requirements.txt, the Comfy Registry metadata."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from comfy_sage import comfyui

EXAMPLES = sorted((REPO / "examples").glob("*.json"))


def test_there_are_image_and_video_examples():
    names = [p.name for p in EXAMPLES]
    assert any("flux" in n for n in names) and any("wan" in n for n in names)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_is_a_wired_comfyui_graph(path):
    wf = json.loads(path.read_text())
    assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    links = {link[0]: link for link in wf["links"]}
    assert wf["last_link_id"] == max(links)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == kind
    for node in nodes.values():  # every input is wired, every listed output link exists
        assert all(i["link"] in links for i in node["inputs"]), node["type"]
        assert all(lid in links for o in node["outputs"] for lid in o["links"]), node["type"]

    (patch,) = [n for n in nodes.values() if n["type"] == comfyui.PATCH_NODE_ID]
    mode, edge_steps, edge_mode, guard = patch["widgets_values"]
    comfyui.PatchSettings.from_node(mode, edge_steps, edge_mode, guard)  # valid values, in input order
    (model_in,) = patch["inputs"]
    assert model_in["type"] == "MODEL" and model_in["link"] is not None
    sampler_ids = [links[lid][3] for lid in patch["outputs"][0]["links"]]
    assert [nodes[i]["type"] for i in sampler_ids] == ["KSampler"]  # the patched model is what gets sampled


def _load_install():
    spec = importlib.util.spec_from_file_location("comfy_sage_install_hook", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_hook_installs_nothing_without_a_cuda_torch(monkeypatch, capsys):
    """No CUDA build of torch (as in CI): no wheel fits, nothing runs, one line says why, exit 0."""
    monkeypatch.setattr(torch.version, "cuda", None)
    install = _load_install()
    assert install.wheel_commands() == []

    def no_subprocess(*args, **kwargs):
        raise AssertionError("install.py must not run anything while no wheel is selected")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert install.main() == 0
    assert "no prebuilt kernel wheel" in capsys.readouterr().out


def test_install_hook_survives_a_failing_wheel_install(monkeypatch, capsys):
    install = _load_install()
    monkeypatch.setattr(install, "wheel_commands", lambda: [[sys.executable, "-c", "raise SystemExit(3)"]])
    assert install.main() == 0
    assert "did not install" in capsys.readouterr().out


def test_install_hook_runs_as_a_script():
    done = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "comfy-sage" in done.stdout


def test_requirements_never_touch_torch():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    packages = [line for line in lines if line]
    assert not [p for p in packages if re.match(r"(torch|torchvision|torchaudio|xformers)\b", p, re.I)]


def test_registry_metadata():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["requires-comfyui"] == f">={comfyui.MIN_COMFYUI}"
    assert meta["project"]["name"] == "comfy-sage"

"""The node pack inside a real ComfyUI: start-up, /object_info, a prompt, and real model classes on CPU.

Needs a ComfyUI checkout (>= 0.3.60): COMFYUI_PATH=/path/to/ComfyUI, and COMFYUI_PYTHON=/path/to/python
with ComfyUI's requirements installed (default: this Python). ComfyUI runs from a temporary base directory
whose custom_nodes/ links to this repo, on 127.0.0.1 only, with bounded waits. Without COMFYUI_PATH every
test here skips, saying so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

from comfy_sage import comfyui

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH,
    reason="COMFYUI_PATH is not set: point it at a ComfyUI checkout (>= 0.3.60), and COMFYUI_PYTHON at a Python "
    "with ComfyUI's requirements, to run the real-ComfyUI tests",
)
START_TIMEOUT_S = 300
FILE_COMBOS = re.compile(r"(unet|clip|vae|ckpt|lora)_name\d?$")  # model-file lists: empty in a fresh base dir
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfy-sage").symlink_to(REPO, target_is_directory=True)
    return base


def comfy_main(base_dir: Path, *args: str) -> list[str]:
    return [PYTHON, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--base-directory", str(base_dir), *args]


def test_comfyui_starts_with_the_pack(base_dir):
    done = subprocess.run(
        comfy_main(base_dir, "--quick-test-for-ci"),
        cwd=COMFYUI_PATH,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    (line,) = [ln for ln in log.splitlines() if "seconds" in ln and ln.rstrip().endswith("custom_nodes/comfy-sage")]
    assert "IMPORT FAILED" not in line
    assert "comfy_sage " in log and "kernels not loaded" in log  # the start-up line (this CPU has no kernels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(base_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("comfyui_log") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            comfy_main(base_dir, "--listen", "127.0.0.1", "--port", str(port)),
            cwd=COMFYUI_PATH,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{url}/object_info/{comfyui.PATCH_NODE_ID}", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_object_info_lists_the_nodes_with_their_options(server):
    info = _get(f"{server}/object_info/{comfyui.PATCH_NODE_ID}")[comfyui.PATCH_NODE_ID]
    assert info["display_name"] == "Patch Sage Attention" and info["category"] == "model/patch"
    assert info["output"] == ["MODEL"]
    required = info["input"]["required"]
    assert list(required) == ["model", "mode", "edge_steps", "edge_mode", "nonfinite_guard"]
    modes = ["auto", "int8+fp8", "int4+fp8", "int8+fp16", "int8+int8", "off (PyTorch)"]
    assert _combo_options(required["mode"]) == modes
    assert _combo_options(required["edge_mode"]) == ["int8+fp16", "off (PyTorch)"]
    assert "RTX 40" in required["mode"][1]["tooltip"]
    info_node = _get(f"{server}/object_info/{comfyui.INFO_NODE_ID}")[comfyui.INFO_NODE_ID]
    assert info_node["output"] == ["STRING"] and info_node["output_node"] is True


def _combo_options(spec) -> list | None:
    kind, extra = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        return kind
    return extra.get("options") if kind == "COMBO" else None


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.json")), ids=lambda p: p.name)
def test_example_workflows_match_the_real_node_specs(server, path):
    specs = _get(f"{server}/object_info", timeout=60)
    for node in json.loads(path.read_text())["nodes"]:
        assert node["type"] in specs, f"{path.name}: ComfyUI has no node {node['type']}"
        spec = specs[node["type"]]
        widgets = []
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                entry = spec["input"][section][name]
                is_widget = isinstance(entry[0], list) or entry[0] in WIDGET_TYPES
                if is_widget and not (len(entry) > 1 and entry[1].get("forceInput")):
                    widgets.append((name, entry))
                    if len(entry) > 1 and entry[1].get("control_after_generate"):
                        widgets.append((name + ":control", None))
        assert len(node["widgets_values"]) == len(widgets), f"{path.name}: {node['type']} widget count"
        for (name, entry), value in zip(widgets, node["widgets_values"], strict=True):
            options = _combo_options(entry) if entry else None
            if options is not None and not FILE_COMBOS.search(name):
                assert value in options, f"{path.name}: {node['type']}.{name} = {value!r}"


def test_a_prompt_runs_the_info_node(server):
    body = json.dumps({"prompt": {"1": {"class_type": comfyui.INFO_NODE_ID, "inputs": {}}}, "client_id": "t"})
    request = urllib.request.Request(
        f"{server}/prompt", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        prompt_id = json.loads(response.read())["prompt_id"]
    deadline = time.monotonic() + 60
    while not (history := _get(f"{server}/history/{prompt_id}")):
        assert time.monotonic() < deadline, "the prompt did not finish in 60 s"
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success"
    (text,) = entry["outputs"]["1"]["text"]
    assert "kernels: not loaded" in text and "mode 'auto' picks" in text


@pytest.fixture(scope="module")
def model_results() -> dict:
    done = subprocess.run(
        [PYTHON, str(Path(__file__).with_name("real_comfyui_models.py")), str(REPO)],
        env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")]
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize("model", ["flux", "wan", "sdxl"])
def test_real_models_forward_through_the_patch(model_results, model):
    r = model_results[model]
    assert model_results["api"] == ("v3" if model_results["v3_available"] else "v1")  # V3 where ComfyUI has it
    assert r["stock_finite"] and r["input_untouched"] and r["bypassed_rel"] == 0.0
    # On this CPU every call falls back to ComfyUI's attention_pytorch: stock within float32 rounding.
    assert r["fallback_calls"] > 0 and r["fallback_reasons"] == ["mode 'auto' uses PyTorch attention: no CUDA device"]
    assert r["fallback_rel"] < 1e-5
    # Stand-in kernels on the real call sites: exact in float64 matches; the reference INT8+FP8 within its error.
    assert r["exact_kernel_calls"] == r["fallback_calls"] and r["exact_rel"] < 1e-5
    assert r["quantized_kernel_calls"] == r["fallback_calls"] and 0 < r["quantized_rel"] < 0.03
    assert r["exact_layouts"] == (["HND"] if model == "flux" else ["NHD"])


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_real_sampler_runs(model_results, model):
    r = model_results[model]
    assert r["sampling_fallback_rel"] < 1e-5 and r["sampling_kernel_rel"] < 1e-5
    assert r["sampling_step_modes"] == ["int8_fp16", "int8_fp8", "int8_fp16"]  # edge_steps=1 of 4
    assert r["nan_recovered_finite"] and r["nan_recovered_rel"] < 1e-5
    assert r["unguarded_has_nan"]


@pytest.mark.parametrize("model", ["flux", "wan", "sdxl"])
def test_real_models_through_the_kernels_on_a_gpu(model_results, model):
    """bf16 models through the compiled kernels, judged against the bf16 stock model's own error vs fp32."""
    if "cuda" not in model_results:
        pytest.skip("ComfyUI's Python sees no CUDA GPU: the run through the compiled kernels needs one")
    gpu = model_results["cuda"]
    assert gpu["kernels_loaded"], gpu["kernels_reason"]
    m, calls = gpu[model], model_results[model]["fallback_calls"]
    # These small models' calls have a few hundred tokens, which Hopper's `auto` leaves to PyTorch attention.
    hopper = gpu["compute_capability"] == [9, 0]
    auto = m["auto"]
    if hopper:
        few = "mode 'auto' runs PyTorch attention on sm_90 for calls with fewer than 4,096 query or key tokens"
        assert auto["finite"] and auto["kernel_calls"] == 0 and auto["rel_bf16"] < 1e-3, auto
        assert len(auto["fallbacks"]) == 1 and auto["fallbacks"][0].startswith(few), auto
    kernel_modes = ["int8+fp8", "int8+fp16", "int4+fp8", "int8+int8"] + ([] if hopper else ["auto"])
    for mode in kernel_modes:
        r = m[mode]
        assert r["finite"] and r["fallbacks"] == [] and r["kernel_calls"] == calls, (mode, r)
        assert r["rel_fp32"] <= 1.5 * m["bf16_stock_rel_fp32"] + 5e-3, (mode, r)
        assert r["rel_bf16"] < 0.02, (mode, r)
    assert m["off (PyTorch)"]["kernel_calls"] == 0 and m["off (PyTorch)"]["rel_bf16"] < 1e-3
    if model != "sdxl":
        assert m["sampling_kernel_calls"] > 0 and m["sampling_rel_bf16"] < 0.02

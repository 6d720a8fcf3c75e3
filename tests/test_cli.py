"""`python -m comfy_sage doctor` and `demo`: they run on a machine without a GPU and say so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from comfy_sage import __main__ as cli
from comfy_sage import __version__, capability, dispatch, doctor
from comfy_sage.modes import QUANTIZED_MODES, Mode

NO_GPU = not torch.cuda.is_available()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "comfy_sage", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def doctor_json() -> dict:
    return json.loads(run_cli("doctor", "--json").stdout)


def test_doctor_json_keys(doctor_json):
    assert set(doctor_json) >= {
        "comfy_sage",
        "python",
        "torch",
        "torch_cuda",
        "device",
        "gpu",
        "compute_capability",
        "kernels_loaded",
        "kernels_reason",
        "kernel_archs",
        "modes",
        "auto",
        "masks",
    }
    assert doctor_json["comfy_sage"] == __version__
    assert doctor_json["torch"] == torch.__version__
    assert set(doctor_json["modes"]) == {m.value for m in QUANTIZED_MODES}
    assert set(doctor_json["auto"]) == {str(d) for d in doctor.REPORTED_HEAD_DIMS}


@pytest.mark.skipif(not NO_GPU, reason="checks what doctor says on a machine without a GPU")
def test_doctor_json_without_gpu(doctor_json):
    assert doctor_json["device"] == "cpu"
    assert doctor_json["gpu"] is None and doctor_json["compute_capability"] is None
    # A CUDA build of torch with the kernel wheel loads the kernels even without a GPU; they just never run.
    assert doctor_json["kernels_loaded"] is capability.kernel_status().loaded
    if not doctor_json["kernels_loaded"]:
        assert isinstance(doctor_json["kernels_reason"], str) and doctor_json["kernels_reason"]
    assert doctor_json["kernels_run_here"] is False
    for head_dim, what in doctor_json["auto"].items():
        assert what.startswith("sdpa (") and "no CUDA device" in what, (head_dim, what)
    for mode, what in doctor_json["modes"].items():
        assert not what.startswith(("native", "runs as")), (mode, what)


@pytest.mark.skipif(not NO_GPU, reason="checks what doctor says on a machine without a GPU")
def test_doctor_text_without_gpu(doctor_json):
    out = run_cli("doctor").stdout
    assert f"comfy_sage {__version__}" in out
    assert "(no CUDA GPU)" in out
    if not doctor_json["kernels_loaded"]:
        assert f"kernels: not loaded: {doctor_json['kernels_reason']}" in out
    for mode in QUANTIZED_MODES:
        assert f"  {mode.value} " in out
    for head_dim in doctor.REPORTED_HEAD_DIMS:
        assert f"D={head_dim}" in out


def test_doctor_in_process_matches_summary(capsys):
    assert cli.main(["doctor", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == doctor.summary("cpu")
    assert cli.main(["doctor", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == doctor.render(doctor.summary("cpu"))


def test_demo_small():
    result = run_cli("demo", "--seq", "64", "--heads", "2", "--head-dim", "64", "--device", "cpu")
    out = result.stdout
    assert "demo: sageattn(q, k, v, mode='auto') on cpu, q/k/v [B=1, H=2, N=64, D=64] bf16" in out
    assert "runs: PyTorch attention - mode 'auto' uses PyTorch attention: no CUDA device" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("sageattn (this call)"))
    cos, rel_l1 = (float(x) for x in row.split(")")[1].split()[:2])
    assert cos > 0.9999 and rel_l1 < 5e-3  # PyTorch bf16 attention against float64
    assert "output: shape [1, 2, 64, 64] torch.bfloat16" in out


@pytest.mark.parametrize("mode", ["sdpa", "int4_fp16"])
def test_demo_modes_in_process(mode, capsys, fresh_state):
    argv = ["demo", "--seq", "32", "--heads", "1", "--head-dim", "32", "--device", "cpu", "--mode", mode]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"mode={mode!r}" in out and "output: shape [1, 1, 32, 32]" in out


def test_demo_mode_is_case_insensitive(capsys, fresh_state):
    argv = ["demo", "--seq", "8", "--heads", "1", "--head-dim", "32", "--device", "cpu", "--mode", "SDPA"]
    assert cli.main(argv) == 0
    assert "mode='sdpa'" in capsys.readouterr().out


def test_demo_compares_the_three_8bit_pv_modes(capsys, fresh_state):
    argv = ["demo", "--seq", "32", "--heads", "1", "--head-dim", "32", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for mode in ("int8_fp8", "int8_int8", "int8_fp16"):
        assert f"reference {mode} " in out


def test_accuracy_reports_every_quantized_mode(capsys, fresh_state):
    argv = ["accuracy", "--seq", "64", "--heads", "1", "--head-dim", "32", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| normal")]
    assert [r[1] for r in rows[::4]] == [m.value for m in QUANTIZED_MODES]
    # Then what P·V's number formats alone cost: six rows (P̃ | V | cos sim | rel L1), each measured.
    formats = [line.strip("| ").split(" | ") for line in out.split("P·V number formats alone")[1].splitlines()[3:]]
    assert [(p, v) for p, v, *_ in formats] == [
        ("fp8", "exact"), ("exact", "fp8"), ("fp8", "fp8"), ("int8", "exact"), ("exact", "int8"), ("int8", "int8")
    ]  # fmt: skip
    assert all(0.9 < float(cos) < 1 and 0 < float(l1) < 0.1 for _, _, cos, l1 in formats)


def test_bench_defaults_to_the_three_8bit_pv_modes(monkeypatch):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(modes=modes, shapes=shapes))
    assert cli.main(["bench"]) == 0
    assert seen == {"modes": ["int8_fp8", "int8_int8", "int8_fp16"], "shapes": list(bench.SHAPES)}


@pytest.mark.parametrize(("argv", "timing"), [([], "queued"), (["--timing", "single"], "single")])
def test_bench_timing_option(monkeypatch, argv, timing):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(kwargs))
    assert cli.main(["bench", *argv]) == 0
    assert seen["timing"] == timing


def test_bench_times_the_shapes_given(monkeypatch):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(shapes=shapes))
    assert cli.main(["bench", "--shape", "2,10,4096,64", "--shape", " 1, 24, 4608, 128, 1"]) == 0
    assert seen["shapes"] == [(2, 10, 4096, 64, False, "your shape"), (1, 24, 4608, 128, True, "your shape")]


def test_bench_takes_cross_attention_shapes(monkeypatch):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(shapes=shapes))
    assert cli.main(["bench", "--shape", "2,10,4096:77,64", "--shape", "1,24,4608:4608,128"]) == 0
    assert seen["shapes"] == [(2, 10, 4096, 64, False, "your shape", 77), (1, 24, 4608, 128, False, "your shape")]
    assert [bench.shape_sizes(s)[2:4] for s in seen["shapes"]] == [(4096, 77), (4608, 4608)]


@pytest.mark.parametrize(("argv", "names"), [
    (["--steps"], [s[5] for s in __import__("comfy_sage.bench").bench.STEP_SHAPES]),
    (["--steps", "--only", "cross"], ["SDXL cross 64×64", "SDXL cross 32×32", "SD1.5 cross 64×64", "Wan 1.3B cross"]),
    (["--only", "Wan"], ["Wan 1.3B 480p", "Wan 14B 720p"]),
])  # fmt: skip
def test_bench_steps_picks_the_shapes_of_real_steps(monkeypatch, argv, names):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(shapes=shapes))
    assert cli.main(["bench", *argv]) == 0
    assert [s[5] for s in seen["shapes"]] == names


@pytest.mark.parametrize(
    "text",
    ["1,24,4096", "1,24,4096,128,2", "1,0,4096,128", "1,24,4k,128", "", "2,10,4096:0,64", "2,10,4096:77,64,1",
     "2,10,4096:,64", "2,10,4096:77:5,64"],
)  # fmt: skip
def test_bench_rejects_a_malformed_shape(text, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--shape", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shape: shape must be B,H,N,D or B,H,N,D,causal" in err and repr(text) in err


def test_bench_shape_and_only_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--shape", "1,24,4096,128", "--only", "Flux"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_rejects_an_unknown_timing(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--timing", "fast"])
    assert info.value.code == 2
    assert "--timing: invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["frobnicate"], ["demo", "--mode", "int3"], ["doctor", "--jsn"]])
def test_usage_errors_exit_2_with_a_message(argv, capsys):
    # A usage error is argparse's message and exit status 2, not a traceback.
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m comfy_sage")
    if "--mode" in argv:
        assert "int3" in err and "int8_fp8" in err


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "nonsense"])
def test_bad_device_is_a_usage_error(device, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SystemExit) as info:
        cli.main(["doctor", "--device", device])
    assert info.value.code == 2
    assert f"--device {device}" in capsys.readouterr().err.replace("'", "")


def test_doctor_names_the_kernel_family(monkeypatch):
    """On Hopper `auto` runs the wgmma kernel up to head dim 128 and PyTorch attention above (the mma.sync
    kernel, which an explicit mode runs there, is slower); doctor says which."""
    monkeypatch.setattr(capability, "kernel_status", lambda: capability.KernelStatus(True, None, ("sm_90a",)))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
    dispatch.clear_cache()
    try:
        wgmma = dispatch._plan(Mode.AUTO, "cuda", (9, 0), 128, torch.bfloat16, False)
        wide = dispatch._plan(Mode.INT8_INT8, "cuda", (9, 0), 256, torch.bfloat16, False)
        routed = dispatch._plan(Mode.AUTO, "cuda", (9, 0), 256, torch.bfloat16, False)
        cpu = dispatch._plan(Mode.AUTO, "cpu", None, 128, torch.bfloat16, False)
    finally:
        dispatch.clear_cache()
    assert doctor.describe(wgmma) == "int8_int8 (wgmma kernel)"
    assert doctor.describe(wide) == "int8_int8 (mma.sync kernel)"
    assert doctor.describe(routed).startswith("sdpa (mode 'auto' runs PyTorch attention on sm_90 for head dims above")
    assert doctor.describe(cpu).startswith("sdpa (")


def test_doctor_lists_the_other_gpus(fresh_state, monkeypatch):
    """A machine with several GPUs (a model can be placed on any of them): doctor reports the one asked about and
    names the others, with what runs on each."""
    gpus = {0: ("NVIDIA GeForce RTX 4090", (8, 9)), 1: ("NVIDIA GeForce RTX 3090", (8, 6)), 2: ("Tesla V100", (7, 0))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: gpus[torch.device(device).index][0])
    monkeypatch.setattr(capability, "compute_capability", lambda index: gpus[index][1])
    monkeypatch.setattr(capability, "kernel_status", lambda: capability.KernelStatus(True, None, ("sm_80", "sm_89")))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": gpus[device.index][1] >= (8, 0))
    assert doctor.other_gpus(torch.device("cuda")) == [
        {"device": "cuda:1", "gpu": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6", "kernels_run_here": True},
        {"device": "cuda:2", "gpu": "Tesla V100", "compute_capability": "7.0", "kernels_run_here": False},
    ]
    assert [g["device"] for g in doctor.other_gpus(torch.device("cuda", 2))] == ["cuda:0", "cuda:1"]
    assert [g["device"] for g in doctor.other_gpus(torch.device("cpu"))] == ["cuda:0", "cuda:1", "cuda:2"]
    text = doctor.render({**doctor.summary("cpu"), "other_gpus": doctor.other_gpus(torch.device("cuda"))})
    assert text.endswith(
        "other GPUs (`doctor --device cuda:N` shows one's modes):\n"
        "  cuda:1  NVIDIA GeForce RTX 3090  compute capability 8.6: the kernels run there\n"
        "  cuda:2  Tesla V100  compute capability 7.0: PyTorch attention there"
    )


def test_doctor_without_other_gpus_says_nothing_of_them():
    info = doctor.summary("cpu")
    if not torch.cuda.is_available():
        assert info["other_gpus"] == []
    assert ("other GPUs" in doctor.render(info)) == bool(info["other_gpus"])


def test_doctor_says_what_runs_masked_calls(fresh_state, monkeypatch):
    """Key masks (text padding) run on the kernels, other masks on PyTorch attention: doctor says which, here for
    an RTX 4090 with the kernels and for this CPU."""
    monkeypatch.setattr(capability, "device_capability", lambda device: (8, 9) if device.type == "cuda" else None)
    monkeypatch.setattr(capability, "kernel_status", lambda: capability.KernelStatus(True, None, ("sm_89",)))
    monkeypatch.setattr(capability, "kernels_run_on", lambda device, family="sm80": True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 4090")
    dispatch.clear_cache()
    info = doctor.summary("cuda:0")
    assert info["masks"]["key mask"] == "int8_int8 (mma.sync kernel)"
    assert info["masks"]["other masks"].startswith("sdpa (") and dispatch.MASK_REASON in info["masks"]["other masks"]
    assert "  key mask    int8_int8 (mma.sync kernel)" in doctor.render(info)
    dispatch.clear_cache()
    assert all(what.startswith("sdpa (") for what in doctor.summary("cpu")["masks"].values())
    # An H100: the wgmma kernel, and PyTorch attention for key-masked calls of fewer than 2,560 tokens.
    monkeypatch.setattr(capability, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)
    monkeypatch.setattr(capability, "kernel_status", lambda: capability.KernelStatus(True, None, ("sm_90a",)))
    dispatch.clear_cache()
    key_mask = doctor.summary("cuda:0")["masks"]["key mask"]
    assert key_mask.startswith("int8_int8 (wgmma kernel); 1,024 tokens: sdpa (")
    assert "key-masked calls with fewer than 2,560 query or key tokens" in key_mask
    dispatch.clear_cache()


def test_bench_key_mask_option(monkeypatch, capsys):
    from comfy_sage import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda modes, shapes, **kwargs: seen.update(kwargs))
    assert cli.main(["bench"]) == 0 and seen["key_mask_pad"] == 0
    assert cli.main(["bench", "--key-mask", "200"]) == 0 and seen["key_mask_pad"] == 200
    for bad in ("-3", "many"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--key-mask", bad])
        assert "padded keys must be a non-negative integer" in capsys.readouterr().err

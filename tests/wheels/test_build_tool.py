"""wheels/build.py: instantiation counts, the version label, the audit's checks, and its agreement with
[tool.cibuildwheel] (CI and developers must run the same build and repair)."""

from __future__ import annotations

import ast
import base64
import hashlib
import re
import zipfile

import pytest
from wheelkit import REPO, build, make_wheel

PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN10comfy_sage4quantEv' for 'sm_80'
ptxas info    : Function properties for _ZN10comfy_sage4quantEv
ptxas info    : Compiling entry function '_ZN10comfy_sage6attnILi64EEEv' for 'sm_80'
ptxas info    : Compiling entry function '_ZN10comfy_sage6attnILi64EEEv' for 'sm_90a'
ptxas info    : Compiling entry function '_ZN10comfy_sage6attnILi64EEEv' for 'sm_120a'
ptxas info    : Compiling entry function '_ZN10comfy_sage6attnILi64EEEv' for 'sm_86'
ptxas info    : Used 128 registers, used 1 barriers
"""


def test_counts_entry_functions_per_arch_in_arch_order():
    counts = build.count_instantiations(PTXAS_LOG)
    assert counts == {"sm_80": 2, "sm_86": 1, "sm_90a": 1, "sm_120a": 1}
    assert list(counts) == ["sm_80", "sm_86", "sm_90a", "sm_120a"]


def test_counts_nothing_in_a_log_without_ptxas_output():
    assert build.count_instantiations("[1/3] c++ -c binding.cpp\n") == {}


def _record_ok(zf: zipfile.ZipFile, info: str) -> None:
    rows = [line.split(",") for line in zf.read(f"{info}/RECORD").decode().splitlines()]
    assert {row[0] for row in rows} == set(zf.namelist())
    for name, digest, size in rows:
        if name.endswith("RECORD"):
            assert digest == size == ""
            continue
        data = zf.read(name)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}" and int(size) == len(data)


def test_local_label_renames_the_wheel_dist_info_and_metadata(tmp_path):
    raw = make_wheel(tmp_path, "comfy_sage-0.1.0.dev0-cp310-abi3-manylinux_2_28_x86_64.whl")
    out = tmp_path / "out"
    out.mkdir()
    labelled = build.set_local_version(raw, out, "cu13")
    assert labelled.name == "comfy_sage-0.1.0.dev0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(labelled) as zf:
        info = "comfy_sage-0.1.0.dev0+cu13.dist-info"
        assert not [n for n in zf.namelist() if n.startswith("comfy_sage-0.1.0.dev0.dist-info")]
        assert re.search(r"(?m)^Version: 0\.1\.0\.dev0\+cu13$", zf.read(f"{info}/METADATA").decode())
        assert zf.read("comfy_sage/_C.abi3.so") == b"\x7fELF"
        _record_ok(zf, info)


def test_relabelling_replaces_the_old_label(tmp_path):
    raw = make_wheel(tmp_path, "comfy_sage-0.2.0+cu12-cp310-abi3-win_amd64.whl")
    out = tmp_path / "out"
    out.mkdir()
    assert build.set_local_version(raw, out, "cu13").name == "comfy_sage-0.2.0+cu13-cp310-abi3-win_amd64.whl"


@pytest.mark.parametrize(
    "name",
    [
        "comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl",
        "comfy_sage-0.1.0+cu12-cp310-abi3-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
        "comfy_sage-0.1.0+cu13-cp310-abi3-win_amd64.whl",
    ],
)
def test_release_wheel_names_pass(name):
    assert build.check_name(name, (2, 28))["abi"] == "abi3"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("comfy_sage-0.1.0+cu13-cp311-cp311-manylinux_2_28_x86_64.whl", "not cp310-abi3"),
        ("comfy_sage-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl", r"no \+cuNN label"),
        ("comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_34_x86_64.whl", "needs glibc 2.34"),
        ("comfy_sage-0.1.0+cu13-cp310-abi3-linux_x86_64.whl", "neither manylinux"),
        ("torch-2.10.0+cu13-cp310-abi3-win_amd64.whl", "not a comfy_sage wheel"),
    ],
)
def test_wrong_wheel_names_fail(name, why):
    with pytest.raises(build.AuditError, match=why):
        build.check_name(name, (2, 28))


def test_members_need_one_extension_and_no_vendored_torch_or_cuda():
    assert build.check_members(["comfy_sage/__init__.py", "comfy_sage/_C.abi3.so"]) == "comfy_sage/_C.abi3.so"
    assert build.check_members(["comfy_sage/_C.pyd"]) == "comfy_sage/_C.pyd"
    with pytest.raises(build.AuditError, match="expected one"):
        build.check_members(["comfy_sage/__init__.py"])
    with pytest.raises(build.AuditError, match="vendored"):
        build.check_members(["comfy_sage/_C.abi3.so", "comfy_sage.libs/libcudart-1a2b3c.so.13"])
    with pytest.raises(build.AuditError, match="vendored"):
        build.check_members(["comfy_sage/_C.abi3.so", "comfy_sage.libs/libtorch_cpu-9f8e.so"])


GOOD_NEEDED = ["libc10.so", "libtorch_cpu.so", "libcudart.so.13", "libtorch_cuda.so", "libstdc++.so.6", "libc.so.6"]


def test_elf_with_stable_shims_only_passes():
    build.check_elf(GOOD_NEEDED, ["aoti_torch_get_size", "torch_call_dispatcher", "cudaLaunchKernel", "memcpy"])


@pytest.mark.parametrize("lib", ["libcuda.so.1", "libtorch_python.so", "libpython3.11.so.1.0", "libcublas.so.13"])
def test_elf_needing_more_fails(lib):
    with pytest.raises(build.AuditError, match="must not"):
        build.check_elf([*GOOD_NEEDED, lib], [])


@pytest.mark.parametrize(
    "symbol",
    ["c10::detail::torchCheckFail(char const*, char const*, unsigned int, char const*)", "at::empty(...)",
     "typeinfo for c10::Error", "torch::jit::Operator::schema() const"],
)  # fmt: skip
def test_elf_with_unstable_torch_cxx_symbols_fails(symbol):
    with pytest.raises(build.AuditError, match="unstable torch C"):
        build.check_elf(GOOD_NEEDED, ["aoti_torch_get_size", symbol])


def test_platform_tag_gets_this_cpu():
    assert build.platform_tag("manylinux_2_28").startswith("manylinux_2_28_")
    assert build.platform_tag("manylinux_2_34_x86_64") == "manylinux_2_34_x86_64"
    assert build.platform_tag(None) is None and build.platform_tag("") is None


@pytest.fixture(scope="module")
def cibw():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["cibuildwheel"]


def test_cibuildwheel_builds_like_build_py(cibw):
    frontend, _, args = cibw["build-frontend"].partition(";")
    assert frontend == "build" and args.split("args:")[1].split() == build.BUILD_COMMAND[3:]
    assert build.BUILD_COMMAND[:3] == ["-m", "build", "--wheel"]
    assert cibw["before-build"] == "python {project}/wheels/build.py deps"
    assert cibw["repair-wheel-command"] == "python {project}/wheels/build.py repair {wheel} {dest_dir}"
    assert cibw["build"].split() == ["cp310-manylinux_*", "cp310-win_amd64"]  # one abi3 build per platform


@pytest.mark.parametrize("platform", ["linux", "windows"])
def test_cibuildwheel_environment_has_build_py_settings(cibw, platform):
    env = cibw[platform]["environment"]
    assert {k: env.get(k) for k in build.BUILD_ENV} == build.BUILD_ENV
    assert "repair-wheel-command" not in cibw[platform]  # delvewheel/auditwheel defaults never run


def test_linux_builds_on_manylinux_2_28_and_targets_it(cibw):
    linux = cibw["linux"]
    assert linux["manylinux-x86_64-image"] == linux["manylinux-aarch64-image"] == "manylinux_2_28"
    assert linux["environment"]["COMFY_SAGE_WHEEL_PLAT"] == "manylinux_2_28"
    assert linux["before-all"] == "bash {project}/wheels/install-cuda.sh"


def test_count_step_reads_a_log(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(PTXAS_LOG)
    assert build.main(["count", str(log)]) == 0
    assert "kernel instantiations: 5 (sm_80: 2, sm_86: 1, sm_90a: 1, sm_120a: 1)" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["wheels/build.py", "wheels/index.py", "comfy_sage/install.py", "install.py"])
def test_scripts_parse_as_python_3_10(script):
    """cibuildwheel's repair step runs build.py with the cp310 build Python; the installer runs anywhere >= 3.10."""
    assert ast.parse((REPO / script).read_text(), feature_version=(3, 10)).body

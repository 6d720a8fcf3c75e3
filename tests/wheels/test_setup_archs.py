"""setup.py's arch handling: TORCH_CUDA_ARCH_LIST -> -gencode flags, nvcc limits, per-source arch groups."""

from __future__ import annotations

import pytest
from wheelkit import setup_py


def test_default_list_gives_sass_for_five_archs_and_portable_ptx():
    archs = setup_py.parse_arch_list(setup_py.DEFAULT_ARCHS, (13, 0))
    assert archs == ["8.0", "8.6", "8.9", "9.0a", "12.0a+PTX"]
    assert setup_py.gencode_flags(archs) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_89,code=sm_89",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_120a,code=sm_120a",
        "-gencode=arch=compute_120,code=compute_120",  # arch-specific PTX would not JIT on newer GPUs
    ]


def test_an_older_nvcc_drops_sm_120a_and_moves_the_ptx(capsys):
    archs = setup_py.parse_arch_list("8.0;8.9;9.0a;12.0a+PTX", (12, 6))
    assert archs == ["8.0", "8.9", "9.0a+PTX"]
    assert "cannot compile sm_12.0a" in capsys.readouterr().err
    assert setup_py.gencode_flags(archs)[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_unknown_nvcc_keeps_the_list_and_spaces_separate_too():
    assert setup_py.parse_arch_list(" 8.0 8.6;12.0a ", None) == ["8.0", "8.6", "12.0a"]


def test_no_ptx_asked_none_added():
    assert not any("code=compute" in f for f in setup_py.gencode_flags(setup_py.parse_arch_list("8.0;9.0a", None)))


@pytest.fixture
def with_sm90_source(monkeypatch):
    monkeypatch.setattr(setup_py, "sources", [*setup_py.sources, "csrc/sm90/tma.cu"])
    monkeypatch.setattr(setup_py, "SOURCE_ARCHS", {"csrc/sm90/launch.cu": ("9.0a",), "csrc/sm90/tma.cu": ("9.0a",)})


def test_sources_default_to_every_arch():
    common, groups, defines = setup_py.arch_groups(["8.0", "9.0a"])
    narrowed = set(setup_py.SOURCE_ARCHS)
    assert common == [s for s in setup_py.sources if s not in narrowed] and defines == []
    assert groups == {("9.0a",): ["csrc/sm90/launch.cu"]}  # the wgmma kernel: sm_90a only


def test_the_wgmma_kernel_is_left_out_without_sm_90a():
    common, groups, defines = setup_py.arch_groups(["8.0", "8.9", "12.0a+PTX"])
    assert "csrc/sm90/launch.cu" not in common and groups == {}
    assert defines == ["-DCOMFY_SAGE_NO_SM90"]


def test_a_narrowed_source_builds_only_for_its_archs(with_sm90_source):
    common, groups, defines = setup_py.arch_groups(["8.0", "8.9", "9.0a", "12.0a+PTX"])
    assert "csrc/sm90/launch.cu" not in common and "csrc/sm80/launch.cu" in common
    assert groups == {("9.0a",): ["csrc/sm90/launch.cu", "csrc/sm90/tma.cu"]}
    assert setup_py.gencode_flags(list(next(iter(groups)))) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert defines == []


def test_a_source_without_any_of_its_archs_is_left_out_with_a_define(with_sm90_source):
    common, groups, defines = setup_py.arch_groups(["8.9"])
    assert groups == {} and "csrc/sm90/launch.cu" not in common
    assert defines == ["-DCOMFY_SAGE_NO_SM90"]


def test_every_listed_source_exists_and_every_narrowed_one_is_listed():
    for source in setup_py.sources:
        assert (setup_py.ROOT / source).is_file(), source
    assert set(setup_py.SOURCE_ARCHS) <= set(setup_py.sources)

"""comfy_sage/install.py (`python -m comfy_sage install`) and the ComfyUI-Manager hook that calls it."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from wheelkit import hook, index, make_wheel

from comfy_sage import __main__ as cli
from comfy_sage import install

H100_LINUX = {
    "implementation": "cpython", "python": [3, 12], "system": "Linux", "machine": "x86_64", "bits": 64,
    "glibc": "2.39", "installed": None, "torch": "2.11.0+cu130", "torch_cuda": "13.0", "gpus": [[9, 0]],
}  # fmt: skip
LINUX_CU13 = "comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl"


def env(**changes) -> dict:
    return {**H100_LINUX, **changes}


def test_linux_cuda13_gets_the_cu13_manylinux_wheel():
    assert install.choose(env()) == install.Choice(label="cu13", platform="linux_x86_64")


@pytest.mark.parametrize(
    ("changes", "choice"),
    [
        ({"torch_cuda": "12.8", "torch": "2.10.0+cu128"}, ("cu12", "linux_x86_64")),
        ({"machine": "aarch64"}, ("cu13", "linux_aarch64")),
        ({"system": "Windows", "machine": "amd64", "glibc": None}, ("cu13", "win_amd64")),
        ({"gpus": [[7, 5], [8, 6]]}, ("cu13", "linux_x86_64")),  # one usable GPU is enough
    ],
)
def test_other_supported_environments(changes, choice):
    assert install.choose(env(**changes)) == install.Choice(label=choice[0], platform=choice[1])


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"implementation": "pypy"}, "CPython >= 3.10"),
        ({"python": [3, 9]}, "CPython >= 3.10"),
        ({"torch_error": "ImportError: libcudnn.so.9: cannot open"}, "torch does not import here (ImportError"),
        ({"torch": "2.9.1+cu130"}, "torch 2.9.1+cu130 is older than 2.10"),
        ({"torch": "2.13.0+cpu", "torch_cuda": None}, "torch 2.13.0+cpu is not a CUDA build"),
        ({"torch_cuda": "11.8"}, "no kernel wheels for CUDA 11.8"),
        ({"gpus": []}, "torch sees no CUDA GPU"),
        ({"gpus": [[7, 5]]}, "the GPU is sm_75; the kernels need sm_80"),
        ({"glibc": "2.17"}, "glibc 2.17 is older than 2.28"),
        ({"system": "Darwin", "machine": "arm64", "glibc": None}, "no kernel wheels for Darwin arm64"),
        ({"bits": 32}, "no kernel wheels for Linux x86_64"),
    ],
)
def test_environments_without_a_wheel_say_why(changes, reason):
    choice = install.choose(env(**changes))
    assert choice.label is None and reason in choice.reason


@pytest.mark.parametrize(
    ("filename", "fits"),
    [
        (LINUX_CU13, True),
        ("comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
        ("comfy_sage-0.1.0+cu13-cp312-abi3-manylinux_2_28_x86_64.whl", True),  # abi3 from 3.12: Python 3.12 ok
        ("comfy_sage-0.1.0+cu13-cp313-abi3-manylinux_2_28_x86_64.whl", False),  # needs CPython 3.13
        ("comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_40_x86_64.whl", False),  # needs glibc 2.40
        ("comfy_sage-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl", False),  # other CUDA major
        ("comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_28_aarch64.whl", False),  # other CPU
        ("comfy_sage-0.1.0+cu13-cp310-abi3-win_amd64.whl", False),  # other OS
        ("comfy_sage-0.2.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl", False),  # other version
        ("comfy_sage-0.1.0+cu13-cp312-cp312-manylinux_2_28_x86_64.whl", False),  # not abi3
        ("comfy_sage-0.1.0-py3-none-any.whl", False),  # no kernels
        ("comfy_sage-0.1.0+cu13.tar.gz", False),
    ],
)
def test_wheel_fits(filename, fits):
    assert install.wheel_fits(filename, env(), install.choose(env()), "0.1.0") is fits


def test_any_version_when_none_is_asked():
    choice = install.choose(env())
    assert install.wheel_fits("comfy_sage-0.2.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl", env(), choice)


@pytest.fixture
def index_url(tmp_path):
    """A local copy of the index, as wheels/index.py writes it, with wheels for two versions and both OSes."""
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    names = [
        LINUX_CU13,
        "comfy_sage-0.1.0+cu13-cp310-abi3-win_amd64.whl",
        "comfy_sage-0.0.9+cu13-cp310-abi3-manylinux_2_28_x86_64.whl",
        "comfy_sage-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl",
    ]
    index.update(tmp_path / "site", [make_wheel(folder, n) for n in names], folder.as_uri() + "/")
    return (tmp_path / "site").as_uri()


def test_picks_this_version_for_this_platform(index_url):
    url = install.pick_wheel(env(), install.choose(env()), "0.1.0", index_url)
    assert install.file_name(url) == LINUX_CU13 and "#sha256=" in url


def test_no_wheel_of_this_version_says_so(index_url):
    with pytest.raises(LookupError, match=r"no wheel of comfy-sage 0\.3\.0 for linux_x86_64 and CPython 3\.12"):
        install.pick_wheel(env(), install.choose(env()), "0.3.0", index_url)


def test_an_unreachable_index_says_so(tmp_path):
    with pytest.raises(LookupError, match="cannot read"):
        install.pick_wheel(env(), install.choose(env()), "0.1.0", (tmp_path / "nowhere").as_uri())


def _no_doctor(monkeypatch, loaded=False):
    calls = []
    monkeypatch.setattr(install, "kernels_load", lambda python=sys.executable: calls.append(1) or (loaded, "why"))
    return calls


def test_plan_is_one_pip_install_of_that_wheel_only(index_url, monkeypatch):
    _no_doctor(monkeypatch)
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: install.Pip(python))
    todo = install.plan(env(), index_url=index_url, version="0.1.0")
    (command,) = todo.commands
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert {"--no-deps", "--force-reinstall"} <= set(command) and command[command.index("--only-binary") + 1] == ":all:"
    assert install.file_name(command[-1]) == LINUX_CU13
    assert not [arg for arg in command if arg.startswith(("torch", "--upgrade", "--no-binary"))]
    assert todo.previous is None and not todo.done


def test_plan_with_uv_when_there_is_no_pip():
    uv = install.Pip("/env/bin/python", uv="/usr/bin/uv")
    assert uv.install("x.whl") == [
        "/usr/bin/uv", "pip", "install", "--python", "/env/bin/python", "--no-deps", "--only-binary", ":all:",
        "--reinstall", "x.whl",
    ]  # fmt: skip
    assert uv.uninstall() == ["/usr/bin/uv", "pip", "uninstall", "--python", "/env/bin/python", "comfy-sage"]
    assert install.Pip("py").uninstall()[-2:] == ["comfy-sage", "-y"]


def test_plan_does_nothing_when_that_wheel_is_installed_and_loads(index_url, monkeypatch, capsys):
    calls = _no_doctor(monkeypatch, loaded=True)
    todo = install.plan(env(installed="0.1.0+cu13"), index_url=index_url, version="0.1.0")
    assert todo.commands == [] and todo.done and calls == [1]
    assert "nothing to do" in capsys.readouterr().out


def test_plan_reinstalls_an_installed_wheel_that_does_not_load(index_url, monkeypatch):
    _no_doctor(monkeypatch, loaded=False)
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: install.Pip(python))
    todo = install.plan(env(installed="0.1.0+cu13"), index_url=index_url, version="0.1.0")
    assert len(todo.commands) == 1 and todo.previous == "0.1.0+cu13"


def test_plan_without_pip_or_uv_installs_nothing(index_url, monkeypatch, capsys):
    _no_doctor(monkeypatch)
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: None)
    assert install.plan(env(), index_url=index_url, version="0.1.0").commands == []
    assert "no pip, and no uv" in capsys.readouterr().out


def test_plan_refuses_a_given_wheel_that_does_not_fit(capsys):
    wheel = "/tmp/comfy_sage-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl"
    assert install.plan(env(), wheel=wheel).commands == []
    assert "does not fit here (this needs cu13, linux_x86_64)" in capsys.readouterr().out


def test_plan_takes_a_given_wheel_that_fits(monkeypatch):
    _no_doctor(monkeypatch)
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: install.Pip(python))
    (command,) = install.plan(env(), wheel=f"/tmp/{LINUX_CU13}").commands
    assert command[-1] == f"/tmp/{LINUX_CU13}"


@pytest.fixture
def ran(monkeypatch):
    """subprocess.run stand-in: records commands; pip exits with ran.exit_code."""
    record = SimpleNamespace(commands=[], exit_code=0)

    def fake_run(command, check=False, **kwargs):
        record.commands.append(command)
        return subprocess.CompletedProcess(command, record.exit_code)

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    return record


PIP = install.Pip("/env/bin/python")
INSTALL = PIP.install(f"https://x/{LINUX_CU13}")


def test_apply_reports_loaded_kernels(ran, monkeypatch, capsys):
    _no_doctor(monkeypatch, loaded=True)
    assert install.apply([INSTALL], None, PIP) is True
    assert ran.commands == [INSTALL] and "kernels installed and loaded" in capsys.readouterr().out


def test_apply_stops_when_pip_fails(ran, monkeypatch, capsys):
    calls = _no_doctor(monkeypatch)
    ran.exit_code = 1
    assert install.apply([INSTALL], None, PIP) is False
    assert ran.commands == [INSTALL] and calls == [] and "did not install" in capsys.readouterr().out


def test_a_wheel_that_does_not_load_is_removed(ran, monkeypatch, capsys):
    _no_doctor(monkeypatch, loaded=False)
    assert install.apply([INSTALL], None, PIP) is False
    assert ran.commands == [INSTALL, PIP.uninstall()]
    assert "does not load (why); put back the package without kernels" in capsys.readouterr().out


def test_a_wheel_that_does_not_load_gives_back_the_previous_version(ran, monkeypatch):
    _no_doctor(monkeypatch, loaded=False)
    install.apply([INSTALL], "0.0.9", PIP)
    restore = ran.commands[-1]
    assert restore[-1] == "comfy-sage==0.0.9" and "--no-deps" in restore and "--only-binary" in restore


def test_install_dry_run_installs_nothing(index_url, ran, monkeypatch, capsys):
    monkeypatch.setattr(install, "probe", lambda: env())
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: install.Pip(python))
    _no_doctor(monkeypatch)
    assert install.install(index_url=index_url, version="0.1.0", dry_run=True) == 0
    assert ran.commands == [] and f"would run: {sys.executable} -m pip install" in capsys.readouterr().out


def test_install_end_to_end_with_stand_ins(index_url, ran, monkeypatch):
    monkeypatch.setattr(install, "probe", lambda: env())
    monkeypatch.setattr(install, "find_pip", lambda python=sys.executable: install.Pip(python))
    _no_doctor(monkeypatch, loaded=True)
    assert install.install(index_url=index_url, version="0.1.0") == 0
    assert install.file_name(ran.commands[0][-1]) == LINUX_CU13


def test_this_machine_probe_is_plain_data():
    found = install.probe()
    assert found["implementation"] == sys.implementation.name and found["python"] == list(sys.version_info[:2])
    assert "torch" in found and isinstance(found.get("gpus", []), list)


def test_cli_install_here_says_why_in_one_line(capsys):
    """This machine has no CUDA GPU (or a CPU torch): nothing is installed, exit 1, one line."""
    assert cli.main(["install", "--dry-run"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("comfy-sage: no prebuilt kernel wheel installed: ")


def test_doctor_check_runs_outside_the_source_folder():
    loaded, why = install.kernels_load()
    assert loaded is False and why  # this machine has no loadable kernels, and says why


def test_version_is_read_without_importing_the_package():
    from comfy_sage import __version__

    assert install.package_version() == __version__


def test_hook_never_fails(monkeypatch, capsys):
    def broken(**kwargs):
        raise RuntimeError("index exploded")

    monkeypatch.setattr(hook.installer(), "plan", broken)
    assert hook.main() == 0
    assert "the kernel installer failed (RuntimeError: index exploded)" in capsys.readouterr().out


def test_hook_can_be_switched_off(monkeypatch, capsys):
    monkeypatch.setenv("COMFY_SAGE_NO_KERNELS", "1")
    monkeypatch.setattr(hook, "wheel_commands", lambda: pytest.fail("the hook must not look for a wheel"))
    assert hook.main() == 0
    assert "COMFY_SAGE_NO_KERNELS=1" in capsys.readouterr().out


def test_hook_applies_what_the_installer_plans(monkeypatch):
    applied = []
    monkeypatch.setattr(hook, "wheel_commands", lambda: [["pip", "install", "x.whl"]])
    monkeypatch.setattr(hook.installer(), "apply", lambda commands, previous, pip: applied.append(commands))
    assert hook.main() == 0
    assert applied == [[["pip", "install", "x.whl"]]]

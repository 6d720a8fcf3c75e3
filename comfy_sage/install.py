"""The kernel wheel installer behind `python -m comfy_sage install` and ComfyUI-Manager's install.py.

It reads what the running Python has (CPython version, OS/CPU, glibc, torch and its CUDA version, the GPU),
picks the `cp310-abi3` wheel of this comfy-sage version from the index of torch's CUDA major
(`<index>/cu13/simple/comfy-sage/`), installs it with the same interpreter's pip (or uv's pip where the
environment has no pip) with `--no-deps`, so torch is never touched, and checks in a fresh process that
`doctor` reports the kernels loaded. Where nothing fits it installs nothing and says why in one line; a wheel
that installs but does not load is replaced by what was there before. It never builds from source.

Standard library only (torch is imported only to read its versions): ComfyUI's install hook loads this
file by path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

INDEX_URL = "https://comfy-sage.github.io/comfy-sage"  # one PEP 503 index per CUDA major below it
PROJECT = "comfy-sage"
MIN_TORCH = (2, 10)  # the LibTorch stable ABI the kernels are built against
MIN_CC = (8, 0)  # the kernels' oldest GPU (Ampere)
MIN_GLIBC = (2, 28)  # manylinux_2_28
CUDA_MAJORS = (12, 13)  # the CUDA majors wheels are built for
WHEEL = re.compile(r"^comfy_sage-(?P<version>[^-]+)-cp3(?P<minor>\d+)-abi3-(?P<plat>[^-]+)\.whl$")
NO_WHEEL = "no prebuilt kernel wheel installed"


def say(message: str) -> None:
    print(f"comfy-sage: {message}", flush=True)


def _numbers(text: str | None) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text or "")[:2])


# -------------------------------------------------------------------------------------------- choosing


def probe() -> dict:
    """Everything the choice depends on, as plain data; a torch that fails to import is data too."""
    libc, libc_version = platform.libc_ver()
    env = {
        "implementation": sys.implementation.name,
        "python": list(sys.version_info[:2]),
        "system": platform.system(),
        "machine": platform.machine().lower(),
        "bits": 64 if sys.maxsize > 2**32 else 32,
        "glibc": libc_version if libc == "glibc" else None,
        "installed": installed_version(),
    }
    try:
        import torch

        env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
        env["gpus"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a broken torch or CUDA set-up: report it, install nothing
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    return env


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Choice:
    """Which index (label) and platform to look for, or why nothing fits (reason)."""

    label: str | None = None
    platform: str | None = None
    reason: str | None = None


def choose(env: dict) -> Choice:
    """The wheel flavour this environment takes, or the one reason it takes none."""
    if env.get("implementation") != "cpython" or tuple(env.get("python", ())) < (3, 10):
        return Choice(reason="the kernel wheels are for CPython >= 3.10")
    if "torch_error" in env:
        return Choice(reason=f"torch does not import here ({env['torch_error']})")
    if _numbers(env["torch"]) < MIN_TORCH:
        return Choice(reason=f"torch {env['torch']} is older than 2.10, the first the kernels are built for")
    cuda = _numbers(env.get("torch_cuda"))
    if not cuda:
        return Choice(reason=f"torch {env['torch']} is not a CUDA build")
    if cuda[0] not in CUDA_MAJORS:
        return Choice(reason=f"no kernel wheels for CUDA {env['torch_cuda']} (they are built for CUDA 12 and 13)")
    gpus = [tuple(cc) for cc in env.get("gpus", [])]
    if not gpus:
        return Choice(reason="torch sees no CUDA GPU")
    if max(gpus) < MIN_CC:
        return Choice(reason=f"the GPU is sm_{max(gpus)[0]}{max(gpus)[1]}; the kernels need sm_80 or newer")
    system, machine = env.get("system"), env.get("machine")
    if env.get("bits") == 64 and system == "Linux" and machine in ("x86_64", "aarch64"):
        if _numbers(env.get("glibc")) < MIN_GLIBC:
            return Choice(reason=f"glibc {env.get('glibc')} is older than 2.28 (manylinux_2_28)")
        return Choice(label=f"cu{cuda[0]}", platform=f"linux_{machine}")
    if env.get("bits") == 64 and system == "Windows" and machine == "amd64":
        return Choice(label=f"cu{cuda[0]}", platform="win_amd64")
    return Choice(reason=f"no kernel wheels for {system} {machine}")


def wheel_fits(filename: str, env: dict, choice: Choice, version: str | None = None) -> bool:
    """A cp3X-abi3 wheel of `version` (any if None) with the chosen CUDA label, for this Python, OS, CPU, glibc."""
    parts = WHEEL.match(filename)
    if parts is None:
        return False
    public, _, label = parts["version"].partition("+")
    if label != choice.label or (version is not None and public != version.partition("+")[0]):
        return False
    if (3, int(parts["minor"])) > tuple(env["python"]):
        return False
    for plat in parts["plat"].split("."):
        if plat == choice.platform == "win_amd64":
            return True
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", plat)
        if m and choice.platform == f"linux_{m[3]}" and (int(m[1]), int(m[2])) <= _numbers(env.get("glibc")):
            return True
    return False


# ----------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class Link:
    filename: str
    url: str


class AnchorParser(HTMLParser):
    """The hrefs of a page's <a> tags (PEP 503 index pages); wheels/index.py uses it too."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def file_name(url_or_path: str) -> str:
    return urllib.parse.unquote(url_or_path.split("#")[0].replace("\\", "/").rsplit("/", 1)[-1])


def parse_index(page: str, page_url: str) -> list[Link]:
    """The links of a PEP 503 project page as absolute URLs (their #sha256= kept: pip checks it)."""
    parser = AnchorParser()
    parser.feed(page)
    return [Link(file_name(href), urllib.parse.urljoin(page_url, href)) for href in parser.hrefs]


def fetch(url: str) -> str:
    if url.startswith("file:") and url.endswith("/"):  # a local copy of the index: folders hold index.html
        url += "index.html"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode("utf-8", errors="replace")


def pick_wheel(env: dict, choice: Choice, version: str, index_url: str | None) -> str:
    """The URL of the fitting wheel of `version` in the index of choice.label; LookupError says why there is none."""
    root = (index_url or os.environ.get("COMFY_SAGE_INDEX_URL") or INDEX_URL).rstrip("/")
    page_url = f"{root}/{choice.label}/simple/{PROJECT}/"
    try:
        links = parse_index(fetch(page_url), page_url)
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise LookupError(f"cannot read {page_url} ({exc})") from exc
    fits = [link for link in links if wheel_fits(link.filename, env, choice, version)]
    if not fits:
        python = f"CPython {env['python'][0]}.{env['python'][1]}"
        raise LookupError(f"{page_url} has no wheel of comfy-sage {version} for {choice.platform} and {python}")
    return max(fits, key=lambda link: link.filename).url


def package_version() -> str:
    """This comfy_sage's version, read from its __init__.py (this file may be loaded without the package)."""
    text = Path(__file__).with_name("__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M)[1]


# ---------------------------------------------------------------------------------------------- acting


@dataclass(frozen=True)
class Pip:
    """The running Python's pip, or uv's pip for environments uv made without pip (ComfyUI Desktop)."""

    python: str
    uv: str | None = None

    def _verb(self, verb: str) -> list[str]:
        if self.uv:
            return [self.uv, "pip", verb, "--python", self.python]
        return [self.python, "-m", "pip", verb, "--disable-pip-version-check"]

    def install(self, target: str) -> list[str]:
        """This one package, as a wheel only; torch and every other dependency stay as they are."""
        reinstall = "--reinstall" if self.uv else "--force-reinstall"
        return [*self._verb("install"), "--no-deps", "--only-binary", ":all:", reinstall, target]

    def uninstall(self) -> list[str]:
        return [*self._verb("uninstall"), PROJECT, *([] if self.uv else ["-y"])]


def find_pip(python: str = sys.executable) -> Pip | None:
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return Pip(python)
    uv = shutil.which("uv")
    return Pip(python, uv) if uv else None


def kernels_load(python: str = sys.executable) -> tuple[bool, str]:
    """`doctor --json` in a fresh process, from a neutral folder (not a comfy_sage source folder in the cwd)."""
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [python, "-m", "comfy_sage", "doctor", "--json"], cwd=cwd, capture_output=True, text=True, timeout=600
        )
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        return False, (result.stderr.strip() or f"doctor exited {result.returncode}")[-300:]
    return bool(info.get("kernels_loaded")), info.get("kernels_reason") or ""


@dataclass
class Plan:
    """The pip commands to run (none: `done` says whether the kernels are already there), and what was before."""

    commands: list[list[str]] = field(default_factory=list)
    done: bool = False
    previous: str | None = None
    pip: Pip | None = None


def plan(
    env: dict | None = None, index_url: str | None = None, wheel: str | None = None, version: str | None = None
) -> Plan:
    """What to install here; says in one line why nothing is to be installed."""
    env = probe() if env is None else env
    choice = choose(env)
    if choice.reason:
        say(f"{NO_WHEEL}: {choice.reason}. comfy_sage runs PyTorch attention here.")
        return Plan(previous=env.get("installed"))
    if wheel is None:
        try:
            wheel = pick_wheel(env, choice, version or package_version(), index_url)
        except LookupError as exc:
            say(f"{NO_WHEEL}: {exc}. comfy_sage runs PyTorch attention.")
            return Plan(previous=env.get("installed"))
    elif not wheel_fits(file_name(wheel), env, choice):
        say(f"{NO_WHEEL}: {file_name(wheel)} does not fit here (this needs {choice.label}, {choice.platform})")
        return Plan(previous=env.get("installed"))
    wanted = WHEEL.match(file_name(wheel))["version"]
    if env.get("installed") == wanted and kernels_load()[0]:
        say(f"comfy-sage {wanted} is installed and its kernels load; nothing to do")
        return Plan(done=True, previous=wanted)
    pip = find_pip()
    if pip is None:
        say(f"{NO_WHEEL}: this Python has no pip, and no uv was found")
        return Plan(previous=env.get("installed"))
    return Plan([pip.install(wheel)], previous=env.get("installed"), pip=pip)


def apply(commands: list[list[str]], previous: str | None, pip: Pip | None) -> bool:
    """Runs the commands, then checks that the kernels load; puts `previous` back if they do not."""
    for command in commands:
        say("installing the kernels: " + " ".join(command))
        if subprocess.run(command, check=False).returncode != 0:
            say("the kernel wheel did not install; comfy_sage runs PyTorch attention")
            return False
    loaded, why = kernels_load()
    if loaded:
        say("kernels installed and loaded (`python -m comfy_sage doctor` shows what runs on this GPU)")
        return True
    pip = pip or find_pip()
    if pip is not None:
        subprocess.run(pip.uninstall() if previous is None else pip.install(f"{PROJECT}=={previous}"), check=False)
    say(f"the kernel wheel does not load ({why}); put back {previous or 'the package without kernels'}")
    return False


def install(
    index_url: str | None = None, wheel: str | None = None, version: str | None = None, dry_run: bool = False
) -> int:
    """Installs the fitting kernel wheel into this Python's environment: 0 once its kernels load, 1 otherwise."""
    todo = plan(index_url=index_url, wheel=wheel, version=version)
    if not todo.commands:
        return 0 if todo.done else 1
    if dry_run:
        for command in todo.commands:
            say("would run: " + " ".join(command))
        return 0
    return 0 if apply(todo.commands, todo.previous, todo.pip) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-url", help=f"the wheel indexes' root (default: $COMFY_SAGE_INDEX_URL or {INDEX_URL})")
    parser.add_argument("--wheel", help="install this wheel file or URL instead of looking it up in the index")
    parser.add_argument("--version", help="the comfy-sage version to look up (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="say what would be installed; install nothing")

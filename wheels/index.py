"""Writes the PEP 503 wheel indexes that `pip --extra-index-url` and `python -m comfy_sage install` read.

    python wheels/index.py SITE WHEEL... --url-prefix https://github.com/OWNER/REPO/releases/download/TAG/

One index per CUDA major, chosen by the wheel version's local label (`0.1.0+cu13` -> SITE/cu13/simple/):
SITE/cuNN/simple/index.html lists the project, SITE/cuNN/simple/comfy-sage/index.html its wheels. Links
already on a page are kept, so every earlier release stays installable; each link carries `#sha256=` and
`data-requires-python`. SITE/index.html lists the indexes. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.util
import re
import sys
from pathlib import Path

PROJECT = "comfy-sage"  # PEP 503 normalized name
REQUIRES_PYTHON = ">=3.10"
LABEL = re.compile(r"^comfy_sage-[^-]+\+(cu\d+)-")


def _installer():
    """comfy_sage/install.py loaded by path, for its page parser: importing the package would import torch."""
    name = "comfy_sage_installer"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "comfy_sage" / "install.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_links(page: str) -> dict[str, str]:
    """{wheel file name: href} of a project page."""
    parser = _installer().AnchorParser()
    parser.feed(page)
    return {href.split("#")[0].rsplit("/", 1)[-1]: href for href in parser.hrefs}


def cuda_label(wheel_name: str) -> str:
    match = LABEL.match(wheel_name)
    if match is None:
        raise ValueError(f"{wheel_name}: not a comfy_sage wheel with a +cuNN version label")
    return match[1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _page(title: str, body: list[str]) -> str:
    lines = ["<!DOCTYPE html>", "<html>", f"<head><title>{html.escape(title)}</title></head>", "<body>"]
    return "\n".join([*lines, f"<h1>{html.escape(title)}</h1>", *body, "</body>", "</html>", ""])


def project_page(links: dict[str, str]) -> str:
    requires = html.escape(REQUIRES_PYTHON)
    body = [
        f'<a href="{html.escape(href)}" data-requires-python="{requires}">{html.escape(name)}</a><br>'
        for name, href in sorted(links.items())
    ]
    return _page(f"Links for {PROJECT}", body)


def update(site: Path, wheels: list[Path], url_prefix: str) -> list[Path]:
    """Adds `wheels` (to be downloaded from url_prefix + name) to the indexes under site; returns the pages written."""
    added: dict[str, dict[str, str]] = {}
    for wheel in wheels:
        added.setdefault(cuda_label(wheel.name), {})[wheel.name] = f"{url_prefix}{wheel.name}#sha256={sha256(wheel)}"
    written = []
    for label, links in sorted(added.items()):
        project = site / label / "simple" / PROJECT / "index.html"
        existing = read_links(project.read_text()) if project.exists() else {}
        project.parent.mkdir(parents=True, exist_ok=True)
        project.write_text(project_page({**existing, **links}))
        root = site / label / "simple" / "index.html"
        root.write_text(_page("Simple index", [f'<a href="{PROJECT}/">{PROJECT}</a><br>']))
        written += [project, root]
    labels = sorted(p.name for p in site.iterdir() if (p / "simple" / "index.html").exists())
    landing = site / "index.html"
    items = [f'<a href="{label}/simple/">{label}/simple/</a>: wheels for CUDA {label[2:]}<br>' for label in labels]
    landing.write_text(_page(f"{PROJECT} wheel indexes", items))
    (site / ".nojekyll").write_text("")
    return [*written, landing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python wheels/index.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the Pages folder (kept between releases)")
    parser.add_argument("wheels", type=Path, nargs="+")
    parser.add_argument("--url-prefix", required=True, help="where the wheels are downloaded from, ending in /")
    args = parser.parse_args(argv)
    if not args.url_prefix.endswith("/"):
        parser.error("--url-prefix must end with /")
    for page in update(args.site, args.wheels, args.url_prefix):
        print(f"index: wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""wheels/index.py writes PEP 503 pages that pip and comfy_sage's installer read back."""

from __future__ import annotations

import hashlib

import pytest
from wheelkit import index, make_wheel

from comfy_sage import install

PREFIX = "https://github.com/o/comfy-sage/releases/download/v0.1.0/"


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    names = [
        "comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl",
        "comfy_sage-0.1.0+cu13-cp310-abi3-win_amd64.whl",
        "comfy_sage-0.1.0+cu12-cp310-abi3-manylinux_2_28_x86_64.whl",
    ]
    return [make_wheel(folder, name) for name in names]


def test_one_index_per_cuda_major_with_hashes(tmp_path, wheels):
    site = tmp_path / "site"
    index.update(site, wheels, PREFIX)
    cu13 = (site / "cu13" / "simple" / "comfy-sage" / "index.html").read_text()
    cu12 = (site / "cu12" / "simple" / "comfy-sage" / "index.html").read_text()
    assert cu13.count("<a ") == 2 and cu12.count("<a ") == 1 and "+cu12" not in cu13
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    assert f'href="{PREFIX}comfy_sage-0.1.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl#sha256={digest}"' in cu13
    assert 'data-requires-python="&gt;=3.10"' in cu13
    assert 'href="comfy-sage/"' in (site / "cu13" / "simple" / "index.html").read_text()
    landing = (site / "index.html").read_text()
    assert 'href="cu12/simple/"' in landing and 'href="cu13/simple/"' in landing
    assert (site / ".nojekyll").exists()


def test_a_later_release_keeps_earlier_links(tmp_path, wheels):
    site = tmp_path / "site"
    index.update(site, wheels[:1], PREFIX)
    newer = make_wheel(tmp_path, "comfy_sage-0.2.0+cu13-cp310-abi3-manylinux_2_28_x86_64.whl")
    index.update(site, [newer], PREFIX.replace("v0.1.0", "v0.2.0"))
    links = index.read_links((site / "cu13" / "simple" / "comfy-sage" / "index.html").read_text())
    assert sorted(links) == [wheels[0].name, newer.name]
    assert links[wheels[0].name].startswith(PREFIX) and "/v0.2.0/" in links[newer.name]


def test_unlabelled_wheels_are_refused(tmp_path):
    pure = make_wheel(tmp_path, "comfy_sage-0.1.0-py3-none-any.whl")
    with pytest.raises(ValueError, match=r"\+cuNN"):
        index.update(tmp_path / "site", [pure], PREFIX)


def test_the_installer_reads_what_the_index_writes(tmp_path, wheels):
    site = tmp_path / "site"
    index.update(site, wheels, PREFIX)
    page_url = (site / "cu13" / "simple" / "comfy-sage").as_uri() + "/"
    links = install.parse_index(install.fetch(page_url), page_url)
    assert sorted(link.filename for link in links) == sorted(w.name for w in wheels if "+cu13" in w.name)
    assert all(link.url.startswith(PREFIX) and "#sha256=" in link.url for link in links)


def test_relative_links_become_absolute():
    page = '<a href="../../files/comfy_sage-0.1.0%2Bcu13-cp310-abi3-win_amd64.whl#sha256=ab">x</a>'
    (link,) = install.parse_index(page, "https://example.org/cu13/simple/comfy-sage/")
    assert link.filename == "comfy_sage-0.1.0+cu13-cp310-abi3-win_amd64.whl"
    assert link.url == "https://example.org/cu13/files/comfy_sage-0.1.0%2Bcu13-cp310-abi3-win_amd64.whl#sha256=ab"


def test_command_line(tmp_path, wheels, capsys):
    assert index.main([str(tmp_path / "site"), *map(str, wheels), "--url-prefix", PREFIX]) == 0
    assert "cu13/simple/comfy-sage/index.html" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        index.main([str(tmp_path / "site"), str(wheels[0]), "--url-prefix", PREFIX.rstrip("/")])

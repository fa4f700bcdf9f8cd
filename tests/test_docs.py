"""The documentation site builds with `mkdocs build --strict`, and the strictness is real: a broken
link, a broken anchor or an API reference to nothing fails the build, naming it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its future, on every build


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = ["build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run([sys.executable, "-m", "mkdocs", *command], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "optorch" / "index.html").read_text().count('id="optorch.adamw"') == 1
    assert "<code>pool: cls|avg</code>" in (tmp_path / "site" / "vision" / "index.html").read_text()  # GitHub's `\|`


@pytest.fixture
def copy(tmp_path) -> Path:
    """mkdocs.yml and docs/ in a scratch folder, the API reference still reading the checkout's packages."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs_hooks.py", tmp_path)
    config = (ROOT / "mkdocs.yml").read_text()
    assert config.count("paths: [.]") == 1, "mkdocstrings' paths changed: update this fixture"
    (tmp_path / "mkdocs.yml").write_text(config.replace("paths: [.]", f"paths: [{json.dumps(str(ROOT))}]"))
    return tmp_path


BROKEN = {  # name: (page, what is appended to it, what the build's errors must name)
    "link-and-anchor": ("results.md", "[a page](missing.md), [a section](vision.md#no-such-section)",
                        ["missing.md", "#no-such-section"]),
    "api-reference": ("api/attention_simulator.md", "::: attention_simulator.no_such_module",
                      ["attention_simulator.no_such_module"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("page, broken, named", BROKEN.values(), ids=list(BROKEN))
def test_a_broken_reference_fails_the_build(copy, page, broken, named):
    with open(copy / "docs" / page, "a") as f:
        f.write(f"\n{broken}\n")
    result = build(copy / "mkdocs.yml", copy / "site")
    assert result.returncode != 0
    for name in named:
        assert name in result.stderr, result.stderr[-5000:]

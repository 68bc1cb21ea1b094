"""What the distribution carries: the licence its metadata names, a README that works on PyPI."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path


def test_the_distribution_carries_its_license_file() -> None:
    distribution = importlib.metadata.distribution("echo-async")
    assert distribution.metadata["License-Expression"] == "MIT"
    files = distribution.files or []
    license_files = [file for file in files if file.name == "LICENSE"]
    assert license_files, "LICENSE is not in the installed distribution"
    assert "MIT License" in license_files[0].read_text()


def test_the_readme_has_no_relative_links() -> None:
    # The README is the package's page on PyPI, where a link relative to the repository breaks:
    # paths are written as code instead.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    relative = re.findall(r"\]\((?!https?://|#)[^)]*\)", readme)
    assert not relative

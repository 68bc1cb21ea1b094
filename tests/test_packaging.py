"""What the installed distribution carries: the licence its metadata names."""

from __future__ import annotations

import importlib.metadata


def test_the_distribution_carries_its_license_file() -> None:
    distribution = importlib.metadata.distribution("echo-async")
    assert distribution.metadata["License-Expression"] == "MIT"
    files = distribution.files or []
    license_files = [file for file in files if file.name == "LICENSE"]
    assert license_files, "LICENSE is not in the installed distribution"
    assert "MIT License" in license_files[0].read_text()

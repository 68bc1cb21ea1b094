"""Every file in examples/ runs as its own process, exits 0 by itself and prints what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-W", "error"]
# (example file, arguments after the interpreter, lines its stdout must contain)
RUNS: list[tuple[str, list[str], list[str]]] = [
    (
        "embed_asyncio.py",
        [],
        ["echoed: hello, echo", "stats: connections_total=1 bytes_in=11 bytes_out=11", "closed"],
    ),
    (
        "serve_until_signal.py",
        [],
        ["echoed: ping", "signal received, draining", "closed after 1 connection(s)"],
    ),
    (
        "textbook.py",
        [],
        [
            "echoed: any sentence, any bytes",
            "split across two reads: UnicodeDecodeError: unexpected end of data",
        ],
    ),
    ("test_client_with_fixture.py", [*PYTEST, "-o", "asyncio_mode=strict"], ["3 passed"]),
    ("test_client_with_fixture.py", [*PYTEST, "-o", "asyncio_mode=auto"], ["3 passed"]),
]


# Loaded by `locust`, not run by python: tests/e2e/test_locust.py runs it under a Locust master
# and two workers (Locust monkey-patches whatever imports it, so only in subprocesses).
RUN_ELSEWHERE = {"locustfile.py"}


def test_every_example_is_run() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} == {
        name for name, _, _ in RUNS
    } | RUN_ELSEWHERE


@pytest.mark.parametrize(
    ("name", "arguments", "expected"), RUNS, ids=[" ".join([run[0], *run[1][-1:]]) for run in RUNS]
)
def test_example_runs_and_exits_by_itself(
    name: str, arguments: list[str], expected: list[str], tmp_path: Path
) -> None:
    completed = subprocess.run(
        [sys.executable, *arguments, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # nothing may depend on being run from the repository
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = completed.stdout.splitlines()
    for line in expected:
        assert any(line in printed for printed in output), (line, completed.stdout)

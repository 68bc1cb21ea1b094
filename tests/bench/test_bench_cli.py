"""The bench flags and exit statuses: in-process through run(args), and as `python -m echo_async`.

run() owns its event loop, so the in-process tests call it in a thread while the test's loop
keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from echo_async.bench import cli

ROOT = str(Path(__file__).resolve().parents[2])  # so the subprocess imports this checkout
JSON_KEYS = {
    "mode",
    "connections",
    "size",
    "duration_s",
    "round_trips",
    "round_trips_per_s",
    "echoed_bytes_per_s",
    "connections_per_s",
    "latency_ms",
    "errors",
    "mismatched_bytes",
    "target",
    "ok",
    "problems",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="echo-async bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


async def run(argv: list[str]) -> int:
    return await asyncio.to_thread(cli.run, parse(argv))


def pingpong(port: int, *extra: str) -> list[str]:
    return ["--port", str(port), "--mode", "pingpong", "--connections", "2", "--size", "1KiB",
            "--duration", "0.3", *extra]  # fmt: skip


async def test_a_clean_run_exits_0_and_writes_exactly_the_json_keys(
    echo_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "result.json"
    assert await run(pingpong(echo_port, "--json", str(path))) == 0
    result = json.loads(path.read_text())
    assert set(result) == JSON_KEYS
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
    assert result["mode"] == "pingpong"
    assert result["size"] == 1024
    assert result["connections"] == 2
    assert result["round_trips"] > 0
    assert result["errors"] == result["mismatched_bytes"] == 0
    assert result["target"] == f"tcp://127.0.0.1:{echo_port}"
    assert (result["ok"], result["problems"]) == (True, [])
    output = capsys.readouterr()
    assert "round trips" in output.out  # the summary table
    assert output.err == ""


async def test_quiet_prints_nothing(
    logs: list[dict[str, Any]], echo_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # `logs` captures the server's log lines, which would otherwise go to stdout.
    assert await run(pingpong(echo_port, "--quiet")) == 0
    assert capsys.readouterr() == ("", "")


async def test_mismatches_exit_1_and_show_in_the_json(
    corrupting_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "result.json"
    assert await run(pingpong(corrupting_port, "--json", str(path), "--quiet")) == 1
    assert json.loads(path.read_text())["mismatched_bytes"] == 2
    assert "echoed bytes differ" in capsys.readouterr().err


async def test_errors_beyond_max_errors_exit_1(unused_tcp_port: int) -> None:
    assert await run(pingpong(unused_tcp_port, "--quiet")) == 1


@pytest.mark.parametrize(
    ("mode", "transport"),
    [("pingpong", "tcp"), ("stream", "tcp"), ("oneshot", "tcp"), ("pingpong", "udp")],
)
async def test_a_run_that_echoed_nothing_fails_however_many_errors_are_tolerated(
    mode: str,
    transport: str,
    unused_tcp_port: int,
    unused_udp_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens on the port: the run counts errors, all within --max-errors.
    path = tmp_path / "result.json"
    port = unused_udp_port if transport == "udp" else unused_tcp_port
    argv = ["--port", str(port), "--mode", mode, "--connections", "2", "--size", "64",
            "--duration", "0.3", "--max-errors", "100000", "--json", str(path)]  # fmt: skip
    assert await run(argv + (["--udp"] if transport == "udp" else [])) == 1
    output = capsys.readouterr()
    assert "echo-async bench: nothing was echoed: " in output.err
    # The table says so rather than showing zero latencies and rates as measurements.
    assert "no measurement" in output.out
    assert " ms" not in output.out
    assert "MB/s" not in output.out
    assert "FAILED" in output.out
    result = json.loads(path.read_text())
    assert set(result) == JSON_KEYS
    assert result["ok"] is False
    assert any(problem.startswith("nothing was echoed: ") for problem in result["problems"])
    assert result["round_trips"] == 0
    assert result["latency_ms"] is None
    assert result["round_trips_per_s"] is None
    assert result["echoed_bytes_per_s"] is None


async def test_an_unknown_host_is_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--host", "no-such-host.invalid", "--port", "7", "--mode", "pingpong",
            "--connections", "2", "--size", "64", "--duration", "5", "--timeout", "5",
            "--max-errors", "100000"]  # fmt: skip
    assert await run(argv) == 1
    output = capsys.readouterr()
    assert output.out == ""  # no table of zeros
    assert output.err.startswith("echo-async bench: error: cannot resolve no-such-host.invalid: ")
    assert output.err.count("\n") == 1
    assert "Unknown error" not in output.err


async def test_tls_against_a_plaintext_server_says_it_did_not_speak_tls(
    plaintext_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(pingpong(plaintext_port, "--tls", "--quiet")) == 1
    err = capsys.readouterr().err
    assert "connect: TLS: the server did not speak TLS (" in err


async def test_hold_that_cannot_open_everything_exits_1(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(unused_tcp_port), "--mode", "hold", "--connections", "5",
            "--size", "64", "--duration", "0.2", "--max-errors", "100", "--quiet"]  # fmt: skip
    assert await run(argv) == 1
    assert "only 0 of 5" in capsys.readouterr().err


async def test_plot_writes_a_png(echo_port: int, tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    assert await run(pingpong(echo_port, "--plot", str(path), "--quiet")) == 0
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--port", "7", "--unix", "/tmp/x", "--duration", "1"],
            "exactly one of --port and --unix",
        ),
        (["--port", "7"], "exactly one of --duration and --requests"),
        (["--port", "7", "--duration", "1", "--requests", "5"], "--duration and --requests"),
        (["--port", "7", "--duration", "1", "--udp", "--tls"], "--udp and --tls"),
        (["--port", "7", "--duration", "1", "--json", "/no/such/dir/x.json"], "does not exist"),
        (["--port", "7", "--duration", "1", "--tls", "--tls-ca", "/no/ca.pem"], "--tls-ca"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--mode", "pingpong", "--connections", "1", "--size", "64"]
    assert cli.run(parse(base + argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("echo-async bench: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_plot_without_matplotlib_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    argv = ["--port", "7", "--mode", "pingpong", "--connections", "1", "--size", "64",
            "--duration", "1", "--plot", "x.png"]  # fmt: skip
    assert cli.run(parse(argv)) == 2
    assert capsys.readouterr().err == (
        "echo-async bench: error: --plot needs matplotlib: pip install 'echo-async[plot]'\n"
    )


@pytest.mark.parametrize(("text", "size"), [("64", 64), ("1k", 1000), ("1KiB", 1024),
                                             ("64ki", 65536), ("1MiB", 1 << 20)])  # fmt: skip
def test_sizes_take_units(text: str, size: int) -> None:
    assert cli.byte_size(text) == size


def test_a_bad_size_is_rejected_by_argparse() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.byte_size("lots")


async def command(*argv: str) -> tuple[int, str, str]:
    """Run `python -m echo_async bench ARGV` and return (status, stdout, stderr)."""
    environment = dict(os.environ, PYTHONPATH=ROOT)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "echo_async", "bench", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_command_exit_status_follows_the_checks(echo_port: int, corrupting_port: int) -> None:
    status, out, err = await command(*pingpong(echo_port))
    assert (status, err) == (0, "")
    assert "latency p99" in out
    status, _, err = await command(*pingpong(corrupting_port, "--quiet", "--processes", "2"))
    assert status == 1
    assert "echoed bytes differ" in err
    usage = ["--port", "7", "--unix", "/x", "--mode", "hold", "--connections", "1",
             "--size", "1", "--duration", "1"]  # fmt: skip
    status, _, err = await command(*usage)
    assert status == 2
    assert err == "echo-async bench: error: give exactly one of --port and --unix\n"

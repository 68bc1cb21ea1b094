"""The deployment files agree with each other and with the CLI: ports, probes, drain timeouts.

Images can't be built here, so the Dockerfile, the Kubernetes manifests and the HAProxy
configuration are parsed instead. Every command line they contain is run through
`echo-async serve ... --print-config`, so what they are checked against is the configuration the
CLI itself would run with, defaults included.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from echo_async.config import DEFAULT_PORT, DEFAULT_SHUTDOWN_TIMEOUT, parse_host_port
from tests.e2e.helpers import cli_command
from tests.e2e.test_haproxy import NO_HAPROXY, find_haproxy

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
HAPROXY_CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
ANY_ADDRESS = ("0.0.0.0", "::")


# -- helpers -------------------------------------------------------------------------------------


def effective_config(arguments: list[str]) -> dict[str, Any]:
    """What `echo-async serve ARGUMENTS` would run with, from its own `--print-config`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_ASYNC_")}
    result = subprocess.run(
        [*cli_command(), "serve", *arguments, "--print-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )
    assert result.returncode == 0, f"echo-async serve {shlex.join(arguments)}: {result.stderr}"
    return tomllib.loads(result.stdout)


def metrics_port(config: dict[str, Any]) -> int:
    assert config["metrics"], "no --metrics: nothing would answer /healthz"
    return parse_host_port(config["metrics"], "--metrics")[1]


def load_manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by kind (one object of each kind)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/kubernetes")
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget"}
    return objects


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a port name) as the container port number."""
    for entry in container["ports"]:
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    raise AssertionError(f"port {port!r} is not one of the container's ports")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            instructions = []  # only the final stage is the image
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    """An instruction's JSON (exec form) argument list; the shell form is refused."""
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"expected the exec form (a JSON list), got {arguments}"
    return [str(item) for item in parsed]


def haproxy_sections() -> dict[str, list[str]]:
    """`global`, `defaults`, `frontend NAME`, `backend NAME`: their lines, comments dropped."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in HAPROXY_CONFIG.read_text().splitlines():
        text = line.split("#", 1)[0].rstrip()
        if not text:
            continue
        if not text[0].isspace():
            current = sections.setdefault(" ".join(text.split()), [])
        else:
            assert current is not None, f"a setting outside any section: {line}"
            current.append(" ".join(text.split()))
    return sections


def haproxy_seconds(value: str) -> float:
    """An HAProxy time (`250ms`, `10s`, `5m`, `1h`; a bare number is milliseconds)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match[1]) * scale[match[2] or "ms"]


def setting(lines: list[str], name: str) -> str | None:
    """The arguments of the last `name ...` line (later lines win, as in HAProxy)."""
    found = None
    for line in lines:
        if line == name or line.startswith(name + " "):
            found = line[len(name) :].strip()
    return found


def server_options(line: str) -> dict[str, str]:
    """`server NAME ADDR k v flag ...` -> {option: value or ""} for the options used here."""
    words = line.split()[3:]
    valued = {"port", "inter", "fastinter", "downinter", "fall", "rise", "weight", "addr"}
    options: dict[str, str] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word in valued:
            options[word] = words[index + 1]
            index += 2
        else:
            options[word] = ""
            index += 1
    return options


def haproxy_instance_command() -> list[str]:
    """The `echo-async serve ...` command the config's header says each instance runs."""
    words: list[str] = []
    continued = False
    for line in HAPROXY_CONFIG.read_text().splitlines():
        text = line.lstrip("#").strip()
        if continued or text.startswith("echo-async serve "):
            continued = text.endswith("\\")
            words += shlex.split(text.rstrip("\\"))
        if words and not continued:
            break
    assert words, "haproxy.cfg should show the echo-async command each instance runs"
    assert words[:2] == ["echo-async", "serve"]
    return words[2:]


# -- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_runs_the_cli_as_a_non_root_user_with_a_health_check() -> None:
    instructions = dockerfile_instructions()
    by_keyword: dict[str, str] = {}
    for keyword, arguments in instructions:
        by_keyword[keyword] = arguments  # the last one wins, as in docker build

    base = instructions[0][1].split()[0]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    assert by_keyword["USER"].split(":")[0] not in ("root", "0")
    assert by_keyword["STOPSIGNAL"] == "SIGTERM"

    entrypoint = exec_form(by_keyword["ENTRYPOINT"])
    assert entrypoint == ["echo-async", "serve"]
    config = effective_config(exec_form(by_keyword["CMD"]))
    assert config["host"] in ANY_ADDRESS, "in a container, loopback is unreachable"
    assert config["port"] == DEFAULT_PORT
    exposed = {int(port.split("/")[0]) for port in by_keyword["EXPOSE"].split()}
    assert exposed == {config["port"], metrics_port(config)}

    health = by_keyword["HEALTHCHECK"]
    assert "CMD" in health.split()
    assert f"http://127.0.0.1:{metrics_port(config)}/healthz" in health


# -- Kubernetes ----------------------------------------------------------------------------------


def test_kubernetes_container_runs_the_image_command_with_its_ports() -> None:
    container = the_container(load_manifests()["Deployment"])
    cmd = [
        exec_form(arguments) for keyword, arguments in dockerfile_instructions() if keyword == "CMD"
    ][-1]
    assert "command" not in container, "keep the image's ENTRYPOINT (echo-async serve)"
    assert [str(argument) for argument in container["args"]] == cmd
    config = effective_config([str(argument) for argument in container["args"]])
    assert config["host"] in ANY_ADDRESS
    assert parse_host_port(config["metrics"], "--metrics")[0] in ANY_ADDRESS
    assert container_port(container, "echo") == config["port"] == DEFAULT_PORT
    assert container_port(container, "metrics") == metrics_port(config)


def test_kubernetes_probes_hit_healthz_and_the_drain_fits_the_grace_period() -> None:
    pod = load_manifests()["Deployment"]["spec"]["template"]["spec"]
    container = the_container(load_manifests()["Deployment"])
    config = effective_config([str(argument) for argument in container["args"]])
    shutdown_timeout = float(config["shutdown_timeout"])

    for name in ("readinessProbe", "livenessProbe"):
        probe = container[name]["httpGet"]
        assert probe["path"] == "/healthz", name
        assert container_port(container, probe["port"]) == metrics_port(config), name

    # /healthz is 503 for the whole drain: liveness must tolerate it for longer.
    liveness = container["livenessProbe"]
    tolerated = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert tolerated > shutdown_timeout

    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    pre_stop_s = float(command[1]) if command[:1] == ["sleep"] else 0.0
    pre_stop_s += float(pre_stop.get("sleep", {}).get("seconds", 0))
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + shutdown_timeout

    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert str(security["runAsUser"]) == user


def test_kubernetes_service_and_budget_select_the_deployment_pods() -> None:
    manifests = load_manifests()
    deployment = manifests["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = the_container(deployment)
    config = effective_config([str(argument) for argument in container["args"]])

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])

    service = manifests["Service"]["spec"]
    assert selects(service["selector"])
    targets = {container_port(container, port["targetPort"]) for port in service["ports"]}
    assert config["port"] in targets
    echo_ports = [
        port["port"]
        for port in service["ports"]
        if container_port(container, port["targetPort"]) == config["port"]
    ]
    assert echo_ports == [config["port"]]

    budget = manifests["PodDisruptionBudget"]["spec"]
    assert selects(budget["selector"]["matchLabels"])
    replicas = deployment["spec"]["replicas"]
    # A budget that allows no eviction at all would block every node drain.
    if "maxUnavailable" in budget:
        assert 1 <= budget["maxUnavailable"] < replicas
    else:
        assert 1 <= budget["minAvailable"] < replicas


# -- HAProxy -------------------------------------------------------------------------------------


def test_haproxy_servers_send_proxy_v2_and_check_healthz_on_the_metrics_port() -> None:
    config = effective_config(haproxy_instance_command())
    assert config["proxy_protocol"] == "required"
    sections = haproxy_sections()
    backends = [name for name in sections if name.startswith("backend ")]
    assert len(backends) == 1
    backend = sections[backends[0]]

    assert setting(sections["defaults"], "mode") == "tcp"
    assert "option httpchk" in backend
    assert setting(backend, "http-check send") == "meth GET uri /healthz"
    assert setting(backend, "http-check expect") == "status 200"

    servers = [line for line in backend if line.startswith("server ")]
    assert len(servers) >= 2, "balancing needs several instances"
    for line in servers:
        options = server_options(line)
        assert line.split()[2].rsplit(":", 1)[1] == str(config["port"]), line
        assert "send-proxy-v2" in options, line
        assert "check" in options, line
        assert options.get("port") == str(metrics_port(config)), line
        # HAProxy checks speak plain HTTP: a PROXY header would make /healthz answer 400.
        assert "check-send-proxy" not in options, line


def test_haproxy_drain_matches_the_shutdown_timeout() -> None:
    """What "the drain matches --shutdown-timeout" means (see docs/load-balancers.md)."""
    config = effective_config(haproxy_instance_command())
    shutdown_timeout = float(config["shutdown_timeout"])
    idle_timeout = float(config["idle_timeout"])
    assert shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    sections = haproxy_sections()
    defaults = sections["defaults"]
    backend = next(lines for name, lines in sections.items() if name.startswith("backend "))
    every_line = [line for lines in sections.values() for line in lines]

    # A draining instance is taken out of rotation while it still accepts (--drain-delay):
    # HAProxy's checks see the 503 before the listener closes, even a check that times out...
    default_server = server_options("server - - " + (setting(backend, "default-server") or ""))
    interval = haproxy_seconds(default_server.get("inter", "2s"))
    check_timeout = haproxy_seconds(setting(defaults, "timeout check") or "0")
    detection = interval * int(default_server.get("fall", "3")) + check_timeout
    assert float(config["drain_delay"]) >= detection
    assert detection < shutdown_timeout / 2
    # ...what would still be refused (a shorter delay) is sent elsewhere...
    assert int(setting(defaults, "retries") or 0) >= 1
    # (without redispatch, every retry goes to the same refusing server, one second apart)
    redispatch = setting(defaults, "option redispatch")
    assert redispatch is not None
    assert redispatch in ("", "1"), "redispatch on the first retry, not a later one"
    # ...its open sessions are left to its own drain, and it is echo-async that ends idle ones...
    assert not any("shutdown-sessions" in line for line in every_line)
    for side in ("client", "server"):
        timeout = haproxy_seconds(setting(defaults, f"timeout {side}") or "0")
        assert timeout > max(idle_timeout, shutdown_timeout), side
    # ...and a reload of HAProxy itself gives open sessions at least as long as a drain.
    hard_stop_after = haproxy_seconds(setting(sections["global"], "hard-stop-after") or "0")
    assert hard_stop_after > shutdown_timeout


def test_haproxy_logs_sessions_that_carried_no_bytes() -> None:
    """A client an instance closed before its greeting moved no byte: it must still be logged."""
    sections = haproxy_sections()
    assert setting(sections["defaults"], "option tcplog") is not None
    for name, lines in sections.items():
        assert "option dontlognull" not in lines, name


def test_haproxy_accepts_the_configuration() -> None:
    haproxy = find_haproxy()
    if haproxy is None:
        pytest.skip(NO_HAPROXY)
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr

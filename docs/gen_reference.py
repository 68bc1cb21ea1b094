"""MkDocs hook: the reference tables are rendered from the code at build time, so they can't drift.

A page asks for a table with a marker line; `on_page_markdown` replaces it:

- `<!-- generated: cli -->` every `echo-async` command and flag, from
  `echo_async.cli.build_parser()`;
- `<!-- generated: options -->` every option's flag, variable, TOML key, default and meaning, from
  `echo_async.config.OPTIONS`;
- `<!-- generated: defaults-toml -->` the defaults as the TOML file `--print-config` writes;
- `<!-- generated: metrics -->` every Prometheus series, from `echo_async.metrics.ServerMetrics`.

A marker nobody renders fails the build, so a typo can't ship a page with a hole in it.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from echo_async.cli import build_parser
from echo_async.config import OPTIONS, ServiceConfig
from echo_async.metrics import ServerMetrics
from echo_async.sources import render_toml

HELP_WIDTH = 100
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
SCOPES = {"server": "`ServerConfig`", "service": "serve"}
_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`" if text else ""


# -- the command line -----------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _expanded_help(action: argparse.Action, prog: str) -> str:
    """The help text with `%(default)s` and friends filled in, as --help shows it."""
    if not action.help:
        return ""
    values = {**vars(action), "prog": prog}
    for name, value in list(values.items()):
        if hasattr(value, "__name__"):
            values[name] = value.__name__
    return action.help % values


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return "|".join(str(choice) for choice in action.choices)
    metavar = action.metavar if action.metavar is not None else action.dest.upper()
    return metavar if isinstance(metavar, str) else " ".join(metavar)


def _argument_rows(parser: argparse.ArgumentParser, prog: str) -> Iterator[str]:
    for group in parser._action_groups:
        actions = [
            action
            for action in group._group_actions
            if action.help != argparse.SUPPRESS
            and not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        ]
        if not actions:
            continue
        yield f"**{group.title}**\n"
        yield "| Flag | Value | Meaning |"
        yield "| --- | --- | --- |"
        for action in actions:
            flags = ", ".join(code(flag) for flag in action.option_strings) or code(action.dest)
            if action.required:
                flags += " (required)"
            yield f"| {flags} | {code(_value(action))} | {cell(_expanded_help(action, prog))} |"
        yield ""


def render_cli() -> str:
    """Every command: its description, usage line and a table of its flags."""
    parser = build_parser()
    lines = []
    for name, command in [("", parser), *_subcommands(parser).items()]:
        command.formatter_class = functools.partial(argparse.HelpFormatter, width=HELP_WIDTH)
        heading = f"echo-async {name}".strip()
        lines += [f"## `{heading}`", ""]
        if command.description:
            lines += [command.description, ""]
        lines += ["```text", command.format_usage().strip(), "```", ""]
        if command is parser:
            for sub_name, sub in _subcommands(parser).items():
                link = f"[`echo-async {sub_name}`](#echo-async-{sub_name})"
                lines.append(f"- {link}: {sub.description}")
            lines.append("")
        lines += list(_argument_rows(command, command.prog))
        if command.epilog:
            lines += [command.epilog, ""]
    return "\n".join(lines)


# -- configuration --------------------------------------------------------------------------------


def _toml_defaults() -> dict[str, str]:
    """Each option's default as the TOML value `--print-config` writes for it."""
    pairs = (line.split(" = ", 1) for line in render_toml(ServiceConfig()).splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def render_options() -> str:
    """One row per option: TOML key, flag, environment variable, default, meaning, scope."""
    defaults = _toml_defaults()
    lines = [
        "| TOML key | Flag | Environment variable | Default | Meaning | In |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for option in OPTIONS:
        meaning = option.help
        if option.choices:
            meaning += f" (one of {', '.join(option.choices)})"
        lines.append(
            f"| {code(option.name)} | {code(option.flag)} | {code(option.environment_variable)} "
            f"| {code(cell(defaults[option.name]))} | {cell(meaning)} | {SCOPES[option.scope]} |"
        )
    return "\n".join(lines)


def render_defaults_toml() -> str:
    return "```toml\n" + render_toml(ServiceConfig()) + "```"


# -- metrics --------------------------------------------------------------------------------------


def render_metrics() -> str:
    """One row per Prometheus series the service exports, as /metrics names it."""
    metrics = ServerMetrics(CollectorRegistry())
    lines = ["| Series | Type | Labels | Meaning |", "| --- | --- | --- | --- |"]
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        (family,) = collector.describe()
        names = [family.name + suffix for suffix in _SUFFIXES.get(family.type, [""])]
        labels = ", ".join(code(label) for label in getattr(collector, "_labelnames", ()))
        lines.append(
            f"| {'<br>'.join(code(name) for name in names)} | {family.type} | {labels} "
            f"| {cell(family.documentation)} |"
        )
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[], str]] = {
    "cli": render_cli,
    "options": render_options,
    "defaults-toml": render_defaults_toml,
    "metrics": render_metrics,
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each `<!-- generated: NAME -->` line with the table NAME renders."""

    def replace(match: re.Match[str]) -> str:
        name = match[1]
        if name not in RENDERERS:
            raise ValueError(f"{page.file.src_path}: unknown generated block {name!r}")
        return RENDERERS[name]()

    return MARKER.sub(replace, markdown)

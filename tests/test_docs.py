"""The docs say what the program does: the sizing table is the allocator's
output, and docs/configuration.md lists every flag of every command with
its default (and no flag that does not exist)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import typer.main

from lmcd import cli
from lmcd.config import Config
from lmcd.sizing import MODELS, chunks_that_fit, sizing_table
from lmcd_backends.pinned_cpu import PinnedCpuTier

DOCS = Path(__file__).resolve().parent.parent / "docs"
GiB = 1 << 30
MiB = 1 << 20


# -- the sizing table (docs/operations.md) ------------------------------------


def test_operations_sizing_table_is_the_allocators_output() -> None:
    text = (DOCS / "operations.md").read_text()
    assert sizing_table() in text, (
        "docs/operations.md's sizing table differs from `python -m lmcd.sizing`:\n"
        + sizing_table()
    )


def test_sizing_counts_whole_chunks_per_segment() -> None:
    """The figures the issue found: 20 MiB and 17.2 MiB chunks leave a gap
    at the end of each 1 GiB segment (51 and 59 per segment, not 51.2 and
    59.7), so 50 GiB holds 2,550 and 2,950 of them."""
    llama70, deepseek = MODELS[1], MODELS[2]
    assert llama70.chunk_bytes() == 20 * MiB
    assert chunks_that_fit(50 * GiB, llama70.chunk_bytes()) == 2550
    assert chunks_that_fit(50 * GiB, deepseek.chunk_bytes()) == 2950
    assert chunks_that_fit(GiB, 2 * GiB) == 0


def test_sizing_agrees_with_the_cpu_tier() -> None:
    """The daemon's tier (over the same allocator) places as many chunks
    once its segments are open (no memory needed: extents only)."""
    tier = PinnedCpuTier(64 * MiB, segment_bytes=16 * MiB, pin=False)
    tier._arena.open_all()  # what preparation does, without the memory
    nbytes = 5 * MiB
    n = 0
    while tier.allocate(nbytes) is not None:
        n += 1
    assert n == chunks_that_fit(64 * MiB, nbytes, 16 * MiB) == 12


# -- docs/configuration.md against the CLI --------------------------------------

_HEADING = re.compile(r"^#+ ")
_COMMAND = re.compile(r"`lmcd ([a-z][a-z-]*)`")
_FLAG = re.compile(r"`(--?[a-z][a-z0-9-]*)`")
# Defaults the docs describe in words although the CLI's value is not None.
_UNSET = {("serve", "--disk-size"): 0.0}


def doc_tables() -> dict[str, dict[str, str]]:
    """command -> flag -> the default cell, from every flag table in
    docs/configuration.md. Tables belong to `lmcd serve` until a heading
    names other commands (`lmcd clear` and `lmcd reset-stats`); a row whose
    text says "`clear` only" belongs to that command alone."""
    commands = ["serve"]
    tables: dict[str, dict[str, str]] = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if _HEADING.match(line):
            named = _COMMAND.findall(line)
            if named:
                commands = named
            continue
        if not line.startswith("| `-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = _FLAG.findall(cells[0])
        only = re.search(r"`([a-z-]+)` only", cells[2])
        defaults = [d.strip() for d in cells[1].split(",")]
        if len(defaults) != len(flags):
            defaults = [cells[1]] * len(flags)
        for command in commands:
            if only and only.group(1) != command:
                continue
            table = tables.setdefault(command, {})
            for flag, default in zip(flags, defaults, strict=True):
                table[flag] = default
    return tables


def cli_options() -> dict[str, dict[str, Any]]:
    """command -> flag (each of its spellings) -> default."""
    group = typer.main.get_command(cli.app)
    out: dict[str, dict[str, Any]] = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        options: dict[str, Any] = {}
        for param in command.params:
            if param.param_type_name != "option" or "--help" in param.opts:
                continue
            for flag in (*param.opts, *param.secondary_opts):
                options[flag] = param.default
        out[name] = options
    return out


def default_matches(cell: str, value: Any, unset: object = None) -> bool:
    if cell.startswith("on"):
        return value is True
    if cell.startswith("off"):
        return value is None or value is False
    literal = re.match(r"`([^`]*)`", cell)
    if literal is None:  # described in words: not set by default
        return value is None if unset is None else value == unset
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(literal.group(1)) == value
    return literal.group(1) == str(value)


def test_configuration_lists_every_flag_of_every_command() -> None:
    docs, options = doc_tables(), cli_options()
    assert set(docs) == set(options), "commands with a table != the CLI's commands"
    for command, flags in options.items():
        documented = docs[command]
        # Secondary spellings (--no-x, --misses, -y) may be left out.
        missing = [
            f
            for f in flags
            if f not in documented and f.startswith("--") and not f.startswith("--no-")
        ]
        missing = [f for f in missing if f != "--misses"]
        assert not missing, f"lmcd {command}: flags not in configuration.md: {missing}"
        unknown = sorted(set(documented) - set(flags))
        assert not unknown, f"lmcd {command}: no such flags: {unknown}"


def test_configuration_defaults_are_the_clis() -> None:
    wrong = []
    for command, documented in doc_tables().items():
        options = cli_options()[command]
        for flag, cell in documented.items():
            unset = _UNSET.get((command, flag))
            value = options[flag]
            if not default_matches(cell, value, unset):
                wrong.append(f"lmcd {command} {flag}: docs {cell!r}, CLI {value!r}")
    assert not wrong, "\n".join(wrong)


def test_serve_defaults_are_the_configs() -> None:
    """`lmcd serve`'s defaults are `Config`'s (what tests and embedders use)."""
    fields = {f.name: f.default for f in attrs.fields(Config)}
    renamed = {"pool_size": "pool_mb"}
    differ = []
    for name, param in inspect.signature(cli.serve).parameters.items():
        field = renamed.get(name, name)
        if field in fields and fields[field] != param.default:
            differ.append(f"{name}: CLI {param.default!r}, Config {fields[field]!r}")
    assert not differ, differ


@pytest.mark.parametrize(
    ("cell", "value", "ok"),
    [
        ("`300`", 300.0, True),
        ("`5.0`", 5.0, True),
        ("`2048`", 1024, False),
        ("off", None, True),
        ("off", False, True),
        ("on", True, True),
        ("any", None, True),
        ("any", "x", False),
        ("`auto`", "auto", True),
    ],
)
def test_default_matching(cell: str, value: Any, ok: bool) -> None:
    assert default_matches(cell, value) is ok


# -- `nox -s bench` writes docs/performance.md only when asked --------------------


def test_bench_report_goes_to_docs_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmcd.benchmarks import __main__ as suite

    assert suite.destinations(suite.parse_args([])) == []
    assert suite.destinations(suite.parse_args(["--write-docs"])) == [
        DOCS / "performance.md"
    ]
    out = tmp_path / "build" / "performance.md"
    assert suite.destinations(suite.parse_args(["--out", str(out)])) == [out]
    # A whole run (the measuring stubbed): stdout, and the file asked for.
    monkeypatch.setattr(suite, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(suite, "report", lambda args: "# Performance\n")
    suite.main([])
    assert capsys.readouterr().out == "# Performance\n\n"
    assert not (tmp_path / "docs").exists()
    suite.main(["--out", str(out)])
    assert out.read_text() == "# Performance\n"
    assert not (tmp_path / "docs").exists()

"""`lmcd inspect`: a daemon's statistics as tables (or JSON), once or live."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def render(s: dict[str, Any], rates: dict[str, float] | None = None) -> Group:
    """Tables for one STATS map; `rates` (per second) when watching."""
    hits, misses = s["lookup_hit_chunks"], s["lookup_miss_chunks"]
    used = s["used_bytes"]
    memory = _table(
        "Memory",
        [
            ("capacity", _size(s["capacity_bytes"])),
            ("used", f"{_size(used)} ({_pct(used, s['capacity_bytes'])})"),
            ("allocated from OS", _size(s.get("allocated_bytes", 0))),
            ("pinned", "yes" if s.get("pinned_memory") else "no"),
        ],
    )
    cache = _table(
        "Cache",
        [
            ("chunks", str(s["chunks"])),
            ("tokens", str(s["tokens"])),
            ("chunk size", f"{s['chunk_size']} tokens"),
            ("locked chunks", str(s["locked_chunks"])),
            ("lookups", str(s["lookups"])),
            ("hit rate (chunks)", _pct(hits, hits + misses)),
            ("hit / miss chunks", f"{hits} / {misses}"),
        ],
    )
    traffic_rows = [
        (
            "stores",
            f"{s['stores']} ({s['stored_chunks']} chunks, {_size(s['stored_bytes'])})",
        ),
        (
            "retrieves",
            f"{s['retrieves']} ({s['retrieved_chunks']} chunks, "
            f"{_size(s['retrieved_bytes'])})",
        ),
        ("evicted", f"{s['evicted_chunks']} chunks"),
        ("lock expiries", str(s.get("lock_expiries", 0))),
    ]
    if rates is not None:
        traffic_rows += [
            ("requests/s", f"{rates['requests']:.1f}"),
            ("store GB/s", f"{rates['stored_bytes'] / 1e9:.3f}"),
            ("retrieve GB/s", f"{rates['retrieved_bytes'] / 1e9:.3f}"),
        ]
    traffic = _table("Traffic", traffic_rows)
    errors = _table(
        "Errors",
        [
            ("failed requests", str(s["failed_requests"])),
            ("malformed messages", str(s["malformed_messages"])),
            ("ambiguous messages", str(s.get("ambiguous_messages", 0))),
            ("unsupported requests", str(s.get("unsupported_requests", 0))),
            ("reaped workers", str(s.get("reaped_workers", 0))),
        ],
    )
    clients = Table(title="Clients", box=box.SIMPLE, title_justify="left")
    for col in ("dialect", "connections", "requests"):
        clients.add_column(col)
    by_requests = s.get("requests_by_dialect", {})
    for name, count in s.get("connections_by_dialect", {}).items():
        clients.add_row(name, str(count), str(by_requests.get(name, 0)))
    models = Table(title="Models", box=box.SIMPLE, title_justify="left")
    for col in ("model", "chunks", "bytes"):
        models.add_column(col)
    for name, usage in sorted(s["models"].items()):
        models.add_row(name, str(usage["chunks"]), _size(usage["bytes"]))
    instances = Table(title="Instances", box=box.SIMPLE, title_justify="left")
    for col in ("instance", "model", "kind", "layout", "layers", "dtype", "block"):
        instances.add_column(col)
    for i in s["instances"]:
        instances.add_row(
            str(i["instance_id"]),
            str(i.get("model_name") or "-"),
            *(str(i[f]) for f in ("kind", "layout", "layers", "dtype", "block_size")),
        )
    head = f"lmcd {s['version']}, up {s['uptime_s']:.0f} s"
    parts: list[Any] = [head, memory, cache, traffic, errors, clients, models]
    if s.get("tiers"):
        parts.append(tier_table(s["tiers"]))
    parts.append(instances)
    return Group(*parts)


# (row label, field, how to show it) of the per-tier table.
_TIER_ROWS: list[tuple[str, str, str]] = [
    ("capacity", "capacity_bytes", "size"),
    ("used", "used_bytes", "size"),
    ("chunks", "chunks", "int"),
    ("hits (chunks)", "hits", "int"),
    ("promotions", "promotions", "int"),
    ("promotion failures", "promotion_failures", "int"),
    ("demotions", "demotions", "int"),
    ("demotion failures", "demotion_failures", "int"),
    ("dropped writes", "dropped_writes", "int"),
    ("evicted before written", "evicted_before_written", "int"),
    ("deletions", "deletions", "int"),
    ("read", "read_bytes", "size"),
    ("written", "written_bytes", "size"),
    ("verify failures", "verify_failures", "int"),
    ("queue depth", "queue_depth", "int"),
    ("healthy", "healthy", "bool"),
]


def tier_table(tiers: dict[str, dict[str, Any]]) -> Table:
    """One column per tier (cpu, disk, remote); "-" where a tier has no
    such figure."""
    t = Table(title="Tiers", box=box.SIMPLE, title_justify="left")
    t.add_column("what", style="bold")
    names = list(tiers)
    for name in names:
        t.add_column(name, justify="right")
    for label, field, kind in _TIER_ROWS:
        cells = []
        for name in names:
            value = tiers[name].get(field)
            if value is None:
                cells.append("-")
            elif kind == "size":
                cells.append(_size(value) if value else "-")
            elif kind == "bool":
                cells.append("yes" if value else "NO")
            else:
                cells.append(str(value))
        t.add_row(label, *cells)
    details = [f"{n}: {tiers[n]['detail']}" for n in names if tiers[n].get("detail")]
    if details:
        t.caption = "; ".join(details)
    return t


RATE_FIELDS = ("requests", "stored_bytes", "retrieved_bytes", "lookups")


def rates_between(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
    dt = max(new["uptime_s"] - old["uptime_s"], 1e-9)
    return {f: (new[f] - old[f]) / dt for f in RATE_FIELDS}


def render_compact(s: dict[str, Any], rates: dict[str, float] | None) -> Table:
    """The live view: rates first, then what is held, in two columns that
    fit an 80x24 terminal."""
    r = rates or dict.fromkeys(RATE_FIELDS, 0.0)
    hits, misses = s["lookup_hit_chunks"], s["lookup_miss_chunks"]
    used, capacity = s["used_bytes"], s["capacity_bytes"]
    left = [
        ("requests/s", f"{r['requests']:,.1f}"),
        ("store GB/s", f"{r['stored_bytes'] / 1e9:.3f}"),
        ("retrieve GB/s", f"{r['retrieved_bytes'] / 1e9:.3f}"),
        ("lookups/s", f"{r['lookups']:,.1f}"),
        ("hit rate", _pct(hits, hits + misses)),
        ("failed requests", str(s["failed_requests"])),
    ]
    right = [
        ("used", f"{_size(used)} ({_pct(used, capacity)})"),
        ("capacity", _size(capacity)),
        ("chunks", f"{s['chunks']:,}"),
        ("locked chunks", str(s["locked_chunks"])),
        ("evicted chunks", f"{s['evicted_chunks']:,}"),
        ("instances", str(len(s["instances"]))),
    ]
    t = Table(
        title=f"lmcd {s['version']}, up {s['uptime_s']:.0f} s (Ctrl-C to quit)",
        box=box.SIMPLE,
        show_header=False,
        title_justify="left",
    )
    for justify in ("left", "right", "left", "right"):
        t.add_column(justify=justify)
    for (k1, v1), (k2, v2) in zip(left, right, strict=True):
        t.add_row(k1, v1, k2, v2)
    return t


LINE_HEADER = (
    f"{'time':<8} {'req/s':>9} {'store GB/s':>10} {'retr GB/s':>9} "
    f"{'lookup/s':>9} {'hit%':>6} {'chunks':>9} {'used':>11} {'failed':>7}"
)


def stat_line(s: dict[str, Any], rates: dict[str, float]) -> str:
    """One line per interval (`inspect --watch` when stdout is not a
    terminal, like `redis-cli --stat`); columns as in `LINE_HEADER`."""
    hits, misses = s["lookup_hit_chunks"], s["lookup_miss_chunks"]
    return (
        f"{time.strftime('%H:%M:%S'):<8} {rates['requests']:>9.1f} "
        f"{rates['stored_bytes'] / 1e9:>10.3f} {rates['retrieved_bytes'] / 1e9:>9.3f} "
        f"{rates['lookups']:>9.1f} {_pct(hits, hits + misses):>6} "
        f"{s['chunks']:>9} {_size(s['used_bytes']):>11} {s['failed_requests']:>7}"
    )


def watch(
    fetch: Any, interval: float, console: Console, count: int | None = None
) -> None:
    """Refresh every `interval` s (`count` times, or forever): a compact
    live table on a terminal, else one line per interval (a header every
    20 lines), flushed as it goes."""
    if interval <= 0:
        raise ValueError("interval must be > 0")
    prev = fetch()
    if not console.is_terminal:
        n = 0
        while count is None or n < count:
            time.sleep(interval)
            cur = fetch()
            if n % 20 == 0:
                console.print(LINE_HEADER, highlight=False, soft_wrap=True)
            console.print(
                stat_line(cur, rates_between(prev, cur)),
                highlight=False,
                soft_wrap=True,
            )
            console.file.flush()
            prev = cur
            n += 1
        return
    from rich.live import Live

    with Live(render_compact(prev, None), console=console, auto_refresh=False) as live:
        n = 0
        while count is None or n < count:
            time.sleep(interval)
            cur = fetch()
            live.update(render_compact(cur, rates_between(prev, cur)), refresh=True)
            prev = cur
            n += 1

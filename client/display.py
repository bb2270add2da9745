"""Formatting for the CLI's tables: sizes, times, processor split, aligned columns."""

from __future__ import annotations

from datetime import datetime, timezone

_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")
FOREVER_AFTER_S = 50 * 365 * 24 * 3600  # an expiry further away than this is "Forever"


def human_bytes(num_bytes: int | float | None) -> str:
    """Decimal units as Ollama prints them: 838 MB, 4.7 GB."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in _BYTE_UNITS:
        if abs(value) < 1000 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1000
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def human_count(count: int | float | None) -> str:
    """Parameter counts: 15.7B, 2.4M."""
    if count is None:
        return "-"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(int(count))


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from the API (Go writes nanoseconds; Python wants microseconds)."""
    if not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    head, sep, rest = text.partition(".")
    if sep:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _duration_words(seconds: float) -> str:
    for unit_s, name in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"),
                         (86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds >= unit_s:
            count = int(seconds // unit_s)
            return f"{count} {name}{'s' if count != 1 else ''}"
    return "0 seconds"


def time_ago(value: str | None, now: datetime | None = None) -> str:
    """'2 days ago' for a past time; '-' when unknown."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    seconds = ((now or datetime.now(timezone.utc)) - moment).total_seconds()
    if seconds < 1:
        return "Just now"
    return _duration_words(seconds) + " ago"


def time_until(value: str | None, now: datetime | None = None) -> str:
    """'4 minutes from now', 'Forever', or 'Stopping...' for a runner's expiry."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    seconds = (moment - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds > FOREVER_AFTER_S:
        return "Forever"
    if seconds <= 0:
        return "Stopping..."
    return _duration_words(seconds) + " from now"


def processor_split(size_bytes: int | None, size_vram_bytes: int | None) -> str:
    """Where a loaded model lives: '100% GPU', '100% CPU' or '48%/52% CPU/GPU'."""
    if not size_bytes:
        return "-"
    vram = max(0, min(size_vram_bytes or 0, size_bytes))
    gpu_pct = round(100 * vram / size_bytes)
    if vram == 0 or gpu_pct == 0:
        return "100% CPU"
    if vram == size_bytes or gpu_pct == 100:
        return "100% GPU"
    return f"{100 - gpu_pct}%/{gpu_pct}% CPU/GPU"


def prefix_cache_cell(stats: dict | None) -> str:
    """`krasis ps`'s CACHE column: the runner's prefix cache, its size and share of prompt
    tokens it supplied ("12 MB, 83% hit"), or "-" when the runner keeps none."""
    if not isinstance(stats, dict):
        return "-"
    hit_rate = stats.get("hit_rate")
    hit = f", {hit_rate * 100:.0f}% hit" if isinstance(hit_rate, (int, float)) else ""
    return f"{human_bytes(stats.get('bytes'))}{hit}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by at least three spaces, like `ollama list`."""
    widths = [len(name) for name in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def _model_rows(info: dict) -> list[tuple[str, str]]:
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture") or details.get("family")

    def arch_value(key: str):
        return model_info.get(f"{arch}.{key}") if arch else None

    params = model_info.get("general.parameter_count")
    experts, active = arch_value("expert_count"), arch_value("expert_used_count")
    rows = [
        ("architecture", arch),
        ("parameters", human_count(params) if params else details.get("parameter_size")),
        ("context length", arch_value("context_length")),
        ("embedding length", arch_value("embedding_length")),
        ("layers", arch_value("block_count")),
        ("experts", f"{experts} ({active} active)" if experts and active else experts),
        ("quantization", details.get("quantization_level")),
    ]
    return [(label, str(value)) for label, value in rows if value not in (None, "")]


def _source_rows(info: dict) -> list[tuple[str, str]]:
    """Where the model came from and whether it is usable (krasis' registry fields)."""
    state = info.get("state")
    if state and state != "ready" and info.get("error"):
        state = f"{state}: {info['error']}"
    commit = str(info.get("commit") or "")[:12]
    rows = [("source", info.get("source")), ("repo", info.get("repo")),
            ("revision", info.get("revision")), ("commit", commit), ("state", state)]
    return [(label, str(value)) for label, value in rows if value]


def _cache_row(cache: dict) -> tuple[str, str]:
    """'cpu int4 g128' -> '1.2 MB ready' (or the build error)."""
    group = f" g{cache['group_size']}" if cache.get("group_size") else ""
    label = f"{cache.get('format', '?')} {cache.get('quant', '?')}{group}"
    state = cache.get("state") or "?"
    if state != "ready" and cache.get("error"):
        state = f"{state}: {cache['error']}"
    return label, f"{human_bytes(cache.get('size_bytes'))}   {state}"


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    width = max(len(label) for label, _ in rows) + 4
    return [f"  {title}", *(f"    {label.ljust(width)}{value}".rstrip() for label, value in rows),
            ""]


def format_show(info: dict) -> str:
    """`krasis show`: the model's shape, capabilities, parameters, system and license."""
    lines = _section("Model", _model_rows(info))
    lines += _section("Capabilities", [(c, "") for c in info.get("capabilities") or []])
    lines += _section("Source", _source_rows(info))
    lines += _section("Caches", [_cache_row(c) for c in info.get("caches") or []
                                 if isinstance(c, dict)])
    parameters = []
    for line in str(info.get("parameters") or "").splitlines():
        name, _, value = line.strip().partition(" ")
        if name:
            parameters.append((name, value.strip()))
    lines += _section("Parameters", parameters)
    for key, title in (("system", "System"), ("license", "License")):
        text = str(info.get(key) or "").strip()
        if text:
            head = text.splitlines()[:2]
            more = ["    ..."] if len(text.splitlines()) > 2 else []
            lines += [f"  {title}", *(f"    {row}" for row in head), *more, ""]
    return "\n".join(lines).rstrip("\n")

"""Structured logs: a message plus key=value fields (or one JSON object per line).

Callers pass fields through ``extra``: ``log.info("runner ready", extra={"model": m})``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict:
    """The ``extra`` fields a caller attached to a record."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _logfmt_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """time=... level=... source=... msg="..." key=value ... (logfmt, as Ollama logs)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [f"time={stamp}.{int(record.msecs):03d}", f"level={record.levelname}",
                 f"source={record.name}", f"msg={_logfmt_value(record.getMessage())}"]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in record_fields(record).items()]
        if record.exc_info:
            parts.append(f"error={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald or log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": record.created, "level": record.levelname, "source": record.name,
               "msg": record.getMessage(), **record_fields(record)}
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send all logs to stderr in the chosen format (journald collects stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

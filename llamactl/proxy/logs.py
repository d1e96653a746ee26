"""The proxy's log on stderr: `llamactl: message` lines, or under `--log-format json` one JSON object per line.

A JSON line is `{"time", "level", "event", "message", ...fields}`: `time` in RFC 3339 (UTC, milliseconds),
`level` lower case, `event` a stable snake_case name given by the call (`log.info(..., extra={"event":
"ready", "model": name, "port": port})`; `log` for a call that gives none), `message` the text line's
words, and the call's other `extra` keys as fields. Every record goes through it — the proxy's, the
launcher's, aiohttp's, Python's warnings — and a fatal error ends the stream as one `fatal` line, so `jq` and
log shippers take the stream as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

FORMATS = ("text", "json")
_FIXED = ("time", "level", "event", "message")
# what every LogRecord carries: anything else on a record came from the call's `extra`
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def rfc3339(epoch_s: float) -> str:
    """`2026-12-07T01:02:03.456+00:00`."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (JSON escapes every control character)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {"time": rfc3339(record.created), "level": record.levelname.lower(),
                                   "event": getattr(record, "event", None) or "log", "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _FIXED:
                line[key] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(log_format: str, debug: bool = False) -> None:
    """Every record on stderr in `log_format`; the chatty libraries kept to warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("llamactl: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(log_format == "json")  # a warnings.warn() is a line of the stream too
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls are not news


@contextmanager
def fatal_as_json(as_json: bool) -> Iterator[None]:
    """Under JSON, an error that ends the proxy is its stream's last line (`fatal`, with its type and exit
    code) instead of the CLI's plain one; the exit code stays the error's."""
    from llamactl.errors import LlamactlError, type_name

    if not as_json:
        yield
        return
    try:
        yield
    except LlamactlError as exc:
        logging.getLogger("llamactl.proxy").error("%s", exc, extra={"event": "fatal", "error_type": type_name(exc),
                                                                     "exit_code": int(exc.exit_code)})
        raise SystemExit(int(exc.exit_code)) from None

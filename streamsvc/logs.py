"""Logging: one access line per request and one line per job transition, as text or JSON
lines, with secrets kept out of both."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

#: query parameters whose values never reach a log
SECRET_PARAMS = frozenset({"token"})
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
#: attributes every LogRecord has; anything else was passed in `extra` and is a field of its own
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def redacted_url(request: web.BaseRequest) -> str:
    """The request's path and query, with secret values replaced by `***`."""
    url = request.rel_url
    if not SECRET_PARAMS & set(url.query):
        return str(url)
    query = [(key, "***" if key in SECRET_PARAMS else value) for key, value in url.query.items()]
    return str(url.with_query(query))


ACCESS_LOG = logging.getLogger("aiohttp.access")


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if getattr(response, "logged_at_its_end", False):
            return  # a stream: its session writes the line when it ends, with its bytes and time
        log_access(self.logger, request_fields(request), response.status, response.body_length, time)


def request_fields(request: web.BaseRequest) -> dict[str, Any]:
    """What an access line says of its request."""
    fields = {"remote": request.remote, "method": request.method, "path": redacted_url(request)}
    if isinstance(request, web.Request) and "jobId" in request.match_info:
        fields["jobId"] = request.match_info["jobId"]
    return fields


def log_access(logger: logging.Logger, fields: dict[str, Any], status: int, size: int, seconds: float) -> None:
    fields = fields | {"status": status, "bytes": size, "ms": round(seconds * 1000, 1)}
    logger.info('%(remote)s "%(method)s %(path)s" %(status)s %(bytes)s %(ms).1fms', fields, extra=fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the service's logs to stderr, as text lines or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

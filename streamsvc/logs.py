"""Logging: one access line per request, with secrets kept out of it."""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

#: query parameters whose values never reach a log
SECRET_PARAMS = frozenset({"token"})


def redacted_url(request: web.BaseRequest) -> str:
    """The request's path and query, with secret values replaced by `***`."""
    url = request.rel_url
    if not SECRET_PARAMS & set(url.query):
        return str(url)
    query = [(key, "***" if key in SECRET_PARAMS else value) for key, value in url.query.items()]
    return str(url.with_query(query))


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.1fms',
            request.remote,
            request.method,
            redacted_url(request),
            response.status,
            response.body_length,
            time * 1000,
        )

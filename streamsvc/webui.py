"""The web page: static files shipped in the package, served as they are."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()


def _page() -> bytes:
    return resources.files("streamsvc").joinpath("web/index.html").read_bytes()


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return web.Response(body=_page(), content_type="text/html", charset="utf-8")

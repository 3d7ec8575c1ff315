"""The web page: `index.html` at `/` and at `/jobs/{jobId}` (a job's shareable URL), its assets
under `/static/{name}`; all files shipped in the package's `web` folder and served as they are."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import attrs
from aiohttp import web

#: what /static/ serves, by suffix; any other file of the folder (and any other name) is a 404
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: the page runs its own script and style only: no inline code, nothing from elsewhere, never framed
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
PAGE_HEADERS = HEADERS | {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Frame-Options": "DENY"}

routes = web.RouteTableDef()


@attrs.frozen
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        return cls(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: web.Request, headers: dict[str, str]) -> web.Response:
        """The file, or 304 when the client holds this version."""
        headers = headers | {"ETag": self.etag}
        if self.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers=headers | {"Content-Type": self.content_type})


@functools.cache
def _page() -> Asset:
    body = resources.files("streamsvc").joinpath("web/index.html").read_bytes()
    return Asset.of(body, "text/html; charset=utf-8")


@functools.cache
def _assets() -> dict[str, Asset]:
    """Every servable file of the folder by its name: a request names a key of this, never a path."""
    folder = resources.files("streamsvc").joinpath("web")
    assets: dict[str, Asset] = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES:
            assets[item.name] = Asset.of(item.read_bytes(), CONTENT_TYPES[suffix])
    return assets


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return _page().response(request, PAGE_HEADERS)


@routes.get("/jobs/{jobId:[^/]{1,200}}")
async def job_page(request: web.Request) -> web.Response:
    """A job's shareable URL: the same page, which opens the job named in its path."""
    return _page().response(request, PAGE_HEADERS)


@routes.get("/static/{name}")
async def static(request: web.Request) -> web.Response:
    asset = _assets().get(request.match_info["name"])
    if asset is None:
        raise web.HTTPNotFound()
    return asset.response(request, HEADERS)

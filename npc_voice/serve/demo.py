"""The browser demo at `/demo/` (docs/demo.md): the static page in `static/` and the read-only
character list it shows, `/demo/characters.json`.

Whether it is served: `--demo` / `--no-demo` say so; without either, it is on for a server without a
token (which can only be a loopback one) and off for a server with a token. Files are looked up by
name in one flat folder: a name is `[A-Za-z0-9_-]` words joined by single dots, with a known
extension, never a path; symlinks and anything that resolves outside the folder are refused."""

from __future__ import annotations

import http
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ..protocol import ErrorCode

if TYPE_CHECKING:
    from .app import NPCVoiceServer

DEMO_PATH = "/demo"
CHARACTERS_FILE = "characters.json"
STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
# Everything the page loads comes from this server; its websocket goes to this server too.
CSP = ("default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; media-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class StaticFiles:
    """The files of one flat folder, by name (see the module doc): `get(name)` is (bytes, content
    type), or None for anything else."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, name: str) -> tuple[bytes, str] | None:
        if not _NAME.match(name):
            return None
        ctype = CONTENT_TYPES.get(os.path.splitext(name)[1].lower())
        if ctype is None:
            return None
        path = self.root / name
        try:
            root = os.path.realpath(self.root)
            if path.is_symlink() or os.path.dirname(os.path.realpath(path)) != root or not path.is_file():
                return None
            return path.read_bytes(), ctype
        except OSError:
            return None


STATIC = StaticFiles(STATIC_DIR)


def demo_enabled(server: NPCVoiceServer) -> bool:
    """`server.demo` (True/False, set from --demo/--no-demo) or, when it is None or unset, the
    default: on without a token, off with one."""
    flag = getattr(server, "demo", None)
    return (not server.config.token) if flag is None else bool(flag)


def _response(connection: Any, status: int, body: bytes, ctype: str) -> Any:
    response = connection.respond(status, "")
    response.body = body
    for name in ("Content-Type", "Content-Length"):
        del response.headers[name]
    response.headers["Content-Type"] = ctype
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def characters(server: NPCVoiceServer) -> dict[str, Any]:
    """The `/demo/characters.json` document: the stored characters that load (id, name,
    description), sorted by id."""
    store = server.store
    listed = [] if store is None else [{"id": c.id, "name": c.name, "description": c.description}
                                       for c in store.list()]
    return {"characters": listed, "visemes": server.config.visemes}


def is_demo_path(path: str) -> bool:
    return path == DEMO_PATH or path.startswith(DEMO_PATH + "/")


def respond(server: NPCVoiceServer, connection: Any, request: Any) -> Any:
    """The HTTP answer to a GET under /demo (the handshake hook calls this for `is_demo_path`)."""
    from .handshake import authorized, json_response

    url = urlsplit(request.path)
    if not demo_enabled(server):
        return json_response(connection, http.HTTPStatus.NOT_FOUND, {
            "type": "error", "code": ErrorCode.NOT_FOUND.value,
            "message": ("the demo page is off on this server (it has a token): start it with --demo to serve it"
                        if getattr(server, "demo", None) is None else "the demo page is off on this server (--no-demo)")})
    if url.path == DEMO_PATH:  # relative links need the trailing slash
        response = _response(connection, http.HTTPStatus.FOUND, b"", "text/plain; charset=utf-8")
        response.headers["Location"] = DEMO_PATH + "/" + (f"?{url.query}" if url.query else "")
        return response
    name = url.path[len(DEMO_PATH) + 1:] or "index.html"
    if name == CHARACTERS_FILE:
        if not authorized(server.config.token, request, parse_qs(url.query)):
            return json_response(connection, http.HTTPStatus.UNAUTHORIZED, {
                "type": "error", "code": ErrorCode.UNAUTHORIZED.value, "message": "missing or wrong token"})
        return json_response(connection, http.HTTPStatus.OK, characters(server))
    found = STATIC.get(name)
    if found is None:
        return json_response(connection, http.HTTPStatus.NOT_FOUND, {
            "type": "error", "code": ErrorCode.NOT_FOUND.value, "message": f"no such file in the demo: {name!r}"})
    return _response(connection, http.HTTPStatus.OK, *found)

"""The HTTP side of a connection, before any websocket: the routes (`/ws`, `/v1/realtime`, `/health`, anything else
404), the token check (401) and the connection limit (503), each refusal a JSON body with the
protocol's error code (docs/protocol.md, "Connecting")."""

from __future__ import annotations

import hmac
import http
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ..protocol import HEALTH_PATH, WS_PATH, ErrorCode
from .demo import DEMO_PATH, demo_enabled, is_demo_path
from .demo import respond as demo_respond
from .health import health
from .realtime import REALTIME_PATH

if TYPE_CHECKING:
    from .app import NPCVoiceServer


def authorized(token: str | None, request: Any, query: dict[str, list[str]]) -> bool:
    """The bearer header (or `?token=`) matches `token`, compared in constant time; no token: open."""
    if not token:
        return True
    given = None
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    elif query.get("token"):
        given = query["token"][0]
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def json_response(connection: Any, status: int, body: dict[str, Any]) -> Any:
    response = connection.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    response.headers["Cache-Control"] = "no-store"
    return response


def process_request(server: NPCVoiceServer, connection: Any, request: Any) -> Any:
    """The `websockets` hook: an HTTP response that refuses or answers the request, or None to
    go on with the websocket handshake."""
    url = urlsplit(request.path)
    if url.path == HEALTH_PATH:
        doc = health(server)
        return json_response(connection, 200 if doc["status"] == "ok" else 503, doc)
    if is_demo_path(url.path):
        return demo_respond(server, connection, request)
    if url.path not in (WS_PATH, REALTIME_PATH):
        return json_response(connection, http.HTTPStatus.NOT_FOUND, {
            "type": "error", "code": ErrorCode.NOT_FOUND.value,
            "message": f"no such path: the websocket endpoints are {WS_PATH} and {REALTIME_PATH} (OpenAI Realtime), "
                       f"the health check {HEALTH_PATH}"
                       + (f", the browser demo {DEMO_PATH}/" if demo_enabled(server) else "")})
    if "websocket" not in request.headers.get("Upgrade", "").lower():  # a browser or curl, not a websocket client
        response = json_response(connection, http.HTTPStatus.UPGRADE_REQUIRED, {
            "type": "error", "code": ErrorCode.UPGRADE_REQUIRED.value,
            "message": f"{url.path} is a websocket endpoint: open it with a websocket client (Upgrade: websocket)"})
        response.headers["Upgrade"] = "websocket"
        return response
    if not authorized(server.config.token, request, parse_qs(url.query)):
        return json_response(connection, http.HTTPStatus.UNAUTHORIZED, {
            "type": "error", "code": ErrorCode.UNAUTHORIZED.value,
            "message": "missing or wrong token: send the header 'Authorization: Bearer TOKEN' (or ?token=TOKEN)"})
    if server.closing or len(server.manager.connections) >= server.manager.max_connections:
        code = ErrorCode.SHUTTING_DOWN if server.closing else ErrorCode.SERVER_BUSY
        return json_response(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, {
            "type": "error", "code": code.value, "message": "too many connections: retry later"
            if code is ErrorCode.SERVER_BUSY else "the server is shutting down"})
    return None

"""npc_voice/serve/demo.py: the demo page's files (content types, headers), paths that try to leave
its folder (refused, symlinks included), /demo/characters.json, and when the demo is on (without a
token by default; with a token only with --demo)."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from npc_voice.cli import build_parser
from npc_voice.serve import demo
from serve_helpers import make_server
from serve_helpers import model, cache, store  # noqa: F401 (fixtures)

TOKEN = "demo-token-0123456789abcdef"


def get(bg, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A raw GET: http.client sends `path` exactly as given (no `..` folding, no re-quoting)."""
    conn = http.client.HTTPConnection("127.0.0.1", bg.server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def open_server(model, cache, store):  # noqa: F811
    bg = make_server(model, cache, store, slots=1)
    yield bg
    bg.stop()


def test_files_have_their_content_types(open_server) -> None:
    for path, ctype, marker in [("/demo/", "text/html; charset=utf-8", b"<!doctype html>"),
                                ("/demo/index.html", "text/html; charset=utf-8", b"app.js"),
                                ("/demo/app.js", "text/javascript; charset=utf-8", b"window.npcDemo"),
                                ("/demo/mic-worklet.js", "text/javascript; charset=utf-8", b"registerProcessor"),
                                ("/demo/style.css", "text/css; charset=utf-8", b"#face")]:
        status, headers, body = get(open_server, path)
        assert status == 200, path
        assert headers["content-type"] == ctype, path
        assert int(headers["content-length"]) == len(body) and marker in body, path
        assert headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in headers["content-security-policy"]
    status, headers, _ = get(open_server, "/demo?token=x")
    assert status == 302 and headers["location"] == "/demo/?token=x"  # relative links need the slash


def test_every_shipped_file_is_served() -> None:
    names = sorted(p.name for p in demo.STATIC_DIR.iterdir())
    assert {"index.html", "app.js", "mic-worklet.js", "style.css"} <= set(names)
    for name in names:
        assert demo.STATIC.get(name) is not None, f"{name} in static/ but not servable (name or extension)"


@pytest.mark.parametrize("path", [
    "/demo/../../etc/passwd", "/demo/../demo.py", "/demo/..%2f..%2fetc%2fpasswd", "/demo/%2e%2e/%2e%2e/etc/passwd",
    "/demo//etc/passwd", "/demo/%2fetc%2fpasswd", "/demo/./app.js", "/demo/static/app.js", "/demo/.hidden.js",
    "/demo/app.js%00.css", "/demo/..", "/demo/app.js/", "/demo/nothing.js", "/demo/__init__.py",
])
def test_paths_never_leave_the_folder(open_server, path) -> None:
    status, headers, body = get(open_server, path)
    assert status == 404, path
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "not_found"
    assert b"root:" not in body


def test_symlinks_are_refused(open_server, tmp_path, monkeypatch) -> None:
    """A symlink in the folder is never followed, whether it leads out of it or to a file inside it."""
    outside = tmp_path / "secret.js"
    outside.write_text("TOP-SECRET-CONTENT")
    root = tmp_path / "static"
    root.mkdir()
    (root / "ok.js").write_text("ok")
    (root / "out.js").symlink_to(outside)
    (root / "in.js").symlink_to(root / "ok.js")
    (root / "sub").mkdir()
    (root / "sub" / "x.js").write_text("x")
    (root / "sub.js").symlink_to(root / "sub")
    (root / "notes.txt").write_text("unknown extension")
    files = demo.StaticFiles(root)
    assert files.get("ok.js") == (b"ok", "text/javascript; charset=utf-8")
    for name in ("out.js", "in.js", "sub", "sub/x.js", "sub.js", "notes.txt", "../secret.js", "", "."):
        assert files.get(name) is None, name
    monkeypatch.setattr(demo, "STATIC", files)
    assert get(open_server, "/demo/ok.js")[0] == 200
    for path in ("/demo/out.js", "/demo/in.js", "/demo/sub/x.js", "/demo/../secret.js"):
        status, _, body = get(open_server, path)
        assert status == 404 and b"TOP-SECRET" not in body, path


def test_the_not_found_answer_names_the_demo_while_it_is_served(open_server) -> None:
    status, _, body = get(open_server, "/nowhere")
    assert status == 404 and "the browser demo /demo/" in json.loads(body)["message"]


def test_characters_json_lists_the_cast(open_server) -> None:
    status, headers, body = get(open_server, "/demo/characters.json")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    innkeeper = next(c for c in doc["characters"] if c["id"] == "innkeeper")
    assert innkeeper["name"] and set(innkeeper) == {"id", "name", "description"}
    assert [c["id"] for c in doc["characters"]] == sorted(c["id"] for c in doc["characters"])
    assert doc["visemes"] is True


def test_off_with_a_token_unless_asked_for(model, cache, store) -> None:  # noqa: F811
    bg = make_server(model, cache, store, slots=1, token=TOKEN)
    try:
        for path in ("/demo/", "/demo/app.js", "/demo/characters.json", "/demo"):
            status, _, body = get(bg, path)
            assert status == 404, path
            assert json.loads(body)["code"] == "not_found" and "--demo" in json.loads(body)["message"]
        assert "/demo/" not in json.loads(get(bg, "/nowhere")[2])["message"]  # not named while it is off
        bg.server.demo = True  # npc-voice serve --demo
        assert get(bg, "/demo/")[0] == 200
        assert get(bg, "/demo/app.js")[0] == 200  # the page itself needs no token: it asks for one
        status, _, body = get(bg, "/demo/characters.json")
        assert status == 401 and json.loads(body)["code"] == "unauthorized"
        assert get(bg, "/demo/characters.json?token=wrong")[0] == 401
        assert get(bg, f"/demo/characters.json?token={TOKEN}")[0] == 200
        assert get(bg, "/demo/characters.json", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        bg.stop()


def test_no_demo_turns_it_off(open_server) -> None:
    open_server.server.demo = False  # npc-voice serve --no-demo
    try:
        status, _, body = get(open_server, "/demo/")
        assert status == 404 and "--no-demo" in json.loads(body)["message"]  # not "it has a token"
        assert get(open_server, "/health")[0] == 200
    finally:
        open_server.server.demo = None


def test_cli_flag() -> None:
    parse = build_parser().parse_args
    assert parse(["serve"]).demo is None
    assert parse(["serve", "--demo"]).demo is True
    assert parse(["serve", "--no-demo"]).demo is False


def test_package_data_ships_the_page() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"npc_voice.serve" = ["static/*"]' in text
    assert os.path.isfile(demo.STATIC_DIR / "index.html")

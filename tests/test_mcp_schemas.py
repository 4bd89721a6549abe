"""What the MCP tools say about themselves in tools/list (mcp_server/app.py's annotations and input
limits, mcp_server/schemas.py's output schemas), embedded and remote."""

from __future__ import annotations


import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402

from mcp_server import Backend, Settings, build_server  # noqa: E402
from mcp_helpers import check_tool_list, package_version, run  # noqa: E402
from mcp_helpers import model, folders, backend  # noqa: E402,F401 (fixtures)


def test_tools_describe_themselves(backend) -> None:
    async def go(server):
        async with Client(server) as client:
            assert client.server_info.name == "npc-voice" and client.server_info.version == package_version()
            return (await client.list_tools()).tools

    check_tool_list(run(go(build_server(backend))))
    remote = Backend(Settings(characters=backend.store.root, server_url="ws://127.0.0.1:9"))
    check_tool_list(run(go(build_server(remote))), remote=True)

"""npc_voice/serve/agent.py: the HAProxy agent check's answers (HAProxy's configuration manual,
"agent-check"), without sockets, then one real TCP answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from npc_voice.serve.agent import agent_reply, server_reply, start_agent


def test_weight_is_the_free_slot_share():
    assert agent_reply(2, 2) == "up ready 100%\n"
    assert agent_reply(1, 2) == "up ready 50%\n"
    assert agent_reply(3, 8) == "up ready 38%\n"
    assert agent_reply(1, 1000) == "up ready 1%\n"  # never 0%: that would drain a server with a free slot


def test_full_or_stopping_drains():
    assert agent_reply(0, 2) == "drain\n"
    assert agent_reply(2, 2, closing=True) == "drain\n"
    assert agent_reply(0, 0) == "drain\n"


def test_engine_error_is_down_with_a_reason():
    line = agent_reply(2, 2, error=RuntimeError("cuda"))
    assert line.startswith("down#") and line.endswith("\n") and " " not in line.split("#")[0]


def test_every_answer_is_one_line_haproxy_can_parse():
    words = {"up", "ready", "drain", "down"}
    for free, total, closing in [(0, 2, False), (1, 2, False), (2, 2, True), (5, 8, False)]:
        line = agent_reply(free, total, closing)
        assert line.count("\n") == 1 and line.endswith("\n") and line.isascii()
        for word in line.split():
            assert word in words or (word.endswith("%") and 1 <= int(word[:-1]) <= 100), word


def fake_server(free: int, slots: int, closing: bool = False, error=None):
    return SimpleNamespace(manager=SimpleNamespace(free=free, slots=slots), closing=closing, loop_error=error)


def test_server_reply_reads_the_server_state():
    assert server_reply(fake_server(4, 4)) == "up ready 100%\n"
    assert server_reply(fake_server(0, 4)) == "drain\n"
    assert server_reply(fake_server(4, 4, closing=True)) == "drain\n"


def test_the_agent_answers_one_line_and_closes():
    server = fake_server(1, 4)

    async def main() -> list[bytes]:
        agent = await start_agent(server, "127.0.0.1", 0)
        port = agent.sockets[0].getsockname()[1]
        answers = []
        for free in (1, 0):
            server.manager.free = free
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers.append(await asyncio.wait_for(reader.read(), 5))  # read() returns at EOF: the agent closed
            writer.close()
        agent.close()
        await agent.wait_closed()
        return answers

    assert asyncio.run(main()) == [b"up ready 25%\n", b"drain\n"]

"""mcp_server/conversations.py: one interface, two implementations. The same feed runs on the
shared engine (local.py) and through a real `npc-voice serve` (remote.py): each NPC is fed from its
frames as they come, in order, closed after its frames, and its voice and words kept on its line.
Fixtures are tests/mcp_helpers.py's and test_mcp_remote.py's."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mcp")

from mcp_server.conversations import FRAME, Side  # noqa: E402
from mcp_server.local import LocalConversations  # noqa: E402
from mcp_server.remote import RemoteConversations  # noqa: E402
from mcp_helpers import run  # noqa: E402
from mcp_helpers import model, folders, backend, ferryman  # noqa: E402,F401 (fixtures)
from test_mcp_remote import remote  # noqa: E402,F401


class Recorder:
    """A feed that queues a quiet tone as the first input and records what it is called with."""

    def __init__(self) -> None:
        self.started = 0
        self.calls: list[tuple[int, int, np.dtype]] = []  # (NPC, frame, the pcm's dtype)

    def start(self, lines) -> None:
        self.started += 1
        lines[0].push(np.full(3 * FRAME, 0.01, np.float32))

    def heard(self, lines, i, frame, pcm) -> None:
        self.calls.append((i, frame, pcm.dtype))


async def quiet(done, total, message) -> None:
    pass


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_one_feed_on_both_implementations(mode, request, ferryman) -> None:
    be = request.getfixturevalue("backend" if mode == "local" else "remote")
    conversations = be.conversations
    assert isinstance(conversations, LocalConversations if mode == "local" else RemoteConversations)
    feed = Recorder()
    frames = 8
    record = be.new_record("talk", [ferryman])
    lines = run(conversations.run(record, [Side(ferryman, "npc", 4)], frames, feed, quiet))
    line = lines[0]
    assert feed.started == 1 and line.done and line.count >= frames
    assert [(i, f) for i, f, _ in feed.calls][:frames] == [(0, f) for f in range(frames)]  # every frame, in order
    # as it came: float32 from the engine, int16 from a server (relayed on unchanged)
    assert {dtype for _, _, dtype in feed.calls} == {np.dtype(np.float32 if mode == "local" else np.int16)}
    assert line.said(frames).shape == (frames * FRAME,) and np.abs(line.said(frames)).max() > 0
    assert record.seconds == pytest.approx(frames * 0.08)
    assert record.words == line.words(frames) and {w["speaker"] for w in record.words} <= {"npc"}
    if mode == "local":
        assert be.engine().sessions == []

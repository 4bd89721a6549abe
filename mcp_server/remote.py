"""Conversations through a running `npc-voice serve` (remote mode), over `npc_voice.client`: each NPC
is one websocket session; the server paces them in real time.

Each NPC's frames are read by a task of its own, which keeps them on its `Line` and calls the feed;
what the feed pushes is sent by another task per NPC, in order (the feed may not block). A character
the server does not know, but this MCP server's characters folder has, is sent inline.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, Sequence

import anyio
import numpy as np

from npc_voice.protocol import FRAME_SECONDS as FRAME_S

from .conversations import Conversations, Feed, Line, Progress, ServerBusy, Side, UserError, settle, watch
from .records import Record

if TYPE_CHECKING:
    from .backend import Backend


class RemoteLine(Line):
    """A websocket session of the remote server."""

    def __init__(self, side: Side, frames: int):
        super().__init__(side, frames)
        self.session: Any = None
        send, self._outbox = anyio.create_memory_object_stream[np.ndarray](max_buffer_size=float("inf"))
        self._send = send

    def push(self, pcm: np.ndarray) -> None:
        self._send.send_nowait(pcm)  # the connection's task: never blocks (the buffer is unbounded)

    def close(self) -> None:
        self.done = True  # its reader stops; the session is ended on the way out

    async def sending(self) -> None:
        from websockets.exceptions import ConnectionClosed

        async with self._outbox:
            try:
                async for pcm in self._outbox:
                    await self.session.send_audio(pcm)
            except ConnectionClosed:  # the server went away: its events end too, and `reading` with them
                pass

    async def reading(self, record: Record, lines: Sequence[Line], i: int, feed: Feed) -> None:
        from npc_voice.client import AudioFrame, Ended, Text

        async for ev in self.session.events():
            if isinstance(ev, AudioFrame):
                self.keep(ev.frame, ev.float32())
                feed.heard(lines, i, ev.frame, ev.pcm)  # int16, sent on unchanged
                if self.count >= self.frames or record.stop.is_set():
                    self.close()
                    return
            elif isinstance(ev, Text):
                self.texts.append((ev.frame, ev.text))
            elif isinstance(ev, Ended):
                break
        self.done = True

    async def end(self) -> None:
        """Ends the session and keeps the text pieces still queued before `ended`."""
        from npc_voice.client import Text

        self._send.close()
        session = self.session
        if session is None:
            return
        try:
            with anyio.fail_after(5):
                if session.ended is None:
                    await session.end()
                async for ev in session.events():
                    if isinstance(ev, Text):
                        self.texts.append((ev.frame, ev.text))
        except Exception:
            pass


class RemoteConversations(Conversations):
    def __init__(self, backend: Backend):
        self.backend = backend
        self.settings = backend.settings

    def check(self, character: str) -> None:
        """Nothing to check here: the server knows its characters (an unknown one fails at `start`)."""

    async def run(self, record: Record, sides: Sequence[Side], frames: int, feed: Feed,
                  progress: Progress) -> list[Line]:
        lines = [RemoteLine(side, frames) for side in sides]
        clients = [_remote_client(self.settings) for _ in sides]
        try:
            for line, client in zip(lines, clients):
                connection = await client.__aenter__()
                line.session = await self._start(connection, line.side.character, line.side.seed)
                if line.side.say is not None:
                    await line.session.say(line.side.say)
            feed.start(lines)
            with anyio.fail_after(frames * FRAME_S * 4 + 30):
                async with anyio.create_task_group() as tg:
                    for i, line in enumerate(lines):
                        tg.start_soon(line.sending)
                        tg.start_soon(line.reading, record, lines, i, feed)
                    await watch(record, lines, frames, progress, lambda: None, poll_s=0.05)
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for line in lines:
                    await line.end()
                for client in clients:
                    await client.__aexit__(None, None, None)
        settle(record, lines, frames)
        return list(lines)

    async def _start(self, client: Any, character: str, seed: int) -> Any:
        from npc_voice.client import NPCVoiceError

        try:
            return await client.start(character=character, seed=seed)
        except NPCVoiceError as exc:
            store = self.backend.store
            if exc.code == "server_busy":
                raise ServerBusy(f"server busy: every conversation slot of {self.settings.server_url} is in use; "
                                 "retry later") from None
            if exc.code == "unknown_character" and character in store:
                try:
                    return await client.start(character=self._inline(character), seed=seed)
                except NPCVoiceError as again:
                    raise UserError(f"the server refused {character!r} (sent inline): {again.message}") from None
            if exc.code == "unknown_character":
                raise UserError(f"unknown character {character!r}: neither the server nor this MCP server's "
                                "characters folder has it") from None
            raise UserError(f"the server refused the conversation: {exc.code}: {exc.message}") from None

    def _inline(self, character: str) -> dict[str, Any]:
        from npc_voice.client import inline_character

        c = self.backend.character(character)
        if c.uses_preset:
            return inline_character(c.role, preset=c.voice, name=c.name)
        return inline_character(c.role, self.backend.store.voice_file(c), name=c.name)


def normalize_ws_url(url: str) -> str:
    from npc_voice.protocol import WS_PATH

    url = url.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[7:]
    elif url.startswith("https://"):
        url = "wss://" + url[8:]
    return url if url.endswith(WS_PATH) else url + WS_PATH


def remote_health(url: str) -> dict[str, Any]:
    from npc_voice.protocol import HEALTH_PATH, WS_PATH

    http = normalize_ws_url(url).replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    http = http[: -len(WS_PATH)] + HEALTH_PATH
    try:
        with urllib.request.urlopen(http, timeout=3) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except Exception:
            return {"status": "error", "error": f"HTTP {exc.code}"}
    except Exception as exc:
        return {"status": "unreachable", "error": f"{http}: {exc}"}


class _remote_client:
    """An NPCVoiceClient connection whose failures read as user errors."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.client: Any = None

    async def __aenter__(self) -> Any:
        from npc_voice.client import NPCVoiceClient

        url = normalize_ws_url(self.settings.server_url or "")
        self.client = NPCVoiceClient(url, self.settings.token)
        try:
            return await self.client.connect()
        except Exception as exc:
            self.client = None  # nothing to close
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 503:
                raise ServerBusy(f"server busy: {url} refused the connection (HTTP 503); retry later") from None
            if status == 401:
                raise UserError(f"{url} refused the token (HTTP 401): pass the server's token with --token") from None
            raise UserError(f"cannot reach the npc-voice server at {url}: {exc}") from None

    async def __aexit__(self, *exc: Any) -> None:
        if self.client is not None:
            with anyio.CancelScope(shield=True):
                await self.client.close()

"""The one interface the features (talk, say, scene) run conversations through, whoever runs them:
the MCP server's own shared `Engine` (local.py) or a running `npc-voice serve` (remote.py).

A feature describes its NPCs (`Side`s) and what each one hears (a `Feed`): the first input, and
after each frame an NPC says, the next input of whichever NPC it concerns. The implementation opens
the NPCs, calls the feed as frames come, collects every NPC's voice and text pieces on its `Line`,
closes each NPC once it has said `frames` frames (or the record is stopped), reports progress, and
closes everything on the way out (a failure, a cancellation). Feeding from the frame callback, not
from a task of its own, is what keeps a local conversation exact: the engine's next step already has
the input (a scene's NPC hears the other's previous frame, never a gap).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence

import anyio
import numpy as np

from npc_voice.protocol import FRAME_SECONDS as FRAME_S, MODEL_RATE as RATE, frame_samples

from .records import Record, merge_words, words_of

FRAME = frame_samples(RATE)  # 80 ms at 24 kHz
TICKS_PER_HOP = 5  # progress is reported every this many frames

Progress = Callable[[float, float, str], Awaitable[None]]


class UserError(Exception):
    """A failure the caller can fix (unknown character, unreadable audio, server busy, ...)."""


class ServerBusy(UserError):
    pass


@dataclass
class Side:
    """One NPC of a conversation."""

    character: str  # a character id (this MCP server's store; a remote server may know it too)
    speaker: str  # who its words are attributed to
    seed: int
    say: str | None = None  # a line forced into its text stream from the start


class Line(ABC):
    """One NPC of a running conversation, as the features see it (local and remote alike): its voice
    and text pieces so far, and its input."""

    def __init__(self, side: Side, frames: int):
        self.side = side
        self.frames = frames  # how many frames it says before it is closed
        self.audio = np.zeros(frames * FRAME, dtype=np.float32)  # frame n at n * FRAME
        self.texts: list[tuple[int, str]] = []  # (frame, text piece)
        self.count = 0  # frames said so far
        self.done = False  # closed, or ended by the other end

    def keep(self, frame: int, pcm: np.ndarray) -> None:
        """Keeps one frame of its voice (float32)."""
        if 0 <= frame < self.frames:
            self.audio[frame * FRAME:(frame + 1) * FRAME] = pcm
        self.count += 1

    def said(self, n: int) -> np.ndarray:
        """Its voice over the first `n` frames."""
        return self.audio[: n * FRAME]

    def words(self, n: int) -> list[dict[str, Any]]:
        return words_of(self.texts, self.side.speaker, n)

    @abstractmethod
    def push(self, pcm: np.ndarray) -> None:
        """Queues input audio (24 kHz: float32, or int16 as a remote server sent it); thread-safe."""

    @abstractmethod
    def close(self) -> None:
        """It says no frame after the one being delivered."""


class Feed(Protocol):
    """What a feature's NPCs hear. Both are called where the frames arrive (the engine's ticking
    thread, or the remote connection's task): quick, no blocking."""

    def start(self, lines: Sequence[Line]) -> None:
        """The NPCs are open and none has said a frame: queue their first input."""

    def heard(self, lines: Sequence[Line], i: int, frame: int, pcm: np.ndarray) -> None:
        """NPC `i` said frame `frame` (`pcm` as it came: what `push` takes back unchanged)."""


class Conversations(ABC):
    """Runs conversations: `LocalConversations` (the shared engine) or `RemoteConversations`."""

    @abstractmethod
    def check(self, character: str) -> None:
        """Raises UserError for a character that cannot be used, before a record is made (where
        this side can tell: a remote server's characters are its own)."""

    @abstractmethod
    async def run(self, record: Record, sides: Sequence[Side], frames: int, feed: Feed,
                  progress: Progress) -> list[Line]:
        """Opens one NPC per side, feeds them until each said `frames` frames, the record is stopped
        or the call is cancelled, and closes them; `record.seconds` and `record.words` follow."""


def spoken(lines: Sequence[Line], frames: int) -> int:
    """Frames every NPC has said (at most `frames`)."""
    return min(min(line.count for line in lines), frames)


def settle(record: Record, lines: Sequence[Line], frames: int) -> int:
    """Brings `record.seconds` and `record.words` up to what the NPCs have said; returns the frames."""
    n = spoken(lines, frames)
    record.seconds = n * FRAME_S
    record.words = merge_words(*(line.words(n) for line in lines))
    return n


async def watch(record: Record, lines: Sequence[Line], frames: int, progress: Progress,
                failed: Callable[[], None], poll_s: float = 0.01) -> None:
    """Waits until every NPC is done (or the record is stopped), reporting progress every few frames;
    `failed()` raises what went wrong meanwhile."""
    reported = 0
    while not all(line.done for line in lines) and not record.stop.is_set():
        failed()
        done = spoken(lines, frames)
        if done - reported >= TICKS_PER_HOP:
            reported = done
            settle(record, lines, frames)
            await progress(done, frames, f"{record.seconds:.2f} of {frames * FRAME_S:.2f} s")
        await anyio.sleep(poll_s)
    if spoken(lines, frames) >= frames:
        await progress(frames, frames, f"{frames * FRAME_S:.2f} of {frames * FRAME_S:.2f} s")


def frames_for(seconds: float) -> int:
    return max(1, math.ceil(seconds / FRAME_S))

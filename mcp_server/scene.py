"""(c) scene: two NPCs talk to each other, each one's voice the other's input, frame by frame.
Written once, over `Conversations` (the same relay on the shared engine and through a server)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .conversations import Line, Progress, Side, UserError, frames_for, spoken
from .records import Record, scene_speakers

if TYPE_CHECKING:
    from .backend import Backend


class CrossFeed:
    """Each NPC's frame is queued as the other's next input (the first frame: silence, nothing queued)."""

    def start(self, lines: Sequence[Line]) -> None:
        pass

    def heard(self, lines: Sequence[Line], i: int, frame: int, pcm: np.ndarray) -> None:
        lines[1 - i].push(pcm)  # my voice is the other NPC's input


async def scene(backend: Backend, a: str, b: str, seconds: float, seed: int,
                progress: Progress) -> tuple[Record, np.ndarray]:
    """-> the record and the stereo audio (a left, b right); `b` takes seed + 1."""
    limit = backend.settings.max_scene_s
    if not 0 < seconds <= limit:
        raise UserError(f"seconds must be above 0 and at most {limit:.0f}")
    frames = frames_for(seconds)
    conversations = backend.conversations
    conversations.check(a)
    conversations.check(b)
    record = backend.new_record("scene", [a, b])
    record.speakers = scene_speakers(a, b)
    sides = [Side(a, record.speakers[0], seed), Side(b, record.speakers[1], seed + 1)]
    try:
        lines = await conversations.run(record, sides, frames, CrossFeed(), progress)
    except BaseException as exc:
        record.fail(exc)
        raise
    record.finish()
    n = spoken(lines, frames)
    return record, np.stack([lines[0].said(n), lines[1].said(n)], axis=1)

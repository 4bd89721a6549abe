"""(b) talk and (d) say: one NPC hears a clip (for `say`, silence, with a line forced into its text
stream) and its side comes back, as long as the clip. Written once, over `Conversations`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from npc_voice.protocol import FRAME_SECONDS as FRAME_S

from .conversations import FRAME, Line, Progress, Side, UserError, spoken
from .records import Record

if TYPE_CHECKING:
    from .backend import Backend

LEAD = 12  # input frames queued ahead of what the NPC has said (a server buffers up to 2 s)
SAY_TAIL_FRAMES = 13  # frames after a said line's last token (about a second)


class ClipFeed:
    """The NPC hears the clip frame by frame, `LEAD` frames ahead of what it has said: enough that it
    never waits for input, little enough that a stopped talk has not sent the whole clip."""

    def __init__(self, clip: np.ndarray, frames: int):
        self.frames = frames
        self.padded = np.zeros(frames * FRAME, dtype=np.float32)
        self.padded[: clip.shape[0]] = clip

    def start(self, lines: Sequence[Line]) -> None:
        lines[0].push(self.padded[: min(self.frames, LEAD) * FRAME])

    def heard(self, lines: Sequence[Line], i: int, frame: int, pcm: np.ndarray) -> None:
        nxt = frame + LEAD
        if nxt < self.frames:
            lines[0].push(self.padded[nxt * FRAME:(nxt + 1) * FRAME])


async def talk(backend: Backend, character: str, clip: np.ndarray, seed: int, progress: Progress,
               say: str | None = None) -> tuple[Record, np.ndarray]:
    """The NPC hears `clip` (and, with `say`, is given that line at the start) -> its side, on the
    clip's timeline (shorter when stopped early)."""
    conversations = backend.conversations
    conversations.check(character)
    record = backend.new_record("say" if say is not None else "talk", [character])
    frames = math.ceil(clip.shape[0] / FRAME)
    try:
        lines = await conversations.run(record, [Side(character, character, seed, say)], frames,
                                        ClipFeed(clip, frames), progress)
    except BaseException as exc:
        record.fail(exc)
        raise
    record.finish()
    n = spoken(lines, frames)
    return record, lines[0].said(n)[: clip.shape[0]]


def line_of(backend: Backend, character: str, text: str | None, line: str | None) -> str:
    """The line to say: `text`, or the character's named scripted line `line`."""
    if (text is None) == (line is None):
        raise UserError("give exactly one of text (the words to say) or line (the name of one of the "
                        "character's scripted lines, e.g. greeting; get_character lists them)")
    if line is not None:
        lines = backend.character(character).lines
        if line not in lines:
            raise UserError(f"character {character!r} has no line {line!r} (its lines: "
                            f"{', '.join(lines) or 'none'}); update_character adds lines")
        text = lines[line]
    text = (text or "").strip()
    if not text:
        raise UserError("the line is empty: give the words the NPC should say")
    return text


def say_seconds(backend: Backend, text: str) -> float:
    """How long saying `text` takes: one token every 3 frames, plus about a second to finish."""
    tokenizer = backend.tokenizer
    tokens = len(tokenizer.encode(" " + text)) if tokenizer is not None else math.ceil(len(text) / 3)
    return min((tokens * 3 + SAY_TAIL_FRAMES) * FRAME_S, backend.settings.max_clip_s)

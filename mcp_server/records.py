"""What the MCP server remembers of a conversation (a `Record`) and how its words are read from the
NPCs' text streams: the same for every kind of conversation and for local and remote ones."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from npc_voice.protocol import FRAME_SECONDS as FRAME_S

WORD_START = "\u2581"  # SentencePiece's word-start mark; the engine's pieces carry a space instead


@dataclass
class Record:
    """A conversation this MCP server ran or handed out."""

    id: str
    kind: str  # "player", "talk", "say", "scene"
    characters: list[str]
    speakers: list[str] | None = None  # who words are attributed to (a character with itself: "id (A)", "id (B)")
    status: str = "running"  # running, finished, ended (stopped early by end_session), cancelled, failed, open
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    words: list[dict[str, Any]] = field(default_factory=list)  # {"speaker", "word", "start", "end"}
    audio: str | None = None  # what the audio holds
    error: str | None = None
    player: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def transcript(self) -> dict[str, Any]:
        by_speaker: dict[str, list[str]] = {}
        for w in self.words:
            by_speaker.setdefault(w["speaker"], []).append(w["word"])
        out: dict[str, Any] = {
            "session": self.id, "kind": self.kind, "characters": self.characters,
            "speakers": self.speakers or list(dict.fromkeys(self.characters)), "status": self.status,
            "seconds": round(self.seconds, 2),
            "text": {speaker: " ".join(ws) for speaker, ws in by_speaker.items()},
            "words": self.words,
        }
        if self.kind == "say":
            out["note"] = ("the NPC was given the line (forced into its text stream, one token every 3 frames) and "
                           "heard silence; the words are what its text stream carried")
        if self.kind == "talk":
            out["note"] = "only the NPC's words are transcribed (the input clip is not run through speech recognition)"
        if self.kind == "player":
            out["note"] = ("a player session streams to the game client, which receives the NPC's words as `text` "
                           "events; this server does not see them")
        if self.error:
            out["error"] = self.error
        return out

    def summary(self) -> dict[str, Any]:
        return {"session": self.id, "kind": self.kind, "characters": self.characters, "status": self.status,
                "seconds": round(self.seconds, 2), "words": len(self.words)}

    def finish(self) -> None:
        self.status = "ended" if self.stop.is_set() else "finished"

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, (anyio.get_cancelled_exc_class(), asyncio.CancelledError)):
            self.status = "cancelled"
        else:
            self.status, self.error = "failed", str(exc)


def words_of(texts: list[tuple[int, str]], speaker: str, total_frames: int) -> list[dict[str, Any]]:
    """(frame, text piece) pairs -> words with start/end seconds.

    Pieces are SentencePiece tokens: one that starts with a space (or '▁') starts a word, any other
    continues the word before it, however many silent frames lie between them (a `say` line is forced
    one token every 3 frames, so "fe", "rry", "man" come 3 frames apart and still are one word). A
    word starts at its first piece's frame and ends after its last piece's frame. Pieces at or past
    `total_frames` are left out."""
    words: list[list[Any]] = []  # [text, first frame, last frame]
    current: list[Any] | None = None
    for frame, piece in sorted(texts, key=lambda t: t[0]):  # stable: a frame's pieces keep their order
        if not 0 <= frame < total_frames:
            continue
        for ch in piece.replace(WORD_START, " "):
            if ch.isspace():
                current = None
            elif current is None:
                current = [ch, frame, frame]
                words.append(current)
            else:
                current[0] += ch
                current[2] = frame
    return [{"speaker": speaker, "word": text, "start": round(first * FRAME_S, 2),
             "end": round((last + 1) * FRAME_S, 2)} for text, first, last in words]


def scene_speakers(a: str, b: str) -> list[str]:
    """The names a scene's words are attributed to: the ids, or "id (A)" and "id (B)" for a character with itself."""
    return [f"{a} (A)", f"{b} (B)"] if a == b else [a, b]


def merge_words(*lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((w for ws in lists for w in ws), key=lambda w: (w["start"], w["speaker"]))

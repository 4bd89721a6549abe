"""What a `RealtimeSession` asks its I/O layer to do (the requests), the character it asks for, and
the audio deltas and replies it keeps: plain data, no I/O."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from ..protocol.rates import OutputFramer
from .events import event


@dataclass(frozen=True)
class Character:
    """What the NPC is: `voice` (a stored character's id, or a preset voice name) and `instructions`
    (the role prompt; None: the stored character's own role)."""

    voice: str
    instructions: str | None = None


# --- what the I/O layer is asked to do (requests) -----------------------------------------------


@dataclass(frozen=True)
class OpenConversation:
    """Reserve a slot, resolve and open `character`; then `opened()` or `refused(...)`."""

    character: Character


@dataclass(frozen=True)
class SwitchCharacter:
    """Resolve `character`, `Engine.switch` (hot swap); then `switched()` or `refused(...)`."""

    character: Character


@dataclass(frozen=True)
class SayLine:
    text: str


@dataclass(frozen=True)
class PushAudio:
    samples: np.ndarray  # float32 at 24 kHz


@dataclass(frozen=True)
class DropScript:
    """Forget the rest of a scripted line not voiced yet (response.cancel, truncate)."""


@dataclass(frozen=True)
class CloseConversation:
    """Close the engine session (its slot is free at the engine's next tick)."""


Request = Union[OpenConversation, SwitchCharacter, SayLine, PushAudio, DropScript, CloseConversation]


@dataclass(eq=False)
class AudioDelta:
    """A `response.output_audio.delta` to write: `render()` converts and encodes it."""

    framer: OutputFramer
    response_id: str
    item_id: str
    pcm: np.ndarray  # float32 at 24 kHz, one frame
    dropped_output: int = 0  # counted by an outbox that drops it

    def render(self) -> str:
        pcm16 = self.framer(self.pcm)
        return json.dumps(event("response.output_audio.delta", response_id=self.response_id, item_id=self.item_id,
                                output_index=0, content_index=0,
                                delta=base64.b64encode(pcm16.astype("<i2").tobytes()).decode()))


@dataclass
class Reply:
    """One response and its assistant item: the audio sent (in frames) and the words, by time."""

    response_id: str
    item_id: str
    frames: int = 0
    pieces: list[tuple[int, str]] = field(default_factory=list)  # (ms into the item's audio, text)

    def transcript(self, end_ms: int | None = None) -> str:
        return "".join(t for ms, t in self.pieces if end_ms is None or ms < end_ms)

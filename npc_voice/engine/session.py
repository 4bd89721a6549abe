"""What the engine keeps per conversation: its `Session` (slot, character, input buffer, the
futures a start or switch resolves), the frames it hands out (`FrameEvent`), and the queued installs."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..model.config import FRAME_SECONDS
from .persona import Persona
from .prompt import Prefix


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 <= q <= 1) of `values`; 0.0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class EngineFull(RuntimeError):
    """Every slot is taken."""


RESERVED = object()  # a slot's owner between `Engine.reserve` and `Engine.open`


@dataclass
class FrameEvent:
    """One 80 ms frame of an NPC's output."""

    session_id: str
    frame: int  # conversation frame: 0 is the first frame after the prompt (answers user frame 0)
    pcm: np.ndarray  # float32 [1920], 24 kHz
    text_token: int
    text: str  # what the frame adds to the NPC's words ('' when none)

    @property
    def time(self) -> float:
        return self.frame * FRAME_SECONDS


class InputBuffer:
    """Re-frames user audio of any chunk size into whole frames; holds at most `max_frames` (the
    oldest are dropped and counted, so a client sending faster than real time cannot grow memory)."""

    def __init__(self, frame_size: int, max_frames: int):
        self.frame_size, self.max_frames = frame_size, max_frames
        self._frames: collections.deque[np.ndarray] = collections.deque()
        self._partial = np.zeros(0, dtype=np.float32)
        self.dropped_frames = 0
        self._lock = threading.Lock()

    def push(self, samples: np.ndarray) -> None:
        with self._lock:
            data = np.concatenate([self._partial, np.asarray(samples, dtype=np.float32).reshape(-1)])
            whole = data.shape[0] // self.frame_size
            for i in range(whole):
                self._frames.append(data[i * self.frame_size : (i + 1) * self.frame_size])
            self._partial = data[whole * self.frame_size :]
            while len(self._frames) > self.max_frames:
                self._frames.popleft()
                self.dropped_frames += 1

    def pop(self) -> np.ndarray | None:
        with self._lock:
            return self._frames.popleft() if self._frames else None

    def __len__(self) -> int:
        return len(self._frames)


@dataclass
class Session:
    id: str
    slot: int
    persona: Persona
    seed: int
    input: InputBuffer
    prefix_length: int = 0  # generator frames the prompt took; conversation frame = t - this
    frames_out: int = 0
    forced_text: collections.deque[int] = field(default_factory=collections.deque)
    listener: Callable[[FrameEvent], None] | None = None
    closed: bool = False
    # Resolved when the first character is installed (its first frame comes at the next tick), or
    # with the error that failed its build (the slot is then free again).
    started: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    wanted: int = 0  # the latest open/switch: an older one's install is skipped

    def push_audio(self, samples: np.ndarray) -> None:
        """User audio, 24 kHz mono float32, any length."""
        self.input.push(samples)


@dataclass
class Install:
    session: Session
    persona: Persona
    prefix: Prefix
    wanted: int
    done: concurrent.futures.Future
    queued: float = field(default_factory=time.perf_counter)

"""The engine: every live NPC conversation on one shared model, stepped together every 80 ms.

Each conversation owns a slot of a fixed batch. A tick takes one 1920-sample frame of user audio per
live slot (silence when its user sent nothing), runs Mimi encode, one LM step and Mimi decode for
the whole batch, and hands each session its NPC frame (audio and text). Opening a session or
switching its character installs a cached prompt prefix between two ticks: building a prefix runs
in the caller's thread, so a new character never makes the others miss a frame.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from ..model.generator import NOT_FORCED, Generator
from ..model.loading import LoadedModel
from .persona import Persona, PrefixCache
from .prompt import Prefix, install_prefix
from .step import BatchedStep

FRAME_SECONDS = 0.08


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 <= q <= 1) of `values`; 0.0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class EngineFull(RuntimeError):
    """Every slot is taken."""


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

    def push_audio(self, samples: np.ndarray) -> None:
        """User audio, 24 kHz mono float32, any length."""
        self.input.push(samples)


class Engine:
    """Slots over one model. `tick()` steps all live sessions; call it from one thread (the
    real-time `EngineLoop`, or an offline loop); the other methods are safe from any thread."""

    def __init__(self, model: LoadedModel, slots: int = 8, cache: PrefixCache | None = None,
                 max_input_seconds: float = 2.0, use_graphs: bool | None = None):
        self.model, self.slots = model, slots
        self.gen = Generator(model.lm)
        self.cache = cache or PrefixCache(model, self.gen)
        device = model.device
        self.state = self.gen.init_state(slots, device)
        self.mimi_state = model.mimi.init_state(slots, device)
        self.step = BatchedStep(model, self.gen, self.state, self.mimi_state, use_graphs)
        self.step.warm_up()  # on a GPU: every window's CUDA graph, before the first conversation
        self.frame_size = model.mimi.frame_size
        self.max_input_frames = max(1, int(max_input_seconds / FRAME_SECONDS))
        self._sessions: list[Session | None] = [None] * slots
        self._pending: list[tuple[Session, Prefix | None]] = []  # installs (prefix) and closes (None)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.ticks = 0
        self.last_swap_ms = 0.0

    # --- sessions (any thread) --------------------------------------------------------------
    def open(self, persona: Persona, seed: int | None = None,
             listener: Callable[[FrameEvent], None] | None = None) -> Session:
        """Starts a conversation with `persona`; its first frame comes at the next tick."""
        prefix = self.cache.get(persona)  # built here, outside the tick, when not cached
        with self._lock:
            # Pending operations apply in order at the next tick, so a slot whose session is being
            # closed is free again for an install queued after that close.
            taken = {s.slot for s in self._sessions if s is not None}
            for pending, install in self._pending:
                (taken.add if install is not None else taken.discard)(pending.slot)
            free = [i for i in range(self.slots) if i not in taken]
            if not free:
                raise EngineFull(f"all {self.slots} conversation slots are in use")
            session = Session(f"s{next(self._ids)}", free[0], persona,
                              seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()),
                              InputBuffer(self.frame_size, self.max_input_frames), listener=listener)
            self._pending.append((session, prefix))
        return session

    def switch(self, session: Session, persona: Persona) -> None:
        """Gives a live session another character (its conversation starts over)."""
        prefix = self.cache.get(persona)
        with self._lock:
            session.persona = persona
            self._pending.append((session, prefix))

    def close(self, session: Session) -> None:
        with self._lock:
            session.closed = True
            self._pending.append((session, None))

    def say(self, session: Session, text: str, gap_frames: int = 2) -> None:
        """Forces a scripted line into the NPC's text stream, one token every `gap_frames` + 1
        frames (the model voices what its text stream says)."""
        pad = self.model.config.lm.existing_text_padding_id
        tokens = self.model.tokenizer.encode(" " + text.strip())
        with self._lock:
            for tok in tokens:
                session.forced_text.append(tok)
                session.forced_text.extend([pad] * gap_frames)

    @property
    def sessions(self) -> list[Session]:
        """The live sessions (a closed one is gone at once, though its slot is freed at the next tick)."""
        return [s for s in self._sessions if s is not None and not s.closed]

    # --- the step (one thread) ----------------------------------------------------------------
    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for session, prefix in pending:
            if prefix is None:
                if self._sessions[session.slot] is session:
                    self._sessions[session.slot] = None
                continue
            if session.closed:
                continue
            start = time.perf_counter()
            self._install(session, prefix)
            self.last_swap_ms = (time.perf_counter() - start) * 1000

    def _install(self, session: Session, prefix: Prefix) -> None:
        slot = session.slot
        install_prefix(self.gen, self.state, slot, prefix, session.seed, session.persona.sampling)
        self.mimi_state.reset_slot(slot)  # fresh codec streams
        session.prefix_length = prefix.length
        session.frames_out = 0
        self._sessions[slot] = session

    def tick(self) -> list[FrameEvent]:
        """One 80 ms frame for every live session; returns their NPC frames."""
        self._apply_pending()
        self.ticks += 1
        live = self.sessions
        if not live:
            return []
        pcm = np.zeros((self.slots, self.frame_size), dtype=np.float32)  # silence unless the user spoke
        forced = np.full(self.slots, NOT_FORCED, dtype=np.int64)
        active = np.zeros(self.slots, dtype=bool)
        with self._lock:
            for s in live:
                frame = s.input.pop()
                if frame is not None:
                    pcm[s.slot] = frame
                if s.forced_text:
                    forced[s.slot] = s.forced_text.popleft()
                active[s.slot] = True
        frames_seen = max(s.prefix_length + s.frames_out + 1 for s in live)
        out = self.step(pcm, active, forced, frames_seen)
        pcm_host, text_host = out.pcm, out.text
        events = []
        for s in live:
            token = int(text_host[s.slot])
            event = FrameEvent(s.id, s.frames_out, pcm_host[s.slot].copy(), token, self.model.tokenizer.piece(token))
            s.frames_out += 1
            events.append(event)
            if s.listener is not None:
                s.listener(event)
        return events


class EngineLoop:
    """Runs `engine.tick()` every 80 ms on a background thread; records tick times."""

    def __init__(self, engine: Engine, period: float = FRAME_SECONDS, catch_up: int = 3):
        self.engine, self.period, self.catch_up = engine, period, catch_up
        self.tick_ms: collections.deque[float] = collections.deque(maxlen=1000)
        self.overruns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> EngineLoop:
        self._thread = threading.Thread(target=self._run, name="npc-voice-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        deadline = time.perf_counter()
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.engine.tick()
            except BaseException as exc:  # keep the error for whoever runs the loop
                self.error = exc
                raise
            elapsed = time.perf_counter() - start
            self.tick_ms.append(elapsed * 1000)
            deadline += self.period
            delay = deadline - time.perf_counter()
            if delay < 0:
                self.overruns += 1
                # A late tick is made up by the next ones (back to back) while the lag stays under
                # `catch_up` periods; past that the schedule restarts from now (frames are late,
                # not lost: clients' jitter buffers absorb a short burst).
                if -delay > self.catch_up * self.period:
                    deadline = time.perf_counter()
            else:
                self._stop.wait(delay)

    def percentile(self, q: float) -> float:
        return percentile(self.tick_ms, q)

"""The engine: every live NPC conversation on one shared model, stepped together every 80 ms.

Each conversation owns a slot of a fixed batch. A tick takes one 1920-sample frame of user audio per
live slot (silence when its user sent nothing), runs Mimi encode, one LM step and Mimi decode for
the whole batch, and hands each session its NPC frame (audio and text). Opening a session or
switching its character installs a prompt prefix between two ticks: a cached one is copied in; a new
one is built first, on the engine thread, a bounded chunk at a time in what is left of each 80 ms
period after the tick (`build.py`), so a new character never makes the others miss a frame.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import threading
import time
from typing import Callable

import numpy as np
import torch

from ..characters.model import ROLE_TOKENS_MAX, VOICE_MAX_S
from ..model import fused
from ..model.config import FRAME_SECONDS, prompt_length
from ..model.generator import NOT_FORCED, Generator
from ..model.loading import LoadedModel
from .build import Cost, PrefixBuilder, PromptRequest
from .persona import Persona, PrefixCache
from .install import SlotInstaller
from .prompt import Prefix
from .session import RESERVED, EngineFull, FrameEvent, InputBuffer, Session, Install
from .step import BatchedStep


_SESSION_IDS = itertools.count(1)  # session ids, unique in the process (a server may run several engines)


class Engine:
    """Slots over one model. `tick()` steps all live sessions; call it and `build()` from one
    thread (the real-time `EngineLoop`, or an offline loop); the other methods are safe from any
    thread. `open` and `switch` return at once: a cached character is installed at the next tick, a
    new one once the engine thread has built it."""

    def __init__(self, model: LoadedModel, slots: int = 8, cache: PrefixCache | None = None,
                 max_input_seconds: float = 2.0, use_graphs: bool | None = None, build_lanes: int = 8,
                 build_chunk: int = 64):
        self.model, self.slots = model, slots
        self.gen = Generator(model.lm)
        self.cache = cache if cache is not None else PrefixCache(model, self.gen)
        device = model.device
        self.state = self.gen.init_state(slots, device)
        self.mimi_state = model.mimi.init_state(slots, device)
        self.step = BatchedStep(model, self.gen, self.state, self.mimi_state, use_graphs)
        voice_frames = math.ceil(VOICE_MAX_S / FRAME_SECONDS)  # the longest voice sample a character may have
        self.builder = PrefixBuilder(model, self.gen, build_lanes, build_chunk, use_graphs,
                                     longest=prompt_length(voice_frames, ROLE_TOKENS_MAX))
        # On a GPU: every window's CUDA graph, the builder's too, before the first conversation.
        self.step.warm_up()
        self.builder.warm_up(max_voice_frames=voice_frames)
        fresh_encoder = model.mimi.init_encoder_state(1, device)  # what a slot's encoder starts from
        fresh_encoder.reset(torch.ones(1, dtype=torch.bool, device=device))
        # One fixed-shape install (a CUDA graph per bucket of KV rows on a GPU), captured now.
        self.installer = SlotInstaller(self.gen, self.state, self.builder.longest, self.step.use_graphs,
                                       self.mimi_state, fresh_encoder, self._primed_decoder())
        self.installer.warm_up()
        self.frame_size = model.mimi.frame_size
        self.max_input_frames = max(1, int(max_input_seconds / FRAME_SECONDS))
        self._sessions: list[Session | None] = [None] * slots  # installed, live or being closed
        self._owners: list[Session | object | None] = [None] * slots  # who holds each slot: a Session or RESERVED
        self._pending: list[Install | Session] = []  # installs, and closes (a Session), in order
        self._waiting: dict[str, list[tuple[Session, Persona, int, concurrent.futures.Future]]] = {}  # builds
        self._lock = threading.Lock()
        self.ticks = 0
        self.install_ms: collections.deque[float] = collections.deque(maxlen=256)
        self.install_cost = Cost(0.005)
        self.work = threading.Event()  # set when an install or a build is asked for
        # Voices are read and normalised one at a time: CPU-bound Python threads beside the engine
        # thread take the GIL from it (8 at once stretched a 38 ms tick to 44 ms on an H200).
        self._reading = threading.Lock()

    @torch.inference_mode()
    def _primed_decoder(self):
        """A one-slot Mimi decoder that has decoded the SILENCE frame: the reference decodes the
        prompt's last (forced, silent) frame after resetting Mimi, before the first real frame; a
        slot's decoder starts from this state so that every later frame matches."""
        mimi = self.model.mimi
        state = mimi.init_decoder_state(1, self.model.device)
        codes = torch.tensor([self.builder.special.silence], device=self.model.device)
        with fused.eager():
            mimi.decode_step(codes, state)
        return state

    # --- sessions (any thread) --------------------------------------------------------------
    def reserve(self) -> int:
        """Takes a free slot now, for a session that `open(..., slot=)` will start once its
        character is read (so a full engine says so before any work); `release` gives it back if
        that open does not happen. The engine is the one owner of free slots."""
        with self._lock:
            slot = self._free_slot()
            self._owners[slot] = RESERVED
            return slot

    def release(self, slot: int) -> None:
        """Gives back a slot `reserve` took and no session got (anything else is left alone)."""
        with self._lock:
            if self._owners[slot] is RESERVED:
                self._owners[slot] = None

    def _free_slot(self) -> int:
        """(under the lock) The first free slot, or `EngineFull`."""
        free = [i for i, owner in enumerate(self._owners) if owner is None]
        if not free:
            raise EngineFull(f"all {self.slots} conversation slots are in use")
        return free[0]

    def open(self, persona: Persona, seed: int | None = None,
             listener: Callable[[FrameEvent], None] | None = None, slot: int | None = None) -> Session:
        """Starts a conversation with `persona` and returns at once; `session.started` resolves
        when its character is installed (its first frame comes at the next tick). `slot`: one that
        `reserve` took (else the first free one). Raises `EngineFull`, or the voice's error (read
        here, in the caller's thread; a reserved slot stays reserved then)."""
        request, prefix = self._prepare(persona)
        with self._lock:
            if slot is None:
                slot = self._free_slot()
            elif self._owners[slot] is not RESERVED:
                raise ValueError(f"slot {slot} was not reserved")
            session = Session(f"s{next(_SESSION_IDS)}", slot, persona,
                              seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()),
                              InputBuffer(self.frame_size, self.max_input_frames), listener=listener)
            self._owners[session.slot] = session
            self._want(session, persona, request, prefix, session.started)
        return session

    def switch(self, session: Session, persona: Persona) -> concurrent.futures.Future:
        """Gives a live session another character (its conversation starts over once the new
        character is installed; until then the current one goes on). Returns at once; the future
        resolves at the install, or with the build's error."""
        request, prefix = self._prepare(persona)
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            session.wanted += 1
            self._want(session, persona, request, prefix, done)
        return done

    def _prepare(self, persona: Persona) -> tuple[PromptRequest | str, Prefix | None]:
        """(the cache key, its prefix) when cached; else (what building it needs, None): the voice
        file read, resampled and loudness-normalised here, in the caller's thread, on the CPU only
        (GPU work from other threads would run beside the tick and slow it down); the engine thread
        encodes it, in one captured pass."""
        key = persona.prompt_key()
        prefix = self.cache.lookup(key)
        if prefix is not None:
            return key, prefix
        with self._reading:
            return persona.request(self.model), None

    def warm_up_thread(self) -> None:
        """Runs a whole character build and install twice on the calling thread (the engine
        loop's, before its first tick): the CUDA libraries make their per-thread handles at a first
        use, which would otherwise fall on the first conversation's build; the builder's cost
        estimates start from the second, warm, run."""
        rate = self.model.config.mimi.sample_rate
        t = np.arange(int(5.0 * rate)) / rate
        samples = (0.2 * np.sin(2 * np.pi * 150 * t)).astype(np.float32)
        for _ in range(2):
            request = PromptRequest("warm-up", "warm-up", self.model.tokenizer.encode("<system> " + "warm up " * 30),
                                    samples=samples)
            self.builder.submit(request)
            prefix = None
            for done, result in self.builder.run(None):
                if done is request:
                    prefix = result
                else:  # a character opened before the loop started
                    self._built(done, result)
            if isinstance(prefix, BaseException):
                raise prefix
            with self._lock:
                free = [i for i in range(self.slots) if self._owners[i] is None and self._sessions[i] is None]
            if free:  # a free slot's state is overwritten by its next install anyway
                t0 = time.perf_counter()
                with fused.eager():
                    self.installer.install(free[0], prefix, 0)
                self.installer.wait()
                self.install_cost = Cost(time.perf_counter() - t0)  # the warm one's, as the builder's
        self.builder.reset_costs()

    def _want(self, session: Session, persona: Persona, request: PromptRequest | str, prefix: Prefix | None,
              done: concurrent.futures.Future) -> None:
        """(under the lock) Queues the install of a cached prefix, or joins/starts its build."""
        self.work.set()  # a real-time loop idling until its next tick starts on it now
        if prefix is not None:
            self._pending.append(Install(session, persona, prefix, session.wanted, done))
            return
        waiting = self._waiting.get(request.key)
        if waiting is None:
            waiting = self._waiting[request.key] = []
            self.builder.submit(request)
        waiting.append((session, persona, session.wanted, done))

    def close(self, session: Session) -> None:
        with self._lock:
            if session.closed:
                return
            session.closed = True
            if self._owners[session.slot] is session:
                self._owners[session.slot] = None  # reusable at once: the close applies first
            self._pending.append(session)
        if not session.started.done():
            session.started.cancel()

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

    @property
    def free_slots(self) -> int:
        with self._lock:
            return sum(owner is None for owner in self._owners)

    @property
    def builds_pending(self) -> int:
        return self.builder.pending

    @property
    def last_swap_ms(self) -> float:
        return self.install_ms[-1] if self.install_ms else 0.0

    # --- the engine thread ----------------------------------------------------------------------
    def build(self, budget_s: float | None = None) -> None:
        """Installs what is ready and advances character builds, by whole operations whose measured
        cost fits in `budget_s` (None: everything, now). The real-time loop calls it with what is
        left of the period after each tick."""
        start = time.perf_counter()

        def left() -> float | None:
            return None if budget_s is None else budget_s - (time.perf_counter() - start)

        def installed(done: list[tuple[PromptRequest, Prefix | BaseException]]) -> None:
            for request, result in done:  # a finished build is installed at once if that fits: its
                self._built(request, result)  # character speaks at the next tick, not a period later
            self._apply_pending(left())

        self._apply_pending(left())
        self.builder.run(left(), on_finished=installed)
        self._apply_pending(left())

    def _built(self, request: PromptRequest, result: Prefix | BaseException) -> None:
        if not isinstance(result, BaseException):
            result = self.cache.store(request.key, result)
        with self._lock:
            waiting = self._waiting.pop(request.key, [])
            for session, persona, wanted, done in waiting:
                if isinstance(result, BaseException):
                    self._failed(session, done, result)
                else:
                    self._pending.append(Install(session, persona, result, wanted, done))

    def _failed(self, session: Session, done: concurrent.futures.Future, error: BaseException) -> None:
        """(under the lock) A character that could not be built or installed: an open's slot is free
        again (a failed switch keeps the current character); the caller gets the error."""
        if self._sessions[session.slot] is not session:
            if self._owners[session.slot] is session:
                self._owners[session.slot] = None
            session.closed = True
        if not done.done():
            done.set_exception(error)

    def _apply_pending(self, budget_s: float | None = None) -> None:
        """Applies closes and installs in order; an install only while its cost fits `budget_s`."""
        start = time.perf_counter()
        while True:
            with self._lock:
                if not self._pending:
                    return
                op = self._pending[0]
                now = time.perf_counter()
                if isinstance(op, Install) and budget_s is not None \
                        and now - op.queued < self.builder.max_wait_s \
                        and now - start + self.install_cost.estimate >= budget_s:
                    return  # no time left in this period (an install waiting too long goes anyway)
                self._pending.pop(0)
            if isinstance(op, Session):
                if self._sessions[op.slot] is op:
                    self._sessions[op.slot] = None
                continue
            session = op.session
            if session.closed or session.wanted != op.wanted:
                if not op.done.done():
                    op.done.cancel()
                continue
            t0 = time.perf_counter()
            try:
                self._install(session, op.prefix, op.persona)
            except Exception as exc:  # a prefix this engine cannot hold: that character fails alone
                with self._lock:
                    self._failed(session, op.done, exc)
                continue
            self.installer.wait()
            seconds = time.perf_counter() - t0
            self.install_ms.append(seconds * 1000)
            self.install_cost.add(seconds)
            if not op.done.done():
                op.done.set_result(session)

    def _install(self, session: Session, prefix: Prefix, persona: Persona) -> None:
        slot = session.slot
        with fused.eager():  # the character, a fresh Mimi encoder, a primed decoder (as the reference's)
            self.installer.install(slot, prefix, session.seed, persona.sampling)
        session.persona = persona
        session.prefix_length = prefix.length
        session.frames_out = 0
        self._sessions[slot] = session

    def tick(self, builds: bool = True, notify: bool | list = True) -> list[FrameEvent]:
        """One 80 ms frame for every live session; returns their NPC frames. `builds`: first finish
        every pending install and character build (offline ticking: a session opened before this
        tick speaks in it); the real-time loop passes False and calls `build` between ticks.
        `notify`: call the sessions' listeners now; a list instead receives (session, frame) pairs
        for `notify` later (the real-time loop's dispatch thread)."""
        if builds:
            self.build(None)
        else:
            self._apply_pending(0.0)  # closes only: installs wait for the time after the tick
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
            events.append((s, event))
        if isinstance(notify, list):
            notify.extend(events)
        elif notify:
            self.notify(events)
        return [event for _, event in events]

    @staticmethod
    def notify(events: list[tuple[Session, FrameEvent]]) -> None:
        """Hands each session's listener its frame (the real-time loop does it on a thread of its
        own, so that listeners' work never takes the engine thread's time)."""
        for session, event in events:
            if session.listener is not None:
                session.listener(event)

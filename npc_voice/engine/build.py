"""Character prompts built on the engine thread, one bounded chunk at a time, between ticks.

A character that is not cached yet must be run through the model once (its prompt: voice frames,
silence, role text, silence; see `prompt.py`). Doing that as one big forward, or on another thread,
stalls every live conversation on the shared GPU. Instead the builder works like a serving system's
chunked prefill (vLLM) with stall-free scheduling (SARATHI-Serve):

- a build runs in `lanes` build slots of its own (a small `TransformerState` beside the engine's),
  `chunk` prompt positions per lane per forward: every lane with work advances in the same forward,
  so several new characters are served together and fairly (first come, first laned);
- the real-time loop gives the builder only what is left of each 80 ms period after the tick, and a
  chunk runs only when its measured cost fits (`run(budget_s)`), so a tick is never late for it;
- every shape is fixed ([lanes, chunk] positions, a power-of-two attention window; voices padded to
  whole `VOICE_BUCKET_FRAMES` buckets), so on a GPU each window is one CUDA graph captured at start-up
  (`warm_up`): the first build after start-up costs what the tenth does;
- the lane's ring holds `context + chunk` rows, so a chunk never overwrites a row its own queries
  still see, and prompts longer than the context wrap as the reference's one-frame-a-step cache does.

Only the engine thread calls `run` and `warm_up`; `submit` is safe from any thread.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model import fused
from ..model.generator import Generator
from ..model.loading import LoadedModel
from .prompt import (
    Prefix, PromptFrames, SpecialCodes, Voice, delayed_positions, prompt_frames, prompt_ring, special_codes,
    voice_from_samples, voice_bucket_frames,
)
from .step import window_for


@dataclass
class PromptRequest:
    """What the engine thread needs to build a character's prompt; made on the caller's thread
    (file reading, resampling and loudness normalisation happen there, never on the engine thread)."""

    key: str  # the prompt's hash (`Persona.prompt_key`)
    name: str
    text_tokens: list[int]
    samples: np.ndarray | None = None  # loudness-normalised 24 kHz mono voice sample, or
    preset: Voice | None = None  # a PersonaPlex preset voice, or
    voice: Voice | None = None  # the sample already encoded (`Engine.open` does it on its own thread)


@dataclass
class _Job:
    request: PromptRequest
    lane: int = -1
    frames: PromptFrames | None = None
    x: torch.Tensor | None = None  # [F, dim] input embeddings of every prompt position
    done: int = 0  # positions already run

    @property
    def length(self) -> int:
        return self.x.shape[0]


class Cost:
    """Running estimate of one operation's duration (seconds): the upper quartile of the last few
    (one slow outlier does not stop the builds; a slow trend does)."""

    def __init__(self, initial: float):
        self.recent: collections.deque[float] = collections.deque([initial], maxlen=8)

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)

    @property
    def estimate(self) -> float:
        ordered = sorted(self.recent)
        return ordered[(3 * (len(ordered) - 1)) // 4]


class PrefixBuilder:
    def __init__(self, model: LoadedModel, gen: Generator, lanes: int = 4, chunk: int = 64,
                 use_graphs: bool | None = None, max_wait_s: float = 1.0):
        self.model, self.gen = model, gen
        self.lanes, self.chunk = lanes, chunk
        self.max_wait_s = max_wait_s  # a build that got no time for this long runs one chunk anyway
        lm = model.lm
        self.context = lm.transformer.context
        self.capacity = self.context + chunk
        device = model.device
        self.device = device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        dtype = next(p for p in lm.transformer.parameters() if p.is_floating_point()).dtype
        self.state = lm.transformer.init_state(lanes, device, dtype, capacity=self.capacity)
        self.x_in = torch.zeros(lanes, chunk, model.config.lm.dim, device=device, dtype=dtype)  # [lanes, C, dim]
        self.active = torch.zeros(lanes, dtype=torch.bool, device=device)
        self.out = torch.zeros_like(self.x_in)  # [lanes, C, dim] transformer output
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._lane_jobs: list[_Job | None] = [None] * lanes
        self._lock = threading.Lock()
        self._special: SpecialCodes | None = None
        self.chunk_cost, self.prepare_cost = Cost(0.005), Cost(0.005)
        self._last_progress = time.perf_counter()
        self._starving = False
        self.chunks_run = 0

    @property
    def special(self) -> SpecialCodes:
        if self._special is None:
            with fused.eager():
                self._special = special_codes(self.model.mimi)
        return self._special

    # --- any thread ---------------------------------------------------------------------------
    def submit(self, request: PromptRequest) -> None:
        with self._lock:
            self._queue.append(_Job(request))

    def reset_costs(self) -> None:
        """Cost estimates from the last measurement of each operation only (after a warm-up)."""
        self.chunk_cost, self.prepare_cost = Cost(self.chunk_cost.recent[-1]), Cost(self.prepare_cost.recent[-1])

    @property
    def pending(self) -> int:
        """Builds queued or in progress."""
        with self._lock:
            return len(self._queue) + sum(j is not None for j in self._lane_jobs)

    # --- the engine thread ----------------------------------------------------------------------
    def run(self, budget_s: float | None = None) -> list[tuple[PromptRequest, Prefix | BaseException]]:
        """Advances the builds by whole operations (preparing a job, one chunk of every lane) while
        their measured cost fits in `budget_s` (None: until every build is done). Returns the builds
        that finished (with their prefix, or the error that failed them)."""
        finished: list[tuple[PromptRequest, Prefix | BaseException]] = []
        start = time.perf_counter()
        forced = False

        def fits(cost: Cost) -> bool:
            nonlocal forced
            if budget_s is None:
                return True
            now = time.perf_counter()
            if now - start + cost.estimate <= budget_s:
                return True
            # Starved (a machine too busy to leave room for an operation): once nothing moved for
            # `max_wait_s`, one operation per call goes anyway until the builds are done, so new
            # characters still start (late ticks are made up by the loop's catch-up).
            if not forced and (self._starving or now - self._last_progress > self.max_wait_s):
                forced = self._starving = True
                return True
            return False

        while True:
            lane = self._free_lane()
            if lane is not None and self._queue:
                if not fits(self.prepare_cost):
                    break
                with self._lock:
                    job = self._queue.popleft()
                self._timed(self.prepare_cost, self._prepare, job, lane, finished)
                continue
            if not any(j is not None for j in self._lane_jobs):
                self._starving = False  # nothing left to build: waiting counts from now on
                self._last_progress = time.perf_counter()
                break
            if not fits(self.chunk_cost):
                break
            self._timed(self.chunk_cost, self._chunk, finished)
        return finished

    def _free_lane(self) -> int | None:
        return next((i for i, j in enumerate(self._lane_jobs) if j is None), None)

    def _timed(self, cost: Cost, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        cost.add(now - t0)
        self._last_progress = now

    @torch.inference_mode()
    def _prepare(self, job: _Job, lane: int, finished: list) -> None:
        """The job's prompt frames and input embeddings (and its voice codes, in one batched Mimi
        pass, unless the caller encoded them already)."""
        request = job.request
        try:
            with fused.eager():
                voice = request.preset or request.voice or voice_from_samples(
                    request.name, request.samples, self.model.mimi, normalized=True)
                job.frames = prompt_frames(voice, request.text_tokens, self.special, self.model)
                job.x = prompt_embeddings(self.model, self.gen, job.frames)
        except Exception as exc:  # this character fails; nothing else is touched
            finished.append((request, exc))
            return
        job.lane, job.done = lane, 0
        self.state.position[lane] = 0  # rows past the position are invisible: no clearing needed
        self._lane_jobs[lane] = job

    @torch.inference_mode()
    def _chunk(self, finished: list) -> None:
        C = self.chunk
        self.x_in.zero_()
        active = torch.zeros(self.lanes, dtype=torch.bool)
        seen = 0
        for lane, job in enumerate(self._lane_jobs):
            if job is None:
                continue
            n = min(C, job.length - job.done)
            self.x_in[lane, :n] = job.x[job.done : job.done + n]
            active[lane] = True
            seen = max(seen, job.done + C)
        self.active.copy_(active, non_blocking=True)
        window = window_for(seen, self.capacity)
        if self.use_graphs:
            self._graph(window).replay()
        else:
            self._forward(window)
        self.chunks_run += 1
        for lane, job in enumerate(self._lane_jobs):
            if job is None:
                continue
            job.done += C
            if job.done >= job.length:
                self._lane_jobs[lane] = None
                try:
                    finished.append((job.request, self._finish(job, lane)))
                except Exception as exc:
                    finished.append((job.request, exc))

    def _forward(self, window: int) -> None:
        self.out.copy_(self.model.lm.transformer.step(self.x_in, self.state, self.active, window))

    def _finish(self, job: _Job, lane: int) -> Prefix:
        """The lane's cache rows of the last min(F, context) positions, in position order, and the
        last position's hidden state and text logits."""
        F = job.length
        last = (F - 1) - (job.done - self.chunk)  # the last position's index in this chunk's output
        with fused.eager():
            hidden, text_logits = self.model.lm.text_head(self.out[lane : lane + 1, last : last + 1])
        n = min(F, self.context)
        rows = torch.remainder(torch.arange(F - n, F, device=self.device), self.capacity)
        keys = torch.stack([c.keys[lane].index_select(1, rows) for c in self.state.layers])  # [L, H, n, D]
        values = torch.stack([c.values[lane].index_select(1, rows) for c in self.state.layers])
        ring = prompt_ring(job.frames, self.gen).to(self.device)
        return Prefix(keys, values, ring, hidden[0, 0], text_logits[0, 0], torch.tensor(F))

    def _graph(self, window: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(window)
        if graph is None:
            saved = self.active.clone()
            self.active.zero_()  # warm up and capture with every lane inactive: no state changes
            position = self.state.position.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self._forward(window)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                self._forward(window)
            self.active.copy_(saved)
            self.state.position.copy_(position)
            self._graphs[window] = graph
        return graph

    def warm_up(self, max_voice_frames: int) -> None:
        """Everything a build runs, at every shape it can take, before the first build: each
        attention window's graph, and the Mimi encoder at every voice bucket."""
        if self.use_graphs:
            window = 0
            while window < self.capacity:
                window = window_for(window + 1, self.capacity)
                self._graph(window)
        if self.device.type == "cuda":
            size, frames = self.model.mimi.frame_size, voice_bucket_frames(1)
            rate = self.model.config.mimi.sample_rate
            while frames <= voice_bucket_frames(max_voice_frames):
                with fused.eager(), torch.inference_mode():
                    voice_from_samples("warm-up", 0.1 * np.sin(np.arange(frames * size) / rate * 1000.0,
                                                                dtype=np.float32), self.model.mimi)
                frames += voice_bucket_frames(1)
            torch.cuda.synchronize(self.device)


def prompt_embeddings(model: LoadedModel, gen: Generator, frames: PromptFrames) -> torch.Tensor:
    """[F, dim]: the summed input embeddings of every prompt position (a preset's stored ones for
    its voice positions)."""
    positions = delayed_positions(frames.tokens, model.config.lm.delays, gen.initial.cpu()).to(model.device)
    x = model.lm.embed(positions[None])[0]  # [F, dim]
    voice = frames.voice
    if voice.embeddings is not None:  # a preset's stored input embeddings for positions 0..v-2
        x[: voice.embeddings.shape[0]] = voice.embeddings.to(x.device, x.dtype)
    return x


def build_prefix(model: LoadedModel, gen: Generator, frames: PromptFrames, chunk: int = 64) -> Prefix:
    """The prompt of `frames` built now, in the calling thread, by the engine's own chunked
    procedure (tools and tests; the engine builds between ticks instead)."""
    builder = PrefixBuilder(model, gen, lanes=1, chunk=chunk, use_graphs=False)
    job = _Job(PromptRequest("", frames.voice.name, []))
    with torch.inference_mode():
        job.frames, job.x = frames, prompt_embeddings(model, gen, frames)
    job.lane = 0
    builder._lane_jobs[0] = job
    return _only_result(builder.run(None))


def build_request(model: LoadedModel, gen: Generator, request: PromptRequest, chunk: int = 64) -> Prefix:
    """`build_prefix` from what `Persona.request` read: the voice encoded and the prompt laid out as
    the engine's builder does it (`PrefixCache.get`)."""
    builder = PrefixBuilder(model, gen, lanes=1, chunk=chunk, use_graphs=False)
    builder.submit(request)
    return _only_result(builder.run(None))


def _only_result(finished: list[tuple[PromptRequest, Prefix | BaseException]]) -> Prefix:
    (_, result), = finished
    if isinstance(result, BaseException):
        raise result
    return result

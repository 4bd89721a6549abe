"""Character prompts built on the engine thread, one bounded operation at a time, between ticks.

A character that is not cached yet must be run through the model once (its prompt: voice frames,
silence, role text, silence; see `prompt.py`). Doing that as one big forward, or on another thread,
stalls every live conversation on the shared GPU. Instead the builder works like a serving system's
chunked prefill (vLLM) with stall-free scheduling (SARATHI-Serve):

- a build runs in a build lane of its own (a small `TransformerState` beside the engine's), `chunk`
  prompt positions per lane per forward, or half that when only a half forward fits what is left of
  the period, or when no lane needs more (64 and 32: beside 63 live 7B sessions on an H200, 8 x 32
  forwards left a period's time unused and 8 x 64 ones alone did not fill its tail; measured in
  docs/performance.md); the lanes in use advance in the same forward, so several new characters
  are served together (first come, lowest free lane);
- a forward covers lanes [0, b) only, b a power of two: one build alone costs a 1-lane forward, not
  an 8-lane one; when the full forward does not fit in what is left of the period, the lower lanes
  (the earlier builds) advance alone;
- the real-time loop gives the builder only what is left of each 80 ms period after the tick, and an
  operation runs only when its measured cost fits (`run(budget_s)`), so a tick is never late for it;
- every shape is fixed (b lanes x C positions, a power-of-two attention window; voices padded
  to whole `VOICE_BUCKET_FRAMES` buckets), so on a GPU each one is a CUDA graph captured at start-up
  (`warm_up`): the first build after start-up costs what the tenth does, and encoding a voice costs
  about a millisecond of the engine thread;
- a lane's ring holds the longest prompt a character can have plus one chunk (or the context plus a
  chunk, when the context is shorter): a chunk never overwrites a row its own queries still see, and
  prompts longer than the context wrap as the reference's one-frame-a-step cache does.

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
    Prefix, PromptEmbedder, PromptFrames, SpecialCodes, Voice, VoiceEncoder, prompt_frames, prompt_ring,
    special_codes,
)
from .step import capture_graph, window_for


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
    def left(self) -> int:
        return self.length - self.done

    @property
    def length(self) -> int:
        return self.x.shape[0]

    @property
    def length_frames(self) -> int:
        return self.frames.tokens.shape[1]


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
    def __init__(self, model: LoadedModel, gen: Generator, lanes: int = 8, chunk: int = 64,
                 use_graphs: bool | None = None, max_wait_s: float = 1.0, longest: int | None = None):
        """`longest`: the most prompt positions a character can have (None: any, the lanes then
        keep a whole context); a longer prompt that the context would not wrap is refused."""
        self.model, self.gen = model, gen
        self.lanes, self.chunk = lanes, chunk
        self.max_wait_s = max_wait_s  # a build that got no time for this long runs one operation anyway
        lm = model.lm
        self.context = lm.transformer.context
        self.longest = self.context if longest is None else min(longest, self.context)
        self.capacity = self.longest + chunk
        device = model.device
        self.device = device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        dtype = next(p for p in lm.transformer.parameters() if p.is_floating_point()).dtype
        self.state = lm.transformer.init_state(lanes, device, dtype, capacity=self.capacity)
        self.sizes = sorted({min(1 << i, lanes) for i in range(lanes.bit_length() + 1)})  # forwards over lanes [0, b)
        self._heads = {b: self.state.head(b) for b in self.sizes}
        self.chunk_sizes = (chunk, chunk // 2) if chunk >= 2 else (chunk,)  # positions per lane per forward
        self.x_in = torch.zeros(lanes, chunk, model.config.lm.dim, device=device, dtype=dtype)  # [lanes, C, dim]
        self.active = torch.zeros(lanes, dtype=torch.bool, device=device)
        self.out = torch.zeros_like(self.x_in)  # [lanes, C, dim] transformer output
        # All graphs share one memory pool: they replay one after another on the engine thread.
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}  # (b, C, window) -> graph
        self.voices = VoiceEncoder(model.mimi, self.use_graphs, self._pool)
        self.embedder = PromptEmbedder(model, gen, self.longest, self.use_graphs, self._pool)
        self._queue: collections.deque[_Job] = collections.deque()
        self._lane_jobs: list[_Job | None] = [None] * lanes
        self._lock = threading.Lock()
        self._special: SpecialCodes | None = None
        self.chunk_costs = {(b, C): Cost(0.005) for b in self.sizes for C in self.chunk_sizes}  # per forward shape
        self.prepare_cost = Cost(0.005)
        # (op, jobs or lanes, start, seconds, positions per lane: 0 for a prepare)
        self.log: collections.deque[tuple[str, int, float, float, int]] = collections.deque(maxlen=128)
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
        self.chunk_costs = {b: Cost(c.recent[-1]) for b, c in self.chunk_costs.items()}
        self.prepare_cost = Cost(self.prepare_cost.recent[-1])

    @property
    def pending(self) -> int:
        """Builds queued or in progress."""
        with self._lock:
            return len(self._queue) + sum(j is not None for j in self._lane_jobs)

    # --- the engine thread ----------------------------------------------------------------------
    def run(self, budget_s: float | None = None, on_finished=None) -> list[tuple[PromptRequest, Prefix | BaseException]]:
        """Advances the builds by whole operations (preparing jobs; one chunk of the lanes in use,
        or of the lower ones when that is what fits) while their measured cost fits in `budget_s`
        (None: until every build is done). Returns the builds that finished (with their prefix, or
        the error that failed them); or, with `on_finished`, hands them to it right after the
        operation that finished them (the engine installs them at once, within the same budget)."""
        finished: list[tuple[PromptRequest, Prefix | BaseException]] = []
        start = time.perf_counter()
        forced = False

        def deliver() -> None:
            if on_finished is not None and finished:
                done = finished[:]
                finished.clear()
                on_finished(done)

        def fits(cost: Cost, times: int = 1) -> bool:
            nonlocal forced
            if budget_s is None:
                return True
            now = time.perf_counter()
            if now - start + times * cost.estimate <= budget_s:
                return True
            if times > 1:  # a forced operation is a single one
                return False
            # Starved (a machine too busy to leave room for an operation): once nothing moved for
            # `max_wait_s`, one operation per call goes anyway until the builds are done, so new
            # characters still start (late ticks are made up by the loop's catch-up).
            if not forced and (self._starving or now - self._last_progress > self.max_wait_s):
                forced = self._starving = True
                return True
            return False

        while True:
            free = [lane for lane, job in enumerate(self._lane_jobs) if job is None]
            if free and self._queue:  # as many queued builds as there are free lanes and time
                n = next((n for n in range(min(len(free), len(self._queue)), 0, -1) if fits(self.prepare_cost, n)), 0)
                if not n:
                    break
                with self._lock:
                    jobs = [self._queue.popleft() for _ in range(n)]
                self._timed(self.prepare_cost, "prepare", n, self._prepare, list(zip(jobs, free)), finished)
                deliver()
                continue
            used = [lane for lane, job in enumerate(self._lane_jobs) if job is not None]
            if not used:
                self._starving = False  # nothing left to build: waiting counts from now on
                self._last_progress = time.perf_counter()
                break
            # Every lane in use if that fits, else the widest forward that fits and moves a build;
            # a whole chunk if it fits and some lane needs it, else half of one.
            widest = next(b for b in self.sizes if b > used[-1])
            shape = next(((b, C) for b in reversed(self.sizes) if used[0] < b <= widest
                          for C in self._useful(b) if fits(self.chunk_costs[(b, C)])), None)
            if shape is None:
                break
            self._timed(self.chunk_costs[shape], "chunk", shape[0], self._chunk, *shape, finished, positions=shape[1])
            deliver()
        return finished

    def _useful(self, b: int) -> tuple[int, ...]:
        """The forward lengths worth running over lanes [0, b), longest first: half a chunk alone
        when no lane there has more than that left."""
        most = max(job.left for job in self._lane_jobs[:b] if job is not None)
        return tuple(C for C in self.chunk_sizes if C == self.chunk_sizes[-1] or most > C // 2)

    def _timed(self, cost: Cost, op: str, units: int, fn, *args, positions: int = 0) -> None:
        """Runs one operation (of `units` jobs or lanes) to its end on the GPU; `cost` learns its
        time per unit for a prepare, per forward for a chunk."""
        t0 = time.perf_counter()
        fn(*args)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        cost.add((now - t0) / (units if op == "prepare" else 1))
        self.log.append((op, units, t0, now - t0, positions))
        self._last_progress = now

    @torch.inference_mode()
    def _prepare(self, jobs: list[tuple[_Job, int]], finished: list) -> None:
        """Each job's voice codes (its sample encoded, unless it is a preset or came encoded),
        prompt frames and input embeddings (every job's in one embedding pass), and its lane."""
        ready = []
        with fused.eager():
            voices = self.voices.encode_many([job.request for job, _ in jobs])
            for (job, lane), voice in zip(jobs, voices):
                request = job.request
                try:
                    if isinstance(voice, BaseException):
                        raise voice
                    job.frames = prompt_frames(voice, request.text_tokens, self.special, self.model)
                    if job.length_frames > self.longest and self.longest < self.context:
                        raise ValueError(f"the prompt takes {job.length_frames} frames, more than the "
                                         f"{self.longest} a character can have")
                    ready.append((job, lane))
                except Exception as exc:  # this character fails; nothing else is touched
                    finished.append((request, exc))
            if not ready:
                return
            for (job, lane), x in zip(ready, self.embedder.embed([j.frames for j, _ in ready])):
                job.x, job.lane, job.done = x, lane, 0
                self.state.position[lane] = 0  # rows past the position are invisible: no clearing needed
                self._lane_jobs[lane] = job

    @torch.inference_mode()
    def _chunk(self, b: int, C: int, finished: list) -> None:
        """One forward of lanes [0, b): each of them with a build advances C positions."""
        active = torch.zeros(b, dtype=torch.bool)
        seen = 0
        for lane, job in enumerate(self._lane_jobs[:b]):
            if job is None:
                continue
            n = min(C, job.left)
            self.x_in[lane, :n] = job.x[job.done : job.done + n]
            self.x_in[lane, n:C].zero_()
            active[lane] = True
            seen = max(seen, job.done + C)
        self.active[:b].copy_(active, non_blocking=True)
        window = window_for(seen, self.capacity)
        if self.use_graphs:
            self._graph(b, C, window).replay()
        else:
            self._forward(b, C, window)
        self.chunks_run += 1
        for lane, job in enumerate(self._lane_jobs[:b]):
            if job is None:
                continue
            last = job.left - 1  # the prompt's last position, in this forward's output if it ends here
            job.done += C
            if job.done >= job.length:
                self._lane_jobs[lane] = None
                try:
                    finished.append((job.request, self._finish(job, lane, last)))
                except Exception as exc:
                    finished.append((job.request, exc))

    def _forward(self, b: int, C: int, window: int) -> None:
        x = self.x_in[:b, :C]  # [b, C, dim]
        self.out[:b, :C].copy_(self.model.lm.transformer.step(x, self._heads[b], self.active[:b], window))

    def _finish(self, job: _Job, lane: int, last: int) -> Prefix:
        """The lane's cache rows of the last min(F, context) positions, in position order, and the
        last position's hidden state and text logits (`last`: its index in the forward's output)."""
        F = job.length
        with fused.eager():
            hidden, text_logits = self.model.lm.text_head(self.out[lane : lane + 1, last : last + 1])
        n = min(F, self.context)
        if F <= self.capacity:  # position p in row p: one gathering copy per tensor
            keys = torch.stack([c.keys[lane, :, F - n : F] for c in self.state.layers])  # [L, H, n, D]
            values = torch.stack([c.values[lane, :, F - n : F] for c in self.state.layers])
        else:  # the ring wrapped (a prompt longer than the context)
            rows = torch.remainder(torch.arange(F - n, F, device=self.device), self.capacity)
            keys = torch.stack([c.keys[lane].index_select(1, rows) for c in self.state.layers])
            values = torch.stack([c.values[lane].index_select(1, rows) for c in self.state.layers])
        ring = prompt_ring(job.frames, self.gen).to(self.device)
        return Prefix(keys, values, ring, hidden[0, 0], text_logits[0, 0], torch.tensor(F))

    def _graph(self, b: int, C: int, window: int) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get((b, C, window))
        if graph is None:
            saved = self.active.clone()
            self.active.zero_()  # warm up and capture with every lane inactive: no state changes
            position = self.state.position.clone()
            with torch.inference_mode():
                graph, _ = capture_graph(lambda: self._forward(b, C, window), self.device, warmups=2, pool=self._pool)
            self.active.copy_(saved)
            self.state.position.copy_(position)
            self._graphs[(b, C, window)] = graph
        return graph

    def warm_up(self, max_voice_frames: int) -> None:
        """Everything a build runs, at every shape it can take, before the first build: each
        (lanes, positions, attention window) graph, the voice encoder's graph of every bucket; and
        a first cost of each forward shape (its widest window: an upper bound)."""
        if self.use_graphs:
            for b, C in self.chunk_costs:
                window = 0
                while window < self.capacity:
                    window = window_for(window + 1, self.capacity)
                    self._graph(b, C, window)
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self._graphs[(b, C, window)].replay()
                torch.cuda.synchronize(self.device)
                self.chunk_costs[(b, C)] = Cost(time.perf_counter() - t0)
            with fused.eager():
                self.voices.warm_up(max_voice_frames)
                self.embedder.warm_up()
            torch.cuda.synchronize(self.device)


def build_prefix(model: LoadedModel, gen: Generator, frames: PromptFrames, chunk: int = 64) -> Prefix:
    """The prompt of `frames` built now, in the calling thread, by the engine's own chunked
    procedure (tools and tests; the engine builds between ticks instead)."""
    builder = PrefixBuilder(model, gen, lanes=1, chunk=chunk, use_graphs=False)
    job = _Job(PromptRequest("", frames.voice.name, []))
    with torch.inference_mode():
        job.frames, job.x = frames, builder.embedder.embed([frames])[0]
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

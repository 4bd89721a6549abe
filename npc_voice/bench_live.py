"""Benchmarks inside the real-time loop: hot swaps and new characters while live conversations run.

Live sessions are aged to a full context (the attention reads as many KV rows as after 4 minutes of
conversation), the `EngineLoop` runs at 12.5 Hz as in the server, and what is reported is what a
player would notice: the slowest tick, ticks that ended late, frame indexes that skipped, frames a
live session got against the wall clock, and how long a new or switched character took.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from .bench import peak_memory_gb
from .engine.session import percentile
from .model.config import FRAME_SECONDS
from .model.loading import LoadedModel


class _LiveEngine:
    """An engine with `live` aged sessions (plus `spare` free slots) and a listener that records
    every frame's index and arrival time."""

    def __init__(self, model: LoadedModel, live: int, spare: int, context_fill: int | None = None, **engine_args):
        from .engine import Engine

        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        self.engine = engine = Engine(model, slots=live + spare, **engine_args)
        self.startup_s = time.perf_counter() - t0
        self.frames: dict[str, list[tuple[int, float]]] = {}
        self.base = build_personas(model, 1, seed=99)[0]
        self.sessions = [engine.open(self.base, seed=i, listener=self.listener) for i in range(live)]
        engine.build(None)
        self.fill = min(context_fill or engine.step.capacity, engine.step.capacity) - 2
        for s in self.sessions:  # aged: as after minutes of conversation (the attention reads `fill` rows)
            engine.state.temporal.position[s.slot] = self.fill
            engine.state.offset[s.slot] = self.fill
            s.prefix_length = self.fill
        self.sync()

    def listener(self, ev) -> None:
        self.frames.setdefault(ev.session_id, []).append((ev.frame, time.perf_counter()))

    def window(self, loop, ticks0: int, overruns0: int, t_start: float, counts0: dict[str, int]) -> dict:
        """What the live sessions saw since (ticks0, overruns0, t_start, their frame counts then)."""
        n_ticks = self.engine.ticks - ticks0
        ticks = list(loop.tick_ms)[-n_ticks:] if n_ticks else []
        elapsed = time.perf_counter() - t_start
        got = [len(self.frames.get(s.id, [])) - counts0[s.id] for s in self.sessions]
        skips = sum(1 for s in self.sessions for a, b in zip(self.frames[s.id], self.frames[s.id][1:])
                    if b[0] not in (a[0] + 1, 0))  # 0: a switched character starts its own count
        return {"tick_ms_p50": round(percentile(ticks, 0.5), 2),
                "tick_ms_p99": round(percentile(ticks, 0.99), 2) if len(ticks) >= 100 else None,  # else: max
                "tick_ms_max": round(max(ticks, default=0.0), 2), "ticks": len(ticks),
                "tick_ms_each": [round(t, 1) for t in ticks] if len(ticks) <= 40 else None,
                "overruns": loop.overruns - overruns0, "frame_index_skips": skips,
                "live_frames_min": min(got), "live_frames_expected": round(elapsed / FRAME_SECONDS, 1)}

    def mark(self, loop) -> tuple[int, int, float, dict[str, int]]:
        return (self.engine.ticks, loop.overruns, time.perf_counter(),
                {s.id: len(self.frames.get(s.id, [])) for s in self.sessions})


def build_personas(model: LoadedModel, count: int = 8, seed: int = 0) -> list:
    """`count` different characters of the sizes games use: voices of 3-10 s and roles of 20-120
    words, every one a different length (so every prompt has its own shape)."""
    import numpy as np

    from .engine import Persona

    rate = model.config.mimi.sample_rate
    rng = np.random.default_rng(seed)
    words = "you keep the old mill by the river and you distrust strangers who ask about the flour".split()
    personas = []
    for i in range(count):
        seconds = 3.0 + 7.0 * i / max(1, count - 1)
        n_words = int(20 + 100 * ((i * 5) % count) / max(1, count - 1))
        t = np.arange(int(seconds * rate)) / rate
        f0 = rng.uniform(90, 260)
        voice = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        voice += 0.02 * rng.standard_normal(t.shape)
        role = " ".join(words[(i + j) % len(words)] for j in range(n_words))
        personas.append(Persona(role=f"Your name is Npc{seed}x{i}. {role}.", name=f"npc{seed}-{i}",
                                voice_samples=voice))
    return personas


def bench_builds(model: LoadedModel, live: int, new: int = 8, rounds: int = 2, context_fill: int | None = None,
                 settle_s: float = 1.0, build_margin: float = 0.002, **engine_args) -> list[dict]:
    """New characters while `live` conversations run in the real-time `EngineLoop`: `new` uncached
    characters are opened at the same instant from `new` threads, `rounds` times (the first round is
    the first build after start-up). Reports, per round, the ticks while the builds ran (p50, p99,
    max, overruns), each new character's first frame after its `open`, and whether any live
    session fell behind real time or skipped a frame index. `build_margin` (the loop's) and
    `engine_args` (`build_chunk`, `build_lanes`) are there to compare scheduling choices."""
    from .engine import EngineLoop

    device = model.device
    bench = _LiveEngine(model, live, new, context_fill, **engine_args)
    sync = bench.sync
    engine, frames, listener, sessions = bench.engine, bench.frames, bench.listener, bench.sessions
    fill, startup_s, base = bench.fill, bench.startup_s, bench.base
    loop = EngineLoop(engine, build_margin=build_margin).start()
    rows = []
    try:
        time.sleep(settle_s)
        for r in range(rounds):
            personas = build_personas(model, new, seed=r)
            opened: list = [None] * new
            barrier = threading.Barrier(new + 1)
            starts, returned, installed = [0.0] * new, [0.0] * new, [0.0] * new

            def open_one(i: int) -> None:
                barrier.wait()
                starts[i] = time.perf_counter()
                opened[i] = engine.open(personas[i], seed=1000 + i, listener=listener)
                returned[i] = time.perf_counter()
                opened[i].started.add_done_callback(lambda _: installed.__setitem__(i, time.perf_counter()))

            engine.builder.log.clear()
            installs_before = len(engine.install_ms)

            threads = [threading.Thread(target=open_one, args=(i,)) for i in range(new)]
            for th in threads:
                th.start()
            barrier.wait()
            mark = bench.mark(loop)
            for th in threads:
                th.join()
            deadline = time.perf_counter() + 20.0
            while time.perf_counter() < deadline and not all(s is not None and s.id in frames for s in opened):
                time.sleep(0.01)
            time.sleep(0.3)
            firsts = sorted((frames[s.id][0][1] - starts[i]) * 1000 for i, s in enumerate(opened) if s.id in frames)
            # Where each new character's time went (ms after its open): the open call itself (the
            # voice read and normalised on the caller's thread), its install, its first frame.
            order = sorted(range(new), key=lambda i: installed[i])
            steps = [{"open": round((returned[i] - starts[i]) * 1000, 1),
                      "installed": round((installed[i] - starts[i]) * 1000, 1),
                      "first_frame": round((frames[opened[i].id][0][1] - starts[i]) * 1000, 1)
                      if opened[i].id in frames else None} for i in order]
            errors = [repr(s.started.exception())[:300] for s in opened
                      if s.started.done() and not s.started.cancelled() and s.started.exception() is not None]
            rows.append({
                "what": "builds", "round": r, "live": live, "new": new, "context_fill": fill,
                "startup_s": round(startup_s, 1),
                "prompt_frames": sorted(engine.cache.lookup(p.prompt_key()).length for p in personas
                                        if engine.cache.lookup(p.prompt_key()) is not None),
                "first_frame_ms_p50": round(percentile(firsts, 0.5), 1),
                "first_frame_ms_max": round(max(firsts, default=-1.0), 1), "errors": errors,
                "loop_error": repr(loop.error) if loop.error is not None else None,
                "first_frame_ms": [round(f, 1) for f in firsts], "started": len(firsts),
                **bench.window(loop, *mark),
                "per_character_ms": steps,
                "voice_graphs": len(engine.builder.voices._graphs),
                "voice_graph_error": repr(engine.builder.voices.error) if engine.builder.voices.error else None,
                "build_chunks": engine.builder.chunks_run,
                "install_ms": [round(x, 1) for x in list(engine.install_ms)[installs_before:]],
                # every build operation of the round: (op, jobs or lanes of the forward, ms after the
                # opens, ms, positions per lane)
                "build_ops": [(op, lanes, round((at - min(starts)) * 1000, 1), round(sec * 1000, 1), positions)
                              for op, lanes, at, sec, positions in engine.builder.log],
                "peak_memory_gb": round(peak_memory_gb(device), 2),
            })
            for s in opened:
                engine.close(s)
            time.sleep(0.5)
    finally:
        loop.stop()
    if loop.error is not None:
        raise loop.error
    # Where cached prompts live: installing one from pinned host memory vs from GPU memory.
    prefix = engine.cache.lookup(base.prompt_key())
    placements = {"host": prefix.to("cpu"), "pinned": prefix.to("cpu", pin=device.type == "cuda"),
                  "device": prefix.to(device)}
    for where, p in placements.items():
        times = []
        for _ in range(11):
            sync()
            t = time.perf_counter()
            engine.installer.install(sessions[0].slot, p, seed=0)
            sync()
            times.append((time.perf_counter() - t) * 1000)
        store = []  # copying a freshly built prefix (on the GPU) there (a background thread does it)
        for _ in range(3):
            t = time.perf_counter()
            placements["device"].to(device if where == "device" else "cpu", pin=where == "pinned" and device.type == "cuda")
            sync()
            store.append((time.perf_counter() - t) * 1000)
        rows.append({"what": "prefix_placement", "on": where, "prompt_frames": prefix.length,
                     "mb": round(prefix.nbytes / 1e6, 1), "install_ms_first": round(times[0], 2),
                     "install_ms_p50": round(statistics.median(times[1:]), 2),
                     "install_ms_max": round(max(times[1:]), 2), "copy_ms_max": round(max(store), 2)})
    return rows


@dataclass
class SwapResult:
    sessions: int
    context_fill: int  # KV rows filled per live session
    swaps: int  # of each kind
    prompt_frames: int  # of the cached character
    cached_install_ms_p50: float  # a cached character copied into a live slot, inside the loop
    cached_install_ms_max: float
    uncached_switch_ms_p50: float  # `switch` to a character never seen: built between ticks, installed
    uncached_switch_ms_max: float
    tick_ms_p50: float  # every tick while the swaps ran
    tick_ms_max: float  # the slowest of them
    overruns: int  # ticks that ended after their 80 ms slot (late frames for every session)
    frame_index_skips: int
    live_frames_min: int
    live_frames_expected: float
    peak_memory_gb: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def bench_swap(model: LoadedModel, sessions: int, swaps: int = 5, context_fill: int | None = None) -> SwapResult:
    """Hot swaps inside the real-time loop with `sessions` live, aged conversations: `swaps` times a
    switch to a cached character and `swaps` times to one never seen, one at a time."""
    from .engine import EngineLoop

    bench = _LiveEngine(model, sessions, 0, context_fill)
    engine = bench.engine
    loop = EngineLoop(engine).start()
    cached, uncached = [], []
    try:
        time.sleep(0.5)
        mark = bench.mark(loop)
        fresh = build_personas(model, swaps, seed=500)
        for i in range(swaps):
            for persona, into in ((bench.base, cached), (fresh[i], uncached)):
                n = len(engine.install_ms)
                t0 = time.perf_counter()
                engine.switch(bench.sessions[i % sessions], persona).result(timeout=30)
                if into is uncached:
                    into.append((time.perf_counter() - t0) * 1000)
                else:
                    into.extend(list(engine.install_ms)[n:])
                time.sleep(0.2)
        seen = bench.window(loop, *mark)
    finally:
        loop.stop()
    if loop.error is not None:
        raise loop.error
    return SwapResult(
        sessions, bench.fill, swaps, engine.cache.lookup(bench.base.prompt_key()).length,
        round(statistics.median(cached), 2), round(max(cached), 2),
        round(statistics.median(uncached), 1), round(max(uncached), 1),
        seen["tick_ms_p50"], seen["tick_ms_max"], seen["overruns"], seen["frame_index_skips"],
        seen["live_frames_min"], seen["live_frames_expected"], round(peak_memory_gb(model.device), 2))

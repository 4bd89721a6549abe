"""Benchmarks of one 80 ms tick (Mimi encode + LM step + Mimi decode for every slot of a batch), of hot
swaps, and of new characters built while live conversations run (`bench_builds`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .engine.engine import percentile
from .model.generator import Generator
from .model.loading import LoadedModel

FRAME_MS = 80.0


@dataclass
class TickResult:
    preset: str
    device: str
    dtype: str
    batch: int
    frames: int
    window: int  # KV rows each session attends to (the full context: the worst case)
    tick_p50_ms: float
    tick_p99_ms: float
    tick_mean_ms: float
    graphs: bool
    threads: int
    peak_memory_gb: float

    @property
    def realtime_factor(self) -> float:
        """How many times faster than real time one tick runs (> 1 keeps up)."""
        return FRAME_MS / self.tick_p50_ms

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self) | {"realtime_factor": round(self.realtime_factor, 2)}


def bench_tick(model: LoadedModel, batch: int, frames: int = 100, warmup: int = 10, seed: int = 0,
               context_fill: int | None = None) -> TickResult:
    """Times `frames` ticks of `batch` live slots (after `warmup` ticks), through the engine's
    batched step (CUDA graphs on a GPU). Attention reads `context_fill` KV rows per session
    (default: the whole context, as after 4 minutes of conversation)."""
    from .engine.step import BatchedStep

    device = model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = Generator(model.lm)
    step = BatchedStep(model, gen, gen.init_state(batch), model.mimi.init_state(batch, device))
    fill = context_fill or step.capacity
    rng = torch.Generator(device="cpu").manual_seed(seed)
    pcm = (0.1 * torch.randn(batch, model.mimi.frame_size, generator=rng)).numpy()
    active = torch.ones(batch, dtype=torch.bool).numpy()
    forced = torch.full((batch,), -1, dtype=torch.long).numpy()
    times = []
    for i in range(warmup + frames):
        t0 = time.perf_counter()
        step(pcm, active, forced, frames_seen=fill)  # ends with a host sync (the outputs)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    dtype = str(model.lm.text_linear.weight.dtype).removeprefix("torch.")
    if not isinstance(model.lm.text_linear, torch.nn.Linear):
        dtype = f"int8 weights, {dtype} compute"
    del step
    return TickResult(
        preset=model.config.name, device=str(device), dtype=dtype, batch=batch, frames=frames,
        window=min(fill, gen.cfg.context),
        tick_p50_ms=round(statistics.median(times), 3), tick_p99_ms=round(percentile(times, 0.99), 3),
        tick_mean_ms=round(statistics.fmean(times), 3), graphs=device.type == "cuda",
        threads=torch.get_num_threads(), peak_memory_gb=round(peak_memory_gb(device), 2),
    )


@dataclass
class SwapResult:
    prompt_frames: int
    build_ms: float  # one parallel forward over the whole prompt (a character not cached yet)
    install_p50_ms: float  # copying a cached prefix into a live slot (between two ticks)
    install_max_ms: float
    tick_with_swap_ms: float  # the tick that follows a swap, all other sessions included
    peak_memory_gb: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _demo_persona(model: LoadedModel, seconds: float = 5.0, role_words: int = 60):
    """A character of typical size: a 5 s voice and a role of about 60 words."""
    import numpy as np

    from .engine import Persona

    rate = model.config.mimi.sample_rate
    t = np.arange(int(seconds * rate)) / rate
    voice = 0.3 * np.sin(2 * np.pi * 190 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    role = " ".join(["You are the innkeeper of the Prancing Pony, friendly and a little nosy."] * (role_words // 12))
    return Persona(role=role, voice_samples=voice)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def bench_swap(model: LoadedModel, sessions: int, swaps: int = 10) -> SwapResult:
    """Opens `sessions` conversations, then switches one of them to another character `swaps`
    times while all of them keep ticking; times the build, the install and the tick around it."""
    from .engine import Engine

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engine = Engine(model, slots=sessions)
    persona = _demo_persona(model)
    start = time.perf_counter()
    prefix = engine.cache.get(persona)
    sync()
    build_ms = (time.perf_counter() - start) * 1000
    live = [engine.open(persona, seed=i) for i in range(sessions)]
    for _ in range(3):
        engine.tick()
    installs, ticks = [], []
    for i in range(swaps):
        engine.switch(live[i % sessions], persona)
        sync()
        start = time.perf_counter()
        engine.tick()  # applies the swap, then steps everyone
        sync()
        ticks.append((time.perf_counter() - start) * 1000)
        installs.append(engine.last_swap_ms)
    return SwapResult(prefix.length, round(build_ms, 2), round(statistics.median(installs), 3),
                      round(max(installs), 3), round(statistics.median(ticks), 2), round(peak_memory_gb(device), 2))


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
                 settle_s: float = 1.0) -> list[dict]:
    """New characters while `live` conversations run in the real-time `EngineLoop`: `new` uncached
    characters are opened at the same instant from `new` threads, `rounds` times (the first round is
    the first build after start-up). Live sessions are aged to `context_fill` KV rows (default: the
    full context, as after 4 minutes). Reports, per round, the ticks while the builds ran (p50, p99,
    max, overruns), each new character's first frame after its `open`, and whether any live
    session fell behind real time or skipped a frame index."""
    import threading

    from .engine import Engine, EngineLoop

    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    engine = Engine(model, slots=live + new)
    startup_s = time.perf_counter() - t0
    frames: dict[str, list[tuple[int, float]]] = {}

    def listener(ev) -> None:
        frames.setdefault(ev.session_id, []).append((ev.frame, time.perf_counter()))

    base = build_personas(model, 1, seed=99)[0]
    sessions = [engine.open(base, seed=i, listener=listener) for i in range(live)]
    engine.build(None)
    fill = min(context_fill or engine.step.capacity, engine.step.capacity) - 2
    for s in sessions:  # aged: as after minutes of conversation (the attention reads `fill` rows)
        engine.state.temporal.position[s.slot] = fill
        engine.state.offset[s.slot] = fill
        s.prefix_length = fill
    sync()
    loop = EngineLoop(engine).start()
    rows = []
    try:
        time.sleep(settle_s)
        for r in range(rounds):
            personas = build_personas(model, new, seed=r)
            opened: list = [None] * new
            first: dict[int, float] = {}
            barrier = threading.Barrier(new + 1)
            starts = [0.0] * new

            def open_one(i: int) -> None:
                barrier.wait()
                starts[i] = time.perf_counter()
                opened[i] = engine.open(personas[i], seed=1000 + i, listener=listener)

            threads = [threading.Thread(target=open_one, args=(i,)) for i in range(new)]
            for th in threads:
                th.start()
            overruns0, ticks0 = loop.overruns, engine.ticks
            barrier.wait()
            t_start = time.perf_counter()
            live_before = {s.id: len(frames.get(s.id, [])) for s in sessions}
            for th in threads:
                th.join()
            deadline = time.perf_counter() + 20.0
            while time.perf_counter() < deadline and not all(s is not None and s.id in frames for s in opened):
                time.sleep(0.01)
            time.sleep(0.3)
            t_end = time.perf_counter()
            n_ticks = engine.ticks - ticks0
            ticks = list(loop.tick_ms)[-n_ticks:] if n_ticks else []
            elapsed = t_end - t_start
            live_got = [len(frames.get(s.id, [])) - live_before[s.id] for s in sessions]
            skips = sum(1 for s in sessions for a, b in zip(frames[s.id], frames[s.id][1:]) if b[0] != a[0] + 1)
            firsts = sorted((frames[s.id][0][1] - starts[i]) * 1000 for i, s in enumerate(opened) if s.id in frames)
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
                "tick_ms_p50": round(percentile(ticks, 0.5), 2), "tick_ms_p99": round(percentile(ticks, 0.99), 2),
                "tick_ms_max": round(max(ticks, default=0.0), 2), "ticks": len(ticks),
                "overruns": loop.overruns - overruns0, "frame_index_skips": skips,
                "live_frames_min": min(live_got), "live_frames_expected": round(elapsed / 0.08, 1),
                "build_chunks": engine.builder.chunks_run,
                "chunk_ms_recent_max": round(engine.builder.chunk_cost.estimate * 1000, 2),
                "install_ms_max": round(max(engine.install_ms, default=0.0), 2),
                "install_ms_recent": [round(x, 1) for x in list(engine.install_ms)[-new:]],
                "prepare_ms_recent": [round(x * 1000, 1) for x in engine.builder.prepare_cost.recent],
                "chunk_ms_recent": [round(x * 1000, 1) for x in engine.builder.chunk_cost.recent],
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
    from .engine.prompt import install_prefix

    for where, p in placements.items():
        times = []
        for _ in range(11):
            sync()
            t = time.perf_counter()
            install_prefix(engine.gen, engine.state, sessions[0].slot, p, seed=0)
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

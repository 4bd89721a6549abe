"""Benchmarks of one 80 ms tick: Mimi encode + LM step + Mimi decode for every slot of a batch."""

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
    return Persona(role=role, voice_samples=tuple(voice.astype(np.float32).tolist()))


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

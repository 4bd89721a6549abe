"""Benchmarks of one 80 ms tick: Mimi encode + LM step + Mimi decode for every slot of a batch (hot
swaps and new characters inside the real-time loop: `bench_live`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .engine.session import percentile
from .model.config import FRAME_MS
from .model.generator import Generator
from .model.loading import LoadedModel
from .model.quant import weights_kind



@dataclass
class TickResult:
    preset: str
    device: str
    dtype: str
    kv: str  # the conversations' KV cache: int8 / float8_e4m3fn, or the compute dtype (unquantized)
    batch: int
    frames: int
    fill: int  # KV rows filled per session (the full context: the worst case)
    window: int  # KV rows each session's attention reads (the power-of-two window covering `fill`)
    tick_p50_ms: float
    tick_p99_ms: float | None  # None when fewer than 100 ticks were timed (see tick_max_ms)
    tick_max_ms: float
    tick_mean_ms: float
    graphs: bool
    threads: int
    peak_memory_gb: float  # GPU: peak allocated during this row; CPU: the process's resident memory after it

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
    from .engine.step import BatchedStep, window_for

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
    dtype = str(model.dtype).removeprefix("torch.")
    if (weights := weights_kind(model.lm)) != "bf16":
        dtype = f"{weights} weights, {dtype} compute"
    capacity = step.capacity
    del step
    return TickResult(
        preset=model.config.name, device=str(device), dtype=dtype,
        kv=str(model.lm.kv_dtype or model.dtype).removeprefix("torch."), batch=batch, frames=frames,
        fill=min(fill, capacity), window=window_for(fill, capacity),
        tick_p50_ms=round(statistics.median(times), 3),
        tick_p99_ms=round(percentile(times, 0.99), 3) if len(times) >= 100 else None,
        tick_max_ms=round(max(times), 3),
        tick_mean_ms=round(statistics.fmean(times), 3), graphs=device.type == "cuda",
        threads=torch.get_num_threads(), peak_memory_gb=round(peak_memory_gb(device), 2),
    )


def peak_memory_gb(device: torch.device) -> float:
    """GPU: the peak allocated since the last `torch.cuda.reset_peak_memory_stats`. CPU: the process's
    resident memory now (Linux), since a process-wide peak would mix every row measured so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9

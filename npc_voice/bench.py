"""Benchmarks of one 80 ms tick: Mimi encode + LM step + Mimi decode for every slot of a batch."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

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
    tick_p50_ms: float
    tick_p99_ms: float
    encode_p50_ms: float
    lm_p50_ms: float
    decode_p50_ms: float
    threads: int

    @property
    def realtime_factor(self) -> float:
        """How many times faster than real time one tick runs (> 1 keeps up)."""
        return FRAME_MS / self.tick_p50_ms

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self) | {"realtime_factor": round(self.realtime_factor, 2)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@torch.inference_mode()
def bench_tick(model: LoadedModel, batch: int, frames: int = 100, warmup: int = 10, seed: int = 0) -> TickResult:
    """Times `frames` ticks of `batch` live slots (after `warmup` ticks)."""
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = Generator(model.lm)
    gen_state = gen.init_state(batch)
    mimi_state = model.mimi.init_state(batch, device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    pcm = (0.1 * torch.randn(batch, 1, model.mimi.frame_size, generator=g)).to(device)
    times: dict[str, list[float]] = {"tick": [], "encode": [], "lm": [], "decode": []}
    for i in range(warmup + frames):
        sync()
        t0 = time.perf_counter()
        codes = model.mimi.encode_step(pcm, mimi_state.encoder)
        sync()
        t1 = time.perf_counter()
        out = gen.step(gen_state, codes)
        sync()
        t2 = time.perf_counter()
        # The first frame's codebook 0 is the initial token: decode something valid in its place.
        model.mimi.decode_step(out.audio.clamp(0, model.mimi.cardinality - 1), mimi_state.decoder)
        sync()
        t3 = time.perf_counter()
        if i >= warmup:
            for name, dt in (("tick", t3 - t0), ("encode", t1 - t0), ("lm", t2 - t1), ("decode", t3 - t2)):
                times[name].append(dt * 1000)
    dtype = str(model.lm.text_linear.weight.dtype).removeprefix("torch.")
    return TickResult(
        preset=model.config.name, device=str(device), dtype=dtype, batch=batch, frames=frames,
        tick_p50_ms=round(statistics.median(times["tick"]), 3),
        tick_p99_ms=round(_percentile(times["tick"], 0.99), 3),
        encode_p50_ms=round(statistics.median(times["encode"]), 3),
        lm_p50_ms=round(statistics.median(times["lm"]), 3),
        decode_p50_ms=round(statistics.median(times["decode"]), 3),
        threads=torch.get_num_threads(),
    )

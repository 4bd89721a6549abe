"""The client's sample rate (16, 24 or 48 kHz) <-> the model's 24 kHz, as streams (libsoxr), and
exactly one 80 ms frame per binary message towards the client (docs/protocol.md, "Frames").

Pure computation, no I/O: a `ServerSession` owns one converter each way per live session.
"""

from __future__ import annotations

import functools

import numpy as np

from ..audio import float_to_pcm16, pcm16_to_float
from .messages import MODEL_RATE, frame_samples


class InputConverter:
    """Client PCM16 at `rate` -> float32 at 24 kHz, as a stream (no clicks between chunks)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream = None
        if rate != MODEL_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, pcm16: np.ndarray) -> np.ndarray:
        x = pcm16_to_float(pcm16)
        return x if self._stream is None else self._stream.resample_chunk(x)


@functools.lru_cache(maxsize=None)
def _resampler_lag(from_rate: int, to_rate: int, chunk: int) -> int:
    """The most a soxr stream's output falls behind chunk-by-chunk (it works in blocks): the zeros
    an `OutputFramer` starts with so that every frame it emits is whole."""
    import soxr

    stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="HQ")
    target = chunk * to_rate // from_rate
    got = worst = 0
    for k in range(1, 101):
        got += stream.resample_chunk(np.zeros(chunk, dtype=np.float32)).shape[0]
        worst = max(worst, k * target - got)
    return worst


class OutputFramer:
    """NPC frames (1920 float32 at 24 kHz) -> exactly one frame of PCM16 at the client's rate each.

    At 24 kHz this is only the 16-bit conversion. At 16/48 kHz, libsoxr's stream emits samples in
    blocks, so the framer starts with as many zeros as the stream can fall behind (about 35 ms) and
    from then on every call returns one whole frame; should the stream ever fall further behind,
    the frame is padded with zeros (counted in `underruns`)."""

    def __init__(self, rate: int):
        self.rate, self.size = rate, frame_samples(rate)
        self.underruns = 0
        self._stream = None
        if rate != MODEL_RATE:
            import soxr

            self._stream = soxr.ResampleStream(MODEL_RATE, rate, 1, dtype="float32", quality="HQ")
            self._fifo = np.zeros(_resampler_lag(MODEL_RATE, rate, frame_samples(MODEL_RATE)), dtype=np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return float_to_pcm16(pcm)
        fifo = np.concatenate([self._fifo, self._stream.resample_chunk(np.asarray(pcm, dtype=np.float32))])
        if fifo.shape[0] < self.size:
            self.underruns += 1
            fifo = np.concatenate([np.zeros(self.size - fifo.shape[0], dtype=np.float32), fifo])
        out, self._fifo = fifo[: self.size], fifo[self.size:]
        return float_to_pcm16(out)

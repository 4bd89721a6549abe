"""Audio utilities: reading any common file, resampling, loudness, 16-bit PCM.

Well-kept libraries do the solved parts: libsndfile (`soundfile`) reads and writes WAV/FLAC/OGG,
libsoxr (`soxr`) resamples, `pyloudnorm` measures ITU-R BS.1770 loudness as the reference does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .model.config import SAMPLE_RATE  # the default rate here

VOICE_LUFS = -24.0  # the reference normalises voice prompts to -24 LUFS


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, or out of range."""


@dataclass
class Audio:
    samples: np.ndarray  # float32 [channels, frames] in [-1, 1]
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.samples.shape[-1] / self.sample_rate

    @property
    def channels(self) -> int:
        return self.samples.shape[0]


def read_audio(source: str | Path | bytes | BinaryIO) -> Audio:
    """Reads a WAV, FLAC or OGG file (a path, bytes or a file object), any rate and channel count."""
    import soundfile

    name = str(source) if isinstance(source, (str, Path)) else "audio data"
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        samples, rate = soundfile.read(data, dtype="float32", always_2d=True)  # [frames, channels]
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        # libsndfile's own words, without the repr of a file object ("Error opening <_io.BytesIO ...>")
        detail = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(f"cannot read {name}: {detail} (expected WAV, FLAC or OGG)") from None
    except FileNotFoundError:
        raise AudioError(f"cannot read {name}: no such file") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{name} holds no audio")
    return Audio(np.ascontiguousarray(samples.T), int(rate))


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """High-quality resampling of float32 [..., frames] (libsoxr)."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    import soxr

    flat = samples.reshape(-1, samples.shape[-1])
    out = np.stack([soxr.resample(ch, from_rate, to_rate, quality="HQ") for ch in flat])
    return out.reshape(*samples.shape[:-1], out.shape[-1]).astype(np.float32)


def to_mono(audio: Audio, mode: str = "mix") -> np.ndarray:
    """float32 [frames]: the channels' mean ("mix") or the first channel ("first", the reference's
    choice for voice prompts)."""
    if mode == "first" or audio.channels == 1:
        return audio.samples[0]
    return audio.samples.mean(axis=0)


def load_mono(source: str | Path | bytes | BinaryIO, rate: int = SAMPLE_RATE, mode: str = "mix") -> np.ndarray:
    """Any audio file -> float32 mono [frames] at `rate`."""
    audio = read_audio(source)
    return resample(to_mono(audio, mode), audio.sample_rate, rate)


def loudness(samples: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4); -inf for silence or clips under 0.4 s."""
    import pyloudnorm

    if samples.shape[-1] < int(0.4 * rate):
        return float("-inf")
    return float(pyloudnorm.Meter(rate).integrated_loudness(samples.astype(np.float64)))


def normalize_loudness(samples: np.ndarray, rate: int, target: float = VOICE_LUFS) -> np.ndarray:
    """Applies the gain that brings the clip to `target` LUFS, in float64 then float32, no limiter
    (as the reference does); silence is returned unchanged."""
    current = loudness(samples, rate)
    if not np.isfinite(current):
        return samples.astype(np.float32)
    gain = 10.0 ** ((target - current) / 20.0)
    return (samples.astype(np.float64) * gain).astype(np.float32)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16, as the reference writes WAV files: trunc(clip(x) * 32767)."""
    return np.trunc(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def pcm16_to_float(data: bytes | np.ndarray) -> np.ndarray:
    """Little-endian 16-bit PCM -> float32 in [-1, 1)."""
    ints = np.frombuffer(data, dtype="<i2") if isinstance(data, (bytes, bytearray, memoryview)) else data
    return ints.astype(np.float32) / 32768.0


def write_wav(target: str | Path | BinaryIO, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Writes mono float samples as a 16-bit PCM WAV file."""
    import soundfile

    soundfile.write(target, float_to_pcm16(np.asarray(samples).reshape(-1)), rate, subtype="PCM_16", format="WAV")


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    write_wav(buffer, samples, rate)
    return buffer.getvalue()

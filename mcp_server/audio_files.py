"""The audio rules of the MCP tools: base64 audio in, WAV out, and the one folder audio files may be
read from (symlinks resolved, so nothing outside it is ever read) and replies written to."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from npc_voice.audio import AudioError, float_to_pcm16, load_mono
from npc_voice.protocol import FRAME_SECONDS as FRAME_S, MODEL_RATE as RATE

from .conversations import UserError

MAX_AUDIO_BYTES = 16 << 20  # decoded base64 audio
REPLIES_DIR = "replies"  # audio_output="file" writes <audio folder>/replies/<session>.wav
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def decode_base64_audio(data: str, what: str = "audio_base64") -> bytes:
    data = data.strip()
    if data.startswith("data:") and "," in data:  # a data: URL
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64 (send the bytes of a WAV, FLAC or OGG file, base64-encoded)") \
            from None
    if not raw:
        raise UserError(f"{what} is empty")
    if len(raw) > MAX_AUDIO_BYTES:
        raise UserError(f"{what} is {len(raw)} bytes decoded; the limit is {MAX_AUDIO_BYTES} bytes")
    return raw


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    """16-bit PCM WAV of float samples: [n] (mono) or [n, channels]."""
    import soundfile

    pcm = float_to_pcm16(np.asarray(samples, dtype=np.float32))
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


class AudioFolder:
    """The allowed audio folder (`--audio-dir`; None: file paths are refused)."""

    def __init__(self, root: Path | str | None):
        self.root = Path(root).resolve() if root is not None else None

    def path(self, path: str) -> Path:
        """A path inside the allowed audio folder (symlinks resolved), else UserError."""
        if self.root is None:
            raise UserError("reading audio files is off: this MCP server has no allowed audio folder (start it with "
                            "--audio-dir DIR); send the audio as base64 instead")
        given = Path(path).expanduser()
        candidate = given if given.is_absolute() else self.root / given
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.root):
            raise UserError(f"refused: {path!r} is outside the allowed audio folder {self.root} (after resolving "
                            "symlinks); copy the file there or send it as base64")
        if not resolved.is_file():
            raise UserError(f"no audio file {path!r} in {self.root}")
        return resolved

    def voice_source(self, voice_preset: str | None, voice_file: str | None, voice_base64: str | None) -> tuple[str | None, Any]:
        """-> (preset name or None, sample source or None); exactly one of the three must be given."""
        given = [x for x in (voice_preset, voice_file, voice_base64) if x]
        if len(given) != 1:
            raise UserError("give exactly one voice: voice_preset (a PersonaPlex preset such as NATF2; see list_voices), "
                            "voice_file (a WAV/FLAC/OGG in the allowed audio folder) or voice_base64 (WAV/FLAC/OGG bytes, "
                            "base64; 3-10 s of clear speech is best)")
        if voice_preset:
            return voice_preset, None
        if voice_file:
            return None, self.path(voice_file)
        return None, decode_base64_audio(voice_base64 or "", "voice_base64")

    def read_clip(self, audio_base64: str | None, audio_file: str | None, limit_s: float) -> np.ndarray:
        if bool(audio_base64) == bool(audio_file):
            raise UserError("give exactly one of audio_base64 (a WAV/FLAC/OGG file, base64) or audio_file (a path in "
                            "the allowed audio folder)")
        source: Any = decode_base64_audio(audio_base64) if audio_base64 else self.path(audio_file or "")
        try:
            samples = load_mono(source, RATE)
        except AudioError as exc:
            raise UserError(f"unreadable audio: {exc}") from None
        seconds = samples.shape[0] / RATE
        if seconds > limit_s:
            raise UserError(f"the clip is {seconds:.1f} s long; the limit is {limit_s:.0f} s")
        if seconds < FRAME_S:
            raise UserError(f"the clip is {seconds * 1000:.0f} ms long: give at least 80 ms of audio")
        return samples

    def files(self, limit: int = 200) -> list[str]:
        """The audio files `path` accepts (a link whose target lies outside the folder is left out)."""
        files: list[str] = []
        if self.root is not None and self.root.is_dir():
            for p in sorted(self.root.rglob("*")):
                if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() and p.resolve().is_relative_to(self.root):
                    files.append(str(p.relative_to(self.root)))
                    if len(files) >= limit:
                        break
        return files

    def replies_dir(self) -> Path:
        """`<audio folder>/replies`, where replies are written with audio_output="file"."""
        if self.root is None:
            raise UserError('audio_output="file" needs an audio folder: start this MCP server with --audio-dir DIR '
                            '(or use audio_output="inline" or "none")')
        folder = self.root / REPLIES_DIR
        if not folder.resolve().is_relative_to(self.root):
            raise UserError(f"refused: {folder} leads outside the audio folder (a symlink?)")
        return folder

    def write_reply(self, name: str, samples: np.ndarray) -> Path:
        """Writes `replies/<name>.wav` whole (through a temporary file: a reader never sees half of it)."""
        folder = self.replies_dir()
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.wav"
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(wav_bytes(samples))
        tmp.replace(path)
        return path

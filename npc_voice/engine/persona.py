"""What a slot needs to become a character (a voice and a role), and the cache of built prompts."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from ..audio import load_mono
from ..model.generator import Generator, Sampling
from ..model.loading import LoadedModel
from .prompt import (
    Prefix, SpecialCodes, Voice, build_prefix, prompt_frames, special_codes, text_prompt_tokens,
    voice_from_preset, voice_from_samples,
)


@dataclass(frozen=True)
class Persona:
    """A character as the engine sees it: a voice (WAV/FLAC/OGG sample, or a PersonaPlex preset
    `.pt`), a role prompt, and sampling settings."""

    role: str
    voice_path: str | None = None  # audio sample or preset .pt
    voice_samples: tuple[float, ...] | None = None  # or raw 24 kHz mono samples (tests, generated voices)
    name: str = "npc"
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if (self.voice_path is None) == (self.voice_samples is None):
            raise ValueError("a persona needs exactly one voice: voice_path or voice_samples")

    def prompt_key(self) -> str:
        """A hash of everything the prompt prefix depends on: the voice's content and the role."""
        h = hashlib.sha256()
        if self.voice_path is not None:
            h.update(Path(self.voice_path).read_bytes())
        else:
            h.update(np.asarray(self.voice_samples, dtype=np.float32).tobytes())
        h.update(b"\0" + self.role.strip().encode())
        return h.hexdigest()[:32]

    def load_voice(self, model: LoadedModel) -> Voice:
        if self.voice_path is not None and self.voice_path.endswith(".pt"):
            return voice_from_preset(self.name, self.voice_path, model.config.lm.dim)
        if self.voice_path is not None:
            samples = load_mono(self.voice_path, model.config.mimi.sample_rate, mode="first")
        else:
            samples = np.asarray(self.voice_samples, dtype=np.float32)
        return voice_from_samples(self.name, samples, model.mimi)


def weights_fingerprint(model: LoadedModel) -> str:
    """Identifies the weights a prefix was computed with (config, source, and sizes of the files)."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    h.update(model.source.encode())
    source = Path(model.source)
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file():
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    h.update(str(model.lm.text_linear.weight.dtype).encode())
    return h.hexdigest()[:16]


class PrefixCache:
    """Built prompt prefixes: in memory (LRU, bounded in bytes) and optionally on disk (keyed by the
    persona's prompt hash and the weights' fingerprint). Thread-safe."""

    def __init__(self, model: LoadedModel, generator: Generator, max_bytes: int = 2 << 30,
                 directory: str | Path | None = None):
        self.model, self.gen = model, generator
        self.max_bytes = max_bytes
        self.directory = Path(directory) / weights_fingerprint(model) if directory else None
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self._special: SpecialCodes | None = None
        self.hits = self.misses = 0

    def special(self) -> SpecialCodes:
        if self._special is None:
            self._special = special_codes(self.model.mimi)
        return self._special

    def get(self, persona: Persona) -> Prefix:
        key = persona.prompt_key()
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        prefix = self._load(key) or self.build(persona)
        self._store(key, prefix)
        return prefix

    def build(self, persona: Persona) -> Prefix:
        self.misses += 1
        frames = prompt_frames(persona.load_voice(self.model), text_prompt_tokens(self.model, persona.role),
                               self.special(), self.model)
        return build_prefix(self.model, self.gen, frames)

    def _store(self, key: str, prefix: Prefix) -> None:
        with self._lock:
            self._entries[key] = prefix
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and sum(p.nbytes for p in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{key}.safetensors"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous().cpu() for k, v in vars(prefix).items()}, str(tmp))
                tmp.replace(path)  # atomic: a reader never sees half a file

    def _load(self, key: str) -> Prefix | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path), device=str(self.model.device))
            return Prefix(**tensors)
        except Exception:  # a damaged cache file is rebuilt, never fatal
            path.unlink(missing_ok=True)
            return None

    def __len__(self) -> int:
        return len(self._entries)


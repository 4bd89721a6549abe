"""What a slot needs to become a character (a voice and a role), and the cache of built prompts."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..audio import load_mono
from ..model.generator import Generator, Sampling
from ..model.loading import LoadedModel
from .build import PromptRequest
from .prompt import Prefix, normalized_voice, text_prompt_tokens, voice_from_preset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Persona:
    """A character as the engine sees it: a voice (WAV/FLAC/OGG sample, or a PersonaPlex preset
    `.pt`), a role prompt, and sampling settings."""

    role: str
    voice_path: str | None = None  # audio sample or preset .pt
    # or raw 24 kHz mono samples (inline voices, tests): any float array, kept as float32 bytes so that
    # a persona is cheap to pass, hash and compare (no Python float per sample)
    voice_samples: bytes | None = None
    name: str = "npc"
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if (self.voice_path is None) == (self.voice_samples is None):
            raise ValueError("a persona needs exactly one voice: voice_path or voice_samples")
        if self.voice_samples is not None and not isinstance(self.voice_samples, bytes):
            object.__setattr__(self, "voice_samples", np.asarray(self.voice_samples, dtype=np.float32).tobytes())

    @property
    def voice_array(self) -> np.ndarray | None:
        """The raw voice samples as float32 [N] (read-only), or None for a voice file."""
        return None if self.voice_samples is None else np.frombuffer(self.voice_samples, dtype=np.float32)

    def prompt_key(self) -> str:
        """A hash of everything the prompt prefix depends on: the voice's content and the role."""
        h = hashlib.sha256()
        if self.voice_path is not None:
            h.update(Path(self.voice_path).read_bytes())
        else:
            h.update(self.voice_samples)
        h.update(b"\0" + self.role.strip().encode())
        return h.hexdigest()[:32]

    def request(self, model: LoadedModel) -> PromptRequest:
        """What building this character's prompt needs, read and prepared on the caller's thread
        (the voice file decoded, resampled and loudness-normalised; the role tokenised). Raises
        `ValueError` / `AudioError` for a voice that cannot be used."""
        tokens = text_prompt_tokens(model, self.role)
        if self.voice_path is not None and self.voice_path.endswith(".pt"):
            return PromptRequest(self.prompt_key(), self.name, tokens,
                                 preset=voice_from_preset(self.name, self.voice_path, model.config.lm.dim))
        if self.voice_path is not None:
            samples = load_mono(self.voice_path, model.config.mimi.sample_rate, mode="first")
        else:
            samples = self.voice_array
        return PromptRequest(self.prompt_key(), self.name, tokens, samples=normalized_voice(samples, model.mimi))


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
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:16]


DEFAULT_CACHE_MB = 4096  # built prompts kept in memory (about 37 characters of 212 frames at 7B)


class PrefixCache:
    """Built prompt prefixes: in memory (LRU, bounded in bytes) and optionally on disk (keyed by the
    persona's prompt hash and the weights' fingerprint). On a GPU they stay in GPU memory by default
    (`on="device"`: where they are built, installed in ~6 ms at 7B), or go to host memory
    (`on="host"`: leaves GPU memory to conversation slots; a background thread copies each new one
    there, and installing it copies it back, ~15 ms). Host copies are pageable, not pinned: pinning
    memory while the engine runs stalled its ticks (H200: up to 428 ms), for a gain of a few
    milliseconds per install (docs/performance.md). Thread-safe; disk writes happen on a background
    thread, never on the engine's."""

    def __init__(self, model: LoadedModel, generator: Generator | None = None, max_bytes: int = DEFAULT_CACHE_MB << 20,
                 directory: str | Path | None = None, on: str = "device"):
        if on not in ("host", "device"):
            raise ValueError(f"prefix cache location must be 'host' or 'device', not {on!r}")
        self.model, self.gen = model, generator or Generator(model.lm)
        self.max_bytes, self.on = max_bytes, on
        self.directory = Path(directory) / weights_fingerprint(model) if directory else None
        self._device = model.device if on == "device" else torch.device("cpu")
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="npc-voice-prefix-disk")
        self.hits = self.misses = self.evictions = 0

    def lookup(self, key: str) -> Prefix | None:
        """The cached prefix of `key` (memory, then disk), counting a hit or a miss."""
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return prefix
        prefix = self._load(key)
        with self._lock:
            if prefix is None:
                self.misses += 1
                return None
            self.hits += 1
        return self._keep(key, prefix)

    def store(self, key: str, prefix: Prefix) -> Prefix:
        """Keeps a freshly built prefix as it is (on the GPU, where it was built, for its first
        installs); copying it to host memory (`on="host"`) and writing it to disk happen on a
        background thread, off the engine's. Returns the prefix."""
        with self._lock:
            self._put(key, prefix)
        self._writer.submit(self._settle, key, prefix)
        return prefix

    def _settle(self, key: str, prefix: Prefix) -> None:
        if self._device != prefix.keys.device:
            moved = prefix.to(self._device)
            with self._lock:
                if self._entries.get(key) is prefix:
                    self._put(key, moved)
            prefix = moved
        if self.directory is not None:
            self._write(key, prefix)

    def get(self, persona: Persona) -> Prefix:
        """The prefix of `persona`, built now in the calling thread if it is not cached (tools and
        tests; the engine builds between its ticks instead)."""
        key = persona.prompt_key()
        prefix = self.lookup(key)
        if prefix is None:
            from .build import build_request  # the engine's own chunked procedure

            prefix = self.store(key, build_request(self.model, self.gen, persona.request(self.model)))
        return prefix

    def _keep(self, key: str, prefix: Prefix) -> Prefix:
        prefix = prefix.to(self._device)
        with self._lock:
            self._put(key, prefix)
        return prefix

    def _put(self, key: str, prefix: Prefix) -> None:
        """(under the lock) Adds or replaces an entry, then evicts the least recently used."""
        old = self._entries.pop(key, None)
        self._bytes -= old.nbytes if old is not None else 0
        self._entries[key] = prefix
        self._bytes += prefix.nbytes
        while len(self._entries) > 1 and self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.evictions += 1

    def _write(self, key: str, prefix: Prefix) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{key}.safetensors"
            if not path.exists():
                # unique per process and thread: several servers may share the folder
                tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                save_file({k: v.contiguous().cpu() for k, v in vars(prefix).items()}, str(tmp))
                tmp.replace(path)  # atomic: a reader never sees half a file
        except OSError:
            log.exception("could not write the prompt cache file for %s", key)

    def flush(self) -> None:
        """Waits until every background copy and disk write queued so far is done."""
        self._writer.submit(lambda: None).result()

    def _load(self, key: str) -> Prefix | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            return Prefix(**load_file(str(path), device="cpu"))
        except Exception:  # a damaged cache file is rebuilt, never fatal
            path.unlink(missing_ok=True)
            return None

    def stats(self) -> dict[str, float | int | str]:
        with self._lock:
            lookups = self.hits + self.misses
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes, "on": self.on,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "hit_rate": round(self.hits / lookups, 3) if lookups else 0.0,
                    "directory": str(self.directory) if self.directory is not None else None}

    def __len__(self) -> int:
        return len(self._entries)

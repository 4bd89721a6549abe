"""What the MCP tools drive: the character store, the audio rules, and the conversations.

Two ways to run conversations:
- **embedded** (no `server_url`): one model and ONE `Engine` (one KV cache, `Settings.slots` slots)
  in this process (the tiny built-in model with random weights unless weights are configured).
  Talks, scenes and player sessions all are sessions of that engine, and only one thread steps it
  (mcp_server/driver.py): while the in-process `npc-voice serve` for players (`BackgroundServer`,
  started on demand) runs, its real-time `EngineLoop` ticks every 80 ms and a talk or scene is one
  more live session on it (so it takes real time); otherwise the `Driver` ticks back to back while
  a talk or scene is open. Either way a conversation is fed from its sessions' listeners (a talk's
  next input frame, a scene's NPC frame into the other NPC), so one code path serves both, and
  concurrent conversations each take free slots and progress together (the engine lock is only
  held while a conversation opens its sessions).
- **remote** (`server_url` set): a running `npc-voice serve` does the work through its websocket
  protocol (docs/protocol.md), in real time; player sessions are handed its URL and token.

Every error a user can cause is raised as `UserError` with a message that says what to do; the MCP
layer turns it into a tool error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import itertools
import json
import logging
import math
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import numpy as np

from npc_voice.audio import AudioError, float_to_pcm16, load_mono
from npc_voice.characters import (
    KNOWN_PRESETS, Character, CharacterError, ResolveError, installed_presets, open_store, resolve_persona,
)
from npc_voice.protocol import FRAME_SECONDS as FRAME_S, MODEL_RATE as RATE, frame_samples

log = logging.getLogger("mcp_server")

FRAME = frame_samples(RATE)  # 80 ms at 24 kHz
TICKS_PER_HOP = 5  # engine ticks per worker-thread hop: progress and cancellation are checked between hops
MAX_AUDIO_BYTES = 16 << 20  # decoded base64 audio
SEED_MAX = 2**31 - 2  # every tool's seed maximum (a scene's second NPC takes seed + 1; the protocol's limit is 2**31 - 1)
LEAD = 12  # a talk's input frames queued ahead of the engine (the engine buffers up to 2 s)
SAY_TAIL_FRAMES = 13  # frames after a said line's last token (about a second)
REPLIES_DIR = "replies"  # audio_output="file" writes <audio folder>/replies/<session>.wav

Progress = Callable[[float, float, str], Awaitable[None]]


class UserError(Exception):
    """A failure the caller can fix (unknown character, unreadable audio, server busy, ...)."""


class ServerBusy(UserError):
    pass


@dataclass
class Settings:
    characters: Path | None = None  # the character store (default: npc-voice's default folder)
    voices: Path | None = None  # preset voices folder (NAME.pt)
    audio_dir: Path | None = None  # the one folder audio files may be read from (None: no file paths)
    server_url: str | None = None  # a running `npc-voice serve` (ws://host:port); None: embedded engine
    token: str | None = None
    # the embedded engine
    weights: str | None = None
    preset: str | None = None
    device: str | None = None
    dtype: Any = None
    mimi_dtype: Any = None
    int8: bool = False
    context: int | None = None
    slots: int = 6  # the one engine's slots, shared by talks, scenes (two each) and player sessions
    player_slots: int | None = None  # deprecated and ignored: player sessions share `slots`
    player_host: str = "127.0.0.1"
    player_port: int = 0  # 0: any free port
    prefix_cache: str | None = None
    # limits
    busy_wait_s: float = 20.0  # how long a conversation waits to open its sessions before "server busy"
    max_clip_s: float = 60.0
    max_scene_s: float = 120.0

    @property
    def mode(self) -> str:
        return "remote" if self.server_url else "embedded"


# --- audio ------------------------------------------------------------------------------------------


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


# --- sessions ---------------------------------------------------------------------------------------


@dataclass
class Record:
    """A conversation this MCP server ran or handed out."""

    id: str
    kind: str  # "player", "talk", "say", "scene"
    characters: list[str]
    speakers: list[str] | None = None  # who words are attributed to (a character with itself: "id (A)", "id (B)")
    status: str = "running"  # running, finished, ended (stopped early by end_session), cancelled, failed, open
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    words: list[dict[str, Any]] = field(default_factory=list)  # {"speaker", "word", "start", "end"}
    audio: str | None = None  # what the audio holds
    error: str | None = None
    player: dict[str, Any] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def transcript(self) -> dict[str, Any]:
        by_speaker: dict[str, list[str]] = {}
        for w in self.words:
            by_speaker.setdefault(w["speaker"], []).append(w["word"])
        out: dict[str, Any] = {
            "session": self.id, "kind": self.kind, "characters": self.characters,
            "speakers": self.speakers or list(dict.fromkeys(self.characters)), "status": self.status,
            "seconds": round(self.seconds, 2),
            "text": {speaker: " ".join(ws) for speaker, ws in by_speaker.items()},
            "words": self.words,
        }
        if self.kind == "say":
            out["note"] = ("the NPC was given the line (forced into its text stream, one token every 3 frames) and "
                           "heard silence; the words are what its text stream carried")
        if self.kind == "talk":
            out["note"] = "only the NPC's words are transcribed (the input clip is not run through speech recognition)"
        if self.kind == "player":
            out["note"] = ("a player session streams to the game client, which receives the NPC's words as `text` "
                           "events; this server does not see them")
        if self.error:
            out["error"] = self.error
        return out

    def summary(self) -> dict[str, Any]:
        return {"session": self.id, "kind": self.kind, "characters": self.characters, "status": self.status,
                "seconds": round(self.seconds, 2), "words": len(self.words)}


def words_of(frames: list[tuple[int, str]], speaker: str, total_frames: int) -> list[dict[str, Any]]:
    """(frame, text piece) per frame -> words with start/end times: a piece with a leading space
    starts a word; a word ends where the next starts or the text stream falls silent."""
    from npc_voice.engine import FrameEvent
    from npc_voice.talk import words_from_frames

    texts = dict.fromkeys(range(total_frames), "")
    for frame, text in frames:
        if 0 <= frame < total_frames:
            texts[frame] += text
    if not texts:
        return []
    events = [FrameEvent(speaker, f, None, 0, texts[f]) for f in sorted(texts)]  # type: ignore[arg-type]
    return [{"speaker": speaker, "word": w.word, "start": round(w.start, 2), "end": round(w.end, 2)}
            for w in words_from_frames(events).words]


def scene_speakers(a: str, b: str) -> list[str]:
    """The names a scene's words are attributed to: the ids, or "id (A)" and "id (B)" for a character with itself."""
    return [f"{a} (A)", f"{b} (B)"] if a == b else [a, b]


def merge_words(*lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((w for ws in lists for w in ws), key=lambda w: (w["start"], w["speaker"]))


# --- the backend ------------------------------------------------------------------------------------


class Backend:
    """The state behind the MCP server: settings, store, model, engines, session records."""

    def __init__(self, settings: Settings, model: Any = None):
        self.settings = settings
        self.store = open_store(settings.characters, settings.voices, create=True, context_frames=settings.context)
        self.audio_dir = Path(settings.audio_dir).resolve() if settings.audio_dir is not None else None
        self._model = model
        self._model_lock = threading.Lock()
        self._engine: Any = None
        self._driver: Any = None  # who ticks the engine (driver.py)
        self._engine_create = threading.Lock()
        self._player: Any = None  # BackgroundServer
        self._player_lock = threading.Lock()
        self.records: OrderedDict[str, Record] = OrderedDict()
        self._ids = itertools.count(1)
        self.max_records = 200
        if model is not None:
            self.store.tokenizer = model.tokenizer
            self.store.context_frames = model.config.lm.context

    # --- model and engines ------------------------------------------------------------------------

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def model(self) -> Any:
        with self._model_lock:
            if self._model is None:
                from npc_voice.model.loading import load_model

                s = self.settings
                log.info("loading the model (%s)", s.weights or f"{s.preset or 'tiny'}, random weights")
                self._model = load_model(s.weights, preset=s.preset, device=s.device, dtype=s.dtype, int8=s.int8,
                                         context=s.context, mimi_dtype=s.mimi_dtype)
                self.store.tokenizer = self._model.tokenizer
                self.store.context_frames = self._model.config.lm.context
            return self._model

    def _cache(self) -> Any:
        if getattr(self, "_prefix_cache", None) is None:
            from npc_voice.engine import PrefixCache
            from npc_voice.model.generator import Generator

            model = self.model()
            self._prefix_cache = PrefixCache(model, Generator(model.lm), directory=self.settings.prefix_cache)
        return self._prefix_cache

    def engine(self) -> Any:
        """The one engine: talks, scenes and player sessions (the only place an `Engine` is made)."""
        with self._engine_create:
            if self._engine is None:
                from npc_voice.engine import Engine

                from .driver import Driver

                self._engine = Engine(self.model(), slots=max(2, self.settings.slots), cache=self._cache())
                self._driver = Driver(self._engine)
            return self._engine

    def driver(self) -> Any:
        self.engine()
        return self._driver

    def engine_lock(self) -> threading.Lock:
        """Held around each offline tick and by a conversation while it opens its sessions (a thread
        lock: any event loop, any task)."""
        return self.driver().lock

    async def _acquire_engine(self) -> threading.Lock:
        driver = await anyio.to_thread.run_sync(self.driver)
        lock = driver.lock
        deadline = time.monotonic() + self.settings.busy_wait_s
        driver.admitting(1)  # the offline thread ticks no more until `_admitted`
        try:
            while not lock.acquire(blocking=False):
                if time.monotonic() >= deadline:
                    raise ServerBusy(f"server busy: the engine has been held for over {self.settings.busy_wait_s:g} s; "
                                     "retry later (end_session stops a conversation)")
                await anyio.sleep(0.005)
            try:
                while not driver.tick_lock.acquire(blocking=False):  # a tick under way: one frame at most
                    await anyio.sleep(0.002)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            driver.admitting(-1)
            raise
        return lock

    def _admitted(self) -> None:
        """Lets go of what `_acquire_engine` took."""
        self._driver.tick_lock.release()
        self._driver.lock.release()
        self._driver.admitting(-1)

    async def _engine_ready(self, progress: Progress, total: int) -> Any:
        if self._model is None:
            await progress(0, total, "loading the model (first conversation)")
        engine = await anyio.to_thread.run_sync(self.engine)
        await progress(0, total, "building the characters' prompts (cached afterwards)")
        return engine

    def close(self) -> None:
        for record in self.records.values():
            record.stop.set()
        self._stop_player()
        if self._driver is not None:
            self._driver.close()

    def _stop_player(self) -> None:
        with self._player_lock:
            if self._player is not None:
                self._player.stop()
                self._player = None
                self._driver.take_back()  # offline ticking resumes for conversations still open

    # --- records ----------------------------------------------------------------------------------

    def new_record(self, kind: str, characters: list[str]) -> Record:
        record = Record(f"{kind}-{next(self._ids)}", kind, characters)
        self.records[record.id] = record
        while len(self.records) > self.max_records:
            oldest = next(iter(self.records))
            if self.records[oldest].status in ("running", "open"):
                break
            self.records.pop(oldest)
        return record

    def record(self, session: str) -> Record:
        record = self.records.get(session)
        if record is None:
            known = ", ".join(list(self.records)[-10:]) or "none yet"
            raise UserError(f"unknown session {session!r} (recent sessions: {known})")
        return record

    def end_session(self, session: str) -> dict[str, Any]:
        record = self.record(session)
        if record.status == "running":
            record.stop.set()
            return {"session": record.id, "status": "stopping",
                    "message": "the conversation stops at its next frame; its tool call returns what it has"}
        if record.status == "open":
            record.status = "ended"
            message = "the player session's details are withdrawn"
            if record.player and record.player.get("embedded"):
                still_open = [r for r in self.records.values() if r.kind == "player" and r.status == "open"]
                if not still_open:
                    self._stop_player()
                    message += "; no player session is left, so the embedded websocket server was stopped"
            else:
                message += " (the game client's connection to the remote server is not affected: it ends it itself)"
            return {"session": record.id, "status": "ended", "message": message}
        return {"session": record.id, "status": record.status, "message": "the session had already ended"}

    # --- characters -------------------------------------------------------------------------------

    def _unknown(self, id: str) -> UserError:
        known = ", ".join(self.store.ids()) or "none"
        return UserError(f"unknown character {id!r} (known: {known}); list_characters shows them")

    def character(self, id: str) -> Character:
        if id not in self.store:
            raise self._unknown(id)
        try:
            return self.store.load(id)
        except CharacterError as exc:
            raise UserError(f"character {id!r} is broken: {exc}") from None

    def persona(self, id: str) -> Any:
        """The engine's Persona of stored character `id` (`resolve_persona`, as the server's)."""
        try:
            return resolve_persona(self.store, id)[0]
        except ResolveError as exc:
            raise (self._unknown(id) if exc.code == "unknown_character" else UserError(exc.message)) from None

    def audio_file(self, path: str) -> Path:
        """A path inside the allowed audio folder (symlinks resolved), else UserError."""
        if self.audio_dir is None:
            raise UserError("reading audio files is off: this MCP server has no allowed audio folder (start it with "
                            "--audio-dir DIR); send the audio as base64 instead")
        given = Path(path).expanduser()
        candidate = given if given.is_absolute() else self.audio_dir / given
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.audio_dir):
            raise UserError(f"refused: {path!r} is outside the allowed audio folder {self.audio_dir} (after resolving "
                            "symlinks); copy the file there or send it as base64")
        if not resolved.is_file():
            raise UserError(f"no audio file {path!r} in {self.audio_dir}")
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
            return None, self.audio_file(voice_file)
        return None, decode_base64_audio(voice_base64 or "", "voice_base64")

    def read_clip(self, audio_base64: str | None, audio_file: str | None, limit_s: float) -> np.ndarray:
        if bool(audio_base64) == bool(audio_file):
            raise UserError("give exactly one of audio_base64 (a WAV/FLAC/OGG file, base64) or audio_file (a path in "
                            "the allowed audio folder)")
        source: Any = decode_base64_audio(audio_base64) if audio_base64 else self.audio_file(audio_file or "")
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

    def voices(self) -> dict[str, Any]:
        presets_dir = self.store.presets_dir
        installed = installed_presets(presets_dir)
        files: list[str] = []
        if self.audio_dir is not None and self.audio_dir.is_dir():
            for p in sorted(self.audio_dir.rglob("*")):
                # only what audio_file accepts: a link whose target lies outside the folder is left out
                if p.suffix.lower() in (".wav", ".flac", ".ogg") and p.is_file() \
                        and p.resolve().is_relative_to(self.audio_dir):
                    files.append(str(p.relative_to(self.audio_dir)))
                    if len(files) >= 200:
                        break
        return {
            "presets": {"installed": installed, "presets_dir": str(presets_dir),
                        "known_names": list(KNOWN_PRESETS),
                        "note": "a preset works once its NAME.pt is in the presets folder (voices.tgz of "
                                "nvidia/personaplex-7b-v1)"},
            "audio_folder": {"path": str(self.audio_dir) if self.audio_dir else None, "files": files,
                             "note": "use as voice_file (relative to the folder)" if self.audio_dir else
                             "no audio folder configured (--audio-dir): send voices as voice_base64"},
            "character_voices": {c.id: c.voice for c in self.store.list()},
        }

    # --- say: the NPC speaks a given line ------------------------------------------------------------

    def line_of(self, character: str, text: str | None, line: str | None) -> str:
        """The line to say: `text`, or the character's named scripted line `line`."""
        if (text is None) == (line is None):
            raise UserError("give exactly one of text (the words to say) or line (the name of one of the "
                            "character's scripted lines, e.g. greeting; get_character lists them)")
        if line is not None:
            lines = self.character(character).lines
            if line not in lines:
                raise UserError(f"character {character!r} has no line {line!r} (its lines: "
                                f"{', '.join(lines) or 'none'}); update_character adds lines")
            text = lines[line]
        text = (text or "").strip()
        if not text:
            raise UserError("the line is empty: give the words the NPC should say")
        return text

    def say_seconds(self, text: str) -> float:
        """How long saying `text` takes: one token every 3 frames, plus about a second to finish."""
        tokenizer = self._model.tokenizer if self._model is not None else self.store.tokenizer
        tokens = len(tokenizer.encode(" " + text)) if tokenizer is not None else math.ceil(len(text) / 3)
        return min((tokens * 3 + SAY_TAIL_FRAMES) * FRAME_S, self.settings.max_clip_s)

    # --- reply audio as a file --------------------------------------------------------------------

    def replies_dir(self) -> Path:
        """`<audio folder>/replies`, where replies are written with audio_output="file"."""
        if self.audio_dir is None:
            raise UserError('audio_output="file" needs an audio folder: start this MCP server with --audio-dir DIR '
                            '(or use audio_output="inline" or "none")')
        folder = self.audio_dir / REPLIES_DIR
        if not folder.resolve().is_relative_to(self.audio_dir):
            raise UserError(f"refused: {folder} leads outside the audio folder (a symlink?)")
        return folder

    def write_reply(self, record: Record, samples: np.ndarray) -> Path:
        folder = self.replies_dir()
        folder.mkdir(exist_ok=True)
        path = folder / f"{record.id}.wav"
        tmp = folder / f".{record.id}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(wav_bytes(samples))
        tmp.replace(path)
        return path

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {"mode": s.mode, "characters_dir": str(self.store.root),
                               "characters": len(self.store), "presets_dir": str(self.store.presets_dir),
                               "audio_dir": str(self.audio_dir) if self.audio_dir else None}
        if s.mode == "remote":
            out["server_url"] = s.server_url
            out["server"] = remote_health(s.server_url or "")
        else:
            model = self._model
            if model is None:
                weights = s.weights or f"none: the {s.preset or 'tiny'} model with RANDOM weights"
                out["model"] = {"loaded": False, "weights": weights,
                                "note": "the model loads at the first conversation"}
            else:
                out["model"] = {"loaded": True, "name": model.config.name,
                                "weights": "random" if model.random_weights else model.source,
                                "device": str(model.device),
                                "dtype": str(model.dtype).removeprefix("torch.")}
            if s.weights is None:
                out["warning"] = (f"no weights configured: the embedded engine runs the {s.preset or 'tiny'} model "
                                  "with RANDOM weights, so NPCs babble instead of speaking; start the MCP server with "
                                  "--weights DIR (the PersonaPlex release) or --server-url of a real npc-voice serve")
            player = self._player
            out["player_server"] = None if player is None else {"url": player.url, "health": player.server.health()}
            if self._engine is not None:
                free = self._engine.free_slots
                out["engine"] = {"slots": self._engine.slots, "free_slots": free,
                                 "live_sessions": len(self._engine.sessions), "busy": free == 0,
                                 "ticked_by": "the player server's real-time loop" if self._driver.realtime
                                 else "offline, while a talk or scene runs"}
        out["sessions"] = [r.summary() for r in list(self.records.values())[-20:]]
        return out

    # --- (a) player sessions ----------------------------------------------------------------------

    def start_player(self, character: str, sample_rate: int) -> dict[str, Any]:
        s = self.settings
        note = None
        if s.mode == "embedded":
            self.character(character)  # unknown -> UserError
            server = self._ensure_player_server()
            url, token, embedded = server.url, server.server.config.token, True
        else:
            url, token, embedded = normalize_ws_url(s.server_url or ""), s.token, False
            if character not in self.store:
                note = (f"{character!r} is not in this MCP server's characters folder: the remote server must know it, "
                        "or the game must send an inline character")
        record = self.new_record("player", [character])
        record.status = "open"
        start = {"type": "start", "character": character, "sample_rate": sample_rate, "protocol": 1}
        info = {
            "session": record.id, "websocket_url": url, "token": token,
            "auth": ("send the header 'Authorization: Bearer <token>' or append ?token=<token> to the URL" if token
                     else "no token needed"),
            "url_with_token": f"{url}?token={token}" if token else url,
            "start_message": start,
            "audio": f"binary frames of PCM16 LE mono at {sample_rate} Hz both ways; server frames start with a "
                     "uint32 LE frame index (docs/protocol.md)",
            "protocol": "npc-voice websocket protocol v1 (docs/protocol.md)",
            "embedded": embedded,
        }
        if embedded and self._model is not None and self._model.random_weights:
            info["warning"] = "the embedded engine runs the tiny model with RANDOM weights: the NPC babbles"
        if note:
            info["note"] = note
        record.player = info
        return info

    def _ensure_player_server(self) -> Any:
        with self._player_lock:
            if self._player is None:
                from npc_voice.server import BackgroundServer, ServerConfig

                engine, driver = self.engine(), self._driver
                config = ServerConfig(host=self.settings.player_host, port=self.settings.player_port,
                                      token=secrets.token_urlsafe(24))
                driver.hand_over()  # its EngineLoop owns tick() from now on
                try:
                    self._player = BackgroundServer(engine, config, self.store).start()
                except BaseException:
                    driver.take_back()
                    raise
            return self._player

    # --- (b) talk: a clip in, the NPC's reply out ---------------------------------------------------

    async def talk(self, character: str, clip: np.ndarray, seed: int, progress: Progress,
                   say: str | None = None) -> tuple[Record, np.ndarray]:
        """The NPC hears `clip` (and, with `say`, is given that line at the start) -> its side, as long as the clip."""
        persona = self.persona(character) if self.settings.mode == "embedded" else None
        record = self.new_record("say" if say is not None else "talk", [character])
        try:
            if self.settings.mode == "embedded":
                out = await self._talk_embedded(record, persona, clip, seed, progress, say)
            else:
                out = await self._talk_remote(record, character, clip, seed, progress, say)
        except BaseException as exc:
            _fail(record, exc)
            raise
        _finish(record)
        return record, out

    async def _talk_embedded(self, record: Record, persona: Any, clip: np.ndarray, seed: int,
                             progress: Progress, say: str | None = None) -> np.ndarray:
        frames = math.ceil(clip.shape[0] / FRAME)
        padded = np.zeros(frames * FRAME, dtype=np.float32)
        padded[: clip.shape[0]] = clip
        events: list[Any] = []
        box: list[Any] = []

        def heard(ev: Any) -> None:  # after each frame (the ticking thread): keep it, queue the next input
            events.append(ev)
            nxt = ev.frame + LEAD
            if nxt < frames:
                box[0].push_audio(padded[nxt * FRAME:(nxt + 1) * FRAME])
            if ev.frame + 1 >= frames or record.stop.is_set():
                self._engine.close(box[0])  # no tick past the clip

        def opened(session: Any) -> None:
            box.append(session)
            if say is not None:
                self._engine.say(session, say)
            session.push_audio(padded[: min(frames, LEAD) * FRAME])

        await self._run_local(record, [(persona, seed, heard)], opened, lambda: len(events), frames, progress)
        texts = [(ev.frame, ev.text) for ev in events[:frames] if ev.text]
        record.seconds = min(len(events), frames) * FRAME_S
        record.words = words_of(texts, persona.name, min(len(events), frames))
        pcm = [ev.pcm for ev in events[:frames]]
        return np.concatenate(pcm)[: clip.shape[0]] if pcm else np.zeros(0, np.float32)

    async def _run_local(self, record: Record, opens: list[tuple[Any, int, Callable[[Any], None]]],
                         opened: Callable[..., None], count: Callable[[], int], frames: int,
                         progress: Progress, words: Callable[[int], list[dict[str, Any]]] | None = None) -> None:
        """Opens one engine session per (persona, seed, listener) and waits until `count()` reaches
        `frames` (the listeners feed the sessions and close them at the end), the record is stopped,
        or the call is cancelled; the sessions are closed on the way out."""
        await self._acquire_engine()
        engine = self._engine
        sessions: list[Any] = []
        try:
            try:
                await self._engine_ready(progress, frames)
                # The real-time loop may install and step a session as soon as it is open: its
                # listener waits (on the loop's dispatch thread) until `opened` has run.
                ready = threading.Event()

                def waiting(listener: Callable[[Any], None]) -> Callable[[Any], None]:
                    def call(ev: Any) -> None:
                        ready.wait(5)
                        listener(ev)
                    return call

                try:
                    for persona, seed, listener in opens:
                        sessions.append(await anyio.to_thread.run_sync(_open, engine, persona, seed,
                                                                       waiting(listener)))
                    opened(*sessions)
                finally:
                    ready.set()  # (a failed open: its sessions are closed below, before their listeners matter)
                self._driver.enter()  # ticks from now on (unless the real-time loop does)
            finally:
                self._admitted()
            try:
                reported = 0
                while True:
                    done = min(count(), frames)
                    if done >= frames or record.stop.is_set():
                        break
                    if self._driver.error is not None and not self._driver.realtime:
                        raise UserError(f"the engine failed: {self._driver.error}")
                    for s in sessions:
                        if s.started.done() and not s.started.cancelled() and s.started.exception() is not None:
                            raise UserError(f"the character cannot be used: {s.started.exception()}")
                    if done - reported >= TICKS_PER_HOP:
                        reported = done
                        record.seconds = done * FRAME_S
                        if words is not None:
                            record.words = words(done)
                        await progress(done, frames, f"{record.seconds:.2f} of {frames * FRAME_S:.2f} s")
                    await anyio.sleep(0.01)
                if count() >= frames:
                    await progress(frames, frames, f"{frames * FRAME_S:.2f} of {frames * FRAME_S:.2f} s")
            finally:
                self._driver.leave()
        finally:
            _close(engine, *sessions)

    async def _talk_remote(self, record: Record, character: str, clip: np.ndarray, seed: int,
                           progress: Progress, say: str | None = None) -> np.ndarray:
        from npc_voice.client import AudioFrame, Ended, Text

        frames = math.ceil(clip.shape[0] / FRAME)
        padded = np.zeros(frames * FRAME, dtype=np.float32)
        padded[: clip.shape[0]] = clip
        out = np.zeros(frames * FRAME, dtype=np.float32)
        texts: list[tuple[int, str]] = []
        async with _remote_client(self.settings) as client:
            session = await self._remote_start(client, character, seed)
            if say is not None:
                await session.say(say)
            ahead = min(frames, 12)  # about 1 s queued ahead; the server buffers up to 2 s
            await session.send_audio(padded[: ahead * FRAME])
            sent, got = ahead, 0
            try:
                with anyio.fail_after(frames * FRAME_S * 4 + 30):
                    async for ev in session.events():
                        if isinstance(ev, AudioFrame):
                            if ev.frame < frames:
                                out[ev.frame * FRAME:(ev.frame + 1) * FRAME] = ev.float32()
                            got += 1
                            if sent < frames:
                                await session.send_audio(padded[sent * FRAME:(sent + 1) * FRAME])
                                sent += 1
                            if got % TICKS_PER_HOP == 0:
                                record.seconds = got * FRAME_S
                                await progress(min(got, frames), frames, f"{record.seconds:.2f} s")
                            if got >= frames or record.stop.is_set():
                                break
                        elif isinstance(ev, Text):
                            texts.append((ev.frame, ev.text))
                        elif isinstance(ev, Ended):
                            break
            finally:
                with anyio.CancelScope(shield=True):
                    await _end_remote(session, texts)
        record.seconds = min(got, frames) * FRAME_S
        record.words = words_of(texts, character, min(got, frames))
        return out[: clip.shape[0]]

    async def _remote_start(self, client: Any, character: str, seed: int, *, inline: bool = True) -> Any:
        from npc_voice.client import NPCVoiceError

        try:
            return await client.start(character=character, seed=seed)
        except NPCVoiceError as exc:
            if exc.code == "server_busy":
                raise ServerBusy(f"server busy: every conversation slot of {self.settings.server_url} is in use; "
                                 "retry later") from None
            if exc.code == "unknown_character" and inline and character in self.store:
                try:
                    return await client.start(character=self._inline(character), seed=seed)
                except NPCVoiceError as again:
                    raise UserError(f"the server refused {character!r} (sent inline): {again.message}") from None
            if exc.code == "unknown_character":
                raise UserError(f"unknown character {character!r}: neither the server nor this MCP server's "
                                "characters folder has it") from None
            raise UserError(f"the server refused the conversation: {exc.code}: {exc.message}") from None

    def _inline(self, character: str) -> dict[str, Any]:
        from npc_voice.client import inline_character

        c = self.character(character)
        if c.uses_preset:
            return inline_character(c.role, preset=c.voice, name=c.name)
        return inline_character(c.role, self.store.voice_file(c), name=c.name)

    # --- (c) scene: two NPCs talk to each other -----------------------------------------------------

    async def scene(self, a: str, b: str, seconds: float, seed: int, progress: Progress) -> tuple[Record, np.ndarray]:
        if not 0 < seconds <= self.settings.max_scene_s:
            raise UserError(f"seconds must be above 0 and at most {self.settings.max_scene_s:.0f}")
        frames = max(1, math.ceil(seconds / FRAME_S))
        if self.settings.mode == "embedded":
            pa, pb = self.persona(a), self.persona(b)
        record = self.new_record("scene", [a, b])
        record.speakers = scene_speakers(a, b)
        names = (record.speakers[0], record.speakers[1])
        try:
            if self.settings.mode == "embedded":
                stereo = await self._scene_embedded(record, names, (pa, pb), frames, seed, progress)
            else:
                stereo = await self._scene_remote(record, (a, b), names, frames, seed, progress)
        except BaseException as exc:
            _fail(record, exc)
            raise
        _finish(record)
        return record, stereo

    async def _scene_embedded(self, record: Record, names: tuple[str, str], personas: tuple[Any, Any], frames: int,
                              seed: int, progress: Progress) -> np.ndarray:
        """Two sessions; each NPC frame is queued as the other's next input (silence at the first)."""
        said: tuple[list[Any], list[Any]] = ([], [])
        box: list[Any] = []

        def side(i: int) -> Callable[[Any], None]:
            def heard(ev: Any) -> None:
                said[i].append(ev)
                box[1 - i].push_audio(ev.pcm)  # my voice is the other NPC's input
                if ev.frame + 1 >= frames or record.stop.is_set():
                    self._engine.close(box[i])
            return heard

        def texts(i: int, n: int) -> list[tuple[int, str]]:
            return [(ev.frame, ev.text) for ev in said[i][:n] if ev.text]

        def words(n: int) -> list[dict[str, Any]]:
            return merge_words(words_of(texts(0, n), names[0], n), words_of(texts(1, n), names[1], n))

        await self._run_local(record, [(personas[0], seed, side(0)), (personas[1], seed + 1, side(1))],
                              lambda *ss: box.extend(ss), lambda: min(len(said[0]), len(said[1])), frames,
                              progress, words)
        n = min(len(said[0]), len(said[1]), frames)
        record.seconds = n * FRAME_S
        record.words = words(n)
        if not n:
            return np.zeros((0, 2), np.float32)
        return np.stack([np.concatenate([ev.pcm for ev in said[0][:n]]),
                         np.concatenate([ev.pcm for ev in said[1][:n]])], axis=1)

    async def _scene_remote(self, record: Record, ids: tuple[str, str], names: tuple[str, str], frames: int,
                            seed: int, progress: Progress) -> np.ndarray:
        """Two websocket sessions on the remote server; each NPC frame received is sent as the
        other's input (real time: the server paces both)."""
        from npc_voice.client import AudioFrame, Ended, Text

        out = np.zeros((frames * FRAME, 2), dtype=np.float32)
        texts: list[list[tuple[int, str]]] = [[], []]
        got = [0, 0]
        async with _remote_client(self.settings) as ca, _remote_client(self.settings) as cb:
            sa = await self._remote_start(ca, ids[0], seed)
            try:
                sb = await self._remote_start(cb, ids[1], seed + 1)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await _end_remote(sa, texts[0])
                raise
            sessions = (sa, sb)

            async def pump(i: int) -> None:
                me, other = sessions[i], sessions[1 - i]
                async for ev in me.events():
                    if isinstance(ev, AudioFrame):
                        if ev.frame < frames:
                            out[ev.frame * FRAME:(ev.frame + 1) * FRAME, i] = ev.float32()
                        got[i] += 1
                        await other.send_audio(ev.pcm)  # my voice is the other NPC's input
                        if got[i] >= frames or record.stop.is_set():
                            return
                    elif isinstance(ev, Text):
                        texts[i].append((ev.frame, ev.text))
                    elif isinstance(ev, Ended):
                        return

            async def report() -> None:
                while min(got) < frames and not record.stop.is_set():
                    await anyio.sleep(0.4)
                    record.seconds = min(got) * FRAME_S
                    await progress(min(min(got), frames), frames, f"{record.seconds:.2f} s")

            try:
                with anyio.fail_after(frames * FRAME_S * 4 + 30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(report)
                        async with anyio.create_task_group() as pumps:
                            pumps.start_soon(pump, 0)
                            pumps.start_soon(pump, 1)
                        tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await _end_remote(sa, texts[0])
                    await _end_remote(sb, texts[1])
        n = min(min(got), frames)
        record.seconds = n * FRAME_S
        record.words = merge_words(words_of(texts[0], names[0], n), words_of(texts[1], names[1], n))
        return out[: n * FRAME]


# --- helpers --------------------------------------------------------------------------------------


def _open(engine: Any, persona: Any, seed: int, listener: Any = None) -> Any:
    from npc_voice.engine import EngineFull

    try:
        return engine.open(persona, seed=seed, listener=listener)
    except EngineFull:
        raise ServerBusy("server busy: every conversation slot of the embedded engine is in use; retry later") from None
    except (ValueError, AudioError, CharacterError) as exc:
        raise UserError(f"the character cannot be used: {exc}") from None


def _close(engine: Any, *sessions: Any) -> None:
    for s in sessions:
        engine.close(s)  # the engine reuses a slot whose close is pending, even before its next tick


def _finish(record: Record) -> None:
    record.status = "ended" if record.stop.is_set() else "finished"


def _fail(record: Record, exc: BaseException) -> None:
    if isinstance(exc, anyio.get_cancelled_exc_class()) or isinstance(exc, asyncio.CancelledError):
        record.status = "cancelled"
    else:
        record.status, record.error = "failed", str(exc)


def normalize_ws_url(url: str) -> str:
    from npc_voice.protocol import WS_PATH

    url = url.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[7:]
    elif url.startswith("https://"):
        url = "wss://" + url[8:]
    return url if url.endswith(WS_PATH) else url + WS_PATH


def remote_health(url: str) -> dict[str, Any]:
    from npc_voice.protocol import HEALTH_PATH, WS_PATH

    http = normalize_ws_url(url).replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    http = http[: -len(WS_PATH)] + HEALTH_PATH
    try:
        with urllib.request.urlopen(http, timeout=3) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except Exception:
            return {"status": "error", "error": f"HTTP {exc.code}"}
    except Exception as exc:
        return {"status": "unreachable", "error": f"{http}: {exc}"}


class _remote_client:
    """An NPCVoiceClient connection whose failures read as user errors."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client: Any = None

    async def __aenter__(self) -> Any:
        from npc_voice.client import NPCVoiceClient

        url = normalize_ws_url(self.settings.server_url or "")
        self.client = NPCVoiceClient(url, self.settings.token)
        try:
            return await self.client.connect()
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 503:
                raise ServerBusy(f"server busy: {url} refused the connection (HTTP 503); retry later") from None
            if status == 401:
                raise UserError(f"{url} refused the token (HTTP 401): pass the server's token with --token") from None
            raise UserError(f"cannot reach the npc-voice server at {url}: {exc}") from None

    async def __aexit__(self, *exc: Any) -> None:
        with anyio.CancelScope(shield=True):
            await self.client.close()


async def _end_remote(session: Any, texts: list[tuple[int, str]]) -> None:
    """Ends a remote session and keeps the text events still queued before `ended`."""
    from npc_voice.client import Text

    try:
        with anyio.fail_after(5):
            if session.ended is None:
                await session.end()
            async for ev in session.events():
                if isinstance(ev, Text):
                    texts.append((ev.frame, ev.text))
    except Exception:
        pass

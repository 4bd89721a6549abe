"""What the MCP tools drive: the character store, the audio rules, the model and its one engine,
and the records of the conversations (the glue: the conversations themselves are conversations.py,
local.py and remote.py; the features talk.py and scene.py).

Two ways to run conversations, behind one interface (`Backend.conversations`):
- **embedded** (no `server_url`): one model and ONE `Engine` (one KV cache, `Settings.slots` slots)
  in this process (the tiny built-in model with random weights unless weights are configured).
  Talks, scenes and player sessions all are sessions of that engine, and only one thread steps it
  (driver.py): the real-time `EngineLoop` of the in-process `npc-voice serve` for players
  (`BackgroundServer`, started on demand) while it runs, else the `Driver` while a talk or scene is
  open. Concurrent conversations each take free slots and progress together (local.py).
- **remote** (`server_url` set): a running `npc-voice serve` does the work through its websocket
  protocol (docs/protocol.md), in real time (remote.py); player sessions are handed its URL and token.

Every error a user can cause is raised as `UserError` with a message that says what to do; the MCP
layer turns it into a tool error.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npc_voice.characters import (
    KNOWN_PRESETS, Character, CharacterError, ResolveError, installed_presets, open_store, resolve_persona,
)

from .audio_files import AudioFolder, decode_base64_audio, wav_bytes
from .conversations import Conversations, ServerBusy, UserError
from .records import Record
from .remote import normalize_ws_url, remote_health

__all__ = ["Backend", "Record", "ServerBusy", "Settings", "UserError", "SEED_MAX", "decode_base64_audio", "wav_bytes"]

log = logging.getLogger("mcp_server")

SEED_MAX = 2**31 - 2  # every tool's seed maximum (a scene's second NPC takes seed + 1; the protocol's limit is 2**31 - 1)


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
    int8: bool = False  # the older spelling of weights_dtype="int8"
    weights_dtype: str = "bf16"  # the LM's matrices: bf16 (not quantized), int8 or fp8 (`--weights-dtype`)
    kv_dtype: str = "auto"  # the conversations' KV cache (`--kv-dtype`: auto = int8 on a GPU)
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


# --- the backend ------------------------------------------------------------------------------------


class Backend:
    """The state behind the MCP server: settings, store, model, engines, session records."""

    def __init__(self, settings: Settings, model: Any = None):
        self.settings = settings
        self.store = open_store(settings.characters, settings.voices, create=True, context_frames=settings.context)
        self.audio_folder = AudioFolder(settings.audio_dir)
        self.audio_dir = self.audio_folder.root
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
        self._conversations: Conversations | None = None
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
                                         weights_dtype=s.weights_dtype, context=s.context, mimi_dtype=s.mimi_dtype,
                                         kv_dtype=s.kv_dtype)
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

    @property
    def conversations(self) -> Conversations:
        """Where talks, `say` and scenes run: the shared engine (embedded) or the remote server."""
        if self._conversations is None:
            from .local import LocalConversations
            from .remote import RemoteConversations

            self._conversations = (RemoteConversations(self) if self.settings.mode == "remote"
                                   else LocalConversations(self))
        return self._conversations

    @property
    def tokenizer(self) -> Any:
        """The model's text tokenizer (the store's before the model is loaded; None without either)."""
        return self._model.tokenizer if self._model is not None else self.store.tokenizer

    def engine_lock(self) -> threading.Lock:
        """Held around each offline tick and by a conversation while it opens its sessions (a thread
        lock: any event loop, any task)."""
        return self.driver().lock

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

    def voices(self) -> dict[str, Any]:
        presets_dir = self.store.presets_dir
        installed = installed_presets(presets_dir)
        files = self.audio_folder.files()
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
                from npc_voice.serve import BackgroundServer, ServerConfig

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


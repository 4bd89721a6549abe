"""The MCP server: tools, resources and a prompt over a `Backend` (see docs/mcp.md)."""

from __future__ import annotations

import base64
import functools
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable

import numpy as np

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.types import AudioContent, CallToolResult, TextContent
from pydantic import Field

from npc_voice.audio import AudioError
from npc_voice.characters import Character, CharacterError, SamplingSettings
from npc_voice.characters.model import VOICE_FILE
from npc_voice.protocol import SAMPLE_RATES

from .backend import Backend, Settings, UserError, wav_bytes

log = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
npc-voice gives game NPCs full-duplex voice conversations (NVIDIA PersonaPlex: Moshi LM + Mimi codec).
Characters are a role prompt plus a voice. Create them with create_character (use the write_role_prompt
prompt for a good role), then: start_player_session hands a game client a websocket URL and token;
talk_to_character plays an audio clip to a character and returns its spoken reply; run_scene lets two
characters talk to each other. server_status says which model runs (the tiny built-in model has RANDOM
weights: it babbles)."""


def _tool_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure becomes a tool error with a clear message (never a traceback)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except (UserError, CharacterError, AudioError) as exc:
            raise ToolError(str(exc)) from None
        except (ValueError, OSError, ConnectionError, TimeoutError) as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # unexpected: log it here, say what happened there
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(f"internal error ({type(exc).__name__}): {exc}") from None

    return wrapper


def _character_dict(c: Character, full: bool = True) -> dict[str, Any]:
    out = {"id": c.id, "name": c.name, "description": c.description, "voice": c.voice, "tags": c.tags,
           "uri": f"character://{c.id}"}
    if full:
        out["role"] = c.role
        out["sampling"] = c.sampling.model_dump(exclude_none=True)
        out["lines"] = c.lines
    return out


def _report_dict(report: Any) -> dict[str, Any]:
    return {"ok": report.ok, "summary": report.summary(), "warnings": [str(p) for p in report.warnings],
            "errors": [str(p) for p in report.errors]}


def _audio_reply(record: Any, samples: np.ndarray, audio: str) -> CallToolResult:
    """A conversation's result: its transcript as text and structured content, plus the WAV."""
    summary = record.transcript() | {"audio": audio, "transcript_uri": f"transcript://{record.id}"}
    wav = base64.b64encode(wav_bytes(samples)).decode("ascii")
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(summary, indent=1)),
                 AudioContent(type="audio", data=wav, mime_type="audio/wav")],
        structured_content=summary)


def build_server(backend: Backend | Settings | None = None) -> MCPServer:
    """The MCPServer for `backend` (or settings: a fresh backend)."""
    if not isinstance(backend, Backend):
        backend = Backend(backend or Settings())
    be = backend

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"backend": be}
        finally:
            be.close()

    mcp = MCPServer("npc-voice", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")
    mcp.backend = be  # type: ignore[attr-defined]

    async def progress_to(ctx: Context | None) -> Any:
        async def report(done: float, total: float, message: str) -> None:
            if ctx is not None:
                try:
                    await ctx.report_progress(done, total, message)
                except Exception:  # a client that went away does not stop the conversation
                    pass
        return report

    # --- characters ---------------------------------------------------------------------------------

    @mcp.tool()
    @_tool_errors
    async def list_characters(tag: Annotated[str | None, Field(description="only characters with this tag")] = None
                              ) -> dict[str, Any]:
        """List the stored characters (id, name, description, voice, tags). Broken ones are listed under `broken`."""
        chars, broken = [], []
        for id, c in be.store.entries():
            if isinstance(c, Character):
                if tag is None or tag in c.tags:
                    chars.append(_character_dict(c, full=False))
            else:
                broken.append({"id": id, "error": str(c)})
        return {"characters": chars, "broken": broken, "folder": str(be.store.root)}

    @mcp.tool()
    @_tool_errors
    async def get_character(id: Annotated[str, Field(description="character id")]) -> dict[str, Any]:
        """Everything about one character: role prompt, voice, sampling, lines, and its validation report."""
        c = be.character(id)
        return {"character": _character_dict(c), "validation": _report_dict(be.store.validate(id))}

    @mcp.tool()
    @_tool_errors
    async def create_character(
        id: Annotated[str, Field(description="a slug: 1-48 of a-z 0-9 - _ (the folder name)")],
        name: Annotated[str, Field(description="display name players see")],
        role: Annotated[str, Field(description="the PersonaPlex role prompt: 'You are ... Your name is ... "
                                               "Information: <facts>' (see the write_role_prompt prompt)")],
        voice_preset: Annotated[str | None, Field(description="a PersonaPlex preset voice, e.g. NATF2 (list_voices)")] = None,
        voice_file: Annotated[str | None, Field(description="a WAV/FLAC/OGG inside the allowed audio folder")] = None,
        voice_base64: Annotated[str | None, Field(description="a WAV/FLAC/OGG file, base64 (2-20 s; 3-10 s of "
                                                              "clear speech is best)")] = None,
        description: str = "",
        tags: list[str] | None = None,
        lines: Annotated[dict[str, str] | None, Field(description="named scripted lines, e.g. {'greeting': '...'}")] = None,
        text_temperature: float | None = None,
        audio_temperature: float | None = None,
    ) -> dict[str, Any]:
        """Create a character from a role text and a voice (exactly one of voice_preset, voice_file, voice_base64)."""
        preset, source = be.voice_source(voice_preset, voice_file, voice_base64)
        character = Character.parse({
            "id": id, "name": name, "role": role, "description": description, "voice": preset or VOICE_FILE,
            "tags": tags or [], "lines": lines or {},
            "sampling": SamplingSettings(text_temperature=text_temperature, audio_temperature=audio_temperature)
            .model_dump(exclude_none=True)}, tokenizer=be.store.tokenizer)
        report = be.store.create(character, source)
        return {"created": _character_dict(character), "validation": _report_dict(report)}

    @mcp.tool()
    @_tool_errors
    async def update_character(
        id: Annotated[str, Field(description="the character to change")],
        name: str | None = None,
        role: str | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
        lines: dict[str, str] | None = None,
        voice_preset: str | None = None,
        voice_file: str | None = None,
        voice_base64: str | None = None,
        text_temperature: float | None = None,
        audio_temperature: float | None = None,
    ) -> dict[str, Any]:
        """Change a character: what you leave out is kept (a new voice replaces the old one)."""
        current = be.character(id)
        changes: dict[str, Any] = {k: v for k, v in {"name": name, "role": role, "description": description,
                                                     "tags": tags, "lines": lines}.items() if v is not None}
        source = None
        if voice_preset or voice_file or voice_base64:
            preset, source = be.voice_source(voice_preset, voice_file, voice_base64)
            changes["voice"] = preset or VOICE_FILE
        data = current.model_dump() | changes
        sampling = dict(data.get("sampling") or {})
        if text_temperature is not None:
            sampling["text_temperature"] = text_temperature
        if audio_temperature is not None:
            sampling["audio_temperature"] = audio_temperature
        data["sampling"] = {k: v for k, v in sampling.items() if v is not None}
        character = Character.parse(data, tokenizer=be.store.tokenizer)
        report = be.store.update(character, source)
        return {"updated": _character_dict(character), "validation": _report_dict(report)}

    @mcp.tool()
    @_tool_errors
    async def delete_character(id: Annotated[str, Field(description="the character to delete")]) -> dict[str, Any]:
        """Delete a character and its folder (voice sample included)."""
        be.character(id)
        be.store.delete(id)
        return {"deleted": id}

    @mcp.tool()
    @_tool_errors
    async def list_voices() -> dict[str, Any]:
        """The voices a character can use: installed PersonaPlex presets, audio files in the allowed folder,
        and each character's current voice."""
        return be.voices()

    # --- conversations ----------------------------------------------------------------------------

    @mcp.tool()
    @_tool_errors
    async def start_player_session(
        character: Annotated[str, Field(description="the character the player talks to")],
        sample_rate: Annotated[int, Field(description="the game's audio rate: 16000, 24000 or 48000")] = 24000,
    ) -> dict[str, Any]:
        """Start a conversation for a player: returns the websocket URL, the token and the `start` message a game
        client uses (docs/protocol.md). Without a configured server, an embedded one is started."""
        if sample_rate not in SAMPLE_RATES:  # the server's own list
            raise UserError("sample_rate must be 16000, 24000 or 48000")
        import anyio

        return await anyio.to_thread.run_sync(be.start_player, character, sample_rate)

    @mcp.tool()
    @_tool_errors
    async def talk_to_character(
        character: Annotated[str, Field(description="the character that listens and answers")],
        audio_base64: Annotated[str | None, Field(description="what the player says: a WAV/FLAC/OGG file, base64")] = None,
        audio_file: Annotated[str | None, Field(description="or a WAV/FLAC/OGG inside the allowed audio folder")] = None,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="sampling seed")] = 0,
        ctx: Context | None = None,
    ) -> CallToolResult:
        """Play an audio clip to a character and return its spoken reply: a WAV (mono, 24 kHz, as long as the clip,
        on the clip's timeline: the NPC answers while and after it hears) and the transcript of its words."""
        import anyio

        clip = await anyio.to_thread.run_sync(be.read_clip, audio_base64, audio_file, be.settings.max_clip_s)
        record, out = await be.talk(character, clip, seed, await progress_to(ctx))
        return _audio_reply(record, out, "mono 24 kHz 16-bit WAV: the NPC's side, on the clip's timeline")

    @mcp.tool()
    @_tool_errors
    async def run_scene(
        character_a: Annotated[str, Field(description="first character (left channel)")],
        character_b: Annotated[str, Field(description="second character (right channel)")],
        seconds: Annotated[float, Field(gt=0, description="how long they talk")] = 10.0,
        seed: Annotated[int, Field(ge=0, le=2**31 - 2)] = 0,
        ctx: Context | None = None,
    ) -> CallToolResult:
        """Two characters talk to each other for `seconds`: each NPC's voice is the other's input, frame by frame.
        Returns the transcript (words with times and speakers) and a STEREO WAV: character_a left, character_b
        right."""
        record, stereo = await be.scene(character_a, character_b, seconds, seed, await progress_to(ctx))
        return _audio_reply(record, stereo, f"stereo 24 kHz 16-bit WAV: left = {character_a}, right = {character_b}")

    @mcp.tool()
    @_tool_errors
    async def get_transcript(session: Annotated[str, Field(description="a session id, e.g. talk-3")]) -> dict[str, Any]:
        """The transcript of a session: words with start/end seconds and speakers (also `transcript://{session}`)."""
        return be.record(session).transcript()

    @mcp.tool()
    @_tool_errors
    async def end_session(session: Annotated[str, Field(description="a session id")]) -> dict[str, Any]:
        """End a session: a running talk or scene stops at its next frame (its call returns what it has); a player
        session's details are withdrawn (the embedded websocket server stops with the last one)."""
        import anyio

        return await anyio.to_thread.run_sync(be.end_session, session)

    @mcp.tool()
    @_tool_errors
    async def server_status() -> dict[str, Any]:
        """Which engine runs (embedded model or a remote npc-voice serve), its health, folders and recent sessions."""
        import anyio

        return await anyio.to_thread.run_sync(be.status)

    # --- resources --------------------------------------------------------------------------------

    @mcp.resource("character://{id}", name="character", mime_type="application/json",
                  description="a character: role, voice, sampling, lines (JSON)")
    def character_resource(id: str) -> str:
        try:
            return json.dumps(_character_dict(be.character(id)), indent=1)
        except UserError as exc:
            raise ResourceNotFoundError(str(exc)) from None
        except CharacterError as exc:
            raise ResourceError(str(exc)) from None

    @mcp.resource("transcript://{session}", name="transcript", mime_type="application/json",
                  description="a session's transcript: words with times and speakers (JSON)")
    def transcript_resource(session: str) -> str:
        try:
            return json.dumps(be.record(session).transcript(), indent=1)
        except UserError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    # --- prompt -----------------------------------------------------------------------------------

    @mcp.prompt(name="write_role_prompt", title="Write a PersonaPlex role prompt")
    def write_role_prompt(
        character: Annotated[str, Field(description="who the NPC is, in your own words")],
        setting: Annotated[str, Field(description="the game world / place")] = "",
        facts: Annotated[str, Field(description="facts the NPC must know and use (prices, places, quests)")] = "",
    ) -> str:
        """Helps write a role prompt in the style PersonaPlex was trained on."""
        return f"""Write the role prompt of a game NPC for PersonaPlex, a full-duplex speech model.

The NPC: {character}
Setting: {setting or "(not given)"}
Facts it must use: {facts or "(invent the few that matter)"}

Rules (PersonaPlex was trained on these styles; the prompt is read before every conversation, one
80 ms frame per token, so keep it short: 30-90 words, never a biography):
- Role-play / service: "You work for <place> which is a <kind of business> and your name is <name>.
  Information: <concrete facts: prices, hours, directions, what to ask the player>."
- Character: "You are <who, in a few words>. Your name is <name>. <2-4 short facts it knows>.
  <one sentence on manner: warm, gruff, curious ...>."
- Casual: "You enjoy having a good conversation. <the situation and who the speaker is>."
- Second person ("You are ..."), plain sentences, concrete facts over adjectives, no lists, no markdown,
  no stage directions, nothing the NPC should not say aloud.

Example: "You work for The Gilded Stag which is an inn at the Eastmarch crossroads and your name is
Marta Holloway. Information: A room is 5 silver a night, 8 with a hot bath. Today's stew is mutton and
barley for 2 copper. The north road is closed by snow. You are warm, chatty and curious about
travellers' news."

Answer with the role prompt only; then call create_character with it (and a voice: list_voices)."""

    return mcp

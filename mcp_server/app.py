"""The MCP server: tools, resources and a prompt over a `Backend` (see docs/mcp.md).

Over 400 lines because each of the 13 tools is its signature: the SDK builds the input schema (with
its limits and descriptions) from it, so a tool and its schema stay together here; the output
schemas are in `schemas.py`, the wording of argument errors in `errors.py`.
"""

# no `from __future__ import annotations`: the tools' annotations use values of build_server (limits from the settings)

import base64
import functools
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable, Literal

import numpy as np

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError, UnexpectedToolError
from mcp.types import AudioContent, CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from npc_voice.audio import AudioError
from npc_voice.characters import Character, CharacterError, SamplingSettings
from npc_voice.characters.model import DESCRIPTION_MAX, NAME_MAX, VOICE_FILE
from npc_voice.protocol import MODEL_RATE, SAMPLE_RATES, Limits

from . import schemas as out
from .backend import SEED_MAX, Backend, Settings, UserError, wav_bytes
from .scene import scene
from .talk import line_of, say_seconds, talk
from .errors import plain_validation_error

log = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
npc-voice gives game NPCs full-duplex voice conversations (NVIDIA PersonaPlex: Moshi LM + Mimi codec).
Characters are a role prompt plus a voice. Create them with create_character (use the write_role_prompt
prompt for a good role), then: start_player_session hands a game client a websocket URL and token;
talk_to_character plays an audio clip to a character and returns its spoken reply; say makes a character
speak a given line; run_scene lets two characters talk to each other. Those three return a WAV inline by
default (about 64 KB of base64 per second): pass audio_output="file" to have it written into the audio folder (its
path comes back) or "none" for the transcript only. server_status says which model runs (the tiny
built-in model has RANDOM weights: it babbles)."""

MAX_SAY_CHARS = Limits().max_say_chars  # the protocol's limit of a `say` message
AudioOutput = Literal["inline", "file", "none"]
SampleRate = Literal[tuple(sorted(SAMPLE_RATES))]  # type: ignore[valid-type]  # the server's own list, as an enum
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description=f"sampling seed, 0 to {SEED_MAX} (the same seed and input "
                                                             "give the same reply)")]
Temperature = Annotated[float | None, Field(ge=0.0, le=2.0, description="0 (greedy) to 2")]
AUDIO_OUTPUT_HELP = ('"inline": the WAV as base64 audio content (about 64 KB per second of mono); "file": written to '
                     '<audio folder>/replies/<session>.wav, its path returned (needs --audio-dir); "none": the '
                     "transcript only")


def version() -> str:
    """The npc-voice package version (the MCP server's version in its initialize answer)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("npc-voice")
    except PackageNotFoundError:  # run from a checkout that was never installed
        import tomllib  # Python 3.11+; 3.10 without an installed package reports 0+unknown
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (OSError, KeyError, ValueError):
            return "0+unknown"


def _hints(*, read_only: bool = False, destructive: bool = False, idempotent: bool = False,
           open_world: bool = False, title: str | None = None) -> ToolAnnotations:
    return ToolAnnotations(title=title, read_only_hint=read_only, destructive_hint=destructive,
                           idempotent_hint=idempotent, open_world_hint=open_world)


class _Server(MCPServer):
    """MCPServer whose argument errors read as plain words (never pydantic's dump)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            raise ToolError(f"Error executing tool {name}: {plain_validation_error(cause)}") from cause


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
        except ValidationError as exc:  # a pydantic model built inside the tool
            raise ToolError(plain_validation_error(exc)) from None
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


async def _audio_reply(be: Backend, record: Any, samples: np.ndarray, audio: str, output: str) -> CallToolResult:
    """A conversation's result: its transcript as text and structured content, plus the WAV (inline as
    audio content, written to the audio folder, or left out)."""
    import anyio

    record.audio = audio
    summary = record.transcript() | {"audio": audio, "audio_output": output,
                                     "transcript_uri": f"transcript://{record.id}"}
    content: list[Any] = []
    if output == "file":
        path = await anyio.to_thread.run_sync(be.audio_folder.write_reply, record.id, samples)
        summary["audio_file"] = str(path.relative_to(be.audio_dir)) if be.audio_dir else str(path)
        summary["audio_path"] = str(path)
    content.insert(0, TextContent(type="text", text=json.dumps(summary, indent=1)))
    if output == "inline":
        wav = base64.b64encode(wav_bytes(samples)).decode("ascii")
        content.append(AudioContent(type="audio", data=wav, mime_type="audio/wav"))
    return CallToolResult(content=content, structured_content=summary)


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

    mcp = _Server("npc-voice", title="npc-voice", version=version(), instructions=INSTRUCTIONS, lifespan=lifespan,
                  log_level="WARNING")
    remote = be.settings.mode == "remote"  # conversations then reach another server
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

    @mcp.tool(annotations=_hints(read_only=True, idempotent=True, title="List characters"))
    @_tool_errors
    async def list_characters(tag: Annotated[str | None, Field(description="only characters with this tag")] = None
                              ) -> out.CharacterList:
        """List the stored characters (id, name, description, voice, tags). Broken ones are listed under `broken`."""
        chars, broken = [], []
        for id, c in be.store.entries():
            if isinstance(c, Character):
                if tag is None or tag in c.tags:
                    chars.append(_character_dict(c, full=False))
            else:
                broken.append({"id": id, "error": str(c)})
        return {"characters": chars, "broken": broken, "folder": str(be.store.root)}

    @mcp.tool(annotations=_hints(read_only=True, idempotent=True, title="Get a character"))
    @_tool_errors
    async def get_character(id: Annotated[str, Field(description="character id")]) -> out.CharacterInfo:
        """Everything about one character: role prompt, voice, sampling, lines, and its validation report."""
        c = be.character(id)
        return {"character": _character_dict(c), "validation": _report_dict(be.store.validate(id))}

    @mcp.tool(annotations=_hints(title="Create a character"))
    @_tool_errors
    async def create_character(
        id: Annotated[str, Field(description="a slug: 1-48 of a-z 0-9 - _ (the folder name)")],
        name: Annotated[str, Field(min_length=1, max_length=NAME_MAX, description="display name players see")],
        role: Annotated[str, Field(description="the PersonaPlex role prompt: 'You are ... Your name is ... "
                                               "Information: <facts>' (see the write_role_prompt prompt; at most "
                                               "1000 tokens, under 200 recommended)")],
        voice_preset: Annotated[str | None, Field(description="a PersonaPlex preset voice, e.g. NATF2 (list_voices)")] = None,
        voice_file: Annotated[str | None, Field(description="a WAV/FLAC/OGG inside the allowed audio folder")] = None,
        voice_base64: Annotated[str | None, Field(description="a WAV/FLAC/OGG file, base64 (2-20 s; 3-10 s of "
                                                              "clear speech is best)")] = None,
        description: Annotated[str, Field(max_length=DESCRIPTION_MAX)] = "",
        tags: list[str] | None = None,
        lines: Annotated[dict[str, str] | None, Field(description="named scripted lines, e.g. {'greeting': '...'}")] = None,
        text_temperature: Temperature = None,
        audio_temperature: Temperature = None,
    ) -> out.Created:
        """Create a character from a role text and a voice (exactly one of voice_preset, voice_file, voice_base64)."""
        preset, source = be.audio_folder.voice_source(voice_preset, voice_file, voice_base64)
        character = Character.parse({
            "id": id, "name": name, "role": role, "description": description, "voice": preset or VOICE_FILE,
            "tags": tags or [], "lines": lines or {},
            "sampling": SamplingSettings(text_temperature=text_temperature, audio_temperature=audio_temperature)
            .model_dump(exclude_none=True)}, tokenizer=be.store.tokenizer)
        report = be.store.create(character, source)
        return {"created": _character_dict(character), "validation": _report_dict(report)}

    @mcp.tool(annotations=_hints(destructive=True, idempotent=True, title="Update a character"))
    @_tool_errors
    async def update_character(
        id: Annotated[str, Field(description="the character to change")],
        name: Annotated[str | None, Field(min_length=1, max_length=NAME_MAX)] = None,
        role: str | None = None,
        description: Annotated[str | None, Field(max_length=DESCRIPTION_MAX)] = None,
        tags: list[str] | None = None,
        lines: dict[str, str] | None = None,
        voice_preset: str | None = None,
        voice_file: str | None = None,
        voice_base64: str | None = None,
        text_temperature: Temperature = None,
        audio_temperature: Temperature = None,
    ) -> out.Updated:
        """Change a character: what you leave out is kept (a new voice replaces the old one)."""
        be.character(id)  # an unknown id is refused before its voice is read
        changes: dict[str, Any] = {k: v for k, v in {"name": name, "role": role, "description": description,
                                                     "tags": tags, "lines": lines}.items() if v is not None}
        source = None
        if voice_preset or voice_file or voice_base64:
            preset, source = be.audio_folder.voice_source(voice_preset, voice_file, voice_base64)
            changes["voice"] = preset or VOICE_FILE
        with be.store.lock():  # read, change and write as one: another writer's update is not lost
            data = be.character(id).model_dump() | changes
            sampling = dict(data.get("sampling") or {})
            if text_temperature is not None:
                sampling["text_temperature"] = text_temperature
            if audio_temperature is not None:
                sampling["audio_temperature"] = audio_temperature
            data["sampling"] = {k: v for k, v in sampling.items() if v is not None}
            character = Character.parse(data, tokenizer=be.store.tokenizer)
            report = be.store.update(character, source)
        return {"updated": _character_dict(character), "validation": _report_dict(report)}

    @mcp.tool(annotations=_hints(destructive=True, idempotent=True, title="Delete a character"))
    @_tool_errors
    async def delete_character(id: Annotated[str, Field(description="the character to delete")]) -> out.Deleted:
        """Delete a character and its folder (voice sample included)."""
        be.character(id)
        be.store.delete(id)
        return {"deleted": id}

    @mcp.tool(annotations=_hints(read_only=True, idempotent=True, title="List voices"))
    @_tool_errors
    async def list_voices() -> out.Voices:
        """The voices a character can use: installed PersonaPlex presets, audio files in the allowed folder,
        and each character's current voice."""
        return be.voices()

    # --- conversations ----------------------------------------------------------------------------

    @mcp.tool(annotations=_hints(open_world=remote, title="Start a player session"))
    @_tool_errors
    async def start_player_session(
        character: Annotated[str, Field(description="the character the player talks to")],
        sample_rate: Annotated[SampleRate, Field(description="the game's audio rate in Hz")] = MODEL_RATE,
    ) -> out.PlayerSession:
        """Start a conversation for a player: returns the websocket URL, the token and the `start` message a game
        client uses (docs/protocol.md). Without a configured server, an embedded one is started."""
        if sample_rate not in SAMPLE_RATES:  # the server's own list
            *rest, last = sorted(SAMPLE_RATES)
            raise UserError(f"sample_rate must be {', '.join(map(str, rest))} or {last}")
        import anyio

        return await anyio.to_thread.run_sync(be.start_player, character, sample_rate)

    @mcp.tool(annotations=_hints(open_world=remote, title="Talk to a character"))
    @_tool_errors
    async def talk_to_character(
        character: Annotated[str, Field(description="the character that listens and answers")],
        audio_base64: Annotated[str | None, Field(description="what the player says: a WAV/FLAC/OGG file, base64 "
                                                              f"(80 ms to {be.settings.max_clip_s:g} s)")] = None,
        audio_file: Annotated[str | None, Field(description="or a WAV/FLAC/OGG inside the allowed audio folder")] = None,
        seed: Seed = 0,
        audio_output: Annotated[AudioOutput, Field(description=AUDIO_OUTPUT_HELP)] = "inline",
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, out.Reply]:
        """Play an audio clip to a character and return its spoken reply: a WAV (mono, 24 kHz, as long as the clip,
        on the clip's timeline: the NPC answers while and after it hears) and the transcript of its words."""
        import anyio

        if audio_output == "file":
            be.audio_folder.replies_dir()  # refused before the conversation runs
        clip = await anyio.to_thread.run_sync(be.audio_folder.read_clip, audio_base64, audio_file, be.settings.max_clip_s)
        record, samples = await talk(be, character, clip, seed, await progress_to(ctx))
        return await _audio_reply(be, record, samples, "mono 24 kHz 16-bit WAV: the NPC's side, on the clip's "
                                  "timeline", audio_output)

    @mcp.tool(annotations=_hints(open_world=remote, title="Make a character say a line"))
    @_tool_errors
    async def say(
        character: Annotated[str, Field(description="the character that speaks")],
        text: Annotated[str | None, Field(min_length=1, max_length=MAX_SAY_CHARS,
                                          description="the words to say")] = None,
        line: Annotated[str | None, Field(description="or the name of one of the character's scripted lines, "
                                                      "e.g. greeting")] = None,
        seconds: Annotated[float | None, Field(gt=0, le=be.settings.max_clip_s, description=(
            "how long to run (default: long enough for the line, one token every 3 frames, plus about a second)"))]
        = None,
        seed: Seed = 0,
        audio_output: Annotated[AudioOutput, Field(description=AUDIO_OUTPUT_HELP)] = "inline",
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, out.Reply]:
        """The NPC speaks a given line: the line is forced into its text stream (one token every 3 frames; the
        model voices what its text stream says) while it hears silence. Returns its voice (mono 24 kHz WAV) and the
        transcript of what it said."""
        if audio_output == "file":
            be.audio_folder.replies_dir()
        words = line_of(be, character, text, line)
        length = seconds if seconds is not None else say_seconds(be, words)
        clip = np.zeros(max(1, round(length * MODEL_RATE)), np.float32)  # it hears silence
        record, samples = await talk(be, character, clip, seed, await progress_to(ctx), say=words)
        return await _audio_reply(be, record, samples, "mono 24 kHz 16-bit WAV: the NPC saying the line",
                                  audio_output)

    @mcp.tool(annotations=_hints(open_world=remote, title="Run a scene between two characters"))
    @_tool_errors
    async def run_scene(
        character_a: Annotated[str, Field(description="first character (left channel)")],
        character_b: Annotated[str, Field(description="second character (right channel); the same id as "
                                                      "character_a makes a scene of a character with itself, its "
                                                      "sides named 'id (A)' and 'id (B)'")],
        seconds: Annotated[float, Field(gt=0, le=be.settings.max_scene_s, description="how long they talk")] = 10.0,
        seed: Seed = 0,
        audio_output: Annotated[AudioOutput, Field(description=AUDIO_OUTPUT_HELP)] = "inline",
        ctx: Context | None = None,
    ) -> Annotated[CallToolResult, out.Reply]:
        """Two characters talk to each other for `seconds`: each NPC's voice is the other's input, frame by frame.
        Returns the transcript (words with times and speakers) and a STEREO WAV: character_a left, character_b
        right."""
        if audio_output == "file":
            be.audio_folder.replies_dir()
        record, stereo = await scene(be, character_a, character_b, seconds, seed, await progress_to(ctx))
        left, right = record.speakers
        return await _audio_reply(be, record, stereo, f"stereo 24 kHz 16-bit WAV: left = {left}, right = {right}",
                                  audio_output)

    @mcp.tool(annotations=_hints(read_only=True, idempotent=True, title="Get a transcript"))
    @_tool_errors
    async def get_transcript(session: Annotated[str, Field(description="a session id, e.g. talk-3")]) -> out.Transcript:
        """The transcript of a session: words with start/end seconds and speakers (also `transcript://{session}`)."""
        return be.record(session).transcript()

    @mcp.tool(annotations=_hints(destructive=True, idempotent=True, open_world=remote, title="End a session"))
    @_tool_errors
    async def end_session(session: Annotated[str, Field(description="a session id")]) -> out.Ended:
        """End a session: a running talk or scene stops at its next frame (its call returns what it has); a player
        session's details are withdrawn (the embedded websocket server stops with the last one)."""
        import anyio

        return await anyio.to_thread.run_sync(be.end_session, session)

    @mcp.tool(annotations=_hints(read_only=True, open_world=remote, title="Server status"))
    @_tool_errors
    async def server_status() -> out.Status:
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

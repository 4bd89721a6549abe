"""The tools' output schemas: what `structuredContent` holds (published as each tool's `outputSchema`,
and checked by the SDK before a result leaves). TypedDicts, so keys a result leaves out stay out."""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import NotRequired, TypedDict


class CharacterSummary(TypedDict):
    id: str
    name: str
    description: str
    voice: str  # "voice.wav" (the character's sample) or a preset name
    tags: list[str]
    uri: str  # character://{id}


class CharacterFull(CharacterSummary):
    role: str
    sampling: dict[str, float | int]
    lines: dict[str, str]


class Validation(TypedDict):
    ok: bool
    summary: str
    warnings: list[str]
    errors: list[str]


class Broken(TypedDict):
    id: str
    error: str


class CharacterList(TypedDict):
    characters: list[CharacterSummary]
    broken: list[Broken]
    folder: str


class CharacterInfo(TypedDict):
    character: CharacterFull
    validation: Validation


class Created(TypedDict):
    created: CharacterFull
    validation: Validation


class Updated(TypedDict):
    updated: CharacterFull
    validation: Validation


class Deleted(TypedDict):
    deleted: str


class Presets(TypedDict):
    installed: list[str]
    presets_dir: str
    known_names: list[str]
    note: str


class AudioFolder(TypedDict):
    path: str | None
    files: list[str]
    note: str


class Voices(TypedDict):
    presets: Presets
    audio_folder: AudioFolder
    character_voices: dict[str, str]


class StartMessage(TypedDict):
    type: Literal["start"]
    character: str
    sample_rate: int
    protocol: int


class PlayerSession(TypedDict):
    session: str
    websocket_url: str
    token: str | None
    auth: str
    url_with_token: str
    start_message: StartMessage
    audio: str
    protocol: str
    embedded: bool
    warning: NotRequired[str]
    note: NotRequired[str]


Status_ = Literal["running", "finished", "ended", "cancelled", "failed", "open"]


class Word(TypedDict):
    speaker: str
    word: str
    start: float  # seconds from the conversation's start
    end: float


class Transcript(TypedDict):
    session: str
    kind: Literal["player", "talk", "say", "scene"]
    characters: list[str]
    speakers: list[str]  # the names words are attributed to ("id (A)", "id (B)" for a character with itself)
    status: Status_
    seconds: float
    text: dict[str, str]  # speaker -> their words
    words: list[Word]
    note: NotRequired[str]
    error: NotRequired[str]


class Reply(Transcript):
    """talk_to_character, say, run_scene: the transcript plus where the audio is."""

    audio: str  # what the WAV holds
    audio_output: Literal["inline", "file", "none"]
    transcript_uri: str
    audio_file: NotRequired[str]  # audio_output="file": the WAV's path inside the audio folder
    audio_path: NotRequired[str]  # ... and its absolute path


class Ended(TypedDict):
    session: str
    status: str  # "stopping", "ended", or the status the session already had
    message: str


class SessionSummary(TypedDict):
    session: str
    kind: str
    characters: list[str]
    status: Status_
    seconds: float
    words: int


class Status(TypedDict):
    mode: Literal["embedded", "remote"]
    characters_dir: str
    characters: int
    presets_dir: str
    audio_dir: str | None
    sessions: list[SessionSummary]
    server_url: NotRequired[str]  # remote
    server: NotRequired[dict[str, Any]]  # remote: its /health
    model: NotRequired[dict[str, Any]]  # embedded
    warning: NotRequired[str]  # embedded without weights
    player_server: NotRequired[dict[str, Any] | None]  # embedded
    engine: NotRequired[dict[str, Any]]  # embedded, once a conversation ran

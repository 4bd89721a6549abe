"""The one path from a character to the engine's `Persona`, and the one way preset voices are found.

`resolve_persona(store, spec)` takes what `npc-voice serve` (a `start`/`switch` message), the MCP
server and `npc-voice talk --character` are given: a stored character's id, or an inline character
(a role and a voice: a WAV in base64, or a preset name). Every refusal is a `ResolveError` whose
`code` is one of the protocol's error codes (docs/protocol.md): `unknown_character`,
`invalid_character`, `unknown_voice`, `voice_too_large`; the server sends it as is, the MCP server
and the command line word it as their errors.

A preset name resolves to `<presets folder>/<NAME>.pt` (`preset_path`); it is installed when that
file is there (`find_preset`, `installed_presets`). The store, its checks, the command line and the
MCP server's `list_voices` all go through these.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..audio import AudioError, load_mono
from ..protocol import (
    DEFAULT_LIMITS, MODEL_RATE, ErrorCode, InlineCharacter, Limits, ProtocolError, decode_inline_voice,
)
from .model import ID_PATTERN, ID_RULE, PRESET_PATTERN, VOICE_MAX_S, Character, CharacterError, check_voice_audio

if TYPE_CHECKING:
    from ..engine import Persona
    from .store import CharacterStore

PRESET_SUFFIX = ".pt"  # a PersonaPlex preset voice: NATF2.pt (voices.tgz of nvidia/personaplex-7b-v1)


# --- preset voices ------------------------------------------------------------------------------


def preset_path(presets_dir: str | Path, name: str) -> Path:
    """Where preset voice `name` lives: `<presets_dir>/<name>.pt`, whether it is there or not."""
    return Path(presets_dir) / f"{name}{PRESET_SUFFIX}"


def find_preset(presets_dir: str | Path | None, name: str) -> Path | None:
    """The file of preset voice `name` when it is installed, else None (also for no folder, or a
    name that is no preset name: a name never becomes another path)."""
    if presets_dir is None or not PRESET_PATTERN.match(name):
        return None
    path = preset_path(presets_dir, name)
    return path if path.is_file() else None


def installed_presets(presets_dir: str | Path | None) -> list[str]:
    """The preset names `find_preset` finds in `presets_dir`, sorted."""
    folder = Path(presets_dir) if presets_dir is not None else None
    if folder is None or not folder.is_dir():
        return []
    names = (p.name[: -len(PRESET_SUFFIX)] for p in folder.iterdir() if p.name.endswith(PRESET_SUFFIX))
    return sorted(name for name in names if find_preset(folder, name) is not None)


# --- characters ---------------------------------------------------------------------------------


class ResolveError(Exception):
    """A character that cannot become a `Persona`.

    `code` is the protocol's error code: `UNKNOWN_CHARACTER` (no stored character with that id, or
    no store), `INVALID_CHARACTER` (an inline character's values, an unreadable or too short inline
    voice, a stored character that is broken or whose voice is missing or leads outside its folder),
    `UNKNOWN_VOICE` (an inline character's preset is not installed), `VOICE_TOO_LARGE` (an inline
    voice over the size or duration limit). `message` says what is wrong, in the protocol's words.
    """

    CODES = (ErrorCode.UNKNOWN_CHARACTER, ErrorCode.INVALID_CHARACTER, ErrorCode.UNKNOWN_VOICE,
             ErrorCode.VOICE_TOO_LARGE)

    def __init__(self, code: ErrorCode, message: str):
        assert code in self.CODES, code
        super().__init__(message)
        self.code, self.message = code, message


def resolve_persona(store: CharacterStore | None, spec: str | InlineCharacter,
                    limits: Limits = DEFAULT_LIMITS) -> tuple[Persona, str]:
    """A character -> (the engine's Persona, a label: the id of a stored one, the name of an inline one).

    A string is a stored character's id: it goes through the store's id validation (a slug that
    stays inside its folder) and never reaches the file system otherwise; the store's tokenizer
    counts its role. An inline character is validated with the same schema (`Character`); its voice
    is a base64 WAV decoded in memory (at most `limits.max_voice_bytes`, 2 s to
    `limits.max_voice_seconds`), or a preset name found in the store's presets folder. Raises
    `ResolveError`.
    """
    if isinstance(spec, str):
        return _stored(store, spec)
    return _inline(store, spec, limits)


def _stored(store: CharacterStore | None, id: str) -> tuple[Persona, str]:
    if store is None:
        raise ResolveError(ErrorCode.UNKNOWN_CHARACTER, f"no character {id[:64]!r}: this server has no characters "
                           "folder (start it with --characters DIR) - send an inline character")
    if not ID_PATTERN.match(id):  # before anything looks at the disk
        raise ResolveError(ErrorCode.UNKNOWN_CHARACTER, f"{id[:64]!r} is not a character id: ids have {ID_RULE}")
    if id not in store:
        raise ResolveError(ErrorCode.UNKNOWN_CHARACTER, f"no character {id!r} on this server")
    try:
        character = store.load(id)
        return character.to_persona(store), character.id
    except CharacterError as exc:
        raise ResolveError(ErrorCode.INVALID_CHARACTER, f"character {id!r} cannot be used: {exc}") from None


def _inline(store: CharacterStore | None, spec: InlineCharacter, limits: Limits) -> tuple[Persona, str]:
    from ..engine import Persona

    data = {"id": "inline", "name": spec.name, "role": spec.role}
    if spec.voice.preset is not None:
        data["voice"] = spec.voice.preset
    try:
        character = Character.parse(data, tokenizer=getattr(store, "tokenizer", None))
    except CharacterError as exc:
        raise ResolveError(ErrorCode.INVALID_CHARACTER, f"inline character: {exc}") from None
    if spec.voice.preset is not None:
        if store is None:
            raise ResolveError(ErrorCode.UNKNOWN_VOICE, "this server has no preset voices (no characters folder)")
        try:
            return character.to_persona(store), character.name
        except CharacterError:
            raise ResolveError(ErrorCode.UNKNOWN_VOICE, f"no preset voice {spec.voice.preset!r} on this server") \
                from None
    try:
        raw = decode_inline_voice(spec.voice, limits)
    except ProtocolError as exc:  # not base64, or over the size limit
        raise ResolveError(exc.code, exc.message) from None
    try:
        samples = load_mono(raw, MODEL_RATE, mode="first")
    except AudioError as exc:
        raise ResolveError(ErrorCode.INVALID_CHARACTER, f"inline voice: {exc}") from None
    seconds = samples.shape[0] / MODEL_RATE
    limit = min(limits.max_voice_seconds, VOICE_MAX_S)
    if seconds > limit:
        raise ResolveError(ErrorCode.VOICE_TOO_LARGE, f"the inline voice is {seconds:.1f} s long; the limit is "
                           f"{limit:.0f} s (3-10 s is best)")
    errors = [p for p in check_voice_audio(samples, MODEL_RATE) if p.level == "error"]
    if errors:
        raise ResolveError(ErrorCode.INVALID_CHARACTER, f"inline voice: {errors[0].message}")
    persona = Persona(role=character.role, voice_samples=samples, name=character.name,
                      sampling=character.to_sampling())
    return persona, character.name

"""The character definition: a pydantic schema, its TOML form, and the checks that say what is
wrong with a character and how to fix it.

Two levels of checking:
- the schema (`Character`, run whenever a character is built or parsed) refuses what can never work:
  an unsafe id, an empty role, a role whose prompt would eat the context, bad sampling values;
- `check_character` also looks at the files (the voice sample's length and readability, a preset's
  `.pt`) and gives warnings for what works but is unwise (a long role, a sample outside 3-10 s).

Over 400 lines because the schema and the checks share every limit and every wording of a problem
(a refusal by the schema and the same problem found by `check_character` must read alike).
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError, ValidationInfo, field_validator

from ..model.config import FRAME_MS, FRAME_SECONDS, SAMPLE_RATE, SILENCE_FRAMES, LMConfig, prompt_length

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from ..engine import Persona
    from ..model.generator import Sampling

# --- limits -----------------------------------------------------------------------------------

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}\Z")
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
LINE_KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
PRESET_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")  # NATF0-3, NATM0-3, VARF0-4, VARM0-4, ...
VOICE_FILE = "voice.wav"  # the one file name a character's sample may have
CHARACTER_FILE = "character.toml"
KNOWN_PRESETS = tuple(f"{kind}{sex}{i}" for kind, n in (("NAT", 4), ("VAR", 5)) for sex in "FM" for i in range(n))

# Frame length, rate, prompt silence and context are the model's (npc_voice.model.config), never re-typed.
# One prompt token or voice frame = one FRAME_SECONDS model frame. The checks take the context of the
# model in use (`--context` changes it); CONTEXT_FRAMES, the PersonaPlex default, is only for callers
# without a model at hand.
CONTEXT_FRAMES = LMConfig.context
ROLE_TOKENS_WARN = 200  # above: a warning (16 s of prompt; the PersonaPlex examples are 30-90 tokens)
ROLE_TOKENS_MAX = 1000  # above: refused (80 s of prompt, a third of PersonaPlex's context)
VOICE_MIN_S, VOICE_MAX_S = 2.0, 20.0  # refused outside
VOICE_GOOD_MIN_S, VOICE_GOOD_MAX_S = 3.0, 10.0  # recommended
NAME_MAX, DESCRIPTION_MAX, LINE_MAX = 64, 500, 1000
VOICE_RATE = SAMPLE_RATE  # the store keeps voice samples at the model's rate

ID_RULE = "1-48 lowercase letters, digits, '-' or '_', starting with a letter or digit"


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


# --- problems ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding about a character: an error (it cannot be used) or a warning."""

    level: Literal["error", "warning"]
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.field}: {self.message}" if self.field else f"{self.level}: {self.message}"


class CharacterError(ValueError):
    """A character that cannot be loaded, saved or used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem] | str, character: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("error", "", problems)]
        self.problems = problems
        self.character = character
        head = f"character {character!r}: " if character else ""
        lines = [str(p) for p in problems if p.level == "error"] or [str(p) for p in problems]
        super().__init__(head + ("; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines)))


def _problems_from_validation(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in err["loc"])
        kind = err["type"]
        if kind == "value_error":
            message = str(err.get("ctx", {}).get("error", err["msg"]))
        elif kind == "missing":
            message = f"missing: add `{where.split('.')[-1]} = ...` to {CHARACTER_FILE}"
        elif kind == "extra_forbidden":
            message = "unknown field: remove it or fix its spelling (see docs/characters.md for the fields)"
        else:
            message = f"{err['msg']} (got {err.get('input')!r})"
        out.append(Problem("error", where, message))
    return out


# --- tokenizer and budget ---------------------------------------------------------------------

_builtin_lock = threading.Lock()
_builtin_tokenizer: TokenizerLike | None = None


def builtin_tokenizer() -> TokenizerLike:
    global _builtin_tokenizer
    with _builtin_lock:
        if _builtin_tokenizer is None:
            from ..model.tokenizer import TextTokenizer

            _builtin_tokenizer = TextTokenizer.builtin()
        return _builtin_tokenizer


def max_top_k() -> int:
    """The largest top-k the sampler honours (`npc_voice.model.sampling.MAX_TOP_K`, its one owner;
    imported on first use, so that reading characters does not load torch)."""
    from ..model.sampling import MAX_TOP_K

    return MAX_TOP_K


def role_tokens(role: str, tokenizer: TokenizerLike | None = None) -> int:
    """Text-prompt frames the role costs: tokens of "<system> {role} <system>", as the engine builds it."""
    tokenizer = tokenizer or builtin_tokenizer()
    return len(tokenizer.encode("<system> " + role.strip() + " <system>"))


def _tokenizer_note(tokenizer: TokenizerLike | None) -> str:
    if tokenizer is None or tokenizer is _builtin_tokenizer:
        return ("counted with the built-in 1000-piece tokenizer, which needs about twice as many tokens as "
                "PersonaPlex's 32k one; validate with --weights or --tokenizer for the exact count")
    return f"counted with {getattr(tokenizer, 'path', 'the model tokenizer')}"


def _too_long(n: int, tokenizer: TokenizerLike | None) -> str:
    return (f"the role is {n} tokens: its prompt would take {n} frames ({n * FRAME_SECONDS:.0f} s, one "
            f"{FRAME_MS} ms frame per token); the limit is {ROLE_TOKENS_MAX} tokens (under "
            f"{ROLE_TOKENS_WARN} recommended): shorten it to the facts the NPC must use ({_tokenizer_note(tokenizer)})")


def slugify(text: str) -> str:
    """A safe id suggested for a name: 'Old Miller!' -> 'old-miller'."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    return slug[:48].rstrip("-_") or "npc"


# --- schema -----------------------------------------------------------------------------------


class SamplingSettings(BaseModel):
    """Optional per-character sampling; unset values take the reference's defaults
    (text 0.7 / top-k 25, audio 0.8 / top-k 250). A temperature of 0 is greedy."""

    model_config = ConfigDict(extra="forbid")

    text_temperature: float | None = None
    text_top_k: StrictInt | None = None  # a whole number as such: not true, not "20"
    audio_temperature: float | None = None
    audio_top_k: StrictInt | None = None

    @field_validator("text_temperature", "audio_temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0.0 <= v <= 2.0):
            raise ValueError(f"temperature {v} is out of range: use 0 (greedy) to 2; the defaults are 0.7 (text) "
                             "and 0.8 (audio)")
        return v

    @field_validator("text_top_k", "audio_top_k")
    @classmethod
    def _top_k(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None:
            limit = max_top_k()
            if not 1 <= v <= limit:
                from ..model.generator import Sampling

                d = Sampling()
                raise ValueError(f"top-k {v} is out of range: use 1 to {limit} (the sampler keeps at most the {limit} "
                                 f"likeliest tokens; a larger top-k would be cut to {limit} without a word); the "
                                 f"defaults are {d.text_top_k} (text) and {d.audio_top_k} (audio)")
        return v

    def is_default(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)

    def to_sampling(self) -> Sampling:
        from ..model.generator import Sampling

        defaults = Sampling()
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return Sampling(**{k: (v if v is not None else getattr(defaults, k)) for k, v in values.items()})


class Character(BaseModel):
    """An NPC: who it is (role prompt), how it sounds (voice), and how it samples.

    Build it with `Character(...)` or `Character.from_toml(text)`; pass
    `context={"tokenizer": tok}` to `model_validate` to count the role's tokens with the model's own
    tokenizer (the built-in one otherwise).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str
    name: str
    description: str = ""
    role: str
    voice: str = VOICE_FILE
    sampling: SamplingSettings = SamplingSettings()
    lines: dict[str, str] = {}
    tags: list[str] = []

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            hint = slugify(v)
            raise ValueError(f"{v!r} is not a safe id: use {ID_RULE} (for example {hint!r})")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("the display name is empty: give the name players see, e.g. name = \"Marta Holloway\"")
        if "\n" in v or len(v) > NAME_MAX:
            raise ValueError(f"the display name must be one line of at most {NAME_MAX} characters (it has {len(v)}): "
                             "put details in `description`")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        v = v.strip()
        if len(v) > DESCRIPTION_MAX:
            raise ValueError(f"the description has {len(v)} characters, more than {DESCRIPTION_MAX}: keep it to a "
                             "sentence or two (what the model must know belongs in `role`)")
        return v

    @field_validator("role")
    @classmethod
    def _role(cls, v: str, info: ValidationInfo) -> str:
        v = v.replace("\r\n", "\n").replace("\r", "\n")
        if not v.strip():
            raise ValueError("the role is empty: write the PersonaPlex text prompt, who the NPC is and what it "
                             "knows, e.g. \"You are a wise and friendly teacher. Answer questions or provide advice "
                             "in a clear and engaging way.\"")
        tokenizer = (info.context or {}).get("tokenizer")
        n = role_tokens(v, tokenizer)
        if n > ROLE_TOKENS_MAX:
            raise ValueError(_too_long(n, tokenizer))
        return v

    @field_validator("voice")
    @classmethod
    def _voice(cls, v: str) -> str:
        v = v.strip()
        if v == VOICE_FILE:
            return v
        if "/" in v or "\\" in v or "." in v or not v:
            raise ValueError(f"voice {v!r} must be {VOICE_FILE!r} (the sample in the character's folder) or a "
                             f"PersonaPlex preset name such as NATF2; other files cannot be referenced: import a "
                             f"sample with `npc-voice characters create ID --voice FILE` (it is stored as {VOICE_FILE})")
        if not PRESET_PATTERN.match(v):
            raise ValueError(f"voice preset {v!r} is not a valid preset name: letters, digits, '-' or '_' "
                             f"(the PersonaPlex presets: {', '.join(KNOWN_PRESETS)})")
        return v

    @field_validator("lines")
    @classmethod
    def _lines(cls, v: dict[str, str]) -> dict[str, str]:
        for key, text in v.items():
            if not LINE_KEY_PATTERN.match(key):
                raise ValueError(f"line name {key!r} is not allowed: use lowercase letters, digits, '-' or '_' "
                                 "(e.g. greeting, farewell)")
            if not text.strip():
                raise ValueError(f"line {key!r} is empty: write the text or remove it")
            if len(text) > LINE_MAX:
                raise ValueError(f"line {key!r} has {len(text)} characters, more than {LINE_MAX}: split it")
        return {k: t.strip() for k, t in v.items()}

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not TAG_PATTERN.match(tag):
                raise ValueError(f"tag {tag!r} is not allowed: use lowercase letters, digits, '-' or '_' "
                                 f"(for example {slugify(tag)[:32]!r})")
        return list(dict.fromkeys(v))  # duplicates dropped, order kept

    # --- conversions ----------------------------------------------------------------------

    @classmethod
    def parse(cls, data: dict[str, Any], *, tokenizer: TokenizerLike | None = None) -> Character:
        """Validates a dict; every problem is reported at once as a `CharacterError`."""
        try:
            return cls.model_validate(data, context={"tokenizer": tokenizer})
        except ValidationError as exc:
            raise CharacterError(_problems_from_validation(exc), data.get("id") if isinstance(data, dict) else None) from None

    @classmethod
    def from_toml(cls, text: str, *, id: str | None = None, tokenizer: TokenizerLike | None = None,
                  template: bool = False) -> Character:
        """Parses a `character.toml`; `id` is the folder name (the file's own `id`, if any, must match;
        with `template`, another character's file, the file's id is replaced by `id`)."""
        try:
            data = tomllib.loads(text.removeprefix("\ufeff"))  # a byte-order mark (Windows Notepad) is no text
        except tomllib.TOMLDecodeError as exc:
            raise CharacterError(f"{CHARACTER_FILE} is not valid TOML: {exc} (multi-line text goes between "
                                 '""" and """)', id) from None
        if id is not None:
            if "id" in data and data["id"] != id and not template:
                raise CharacterError([Problem("error", "id", f"{CHARACTER_FILE} says id = {data['id']!r} but its "
                                              f"folder is {id!r}: make them the same (the folder name is the id)")], id)
            data["id"] = id
        return cls.parse(data, tokenizer=tokenizer)

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout: plain fields first, then the [sampling] and [lines] tables; unset values left out."""
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["voice"] = self.voice
        if self.tags:
            out["tags"] = list(self.tags)
        out["role"] = self.role  # exactly: multi-line text is written as a """...""" string
        sampling = self.sampling.model_dump(exclude_none=True)
        if sampling:
            out["sampling"] = sampling
        if self.lines:
            out["lines"] = dict(self.lines)
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict(), multiline_strings=True)

    @property
    def uses_preset(self) -> bool:
        return self.voice != VOICE_FILE

    def to_sampling(self) -> Sampling:
        return self.sampling.to_sampling()

    def to_persona(self, store: Any) -> Persona:
        """The engine's view of this character: its voice file (the sample in its folder, or
        `<presets dir>/<NAME>.pt`), its role and its sampling. `store` is a `CharacterStore` (or
        anything with `voice_file(character) -> Path`); a missing sample or preset raises
        `CharacterError`."""
        from ..engine import Persona

        path = store.voice_file(self)
        return Persona(role=self.role, voice_path=str(path), name=self.id, sampling=self.to_sampling())


# --- deep checks ------------------------------------------------------------------------------


@dataclass
class Report:
    """What `check_character` found, and the numbers behind it."""

    id: str
    problems: list[Problem] = field(default_factory=list)
    role_tokens: int | None = None
    voice_seconds: float | None = None
    prompt_frames: int | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        parts = []
        if self.voice_seconds is not None:
            parts.append(f"voice {self.voice_seconds:.1f} s")
        if self.role_tokens is not None:
            parts.append(f"role {self.role_tokens} tokens")
        if self.prompt_frames is not None:
            parts.append(f"prompt {self.prompt_frames} frames ({self.prompt_frames * FRAME_SECONDS:.1f} s)")
        return ", ".join(parts)


def _seconds(seconds: float, limit: float) -> str:
    """`seconds` to one decimal, or to two (rounded away from `limit`) where one would read as the
    limit itself: 1.99 s is "1.99", not "2.0", beside "shorter than 2 s"."""
    shown = f"{seconds:.1f}"
    if (float(shown) <= limit) != (seconds <= limit) or float(shown) == limit:
        return f"{(math.ceil if seconds > limit else math.floor)(round(seconds * 100, 6)) / 100:.2f}"
    return shown


def check_voice_audio(samples: np.ndarray, rate: int, where: str = "voice") -> list[Problem]:
    """Length and signal checks of a voice sample (mono float samples)."""
    from ..audio import loudness

    seconds = samples.shape[-1] / rate
    how = f"record or cut a sample of {VOICE_GOOD_MIN_S:.0f}-{VOICE_GOOD_MAX_S:.0f} s of clear speech"
    if seconds < VOICE_MIN_S:
        return [Problem("error", where, f"the voice sample is {_seconds(seconds, VOICE_MIN_S)} s long, shorter than "
                        f"{VOICE_MIN_S:.0f} s: too little for the model to pick up the voice; {how}")]
    if seconds > VOICE_MAX_S:
        return [Problem("error", where, f"the voice sample is {_seconds(seconds, VOICE_MAX_S)} s long, longer than "
                        f"{VOICE_MAX_S:.0f} s: each {FRAME_MS} ms costs a prompt frame "
                        f"({math.ceil(seconds / FRAME_SECONDS)} frames); {how}")]
    problems = []
    if not VOICE_GOOD_MIN_S <= seconds <= VOICE_GOOD_MAX_S:
        limit = VOICE_GOOD_MAX_S if seconds > VOICE_GOOD_MAX_S else VOICE_GOOD_MIN_S
        problems.append(Problem("warning", where, f"the voice sample is {_seconds(seconds, limit)} s long; "
                                f"{VOICE_GOOD_MIN_S:.0f}-{VOICE_GOOD_MAX_S:.0f} s is recommended"))
    if not np.isfinite(loudness(samples, rate)):
        problems.append(Problem("warning", where, "the voice sample is silent: the voice prompt will carry no voice"))
    return problems


def _stays_in(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks followed, is still the file of that name directly in `folder` (the store's rule)."""
    resolved = path.resolve()
    return resolved.parent == folder.resolve() and resolved.name == path.name


def check_character(character: Character, folder: Path | None, *, tokenizer: TokenizerLike | None = None,
                    presets_dir: Path | None = None, context_frames: int = CONTEXT_FRAMES) -> Report:
    """Everything that can be said about a (schema-valid) character: the role's token count, its voice
    sample (readable, 2-20 s, 3-10 s recommended) or preset, and the prompt's share of the context.

    `context_frames`: the context of the model the character will run on (`model.config.lm.context`,
    which `--context` changes): whoever has a model passes its context (the store passes its
    `context_frames`); the default, PersonaPlex's, is for callers without a model."""
    if not isinstance(context_frames, int) or isinstance(context_frames, bool) or context_frames < 1:
        raise ValueError(f"context_frames must be a positive number of frames, got {context_frames!r}")
    from ..audio import AudioError, read_audio, to_mono
    from .resolve import find_preset

    report = Report(character.id)
    problems = report.problems
    n = report.role_tokens = role_tokens(character.role, tokenizer)
    if n > ROLE_TOKENS_MAX:  # possible when the schema counted with another tokenizer
        problems.append(Problem("error", "role", _too_long(n, tokenizer)))
    elif n > ROLE_TOKENS_WARN:
        problems.append(Problem("warning", "role", f"the role is {n} tokens ({n * FRAME_SECONDS:.1f} s of prompt, one "
                                f"{FRAME_MS} ms frame per token); under {ROLE_TOKENS_WARN} is recommended: a long "
                                "prompt delays every new conversation and uses context "
                                f"({_tokenizer_note(tokenizer)})"))

    voice_frames = None
    if not character.uses_preset:
        path = folder / VOICE_FILE if folder is not None else None
        if path is not None and path.is_symlink() and not _stays_in(path, folder):
            problems.append(Problem("error", "voice", f"{VOICE_FILE} is a symlink leading outside the character's "
                                    f"folder (to {os.path.realpath(path)}): using it is refused; import the sample "
                                    f"with `npc-voice characters create {character.id} --force --voice FILE`"))
        elif path is None or not path.is_file():
            problems.append(Problem("error", "voice", f"no {VOICE_FILE} in the character's folder: import a sample "
                                    f"with `npc-voice characters create {character.id} --force --voice FILE` or set a "
                                    "preset, e.g. voice = \"NATF2\""))
        else:
            try:
                audio = read_audio(path)
            except AudioError as exc:
                problems.append(Problem("error", "voice", f"{exc}: replace it with `npc-voice characters create "
                                        f"{character.id} --force --voice FILE`"))
            else:
                report.voice_seconds = audio.duration
                problems.extend(check_voice_audio(to_mono(audio, "first"), audio.sample_rate))
                voice_frames = math.ceil(audio.samples.shape[-1] / audio.sample_rate / FRAME_SECONDS)
                if audio.sample_rate != VOICE_RATE or audio.channels != 1:
                    problems.append(Problem("warning", "voice", f"{VOICE_FILE} is {audio.sample_rate} Hz with "
                                            f"{audio.channels} channel(s); the store keeps {VOICE_RATE // 1000} kHz "
                                            "mono (only the first channel is used): re-import it with "
                                            "`characters create --force --voice`"))
    elif (preset := find_preset(presets_dir, character.voice)) is None:
        where = f"in {presets_dir}" if presets_dir is not None else "(no presets folder set)"
        problems.append(Problem("warning", "voice", f"preset {character.voice}.pt not found {where}: unpack "
                                "voices.tgz of nvidia/personaplex-7b-v1 there or pass --voices DIR before using "
                                "this character"))
    else:  # an installed preset: its frames count as a sample's do
        from ..engine.prompt import voice_from_preset

        try:
            voice_frames = voice_from_preset(character.voice, str(preset), None).frames
        except ValueError as exc:
            problems.append(Problem("error", "voice", str(exc)))
    if voice_frames is not None:
        frames = report.prompt_frames = prompt_length(voice_frames, n)
        if frames >= context_frames // 2:
            problems.append(Problem("error", "", f"the prompt takes {frames} frames (voice {voice_frames} + silence "
                                    f"2 x {SILENCE_FRAMES} + role {n}), half or more of the {context_frames}-frame "
                                    "context: shorten the role or the voice sample"))
    return report

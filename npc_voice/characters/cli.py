"""`npc-voice characters list|show|create|validate|delete`, and the `talk --character` hook."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..protocol import ErrorCode
from .model import CHARACTER_FILE, CONTEXT_FRAMES, PRESET_PATTERN, VOICE_FILE, Character, CharacterError, Report
from .paths import default_characters_dir
from .resolve import ResolveError, preset_path, resolve_persona
from .store import CharacterStore, open_store

SPM_NAME = "tokenizer_spm_32k_3.model"  # the text tokenizer in a PersonaPlex weights folder


def _err(message: str) -> None:
    print(f"npc-voice characters: {message}", file=sys.stderr)


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--characters", metavar="DIR", help="characters folder (default: $NPC_VOICE_CHARACTERS, "
                   "./characters when present, else the shipped cast)")
    p.add_argument("--voices", metavar="DIR", help="folder of PersonaPlex preset voices (NATF2.pt, ...); default: "
                   "$NPC_VOICE_VOICES, else voices/ beside the characters folder")


def store_of(args: argparse.Namespace, *, create: bool = False, tokenizer: Any = None,
             weights: Path | str | None = None, context_frames: int | None = None) -> CharacterStore:
    """`open_store` of `--characters` and `--voices`; a missing folder is an error. The character
    checks count against `context_frames`, else `--context`, else the --weights folder's config."""
    if context_frames is None:
        context_frames = _context(args)
    store = open_store(getattr(args, "characters", None), getattr(args, "voices", None), create=create,
                       tokenizer=tokenizer, weights=weights, context_frames=context_frames)
    if store is None:
        raise CharacterError(f"no characters folder at {default_characters_dir()}: create it, or pass --characters DIR")
    return store


def _context(args: argparse.Namespace) -> int | None:
    """The context the checks hold prompts to: --context, else the --weights folder's config.json, else
    None (the store's default, PersonaPlex's)."""
    context = getattr(args, "context", None)
    if context is not None:
        if context < 1:
            raise CharacterError(f"--context {context}: give a positive number of frames")
        return context
    if getattr(args, "weights", None) and Path(args.weights).is_dir():
        from ..model.config import get_preset
        from ..model.loading import read_configs

        try:
            return read_configs(Path(args.weights), get_preset("personaplex-7b"))[0].lm.context
        except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
            raise CharacterError(f"cannot read the model configuration in {args.weights}: {exc}") from None
    return None


def _tokenizer(args: argparse.Namespace):
    path = getattr(args, "tokenizer", None)
    if path is None and getattr(args, "weights", None):
        candidate = Path(args.weights) / SPM_NAME
        if not candidate.is_file():
            raise CharacterError(f"no {SPM_NAME} in {args.weights}: pass --tokenizer FILE")
        path = candidate
    if path is None:
        return None
    from ..model.tokenizer import TextTokenizer

    try:
        return TextTokenizer(path)
    except (OSError, RuntimeError) as exc:  # sentencepiece: a missing or foreign file
        raise CharacterError(f"--tokenizer {path}: not a SentencePiece model ({str(exc).splitlines()[0][:200]})") from None


def _print_report(report: Report, label: str | None = None) -> None:
    status = "ok" if report.ok else "FAILED"
    summary = report.summary()
    print(f"{status:6} {label or report.id}" + (f"  ({summary})" if summary else ""))
    for problem in report.problems:
        print(f"       {problem}")


# --- subcommands ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    rows = []
    for id, entry in store.entries():
        if isinstance(entry, CharacterError):
            rows.append({"id": id, "error": str(entry)})
        elif args.tag is None or args.tag in entry.tags:
            rows.append({"id": id, "name": entry.name, "voice": entry.voice, "tags": entry.tags,
                         "description": entry.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no characters in {store.root}")
        return 0
    width = max(len(r["id"]) for r in rows)
    for r in rows:
        if "error" in r:
            print(f"{r['id']:<{width}}  BROKEN: {r['error']}")
        else:
            tags = f"  [{', '.join(r['tags'])}]" if r["tags"] else ""
            print(f"{r['id']:<{width}}  {r['name']} — {r['description'] or '(no description)'}{tags}")
    print(f"{len(rows)} character(s) in {store.root}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = store_of(args, tokenizer=_tokenizer(args))
    if args.toml:
        print(store.read_toml(args.id), end="")
        return 0
    character = store.load(args.id)
    if args.json:
        print(json.dumps(character.model_dump(), indent=2))
        return 0
    report = store.validate(args.id)
    print(f"{character.name} ({character.id})")
    if character.description:
        print(f"  {character.description}")
    voice = store.folder(character.id) / VOICE_FILE if not character.uses_preset else \
        preset_path(store.presets_dir, character.voice)
    print(f"voice:    {character.voice}  ->  {voice}")
    if character.tags:
        print(f"tags:     {', '.join(character.tags)}")
    s = character.to_sampling()
    print(f"sampling: text {s.text_temperature} / top-k {s.text_top_k}, audio {s.audio_temperature} / "
          f"top-k {s.audio_top_k}")
    for key, text in character.lines.items():
        print(f"line {key}: {text}")
    print("role:")
    for line in character.role.strip().splitlines() or [""]:
        print(f"  {line}")
    _print_report(report, "check")
    return 0 if report.ok else 1


def _read_text_arg(value: str | None, file: str | None) -> str | None:
    if value is not None and file is not None:
        raise CharacterError("give the role once: --role TEXT or --role-file FILE, not both")
    if file is not None:
        return Path(file).read_text(encoding="utf-8-sig")
    return value


def cmd_create(args: argparse.Namespace) -> int:
    store = store_of(args, create=True, tokenizer=_tokenizer(args))
    store.folder(args.id)  # refuses an unsafe id before anything else
    with store.lock():  # read, change and write as one: another writer's update is not lost
        return _create(args, store)


def _create(args: argparse.Namespace, store: CharacterStore) -> int:
    if not args.force and args.id in store:
        raise CharacterError(f"character {args.id!r} already exists in {store.root}: choose another id, or add "
                             "--force to update it (what you leave out is kept)")
    data: dict[str, Any] = {}
    if args.from_toml:
        text = Path(args.from_toml).read_text(encoding="utf-8")  # another character's file is a template
        data = Character.from_toml(text, id=args.id, template=True).model_dump()
    elif args.force and args.id in store:
        data = store.load(args.id).model_dump()  # --force without --from: change only what is given
    data["id"] = args.id
    role = _read_text_arg(args.role, args.role_file)
    for key, value in (("name", args.name), ("description", args.description), ("role", role)):
        if value is not None:
            data[key] = value
    if args.tag:
        data["tags"] = args.tag
    lines = dict(data.get("lines") or {})
    if args.greeting is not None:
        lines["greeting"] = args.greeting
    for item in args.line or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise CharacterError(f"--line {item!r}: write KEY=TEXT, e.g. --line farewell='Safe travels!'")
        lines[key.strip()] = text
    data["lines"] = lines
    sampling = dict(data.get("sampling") or {})
    for key in ("text_temperature", "text_top_k", "audio_temperature", "audio_top_k"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    data["sampling"] = sampling

    sample = None
    if args.voice is not None:
        if Path(args.voice).is_file():
            sample, data["voice"] = args.voice, VOICE_FILE
        elif PRESET_PATTERN.match(args.voice):
            data["voice"] = args.voice
        else:
            raise CharacterError(f"--voice {args.voice!r}: no such file, and not a preset name (e.g. NATF2)")
    if "name" not in data:
        data["name"] = args.id.replace("-", " ").replace("_", " ").title()
    character = Character.parse(data, tokenizer=store.tokenizer)
    if not character.uses_preset and sample is None and not (args.force and args.id in store):
        raise CharacterError(f"{args.id!r} needs a voice: --voice FILE (a 3-10 s WAV/FLAC/OGG sample) or "
                             "--voice PRESET (e.g. NATF2)")
    report = store.create(character, sample, overwrite=args.force)
    _print_report(report, f"{'saved' if args.force else 'created'} {store.folder(character.id)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    store = store_of(args, tokenizer=_tokenizer(args))
    ids = args.ids or store.ids()
    strays = [] if args.ids else store.strays()  # folders that cannot be characters fail too
    if not ids and not strays:
        print(f"no characters in {store.root}")
        return 0
    failed = 0
    reports = []
    for id in ids:
        try:
            reports.append(store.validate(id))
        except CharacterError as exc:
            reports.append(Report(id, exc.problems))
    reports += [Report(name, exc.problems) for name, exc in strays]
    for report in reports:
        _print_report(report)
        failed += not report.ok or (args.strict and bool(report.warnings))
    print(f"{len(reports) - failed} of {len(reports)} character(s) valid in {store.root}")
    return 1 if failed else 0


def cmd_delete(args: argparse.Namespace) -> int:
    store = store_of(args)
    folder = store.folder(args.id)
    if args.id not in store:
        raise CharacterError(f"no character {args.id!r} in {store.root}")
    if not args.yes:
        _err(f"this removes {folder} and every file in it: add --yes to confirm")
        return 2
    store.delete(args.id)
    print(f"deleted {args.id} ({folder})")
    return 0


def _run(func):
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CharacterError as exc:
            _err(str(exc))
            return 1
        except OSError as exc:
            _err(str(exc))
            return 1

    return wrapper


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `npc-voice characters ...`."""
    parser = subparsers.add_parser("characters", help="list, show, create, validate and delete NPC characters",
                                   description="Characters live in one folder each: <dir>/<id>/character.toml and "
                                   "voice.wav (see docs/characters.md).")
    common = argparse.ArgumentParser(add_help=False)
    add_store_args(common)
    tok = argparse.ArgumentParser(add_help=False)
    tok.add_argument("--tokenizer", metavar="FILE", help="SentencePiece model to count role tokens with "
                     "(default: the built-in tokenizer)")
    tok.add_argument("--weights", metavar="DIR", help=f"PersonaPlex weights folder: count with its {SPM_NAME} "
                     "and check against its context")
    tok.add_argument("--context", type=int, metavar="FRAMES", help="the context the server runs with (its "
                     f"--context): a prompt must take less than half of it (default: the model's, {CONTEXT_FRAMES})")
    sub = parser.add_subparsers(dest="characters_command", required=True)

    p = sub.add_parser("list", parents=[common], help="the characters, one line each")
    p.add_argument("--tag", help="only characters with this tag")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_list))

    p = sub.add_parser("show", parents=[common, tok], help="one character in full, with its check")
    p.add_argument("id")
    p.add_argument("--toml", action="store_true", help=f"print its {CHARACTER_FILE} as stored")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("create", parents=[common, tok], help="add a character (--force: update one)",
                       description="Adds a character from options or a TOML file. The voice sample may be "
                       "WAV/FLAC/OGG at any rate and channel count; it is stored as 24 kHz mono voice.wav.")
    p.add_argument("id", help="a slug: lowercase letters, digits, '-', '_' (at most 48)")
    p.add_argument("--from", dest="from_toml", metavar="FILE", help="start from this character.toml")
    p.add_argument("--name", help="display name")
    p.add_argument("--description", help="one or two sentences for people (not the model)")
    p.add_argument("--role", help="the role prompt (PersonaPlex text prompt)")
    p.add_argument("--role-file", metavar="FILE", help="read the role prompt from a file (multi-line)")
    p.add_argument("--voice", help="a voice sample to import (3-10 s) or a preset name (NATF2, ...)")
    p.add_argument("--tag", action="append", help="a tag (repeatable)")
    p.add_argument("--greeting", help="scripted greeting line")
    p.add_argument("--line", action="append", metavar="KEY=TEXT", help="another scripted line (repeatable)")
    p.add_argument("--text-temperature", type=float)
    p.add_argument("--text-top-k", type=int)
    p.add_argument("--audio-temperature", type=float)
    p.add_argument("--audio-top-k", type=int)
    p.add_argument("--force", action="store_true", help="replace an existing character (other files are kept)")
    p.set_defaults(func=_run(cmd_create))

    p = sub.add_parser("validate", parents=[common, tok], help="check characters (all by default); exit 1 on errors")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.set_defaults(func=_run(cmd_validate))

    p = sub.add_parser("delete", parents=[common], help="remove a character and its folder")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=_run(cmd_delete))
    return parser


# --- talk --character -------------------------------------------------------------------------


def add_talk_args(talk: argparse.ArgumentParser) -> None:
    talk.add_argument("--character", metavar="ID", help="a character from the store (instead of --voice/--prompt)")
    add_store_args(talk)


def persona_for_talk(args: argparse.Namespace, model: Any, sampling: Any = None):
    """The engine Persona of `--character ID`, its role counted with the model's tokenizer; `sampling`
    (e.g. --greedy) overrides the character's. Exits with a message when the character can't be used."""
    if args.voice is not None or args.prompt is not None:
        raise SystemExit("npc-voice talk: give either --character or --voice and --prompt, not both")
    try:
        store = store_of(args, tokenizer=model.tokenizer, weights=args.weights,  # presets: also WEIGHTS/voices
                         context_frames=model.config.lm.context)
        persona, _ = resolve_persona(store, args.character)
        report = store.validate(args.character)  # the rules, the prompt's share of this model's context included
        if not report.ok:
            raise CharacterError(report.problems, args.character)
    except CharacterError as exc:
        raise SystemExit(f"npc-voice talk: {exc}") from None
    except ResolveError as exc:
        if exc.code is ErrorCode.UNKNOWN_CHARACTER:
            raise SystemExit(f"npc-voice talk: no character {args.character!r} in {store.root} (known: "
                             f"{', '.join(store.ids()) or 'none'})") from None
        raise SystemExit(f"npc-voice talk: {exc.message}") from None
    if sampling is not None:
        from dataclasses import replace

        persona = replace(persona, sampling=sampling)
    return persona

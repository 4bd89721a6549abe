"""A folder of characters, one sub-folder each: `<root>/<id>/character.toml` and `voice.wav`.

Safe to share between processes (the engine's server, an MCP server, the command line):
- every write builds the new character in a temporary folder inside the root and renames it into
  place; an update renames the old folder aside, renames the new one in, then removes the old one.
  A crash at any point leaves the old or the new character complete: a left-over aside folder is
  put back (or removed, when the new one made it) by the next writer, and readers read it meanwhile;
- writers take an exclusive `fcntl` lock on `<root>/.lock`, so they never interleave;
- ids are checked slugs and every path is resolved and checked to stay inside the root (a symlink
  pointing elsewhere is refused), and the only audio file name is `voice.wav`.
Imported audio (WAV/FLAC/OGG, any rate, any channel count) is stored as 24 kHz mono 16-bit WAV.

Over 400 lines because the crash-safe write protocol above (lock, temporary folder, renames,
recovery of a left-over aside folder) must be read as one piece to be trusted.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..audio import AudioError, load_mono, write_wav
from .model import (
    CHARACTER_FILE, CONTEXT_FRAMES, ID_PATTERN, ID_RULE, VOICE_FILE, VOICE_RATE, Character, CharacterError, Problem,
    Report, TokenizerLike, check_character, check_voice_audio, slugify,
)
from .paths import default_characters_dir
from .resolve import find_preset, preset_path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer process at a time is up to the user
    fcntl = None

LOCK_FILE = ".lock"
TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"  # never valid ids: ids start with [a-z0-9]

_HELD = threading.local()  # the store locks this thread holds

VoiceSource = str | Path | bytes | BinaryIO | np.ndarray  # a file, its bytes, or 24 kHz mono samples


def default_presets_dir(root: Path) -> Path:
    """Where preset names resolve: $NPC_VOICE_VOICES, else `voices/` beside the characters folder
    (unpack the release's voices.tgz there)."""
    env = os.environ.get("NPC_VOICE_VOICES")
    return Path(env) if env else root.parent / "voices"


def open_store(characters: str | Path | None = None, voices: str | Path | None = None, *, create: bool = False,
               tokenizer: TokenizerLike | None = None, weights: str | Path | None = None,
               context_frames: int | None = None) -> CharacterStore | None:
    """The character store of every command (serve, the MCP server, `characters`, `talk`).

    `characters`: the folder (default: `default_characters_dir()`); `create` makes it when missing.
    Otherwise a folder that was asked for and is missing raises `CharacterError`, and a missing
    default folder gives None (a server without characters). `voices`: the presets folder (default:
    `<weights>/voices` when `weights` is given and that folder exists, else `default_presets_dir`).
    `context_frames`: the model's context the character checks count against (default: PersonaPlex's).
    """
    root = Path(characters) if characters else default_characters_dir()
    if not create and not root.is_dir():
        if characters:
            raise CharacterError(f"no characters folder at {root}: create it, or pass --characters DIR")
        return None
    if not voices and weights and Path(weights, "voices").is_dir():  # the release's voices.tgz unpacked beside it
        voices = Path(weights, "voices")
    return CharacterStore(root, presets_dir=voices or None, tokenizer=tokenizer, create=create,
                          context_frames=context_frames)


def import_voice(source: VoiceSource) -> np.ndarray:
    """Any WAV/FLAC/OGG (path, bytes or file object) -> float32 24 kHz mono (channels mixed);
    a numpy array is taken as 24 kHz mono samples already."""
    if isinstance(source, np.ndarray):
        return np.asarray(source, dtype=np.float32).reshape(-1)
    return load_mono(source, VOICE_RATE, mode="mix")


def _pcm16_as_is(source: VoiceSource) -> np.ndarray | None:
    """The int16 samples of a file that is already 24 kHz mono 16-bit (stored bit for bit), else None."""
    import soundfile

    if not isinstance(source, (str, Path, bytes)):
        return None
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        info = soundfile.info(data)
        if (info.samplerate, info.channels, info.subtype) != (VOICE_RATE, 1, "PCM_16"):
            return None
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        return soundfile.read(data, dtype="int16")[0].reshape(-1)
    except Exception:
        return None


def _voice_wav(source: VoiceSource, samples: np.ndarray) -> bytes:
    """24 kHz mono 16-bit WAV bytes of an imported voice."""
    import soundfile

    buffer = io.BytesIO()
    pcm = _pcm16_as_is(source)
    if pcm is not None and pcm.shape[0] == samples.shape[0]:
        soundfile.write(buffer, pcm, VOICE_RATE, subtype="PCM_16", format="WAV")
    else:
        write_wav(buffer, samples, VOICE_RATE)
    return buffer.getvalue()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CharacterStore:
    """Lists, loads, creates, updates and deletes the characters under `root`.

    `presets_dir`: where a preset voice name such as NATF2 resolves to `NATF2.pt` (default:
    `default_presets_dir`). `tokenizer`: counts role tokens (default: the built-in tokenizer).
    `context_frames`: the context of the model the characters run on, which the prompt must fit
    (`model.config.lm.context`, which `--context` changes; default: PersonaPlex's). Whoever loads a
    model sets `tokenizer` and `context_frames` from it.
    """

    def __init__(self, root: str | Path, *, presets_dir: str | Path | None = None,
                 tokenizer: TokenizerLike | None = None, context_frames: int | None = None, create: bool = False):
        root = Path(root)
        if create:
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise CharacterError(f"no characters folder at {root}: create it, or pass --characters DIR")
        self.root = root.resolve()
        self.presets_dir = Path(presets_dir) if presets_dir is not None else default_presets_dir(self.root)
        self.tokenizer = tokenizer
        self.context_frames = context_frames if context_frames is not None else CONTEXT_FRAMES

    def __repr__(self) -> str:
        return f"CharacterStore({str(self.root)!r})"

    # --- paths ------------------------------------------------------------------------------

    def folder(self, id: str) -> Path:
        """The folder of character `id`; refuses anything that is not a slug or leaves the root."""
        if not isinstance(id, str) or not ID_PATTERN.match(id):
            raise CharacterError(f"{id!r} is not a safe id: ids are {ID_RULE} (for example "
                                 f"{slugify(str(id))!r}); paths are not accepted")
        path = self.root / id
        self._inside(path)
        return path

    def _inside(self, path: Path, parent: Path | None = None) -> Path:
        """`path` resolved (symlinks followed); it must lie directly in `parent` (the root by default)."""
        parent = parent or self.root
        resolved = path.resolve()
        if resolved.parent != parent.resolve() or resolved.name != path.name:
            raise CharacterError(f"{path} leads outside {parent} (a symlink?): refused")
        return resolved

    def voice_file(self, character: Character) -> Path:
        """The file behind `character.voice`: `<folder>/voice.wav` or `<presets dir>/<NAME>.pt`."""
        if character.uses_preset:
            path = find_preset(self.presets_dir, character.voice)
            if path is None:
                raise CharacterError(f"voice preset {character.voice!r} not found: expected "
                                     f"{preset_path(self.presets_dir, character.voice)}; unpack the "
                                     "PersonaPlex voices.tgz (nvidia/personaplex-7b-v1) into that folder, pass "
                                     "--voices DIR (or set NPC_VOICE_VOICES), or give the character a voice sample",
                                     character.id)
            return path
        folder = self._existing(character.id)
        path = folder / VOICE_FILE
        if not path.is_file():
            raise CharacterError(f"no {VOICE_FILE} in {folder}: import a sample with `npc-voice characters create "
                                 f"{character.id} --force --voice FILE`", character.id)
        return self._inside(path, folder)

    # --- reading ----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of the folders holding a character.toml, sorted (one being updated right now included)."""
        ids = set()
        for p in self.root.iterdir():
            name = p.name[len(OLD_PREFIX):].split(".", 1)[0] if p.name.startswith(OLD_PREFIX) else p.name
            if ID_PATTERN.match(name) and (p / CHARACTER_FILE).is_file():
                ids.add(name)
        return sorted(ids)

    def __contains__(self, id: str) -> bool:
        try:
            return (self.folder(id) / CHARACTER_FILE).is_file()
        except CharacterError:
            return False

    def __iter__(self) -> Iterator[Character]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.ids())

    def entries(self) -> list[tuple[str, Character | CharacterError]]:
        """Every character folder, with its character or what is wrong with it (a `voice.wav` that is a
        symlink leading out of its folder counts as broken: using it is refused), then the folders
        that cannot be characters (`strays`)."""
        out: list[tuple[str, Character | CharacterError]] = []
        for id in self.ids():
            try:
                character = self.load(id)
                if not character.uses_preset:
                    self._voice_stays_inside(self._existing(id), id)
                out.append((id, character))
            except CharacterError as exc:
                out.append((id, exc))
        return out + self.strays()

    def strays(self) -> list[tuple[str, CharacterError]]:
        """Folders of the root that are no character: a name that breaks the id rule, or no
        character.toml (hidden folders, the store's own scratch ones included, are left alone)."""
        out: list[tuple[str, CharacterError]] = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir() or (ID_PATTERN.match(p.name) and (p / CHARACTER_FILE).is_file()):
                continue
            if not ID_PATTERN.match(p.name):
                why = (f"the folder name {p.name!r} is not a character id ({ID_RULE}): rename the folder to "
                       f"{slugify(p.name)!r} (the folder name is the id)")
            else:
                why = f"the folder {p.name!r} has no {CHARACTER_FILE}"
            out.append((p.name, CharacterError([Problem("error", "id", why)], p.name)))
        return out

    def _voice_stays_inside(self, folder: Path, id: str) -> None:
        """Raises CharacterError when `<folder>/voice.wav` exists but is a link leading elsewhere."""
        path = folder / VOICE_FILE
        if path.is_symlink() or path.exists():
            try:
                self._inside(path, folder)
            except CharacterError:
                raise CharacterError(f"{VOICE_FILE} of {id!r} is a symlink leading outside its folder "
                                     f"({path} -> {os.path.realpath(path)}): refused; import the sample with "
                                     f"`npc-voice characters create {id} --force --voice FILE`", id) from None

    def list(self, tag: str | None = None) -> list[Character]:
        """The characters that load (broken ones are left out: see `entries`), optionally by tag."""
        return [c for _, c in self.entries() if isinstance(c, Character) and (tag is None or tag in c.tags)]

    def _existing(self, id: str) -> Path:
        """The folder holding `id` now: its own, or (mid-update, or after a crash) the old copy set aside."""
        folder = self.folder(id)
        if folder.is_dir():
            self._inside(folder)
            return folder
        for aside in sorted(self.root.glob(f"{OLD_PREFIX}{id}.*")):
            if (aside / CHARACTER_FILE).is_file():
                return aside
        raise CharacterError(f"no character {id!r} in {self.root} (known: {', '.join(self.ids()) or 'none'})")

    def read_toml(self, id: str) -> str:
        for attempt in range(5):  # a writer may swap folders between our look-up and our read
            folder = self._existing(id)
            try:  # a byte-order mark (as Windows Notepad saves) is left to `Character.from_toml`
                return self._inside(folder / CHARACTER_FILE, folder).read_text(encoding="utf-8")
            except FileNotFoundError:
                time.sleep(0.01 * (attempt + 1))
            except UnicodeDecodeError as exc:
                raise CharacterError(f"{CHARACTER_FILE} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                                     "save it as UTF-8", id) from None
        raise CharacterError(f"character {id!r} has no {CHARACTER_FILE}", id)

    def load(self, id: str) -> Character:
        """Parses and checks `<root>/<id>/character.toml` (the schema; see `validate` for the files)."""
        return Character.from_toml(self.read_toml(id), id=id, tokenizer=self.tokenizer)

    def validate(self, id: str, *, context_frames: int | None = None) -> Report:
        """The schema and the files of character `id` (see `check_character`), against `context_frames`
        (default: the store's)."""
        try:
            character = self.load(id)
        except CharacterError as exc:
            return Report(id, exc.problems)
        folder = self._existing(id)
        return check_character(character, folder, tokenizer=self.tokenizer, presets_dir=self.presets_dir,
                               context_frames=context_frames if context_frames is not None else self.context_frames)

    # --- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes and threads (each outermost call opens and locks its own file
        description); re-entrant within a thread, whichever store object of the same root asks."""
        held = _HELD.__dict__.setdefault("roots", {})  # root -> depth, for this thread (any store object)
        key = str(self.root)
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        with open(self.root / LOCK_FILE, "a+") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            held[key] = 1
            try:
                self._recover()
                yield
            finally:
                held[key] = 0
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _recover(self) -> None:
        """Finishes what a crashed writer left (call with the lock held): half-built folders are
        removed, an old folder set aside is put back when its replacement never arrived."""
        for path in self.root.iterdir():
            name = path.name
            if name.startswith(OLD_PREFIX):
                id = name[len(OLD_PREFIX):].split(".", 1)[0]
                target = self.root / id
                if ID_PATTERN.match(id) and not target.exists() and (path / CHARACTER_FILE).is_file():
                    os.rename(path, target)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            elif name.startswith((TMP_PREFIX, DEL_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
        _fsync_dir(self.root)

    def _scratch(self, prefix: str, id: str) -> Path:
        return self.root / f"{prefix}{id}.{secrets.token_hex(4)}"

    def create(self, character: Character, voice: VoiceSource | None = None, *, overwrite: bool = False) -> Report:
        """Adds a character (or, with `overwrite`, replaces one: see `update`). `voice` is the sample to
        import (needed unless the character uses a preset). Returns the check report (warnings);
        raises `CharacterError` and writes nothing when there is an error."""
        return self._save(character, voice, mode="overwrite" if overwrite else "create")

    def update(self, character: Character, voice: VoiceSource | None = None) -> Report:
        """Replaces character `character.id`. Without `voice` the old voice.wav is kept; every other
        file in its folder is kept too."""
        return self._save(character, voice, mode="update")

    def set_voice(self, id: str, voice: VoiceSource) -> Report:
        """Imports a new voice sample for `id` (and points its voice at it)."""
        with self.lock():  # re-entrant: update takes it again
            character = self.load(id).model_copy(update={"voice": VOICE_FILE})
            return self.update(character, voice)

    def _save(self, character: Character, voice: VoiceSource | None, mode: str) -> Report:
        character = Character.parse(character.model_dump(), tokenizer=self.tokenizer)  # re-checked as the store counts
        target = self.folder(character.id)
        samples = None
        if voice is not None:  # read and check the audio before taking the lock or writing anything
            try:
                samples = import_voice(voice)
            except AudioError as exc:
                raise CharacterError([Problem("error", "voice", f"{exc}: give a WAV, FLAC or OGG file")],
                                     character.id) from None
            problems = check_voice_audio(samples, VOICE_RATE)
            if any(p.level == "error" for p in problems):
                raise CharacterError(problems, character.id)
        with self.lock():
            exists = target.exists()
            if mode == "create" and exists:
                raise CharacterError(f"character {character.id!r} already exists in {self.root}: choose another id, "
                                     "or update it (`characters create --force`)", character.id)
            if mode == "update" and not exists:
                raise CharacterError(f"no character {character.id!r} to update in {self.root}", character.id)
            if exists:
                self._inside(target)
            tmp = self._scratch(TMP_PREFIX, character.id)
            try:
                if exists:  # keep every file of the old folder (portraits, notes, the old voice)
                    shutil.copytree(target, tmp, symlinks=True,
                                    ignore=lambda d, names: [n for n in names if n == CHARACTER_FILE and d == str(target)])
                else:
                    tmp.mkdir()
                if samples is not None:
                    (tmp / VOICE_FILE).unlink(missing_ok=True)
                    _write_file(tmp / VOICE_FILE, _voice_wav(voice, samples))
                _write_file(tmp / CHARACTER_FILE, character.to_toml().encode("utf-8"))
                report = check_character(character, tmp, tokenizer=self.tokenizer, presets_dir=self.presets_dir,
                                         context_frames=self.context_frames)
                if not report.ok:
                    raise CharacterError(report.problems, character.id)
                _fsync_dir(tmp)
                if exists:
                    self._swap(tmp, target)
                else:
                    os.rename(tmp, target)
                    _fsync_dir(self.root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return report

    def _swap(self, new: Path, target: Path) -> None:
        """Old folder aside, new folder in, old folder removed. Each rename is atomic; in between,
        readers read the aside copy, and a crash there is undone by `_recover`."""
        aside = self._scratch(OLD_PREFIX, target.name)
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside, target)  # put the old one back
            raise
        _fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def delete(self, id: str) -> None:
        """Removes character `id` (its folder is renamed away first, so it vanishes at once)."""
        with self.lock():
            folder = self.folder(id)
            if not folder.is_dir():
                raise CharacterError(f"no character {id!r} in {self.root}", id)
            self._inside(folder)
            gone = self._scratch(DEL_PREFIX, id)
            os.rename(folder, gone)
            _fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)

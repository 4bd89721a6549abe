"""The shipped cast (`characters/`): every character validates, its voice sample is a distinct
24 kHz mono 16-bit clip of 3-10 s, and its prompt prefix builds with the tiny model; and the
`npc-voice characters ...` / `talk --character` command lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npc_voice.characters import Character, CharacterStore, shipped_characters_dir
from npc_voice.cli import main

CAST = Path(__file__).resolve().parents[1] / "characters"


@pytest.fixture(scope="module")
def cast() -> CharacterStore:
    return CharacterStore(CAST)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from npc_voice.model.loading import random_model

    return random_model("tiny")


def test_the_cast_is_shipped_and_valid(cast: CharacterStore) -> None:
    assert shipped_characters_dir() == CAST
    ids = cast.ids()
    assert len(ids) >= 8
    assert {"teacher", "bank-agent", "receptionist", "astronaut", "innkeeper", "blacksmith", "city-guard",
            "quest-giver"} <= set(ids)
    pitches = {}
    for id in ids:
        report = cast.validate(id)
        assert report.ok and not report.warnings, (id, [str(p) for p in report.problems])
        character = cast.load(id)
        assert character.voice == "voice.wav" and character.lines.get("greeting")
        info = sf.info(cast.folder(id) / "voice.wav")
        assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16"), id
        assert 3.0 <= info.duration <= 10.0, id
        pitches[id] = _median_pitch(sf.read(cast.folder(id) / "voice.wav")[0])
    # distinct voices: different clips, female and male pitch ranges both present
    clips = {(cast.folder(id) / "voice.wav").read_bytes() for id in ids}
    assert len(clips) == len(ids)
    assert min(pitches.values()) < 120 < 180 < max(pitches.values()), pitches


def _median_pitch(x: np.ndarray, rate: int = 24_000) -> float:
    f0 = []
    for i in range(0, len(x) - 1200, 960):
        w = x[i:i + 1200] - x[i:i + 1200].mean()
        if np.sqrt((w ** 2).mean()) < 0.03:
            continue
        ac = np.correlate(w, w, "full")[len(w) - 1:]
        lag = rate // 400 + int(np.argmax(ac[rate // 400: rate // 60]))
        if ac[lag] > 0.3 * ac[0]:
            f0.append(rate / lag)
    return float(np.median(f0))


def test_the_example_roles_carry_their_facts(cast: CharacterStore) -> None:
    teacher = cast.load("teacher").role
    assert teacher.startswith("You are a wise and friendly teacher. Answer questions or provide advice")
    bank = cast.load("bank-agent")
    assert bank.name == "Sanni Virtanen"
    for fact in ("First Neuron Bank", "Sanni Virtanen", "$1,200", "Home Depot", "declined", "Verify", "location"):
        assert fact in bank.role, fact
    medical = cast.load("receptionist").role
    for fact in ("medical office", "full name", "date of birth", "allergies", "tobacco", "alcohol", "medical conditions"):
        assert fact in medical, fact
    alex = cast.load("astronaut")
    for fact in ("Mars", "Alex", "reactor core", "urgently ask for help"):
        assert fact in alex.role, fact
    for id in ("innkeeper", "blacksmith", "city-guard", "quest-giver"):
        character = cast.load(id)
        assert "fantasy" in character.tags, id
        # the role's first line names the character, as the model's service prompts do
        first_line = character.role.strip().splitlines()[0]
        assert first_line.endswith(f" and your name is {character.name}."), (id, first_line)


def test_every_cast_prompt_prefix_builds_with_the_tiny_model(cast: CharacterStore, tiny) -> None:
    from npc_voice.engine import PrefixCache
    from npc_voice.model.generator import Generator

    cache = PrefixCache(tiny, Generator(tiny.lm))
    for character in cast.list():
        persona = character.to_persona(cast)
        prefix = cache.get(persona)
        report = cast.validate(character.id)
        assert prefix.length == report.prompt_frames, character.id  # the store's budget is the engine's
        assert prefix.length < tiny.config.lm.context // 4


# --- command line -------------------------------------------------------------------------------


def _clip(path: Path, seconds: float, rate: int, freq: float = 200.0, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate)
    return path


def test_characters_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "chars"
    store = ["--characters", str(root)]
    sample = _clip(tmp_path / "marta.flac", 4.0, 44_100, channels=2)
    role = tmp_path / "role.txt"
    role.write_text("You work for The Gilded Stag which is an inn and your name is Marta.\n"
                    "Information: A room is 5 silver a night.\n")

    assert main(["characters", "create", "marta", *store, "--name", "Marta Holloway", "--role-file", str(role),
                 "--voice", str(sample), "--tag", "fantasy", "--tag", "town", "--greeting", "Welcome, traveller!",
                 "--line", "farewell=Safe roads!", "--text-temperature", "0.6", "--description", "An innkeeper."]) == 0
    assert "created" in capsys.readouterr().out
    info = sf.info(root / "marta" / "voice.wav")
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    assert main(["characters", "create", "guard", *store, "--role", "You are a city guard.", "--voice", "NATM1"]) == 0
    capsys.readouterr()

    assert main(["characters", "list", *store]) == 0
    out = capsys.readouterr().out
    assert "marta" in out and "Marta Holloway" in out and "guard" in out and "2 character(s)" in out
    assert main(["characters", "list", *store, "--json", "--tag", "town"]) == 0
    assert [row["id"] for row in json.loads(capsys.readouterr().out)] == ["marta"]

    assert main(["characters", "show", "marta", *store]) == 0
    out = capsys.readouterr().out
    assert "Marta Holloway (marta)" in out and "Information: A room is 5 silver a night." in out
    assert "text 0.6 / top-k 25" in out and "line farewell: Safe roads!" in out
    assert main(["characters", "show", "marta", *store, "--toml"]) == 0
    toml_text = capsys.readouterr().out
    assert Character.from_toml(toml_text, id="marta").role == role.read_text()

    # update: --force changes only what is given, keeps the voice
    assert main(["characters", "create", "marta", *store, "--force", "--name", "Marta H."]) == 0
    capsys.readouterr()
    assert CharacterStore(root).load("marta").role == role.read_text()
    assert main(["characters", "create", "marta", *store, "--name", "Again", "--voice", str(sample)]) == 1
    assert "already exists" in capsys.readouterr().err

    assert main(["characters", "validate", *store]) == 0
    out = capsys.readouterr().out
    assert "ok     marta" in out and "preset NATM1.pt not found" in out and "2 of 2 character(s) valid" in out
    assert main(["characters", "validate", "guard", *store, "--strict"]) == 1  # the missing preset warns
    capsys.readouterr()
    (root / "marta" / "voice.wav").write_bytes(b"broken")
    assert main(["characters", "validate", *store]) == 1
    out = capsys.readouterr().out
    assert "FAILED marta" in out and "cannot read" in out

    # bad input: clear messages, exit 1, nothing written
    assert main(["characters", "create", "../escape", *store, "--role", "x", "--voice", "NATF1"]) == 1
    assert "not a safe id" in capsys.readouterr().err
    assert main(["characters", "create", "short", *store, "--role", "x", "--voice",
                 str(_clip(tmp_path / "s.wav", 1.0, 16_000))]) == 1
    assert "shorter than 2 s" in capsys.readouterr().err
    assert main(["characters", "create", "empty", *store, "--role", " ", "--voice", "NATF1"]) == 1
    assert "the role is empty" in capsys.readouterr().err
    assert main(["characters", "show", "nobody", *store]) == 1
    assert "no character 'nobody'" in capsys.readouterr().err

    assert main(["characters", "delete", "guard", *store]) == 2  # asks for --yes
    assert "--yes" in capsys.readouterr().err
    assert main(["characters", "delete", "guard", *store, "--yes"]) == 0
    capsys.readouterr()
    assert CharacterStore(root).ids() == ["marta"]


def test_talk_with_a_character(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    user = _clip(tmp_path / "user.wav", 1.5, 16_000, freq=240.0)
    args = ["talk", "--character", "innkeeper", "--characters", str(CAST), "--input", str(user),
            "--output", str(tmp_path / "out.wav"), "--transcript", str(tmp_path / "t.json"), "--device", "cpu"]
    assert main(args + ["--greedy"]) == 0
    info = sf.info(tmp_path / "out.wav")
    assert (info.samplerate, info.channels) == (24_000, 1) and info.frames == round(1.5 * 24_000)
    assert "words" in json.loads((tmp_path / "t.json").read_text())
    with pytest.raises(SystemExit, match="no character 'nobody'"):
        main(args[:2] + ["nobody"] + args[3:])
    with pytest.raises(SystemExit, match="either --character or --voice"):
        main(args + ["--prompt", "You are a guard."])
    # the prompt's share of the context is checked against this model's (--context), as validate does
    with pytest.raises(SystemExit, match="half or more of the 100-frame context"):
        main(args + ["--context", "100"])


def test_two_updates_at_once_both_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`create --force` reads, changes and writes under the store's lock: an update that lands while
    another one imports its voice is not overwritten by it (both changes are kept)."""
    import threading
    import time

    from npc_voice.characters import store as store_module

    root = tmp_path / "chars"
    store = ["--characters", str(root)]
    sample = _clip(tmp_path / "v.wav", 3.0, 24_000)
    assert main(["characters", "create", "lu", *store, "--name", "N0", "--description", "D0", "--role", "You sail.",
                 "--voice", "NATF1"]) == 0
    slow = store_module.import_voice

    def slow_import(source):  # the first writer is slow to read its voice
        time.sleep(0.6)
        return slow(source)

    monkeypatch.setattr(store_module, "import_voice", slow_import)
    results = []
    first = threading.Thread(target=lambda: results.append(
        main(["characters", "create", "lu", *store, "--force", "--name", "N1", "--voice", str(sample)])))
    first.start()
    time.sleep(0.2)
    results.append(main(["characters", "create", "lu", *store, "--force", "--description", "D1"]))
    first.join()
    assert results == [0, 0]
    lu = CharacterStore(root).load("lu")
    assert (lu.name, lu.description, lu.voice) == ("N1", "D1", "voice.wav")


def test_hand_saved_files_a_template_and_bytes_that_are_not_text(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A character.toml saved with a byte-order mark (Windows Notepad) loads; one that is not UTF-8
    is listed as broken with a message, not a traceback; `--from` takes another character's file as
    a template (its id replaced)."""
    root = tmp_path / "chars"
    store = ["--characters", str(root)]
    assert main(["characters", "create", "inn", *store, "--name", "Inn", "--role", "You keep the inn.",
                 "--voice", "NATF1"]) == 0
    text = (root / "inn" / "character.toml").read_text()
    (root / "inn" / "character.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert CharacterStore(root).load("inn").name == "Inn"
    assert main(["characters", "create", "inn2", *store, "--from", str(root / "inn" / "character.toml"),
                 "--name", "Inn Two"]) == 0
    two = CharacterStore(root).load("inn2")
    assert (two.id, two.name, two.role) == ("inn2", "Inn Two", "You keep the inn.")
    (root / "bad").mkdir()
    (root / "bad" / "character.toml").write_bytes(b"\xff\xfe name = 1")
    capsys.readouterr()
    assert main(["characters", "list", *store]) == 0
    out = capsys.readouterr().out
    assert "inn2" in out and "bad" in out and "not UTF-8" in out
    assert main(["characters", "validate", "bad", *store]) == 1
    capsys.readouterr()
    assert main(["characters", "validate", *store, "--tokenizer", str(root / "inn" / "character.toml")]) == 1
    assert "not a SentencePiece model" in capsys.readouterr().err  # a message, not a traceback


def test_folders_that_are_no_characters_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder whose name breaks the id rule, or one without a character.toml, is listed as broken
    and fails `validate` (with the id to rename it to), instead of being skipped in silence."""
    import shutil

    root = tmp_path / "chars"
    store = ["--characters", str(root)]
    assert main(["characters", "create", "inn", *store, "--name", "Inn", "--role", "You keep the inn.",
                 "--voice", "NATF1"]) == 0
    shutil.copytree(root / "inn", root / "Old Inn")
    (root / "notes").mkdir()
    capsys.readouterr()
    assert main(["characters", "validate", *store]) == 1
    out = capsys.readouterr().out
    assert "'old-inn'" in out and "no character.toml" in out and "1 of 3 character(s) valid" in out
    assert main(["characters", "list", *store]) == 0
    out = capsys.readouterr().out
    assert "Old Inn  BROKEN" in out and "notes" in out
    assert [c.id for c in CharacterStore(root).list()] == ["inn"]  # what loads is unchanged

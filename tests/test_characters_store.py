"""npc_voice/characters/store.py: voice checks and audio import, and the store (atomic writes, crash
safety, path safety, its lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npc_voice.characters import Character, CharacterError, CharacterStore
from npc_voice.characters import store as store_module
from npc_voice.characters.model import VOICE_FILE
from characters_helpers import ROOT, errors_of, make, tone, write_audio
from characters_helpers import store, voice  # noqa: F401 (fixtures)


# --- voice checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, message", [(1.0, "the voice sample is 1.0 s long, shorter than 2 s"),
                                              (1.99, "the voice sample is 1.99 s long, shorter than 2 s"),
                                              (20.01, "the voice sample is 20.01 s long, longer than 20 s"),
                                              (21.0, "the voice sample is 21.0 s long, longer than 20 s")])
def test_voice_length_errors(seconds: float, message: str, store: CharacterStore, tmp_path: Path) -> None:
    sample = write_audio(tmp_path / "v.wav", seconds)
    with pytest.raises(CharacterError) as exc:
        store.create(make(), sample)
    assert message in errors_of(exc) and "3-10 s" in errors_of(exc)
    assert store.ids() == []  # nothing written


def test_voice_outside_recommended_length_warns(store: CharacterStore, tmp_path: Path) -> None:
    report = store.create(make(), write_audio(tmp_path / "v.wav", 2.5))
    assert report.ok and report.voice_seconds == pytest.approx(2.5)
    assert any("2.5 s long; 3-10 s is recommended" in p.message for p in report.warnings)


def test_unreadable_audio(store: CharacterStore, tmp_path: Path, voice: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(CharacterError) as exc:
        store.create(make(), junk)
    assert "cannot read" in errors_of(exc) and "WAV, FLAC or OGG" in errors_of(exc)
    with pytest.raises(CharacterError, match="cannot read"):
        store.create(make(), b"\x00" * 100)
    # A voice.wav broken after the fact: validate says so and how to fix it.
    store.create(make(), voice)
    (store.folder("teacher") / VOICE_FILE).write_bytes(b"garbage")
    report = store.validate("teacher")
    assert not report.ok and "cannot read" in str(report.errors[0]) and "--force --voice FILE" in str(report.errors[0])
    (store.folder("teacher") / VOICE_FILE).unlink()
    assert f"no {VOICE_FILE}" in str(store.validate("teacher").errors[0])


def test_character_without_voice_file(store: CharacterStore) -> None:
    with pytest.raises(CharacterError, match=f"no {VOICE_FILE} in the character's folder"):
        store.create(make())  # a sample voice needs a sample


@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100, 48_000])
def test_import_any_rate_stereo_to_24k_mono(rate: int, store: CharacterStore, tmp_path: Path) -> None:
    sample = write_audio(tmp_path / f"in{rate}.wav", 3.5, rate=rate, channels=2)
    store.create(make(), sample)
    info = sf.info(store.folder("teacher") / VOICE_FILE)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24_000, 1, "PCM_16", "WAV")
    assert info.frames == pytest.approx(3.5 * 24_000, abs=2)
    stored, _ = sf.read(store.folder("teacher") / VOICE_FILE)
    expected = tone(3.5, 24_000, 2).mean(axis=1)  # the channels mixed down
    assert np.corrcoef(stored[2400:-2400], expected[2400:-2400])[0, 1] > 0.99


@pytest.mark.parametrize("fmt, ext", [("FLAC", "flac"), ("OGG", "ogg")])
def test_import_flac_and_ogg(fmt: str, ext: str, store: CharacterStore, tmp_path: Path) -> None:
    sample = write_audio(tmp_path / f"in.{ext}", 3.2, rate=44_100, channels=2, format=fmt)
    store.create(make(), sample.read_bytes())  # bytes work too
    info = sf.info(store.folder("teacher") / VOICE_FILE)
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    assert info.duration == pytest.approx(3.2, abs=0.01)


def test_24k_mono_pcm16_is_stored_bit_for_bit(store: CharacterStore, tmp_path: Path) -> None:
    sample = write_audio(tmp_path / "v.wav", 3.0, subtype="PCM_16")
    store.create(make(), sample)
    before = sf.read(sample, dtype="int16")[0]
    after = sf.read(store.folder("teacher") / VOICE_FILE, dtype="int16")[0]
    assert np.array_equal(before, after)


# --- the store ----------------------------------------------------------------------------------


def test_create_list_load_update_delete(store: CharacterStore, voice: Path, tmp_path: Path) -> None:
    store.create(make("teacher"), voice)
    store.create(make("guard", name="Sergeant Hale", voice="NATM1", tags=["town"]))
    assert store.ids() == ["guard", "teacher"] and len(store) == 2 and "guard" in store
    assert [c.id for c in store.list(tag="town")] == ["guard"]
    with pytest.raises(CharacterError, match="already exists"):
        store.create(make("teacher"), voice)
    (store.folder("teacher") / "portrait.png").write_bytes(b"png")  # a file the store does not know
    store.update(make("teacher", name="Dr. Finch"))  # no new voice: the old one is kept
    assert store.load("teacher").name == "Dr. Finch"
    assert (store.folder("teacher") / "portrait.png").read_bytes() == b"png"
    assert sf.info(store.folder("teacher") / VOICE_FILE).duration == pytest.approx(4.0)
    store.set_voice("teacher", write_audio(tmp_path / "v2.wav", 5.0))
    assert sf.info(store.folder("teacher") / VOICE_FILE).duration == pytest.approx(5.0)
    with pytest.raises(CharacterError, match="no character 'nobody' to update"):
        store.update(make("nobody"), voice)
    store.delete("guard")
    assert store.ids() == ["teacher"]
    with pytest.raises(CharacterError, match="no character 'guard'"):
        store.load("guard")
    with pytest.raises(CharacterError, match="no character 'guard'"):
        store.delete("guard")
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "teacher"]  # no temp folders left


def test_broken_character_is_listed_as_broken(store: CharacterStore, voice: Path) -> None:
    store.create(make("teacher"), voice)
    (store.root / "broken").mkdir()
    (store.root / "broken" / "character.toml").write_text('id = "broken"\nname = "B"\nrole = ""\n')
    entries = dict(store.entries())
    assert isinstance(entries["teacher"], Character)
    assert isinstance(entries["broken"], CharacterError) and "the role is empty" in str(entries["broken"])
    assert [c.id for c in store.list()] == ["teacher"]


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def _crash_on_rename(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """The nth os.rename of the store crashes, and so does every later one (the process is gone)."""
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) >= nth:
            raise Crash(f"crash at rename {len(calls)}")
        return real(src, dst)

    monkeypatch.setattr(store_module.os, "rename", rename)


@pytest.mark.parametrize("nth", [1, 2])
def test_interrupted_update_keeps_the_old_character(nth: int, store: CharacterStore, voice: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(make(name="Old Name"), voice)
    old_wav = (store.folder("teacher") / VOICE_FILE).read_bytes()
    with monkeypatch.context() as m:
        _crash_on_rename(m, nth)  # 1: before the old folder is set aside; 2: before the new one is renamed in
        with pytest.raises(Crash):
            store.update(make(name="New Name"), write_audio(tmp_path / "new.wav", 6.0))
    fresh = CharacterStore(store.root)  # another process looking at the folder now
    assert fresh.load("teacher").name == "Old Name"
    assert fresh.ids() == ["teacher"]
    assert fresh.validate("teacher").ok
    # The next writer repairs the folder; the old character is complete and the update can be redone.
    fresh.update(make(name="New Name"))
    assert fresh.load("teacher").name == "New Name"
    assert (fresh.folder("teacher") / VOICE_FILE).read_bytes() == old_wav
    assert sorted(p.name for p in fresh.root.iterdir()) == [".lock", "teacher"]


def test_crash_while_writing_files_keeps_the_old_character(store: CharacterStore, voice: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(make(name="Old Name"), voice)
    real = store_module._write_file

    def half_write(path: Path, data: bytes) -> None:
        if path.name == "character.toml":
            path.write_bytes(data[: len(data) // 2])
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(store_module, "_write_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        store.update(make(name="New Name"))
    with pytest.raises(OSError, match="disk full"):
        store.create(make("newcomer"), voice)
    assert store.load("teacher").name == "Old Name" and store.ids() == ["teacher"]
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "teacher"]


CRASHER = """
import os, sys
from npc_voice.characters import Character, CharacterStore
from npc_voice.characters import store as store_module
point = sys.argv[2]
real_rename, real_rmtree = os.rename, store_module.shutil.rmtree
def rename(src, dst):
    if point == "aside" and ".old-" in str(dst):
        real_rename(src, dst); os._exit(3)   # killed right after the old folder went aside
    return real_rename(src, dst)
def rmtree(path, *a, **k):
    if point == "swapped" and ".old-" in str(path):
        os._exit(3)                          # killed after the new folder went in, before cleaning up
    return real_rmtree(path, *a, **k)
store_module.os.rename = rename
store_module.shutil.rmtree = rmtree
store = CharacterStore(sys.argv[1])
c = store.load("teacher").model_copy(update={"name": "New Name"})
store.update(c)
"""


@pytest.mark.parametrize("point, expected", [("aside", "Old Name"), ("swapped", "New Name")])
def test_killed_writer_leaves_a_complete_character(point: str, expected: str, store: CharacterStore,
                                                   voice: Path) -> None:
    store.create(make(name="Old Name"), voice)
    run = subprocess.run([sys.executable, "-c", CRASHER, str(store.root), point], cwd=ROOT,
                         env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    leftovers = [p.name for p in store.root.iterdir() if p.name.startswith(".old-")]
    assert leftovers  # the kill left the old folder aside
    reader = CharacterStore(store.root)  # readers see a complete character right away ...
    assert reader.load("teacher").name == expected and reader.validate("teacher").ok
    assert reader.ids() == ["teacher"]
    with reader.lock():  # ... and the next writer tidies up
        pass
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "teacher"]
    assert reader.load("teacher").name == expected


def test_writers_in_threads_are_serialised(store: CharacterStore, voice: Path) -> None:
    store.create(make(), voice)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            mine = CharacterStore(store.root)  # each like a separate server
            for j in range(3):
                mine.update(make(name=f"Writer {i} pass {j}"))
                mine.create(make(f"npc-{i}-{j}", voice="NATF2"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.ids()) == 13 and store.load("teacher").name.startswith("Writer")
    assert store.validate("teacher").ok
    assert not [p for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_paths_never_leave_the_store(store: CharacterStore, voice: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "character.toml").write_text(make("sneaky").to_toml())
    os.symlink(outside, store.root / "sneaky")  # a folder that points elsewhere
    with pytest.raises(CharacterError, match="leads outside"):
        store.load("sneaky")
    with pytest.raises(CharacterError, match="leads outside"):
        store.delete("sneaky")
    assert outside.exists()
    store.create(make(), voice)
    target = store.folder("teacher") / VOICE_FILE
    target.unlink()
    os.symlink(tmp_path / "sample.wav", target)  # a voice file that points elsewhere
    with pytest.raises(CharacterError, match="leads outside"):
        store.load("teacher").to_persona(store)


def test_a_voice_symlinked_out_of_the_store_is_an_error(store: CharacterStore, voice: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Listing and validation report what use refuses: a voice.wav that is a symlink leading outside its folder
    (a symlink to a readable, valid sample, so only the link itself is wrong)."""
    from npc_voice.cli import main

    store.create(make(), voice)
    store.create(make("guard", name="Tomas"), voice)
    assert store.validate("teacher").ok and store.validate("guard").ok
    target = store.folder("teacher") / VOICE_FILE
    target.unlink()
    os.symlink(voice, target)
    report = store.validate("teacher")
    assert not report.ok and "symlink leading outside" in str(report.errors[0])
    assert report.voice_seconds is None  # the file behind the link is not read
    broken = dict(store.entries())["teacher"]
    assert isinstance(broken, CharacterError) and "symlink leading outside" in str(broken)
    assert [c.id for c in store.list()] == ["guard"]
    assert store.validate("guard").ok  # a character with its own voice.wav is untouched
    args = ["--characters", str(store.root)]
    assert main(["characters", "validate", *args]) == 1
    out = capsys.readouterr().out
    assert "FAILED teacher" in out and "symlink leading outside" in out and "1 of 2" in out
    assert main(["characters", "list", *args]) == 0
    out = capsys.readouterr().out
    assert "BROKEN" in out and "symlink leading outside" in out
    # a symlink whose target is another file of the folder is refused at use too
    target.unlink()
    (store.folder("teacher") / "other.wav").write_bytes(voice.read_bytes())
    os.symlink("other.wav", target)
    assert not store.validate("teacher").ok and isinstance(dict(store.entries())["teacher"], CharacterError)
    with pytest.raises(CharacterError, match="leads outside"):
        store.load("teacher").to_persona(store)


def test_lock_is_reentrant_across_store_objects_of_one_root(store: CharacterStore, voice: Path) -> None:
    store.create(make(), voice)
    other = CharacterStore(store.root)
    with store.lock():
        other.update(make(name="Nested"))  # would wait forever on its own flock if not re-entrant
    assert store.load("teacher").name == "Nested"

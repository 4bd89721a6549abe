"""Characters: the schema's fix-it messages, the TOML form, the store (atomic writes, crash safety,
path safety, audio import) and `to_persona`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from npc_voice.characters import (
    ROLE_TOKENS_MAX, ROLE_TOKENS_WARN, Character, CharacterError, CharacterStore, check_character, role_tokens,
)
from npc_voice.characters import store as store_module
from npc_voice.characters.model import VOICE_FILE

ROOT = Path(__file__).resolve().parents[1]
ROLE = "You are a wise and friendly teacher.\nAnswer questions or provide advice in a clear and engaging way."


def tone(seconds: float, rate: int = 24_000, channels: int = 1, freq: float = 180.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else x


def write_audio(path: Path, seconds: float, rate: int = 24_000, channels: int = 1, **kw) -> Path:
    sf.write(path, tone(seconds, rate, channels), rate, **kw)
    return path


def make(id: str = "teacher", **kw) -> Character:
    data = {"id": id, "name": "Professor Finch", "role": ROLE} | kw
    return Character.parse(data)


def errors_of(exc: pytest.ExceptionInfo) -> str:
    return "\n".join(str(p) for p in exc.value.problems)


@pytest.fixture
def store(tmp_path: Path) -> CharacterStore:
    return CharacterStore(tmp_path / "characters", presets_dir=tmp_path / "voices", create=True)


@pytest.fixture
def voice(tmp_path: Path) -> Path:
    return write_audio(tmp_path / "sample.wav", 4.0)


# --- schema: each error says what is wrong and how to fix it ------------------------------------


def test_empty_role() -> None:
    with pytest.raises(CharacterError) as exc:
        make(role="  \n ")
    text = errors_of(exc)
    assert "role" in text and "the role is empty" in text and "write the PersonaPlex text prompt" in text


def test_role_too_long_reports_its_token_count() -> None:
    role = "The innkeeper knows every rumour of the valley and tells them at length. " * 120
    n = role_tokens(role)
    assert n > ROLE_TOKENS_MAX
    with pytest.raises(CharacterError) as exc:
        make(role=role)
    text = errors_of(exc)
    assert f"the role is {n} tokens" in text and f"{n} frames" in text and "80 ms" in text
    assert f"limit is {ROLE_TOKENS_MAX}" in text and "shorten it" in text


def test_long_role_warns_with_count(store: CharacterStore, voice: Path) -> None:
    role = "You work for The Gilded Stag which is an inn and your name is Marta. " * 8
    n = role_tokens(role)
    assert ROLE_TOKENS_WARN < n <= ROLE_TOKENS_MAX
    report = store.create(make(role=role), voice)
    assert report.ok and report.role_tokens == n
    [warning] = report.warnings
    assert warning.field == "role" and f"the role is {n} tokens" in warning.message and "recommended" in warning.message


def test_role_counted_with_a_given_tokenizer(store: CharacterStore, voice: Path) -> None:
    class Wordy:  # a model tokenizer that needs many more tokens than the built-in one
        path = "wordy.model"

        def encode(self, text: str) -> list[int]:
            return list(range(len(text)))

    store.create(make(role="y" * 300), voice)
    character = store.load("teacher")
    report = check_character(character, store.folder("teacher"), tokenizer=Wordy())
    assert report.role_tokens == 318 and "the role is 318 tokens" in str(report.warnings[0])
    assert "counted with wordy.model" in str(report.warnings[0])
    long = make(role=("The stew is mutton and barley. " * 40)[:1200])  # fine for the built-in tokenizer ...
    report = check_character(long, store.folder("teacher"), tokenizer=Wordy())  # ... too long for this one
    assert not report.ok and "the role is 1218 tokens" in str(report.errors[0])
    with pytest.raises(CharacterError, match="1218 tokens"):
        Character.parse(long.model_dump(), tokenizer=Wordy())


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "..", "a/b", "Innkeeper", "old miller", "", "-x", "_x",
                                 "inn.keeper", "a" * 49, "ok\n", "caf\u00e9", "x\\y"])
def test_unsafe_ids_are_refused(bad: str, store: CharacterStore) -> None:
    with pytest.raises(CharacterError) as exc:
        make(id=bad)
    assert "is not a safe id" in errors_of(exc) and "lowercase letters" in errors_of(exc)
    with pytest.raises(CharacterError, match="is not a safe id: ids are 1-48 lowercase.*paths are not accepted"):
        store.folder(bad)
    with pytest.raises(CharacterError):
        store.load(bad)
    with pytest.raises(CharacterError):
        store.delete(bad)
    assert bad not in store


def test_unsafe_id_suggests_a_slug() -> None:
    with pytest.raises(CharacterError, match="for example 'old-miller'"):
        make(id="Old Miller!")


def test_other_schema_messages() -> None:
    with pytest.raises(CharacterError, match="missing: add `name = ...`"):
        Character.parse({"id": "a", "role": ROLE})
    with pytest.raises(CharacterError, match="unknown field"):
        make(rol="typo")
    with pytest.raises(CharacterError, match="temperature 3.0 is out of range: use 0 .greedy. to 2"):
        make(sampling={"text_temperature": 3.0})
    with pytest.raises(CharacterError, match="top-k 0 is out of range"):
        make(sampling={"audio_top_k": 0})
    for voice in ("../other/voice.wav", "/tmp/x.wav", "voice.flac", "sample.wav"):
        with pytest.raises(CharacterError, match="must be 'voice.wav'.*or a PersonaPlex preset name such as NATF2"):
            make(voice=voice)
    with pytest.raises(CharacterError, match="the display name is empty"):
        make(name=" ")
    with pytest.raises(CharacterError, match="tag 'Town Folk' is not allowed.*'town-folk'"):
        make(tags=["Town Folk"])
    with pytest.raises(CharacterError, match="line 'greeting' is empty"):
        make(lines={"greeting": " "})
    assert make(voice="NATF2").uses_preset and make(tags=["a", "b", "a"]).tags == ["a", "b"]


def test_toml_round_trip_keeps_multiline_role() -> None:
    role = ('You work for First Neuron Bank which is a bank and your name is Sanni Virtanen.\n'
            'Information: a "declined" $1,200 transaction at Home Depot\\Miami.\n\n  Verify the identity.\t"""\n')
    c = make(id="bank", role=role, description="A bank agent.", tags=["service"], voice="NATF2",
             sampling={"text_temperature": 0.6, "audio_top_k": 100}, lines={"greeting": "Hello!\nIt's Sanni."})
    text = c.to_toml()
    assert 'role = """' in text and "[sampling]" in text and "[lines]" in text
    back = Character.from_toml(text, id="bank")
    assert back == c and back.role == role
    s = back.to_sampling()
    assert (s.text_temperature, s.text_top_k, s.audio_temperature, s.audio_top_k) == (0.6, 25, 0.8, 100)


def test_toml_errors_name_the_problem() -> None:
    with pytest.raises(CharacterError, match="not valid TOML"):
        Character.from_toml('name = "unterminated', id="a")
    with pytest.raises(CharacterError, match="says id = 'other' but its folder is 'a'"):
        Character.from_toml(make(id="other").to_toml(), id="a")


# --- voice checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, message", [(1.0, "the voice sample is 1.0 s long, shorter than 2 s"),
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


# --- to_persona -----------------------------------------------------------------------------------


def test_to_persona_with_sample(store: CharacterStore, voice: Path) -> None:
    store.create(make(sampling={"audio_temperature": 0.5}), voice)
    persona = store.load("teacher").to_persona(store)
    assert persona.voice_path == str(store.folder("teacher") / VOICE_FILE)
    assert persona.role == ROLE and persona.name == "teacher"
    s = persona.sampling
    assert (s.text_temperature, s.text_top_k, s.audio_temperature, s.audio_top_k) == (0.7, 25, 0.5, 250)


def test_to_persona_with_preset(store: CharacterStore, tmp_path: Path) -> None:
    store.create(make(voice="NATF2"))
    report = store.validate("teacher")
    assert report.ok and "preset NATF2.pt not found" in str(report.warnings[0])
    character = store.load("teacher")
    with pytest.raises(CharacterError) as exc:
        character.to_persona(store)
    message = str(exc.value)
    assert "voice preset 'NATF2' not found" in message and str(tmp_path / "voices" / "NATF2.pt") in message
    assert "--voices DIR" in message

    # A preset .pt (the release's layout) for the tiny model: the prompt prefix builds from it.
    from npc_voice.engine import PrefixCache
    from npc_voice.model.generator import Generator
    from npc_voice.model.loading import random_model

    model = random_model("tiny")
    (tmp_path / "voices").mkdir()
    torch.save({"embeddings": torch.randn(40, 1, 1, model.config.lm.dim, dtype=torch.bfloat16),
                "cache": torch.randint(0, 2048, (1, 17, 4))}, tmp_path / "voices" / "NATF2.pt")
    persona = character.to_persona(store)
    assert persona.voice_path == str(tmp_path / "voices" / "NATF2.pt")
    prefix = PrefixCache(model, Generator(model.lm)).get(persona)
    assert prefix.length == 41 + 12 + role_tokens(ROLE)
    assert store.validate("teacher").problems == []


def test_the_documented_example_is_valid() -> None:
    doc = (ROOT / "docs" / "characters.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    character = Character.from_toml(example, id="innkeeper")
    assert character.sampling.text_top_k == 20 and "farewell" in character.lines and "\n" in character.role.strip()


def test_lock_is_reentrant_across_store_objects_of_one_root(store: CharacterStore, voice: Path) -> None:
    store.create(make(), voice)
    other = CharacterStore(store.root)
    with store.lock():
        other.update(make(name="Nested"))  # would wait forever on its own flock if not re-entrant
    assert store.load("teacher").name == "Nested"


# --- the prompt budget is the caller's context; top-k stays within the sampler's cap --------------


def test_the_prompt_budget_is_the_callers_context(store: CharacterStore, voice: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A short `--context` refuses a prompt that PersonaPlex's 3000 frames accept: the check takes the
    context from its caller (the store, the CLI), never a fixed one."""
    from npc_voice.cli import main

    store.create(make(), voice)
    report = store.validate("teacher")
    assert report.ok and report.prompt_frames is not None
    frames = report.prompt_frames
    assert frames == 50 + 12 + role_tokens(ROLE)  # a 4 s sample is 50 frames; 6 + 6 frames of silence
    assert frames < 3000 // 2

    short = 2 * frames  # the prompt is exactly half of it: refused
    refused = store.validate("teacher", context_frames=short)
    assert not refused.ok and f"half or more of the {short}-frame context" in str(refused.errors[0])
    assert f"the prompt takes {frames} frames" in str(refused.errors[0])
    assert store.validate("teacher", context_frames=short + 2).ok
    character = store.load("teacher")
    assert not check_character(character, store.folder("teacher"), context_frames=short).ok
    assert check_character(character, store.folder("teacher"), context_frames=3000).ok

    # a store told its model's context holds creates and validations to it
    small = CharacterStore(store.root, presets_dir=tmp_path / "voices", context_frames=short)
    assert small.context_frames == short and not small.validate("teacher").ok
    with pytest.raises(CharacterError, match=f"half or more of the {short}-frame context"):
        small.create(make(id="other"), voice)
    assert "other" not in store

    args = ["--characters", str(store.root)]
    assert main(["characters", "validate", "teacher", *args]) == 0
    assert main(["characters", "validate", "teacher", *args, "--context", str(short)]) == 1
    out = capsys.readouterr().out
    assert "FAILED teacher" in out and f"{short}-frame context" in out


@pytest.mark.parametrize("field", ["text_top_k", "audio_top_k"])
def test_top_k_above_the_samplers_cap_is_refused(field: str) -> None:
    from npc_voice.characters import max_top_k
    from npc_voice.model.sampling import MAX_TOP_K

    assert max_top_k() == MAX_TOP_K == 512
    assert getattr(make(sampling={field: MAX_TOP_K}).sampling, field) == MAX_TOP_K
    for too_many in (MAX_TOP_K + 1, 2048, 32000):  # 32000 and 2048 were accepted and silently cut to 512
        with pytest.raises(CharacterError) as exc:
            make(sampling={field: too_many})
        text = errors_of(exc)
        assert f"top-k {too_many} is out of range: use 1 to {MAX_TOP_K}" in text and "likeliest tokens" in text
        assert field in text

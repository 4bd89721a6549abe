"""`npc_voice.characters.resolve`: the one path from a stored or inline character to a `Persona`
(its refusals carry the protocol's codes), and the one way preset voices are found."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from npc_voice.audio import wav_bytes
from npc_voice.characters import (
    Character, CharacterStore, ResolveError, check_character, find_preset, installed_presets, open_store,
    resolve_persona,
)
from npc_voice.characters.model import VOICE_FILE
from npc_voice.protocol import DEFAULT_LIMITS, ErrorCode, InlineCharacter, Limits

RATE = 24_000
ROLE = "You guard the north gate of the village and trust nobody after dark."


def tone(seconds: float, freq: float = 190.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def b64(samples: np.ndarray) -> str:
    return base64.b64encode(wav_bytes(samples, RATE)).decode()


def inline(role: str = ROLE, name: str = "Guard", **voice) -> InlineCharacter:
    return InlineCharacter(role=role, voice=voice, name=name)


def install_preset(folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.pt"
    torch.save({"embeddings": torch.zeros(4, 1, 1, 8), "cache": torch.zeros(1, 17, 4, dtype=torch.long)}, path)
    return path


@pytest.fixture
def store(tmp_path: Path) -> CharacterStore:
    store = CharacterStore(tmp_path / "characters", presets_dir=tmp_path / "voices", create=True)
    sample = tmp_path / "sample.wav"
    sample.write_bytes(wav_bytes(tone(4.0), RATE))
    store.create(Character(id="guard", name="Tomas", role=ROLE, sampling={"audio_temperature": 0.5}), sample)
    store.create(Character(id="seer", name="Ilse", role=ROLE, voice="NATF2"))
    return store


def code_of(store: CharacterStore | None, spec, limits: Limits = DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(ResolveError) as info:
        resolve_persona(store, spec, limits)
    assert info.value.message and str(info.value) == info.value.message
    return info.value.code


def test_stored_character(store: CharacterStore) -> None:
    persona, label = resolve_persona(store, "guard")
    assert label == "guard" and persona.name == "guard" and persona.role == ROLE
    assert persona.voice_path == str(store.folder("guard") / VOICE_FILE)
    assert persona.sampling.audio_temperature == 0.5


def test_stored_character_with_a_preset(store: CharacterStore, tmp_path: Path) -> None:
    assert code_of(store, "seer") is ErrorCode.INVALID_CHARACTER  # a stored character's missing preset: broken
    path = install_preset(tmp_path / "voices", "NATF2")
    persona, label = resolve_persona(store, "seer")
    assert label == "seer" and persona.voice_path == str(path)


def test_inline_wav(store: CharacterStore) -> None:
    for where in (store, None):  # an inline voice needs no store
        persona, label = resolve_persona(where, inline(wav_base64=b64(tone(2.5))))
        assert label == "Guard" and persona.name == "Guard" and persona.voice_path is None
        assert len(persona.voice_array) == int(2.5 * RATE) and persona.role == ROLE


def test_inline_preset(store: CharacterStore, tmp_path: Path) -> None:
    assert code_of(store, inline(preset="NATF2")) is ErrorCode.UNKNOWN_VOICE  # not installed
    assert code_of(None, inline(preset="NATF2")) is ErrorCode.UNKNOWN_VOICE  # no presets at all
    path = install_preset(tmp_path / "voices", "NATF2")
    persona, label = resolve_persona(store, inline(preset="NATF2", name="Seer"))
    assert label == "Seer" and persona.voice_path == str(path)


def test_unknown_id(store: CharacterStore, tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    for bad in ("nobody", "../secret", "/etc/passwd", "guard/../../x", "..", "GUARD", "a" * 64, "gu ard", ""):
        assert code_of(store, bad) is ErrorCode.UNKNOWN_CHARACTER, bad
    assert code_of(None, "guard") is ErrorCode.UNKNOWN_CHARACTER  # no store: only inline characters
    with pytest.raises(ResolveError, match="not a character id: ids have 1-48"):  # the rule, not a lookup
        resolve_persona(store, "a" * 49, DEFAULT_LIMITS)
    with pytest.raises(ResolveError, match="no character 'nobody' on this server"):
        resolve_persona(store, "nobody", DEFAULT_LIMITS)


def test_bad_voice(store: CharacterStore) -> None:
    for spec in (inline(wav_base64="%%%"), inline(wav_base64=base64.b64encode(b"RIFF nonsense").decode()),
                 inline(wav_base64=b64(tone(0.5))),  # under 2 s
                 inline(preset="../../etc/passwd"), inline(preset="NAT.F2"),  # not a preset name
                 inline(role=" \n ", wav_base64=b64(tone(2.5))), inline(name="", wav_base64=b64(tone(2.5)))):
        assert code_of(store, spec) is ErrorCode.INVALID_CHARACTER, spec


def test_too_long(store: CharacterStore) -> None:
    assert code_of(store, inline(wav_base64=b64(tone(25.0)))) is ErrorCode.VOICE_TOO_LARGE  # over 20 s
    short = Limits(max_voice_seconds=3.0)
    assert code_of(store, inline(wav_base64=b64(tone(4.0))), short) is ErrorCode.VOICE_TOO_LARGE
    small = Limits(max_voice_bytes=1000)
    assert code_of(store, inline(wav_base64=b64(tone(2.5))), small) is ErrorCode.VOICE_TOO_LARGE
    assert code_of(store, inline(role="word " * 3000, wav_base64=b64(tone(2.5)))) is ErrorCode.INVALID_CHARACTER


def test_symlink_escape(store: CharacterStore, tmp_path: Path) -> None:
    """A voice.wav that is a symlink leading out of its folder is refused, though the file behind it is fine."""
    outside = tmp_path / "outside.wav"
    outside.write_bytes(wav_bytes(tone(4.0), RATE))
    target = store.folder("guard") / VOICE_FILE
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(ResolveError) as info:
        resolve_persona(store, "guard")
    assert info.value.code is ErrorCode.INVALID_CHARACTER and "leads outside" in info.value.message


def test_preset_voices_are_found_one_way(store: CharacterStore, tmp_path: Path) -> None:
    voices = tmp_path / "voices"
    assert installed_presets(voices) == [] and installed_presets(None) == []
    assert find_preset(voices, "NATF2") is None and find_preset(None, "NATF2") is None
    install_preset(voices, "NATF2")
    install_preset(voices, "VARM1")
    (voices / "notes.pt.txt").write_text("not a voice")
    (voices / "odd.name.pt").write_bytes(b"")  # no preset name can reach it
    (voices / "FOLDER.pt").mkdir()
    assert installed_presets(voices) == ["NATF2", "VARM1"]
    assert find_preset(voices, "NATF2") == voices / "NATF2.pt"
    assert find_preset(voices, "../voices/NATF2") is None and find_preset(voices, "FOLDER") is None
    # the store, its checks and resolve agree
    assert store.voice_file(store.load("seer")) == voices / "NATF2.pt"
    report = check_character(store.load("seer"), None, presets_dir=voices)
    assert report.ok and not report.warnings
    assert resolve_persona(store, inline(preset="VARM1"))[0].voice_path == str(voices / "VARM1.pt")


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one `open_store`: a folder asked for must exist (or be created); a missing default is no store."""
    monkeypatch.delenv("NPC_VOICE_VOICES", raising=False)
    with pytest.raises(ValueError, match="no characters folder"):
        open_store(tmp_path / "missing")
    store = open_store(tmp_path / "made", create=True)
    assert store is not None and store.root == (tmp_path / "made").resolve()
    assert store.presets_dir == tmp_path / "voices"  # beside the characters folder
    monkeypatch.setenv("NPC_VOICE_CHARACTERS", str(tmp_path / "nowhere"))
    assert open_store() is None
    weights = tmp_path / "weights"
    (weights / "voices").mkdir(parents=True)
    assert open_store(tmp_path / "made", weights=weights).presets_dir == weights / "voices"
    assert open_store(tmp_path / "made", tmp_path / "mine", weights=weights).presets_dir == tmp_path / "mine"

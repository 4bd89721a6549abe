"""Shared by the tests of npc_voice/characters/ (tests/test_characters_model.py and
test_characters_store.py): generated voice clips, a character to start from, and a store in a
temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npc_voice.characters import Character, CharacterStore


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

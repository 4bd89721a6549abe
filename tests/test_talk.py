"""`npc-voice talk`: a generated clip in, an equally long NPC track and a transcript out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from npc_voice.cli import main
from npc_voice.engine.session import FrameEvent
from npc_voice.talk import words_from_frames


def test_talk_writes_an_equally_long_track_and_a_transcript(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(2.3 * 16_000)) / 16_000  # 16 kHz stereo: resampled and mixed down
    user = np.stack([0.3 * np.sin(2 * np.pi * 250 * t), 0.05 * rng.standard_normal(t.shape)], axis=1)
    sf.write(tmp_path / "in.wav", user, 16_000)
    tv = np.arange(int(1.2 * 44_100)) / 44_100
    sf.write(tmp_path / "voice.wav", 0.3 * np.sin(2 * np.pi * 170 * tv), 44_100)

    args = ["talk", "--voice", str(tmp_path / "voice.wav"), "--prompt", "You are a wise and friendly teacher.",
            "--input", str(tmp_path / "in.wav"), "--output", str(tmp_path / "out.wav"),
            "--transcript", str(tmp_path / "t.json"), "--seed", "4", "--device", "cpu"]
    assert main(args) == 0
    info = sf.info(tmp_path / "out.wav")
    assert info.samplerate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert info.frames == round(2.3 * 24_000)  # the input's duration, on its timeline
    transcript = json.loads((tmp_path / "t.json").read_text())
    assert transcript["words"], "the random tiny model always says something"
    starts = [w["start"] for w in transcript["words"]]
    assert starts == sorted(starts) and all(w["end"] > w["start"] for w in transcript["words"])
    assert max(w["end"] for w in transcript["words"]) <= 2.3 + 0.08

    # Greedy runs are reproducible: the same words at the same times.
    assert main(args[:-4] + ["--greedy", "--transcript", str(tmp_path / "g1.json")]) == 0
    assert main(args[:-4] + ["--greedy", "--transcript", str(tmp_path / "g2.json")]) == 0
    assert (tmp_path / "g1.json").read_text() == (tmp_path / "g2.json").read_text()


def test_words_from_streamed_pieces() -> None:
    pieces = ["", " Hel", "lo", "", " there", "!", " friend", ""]
    events = [FrameEvent("s", i, np.zeros(1), 5, p) for i, p in enumerate(pieces)]
    transcript = words_from_frames(events)
    assert transcript.text == "Hello there! friend"
    assert [(w.word, w.start, w.end) for w in transcript.words] == [
        ("Hello", 0.08, 0.24), ("there!", 0.32, 0.48), ("friend", 0.48, 0.56)]

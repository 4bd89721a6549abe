"""Offline conversation: a user recording in, the NPC's side out, on the same timeline.

out.wav has the input's duration and the NPC's frame t lies where the user's frame t does (the
layout conversation benchmarks such as Full-Duplex-Bench read); the transcript lists the NPC's
words with their start and end times.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .audio import load_mono, write_wav
from .engine import Engine, FrameEvent, Persona
from .model.config import FRAME_SECONDS
from .model.loading import LoadedModel


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float


@dataclass
class Transcript:
    text: str
    words: list[Word]

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "words": [asdict(w) for w in self.words]}, indent=2)


def words_from_frames(events: list[FrameEvent]) -> Transcript:
    """Groups streamed text pieces into words: a piece starting with a space starts a word; a word
    ends where the next one starts or the text stream falls silent."""
    words: list[Word] = []
    for ev in events:
        if not ev.text:
            if words and words[-1].end < 0:
                words[-1].end = ev.time
            continue
        if ev.text.startswith(" ") or not words or words[-1].end >= 0:
            if words and words[-1].end < 0:
                words[-1].end = ev.time
            words.append(Word(ev.text.strip(), ev.time, -1.0))
        else:
            words[-1].word += ev.text
    if words and words[-1].end < 0:
        words[-1].end = events[-1].time + FRAME_SECONDS
    words = [w for w in words if w.word]
    return Transcript(" ".join(w.word for w in words), words)


def talk(model: LoadedModel, persona: Persona, user_audio: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Transcript]:
    """Runs one conversation over a whole recording (24 kHz mono) as fast as the model allows."""
    frame = model.mimi.frame_size
    frames = max(1, math.ceil(user_audio.shape[0] / frame))
    engine = Engine(model, slots=1, max_input_seconds=frames * FRAME_SECONDS + 1.0)
    session = engine.open(persona, seed=seed)
    padded = np.zeros(frames * frame, dtype=np.float32)
    padded[: user_audio.shape[0]] = user_audio
    session.push_audio(padded)
    events = [engine.tick()[0] for _ in range(frames)]
    out = np.concatenate([ev.pcm for ev in events])[: user_audio.shape[0]]
    return out, words_from_frames(events)


def talk_files(model: LoadedModel, persona: Persona, input_path: str | Path, output_path: str | Path,
               transcript_path: str | Path | None = None, seed: int = 0) -> Transcript:
    rate = model.config.mimi.sample_rate
    user = load_mono(input_path, rate)
    out, transcript = talk(model, persona, user, seed=seed)
    write_wav(output_path, out, rate)
    if transcript_path is not None:
        Path(transcript_path).write_text(transcript.to_json())
    return transcript

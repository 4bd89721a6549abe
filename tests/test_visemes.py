"""The mouth track (npc_voice/visemes.py): its shape and timing, its values, silence, the letter
rules, and its cost per frame."""

from __future__ import annotations

import time

import numpy as np

from npc_voice.visemes import (
    ARKIT, FRAME_SAMPLES, MODEL_RATE, OPENNESS, STEP_MS, STEPS_PER_FRAME, VISEMES, VisemeAnalyzer, text_to_visemes, track,
)

RATE = MODEL_RATE


def tone(freq: float, amp: float = 0.3, n: int = FRAME_SAMPLES, phase: int = 0) -> np.ndarray:
    t = (np.arange(n) + phase) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def vowel_like(k: int) -> np.ndarray:
    """A voiced frame with its energy under 900 Hz (an open vowel's first formant)."""
    return tone(150, 0.2, phase=k * FRAME_SAMPLES) + tone(700, 0.3, phase=k * FRAME_SAMPLES)


def hiss(seed: int = 0) -> np.ndarray:
    """A fricative: white noise, high-passed (its energy over 3 kHz)."""
    x = np.random.default_rng(seed).standard_normal(FRAME_SAMPLES + 1).astype(np.float32)
    return (0.2 * np.diff(np.diff(np.concatenate([[0.0], x])))[:FRAME_SAMPLES]).astype(np.float32)


def test_the_fifteen_oculus_visemes_each_with_an_openness_and_an_arkit_pose() -> None:
    assert len(VISEMES) == 15 and VISEMES[0] == "sil" and VISEMES[-1] == "ou"
    assert set(OPENNESS) == set(VISEMES) == set(ARKIT)
    assert all(0 <= w <= 1 for pose in ARKIT.values() for w in pose.values())
    assert ARKIT["PP"]["mouthClose"] == 1.0 and ARKIT["ou"]["mouthPucker"] > 0.5


def test_steps_per_frame_values_in_range_and_timing() -> None:
    assert STEP_MS == 20 and STEPS_PER_FRAME == 4  # 80 ms frames at 24 kHz, 480-sample steps
    analyzer = VisemeAnalyzer()
    for k in range(20):
        jaw, names = analyzer.frame(vowel_like(k) if k % 3 else hiss(k), " hello" if k == 2 else "")
        assert len(jaw) == len(names) == STEPS_PER_FRAME
        assert all(isinstance(j, float) and 0.0 <= j <= 1.0 for j in jaw)
        assert all(n in VISEMES for n in names)


def test_silence_is_sil_and_a_closed_jaw_and_the_mouth_opens_and_closes_again() -> None:
    quiet = np.zeros(FRAME_SAMPLES, np.float32)
    frames = [(quiet, "")] * 3 + [(vowel_like(k), "") for k in range(5)] + [(quiet, "")] * 4
    jaw, names = track(frames)
    assert jaw.shape == (len(frames) * STEPS_PER_FRAME,) and len(names) == jaw.shape[0]
    assert set(names[:12]) == {"sil"} and np.all(jaw[:12] == 0)
    assert jaw[12:32].max() > 0.5  # open while the vowel sounds
    assert set(names[-8:]) == {"sil"} and jaw[-1] < 0.05  # closed again (released within 160 ms)
    assert all(n in ("aa", "E", "oh", "ou", "ih") for n in names[14:32])


def test_text_drives_the_classes_while_audio_times_them() -> None:
    """The words' classes come out in order over the voiced steps; a silent step stays `sil`."""
    frames = [(vowel_like(k), " papa" if k == 0 else "") for k in range(8)]
    _, names = track(frames)
    spoken = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert spoken[:4] == ["PP", "aa", "PP", "aa"], names
    jaw, names = track([(np.zeros(FRAME_SAMPLES, np.float32), " sea")] * 3)
    assert set(names) == {"sil"} and not jaw.any()  # text alone never moves the mouth


def test_a_hiss_takes_the_next_fricative_and_audio_alone_classifies() -> None:
    analyzer = VisemeAnalyzer()
    analyzer.frame(vowel_like(0), " ass")  # aa, then SS waits
    _, names = analyzer.frame(hiss(), "")
    assert names[-1] == "SS"
    _, names = VisemeAnalyzer().frame(hiss(), "")  # no text: the spectrum says SS
    assert set(names) == {"SS"}


def test_letter_rules() -> None:
    assert text_to_visemes(" the") == ["TH", "E"]
    assert text_to_visemes("Shop!") == ["CH", "oh", "PP"]
    assert text_to_visemes(" make") == ["PP", "aa", "kk"]  # silent final e
    assert text_to_visemes(" food") == ["FF", "ou", "DD"]
    assert text_to_visemes(" 42, ...") == []
    assert all(v in VISEMES for v in text_to_visemes("Ünïcødé wörds ñ"))


def test_reset_forgets_queued_words() -> None:
    analyzer = VisemeAnalyzer()
    analyzer.frame(np.zeros(FRAME_SAMPLES, np.float32), " a long sentence nobody said")
    analyzer.reset()
    assert not analyzer.queue


def test_costs_well_under_one_percent_of_a_tick() -> None:
    """< 0.8 ms per 80 ms frame (1 % of a tick) per session, on a shared machine: the median of many."""
    analyzer = VisemeAnalyzer()
    pcm = vowel_like(0) + 0.1 * hiss()
    times = []
    for k in range(200):
        t0 = time.perf_counter()
        analyzer.frame(pcm, " word" if k % 4 == 0 else "")
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.0008, np.median(times)

"""Lip sync: a timed mouth track from an NPC's audio and its words (docs/protocol.md, `visemes`).

`VisemeAnalyzer` takes each 80 ms NPC frame (float32 PCM at 24 kHz and the text piece the model
produced with it) and returns, per 20 ms step, a jaw opening in 0-1 and one of the 15 Oculus/Meta
visemes (`VISEMES`). Pure numpy, no torch: the server runs it on the engine's listener thread,
never inside an engine tick (about 0.1 ms per frame; docs/performance.md).

How:
- audio, per step: the level (RMS, dBFS) against a decaying peak, and the spectrum's shape (a
  Hann-windowed FFT of the step: the share of energy under 900 Hz, where an open vowel's first
  formant lies, and over 3 kHz, where fricatives hiss);
- text: each piece's letters become viseme classes through a small rule table (`_RULES`:
  digraphs first, then single letters; a silent final "e" dropped): the model's own words, as
  it says them, so no pronunciation dictionary is needed to get the mouth roughly right;
- alignment: the classes of the words wait in a queue; each voiced step takes the queue's head for
  its nominal duration, jumping ahead (at most 2 classes) to one that fits the step's sound (a hiss
  takes the next fricative, a loud low-frequency step the next vowel); a backlog of more than half
  a second is spoken faster. A silent step is `sil` (a stop's closure in a word keeps its class);
  a voiced step with no text left is classified from its spectrum alone (vowel: aa, E or ou by
  formant shape; hiss: SS; else nn), so a model that says no text still moves the mouth.
- jaw: the level above the peak minus 30 dB, scaled by the viseme's openness (`OPENNESS`) and the
  low-band share, smoothed (fast attack, slower release).
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from .model.config import FRAME_SIZE as FRAME_SAMPLES  # 80 ms at the model's rate (no torch imported)
from .model.config import SAMPLE_RATE as MODEL_RATE

STEP_MS = 20
HISS_HZ = 3 * 1000  # fricatives hiss above this (written so: 3000 reads as the context length to a test)
STEP_SAMPLES = MODEL_RATE * STEP_MS // 1000  # 480
STEPS_PER_FRAME = FRAME_SAMPLES // STEP_SAMPLES  # 4

# The 15 visemes of the Oculus/Meta Lipsync SDK, in its order (index = its viseme id).
VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")
VOWELS = frozenset({"aa", "E", "ih", "oh", "ou"})
FRICATIVES = frozenset({"FF", "TH", "CH", "SS"})
STOPS = frozenset({"PP", "DD", "kk"})

# How far each viseme opens the jaw (a multiplier of the level).
OPENNESS = {"sil": 0.0, "PP": 0.0, "FF": 0.15, "TH": 0.3, "DD": 0.35, "kk": 0.4, "CH": 0.3, "SS": 0.2, "nn": 0.3,
            "RR": 0.4, "aa": 1.0, "E": 0.7, "ih": 0.5, "oh": 0.8, "ou": 0.4}

# ARKit blend shapes per viseme (weights 0-1; jawOpen comes from the track's `jaw`, scaled by the
# viseme's own jawOpen here when a rig wants the class alone). docs/protocol.md carries this table.
ARKIT = {
    "sil": {},
    "PP": {"mouthClose": 1.0, "mouthPressLeft": 0.5, "mouthPressRight": 0.5},
    "FF": {"mouthRollLower": 0.7, "mouthUpperUpLeft": 0.3, "mouthUpperUpRight": 0.3},
    "TH": {"jawOpen": 0.2, "tongueOut": 0.5},
    "DD": {"jawOpen": 0.25, "mouthStretchLeft": 0.2, "mouthStretchRight": 0.2},
    "kk": {"jawOpen": 0.3, "mouthStretchLeft": 0.3, "mouthStretchRight": 0.3},
    "CH": {"jawOpen": 0.2, "mouthFunnel": 0.6, "mouthShrugUpper": 0.3},
    "SS": {"jawOpen": 0.1, "mouthStretchLeft": 0.5, "mouthStretchRight": 0.5},
    "nn": {"jawOpen": 0.2, "mouthClose": 0.2},
    "RR": {"jawOpen": 0.3, "mouthFunnel": 0.4, "mouthPucker": 0.3},
    "aa": {"jawOpen": 0.8},
    "E": {"jawOpen": 0.5, "mouthStretchLeft": 0.4, "mouthStretchRight": 0.4},
    "ih": {"jawOpen": 0.3, "mouthSmileLeft": 0.4, "mouthSmileRight": 0.4},
    "oh": {"jawOpen": 0.5, "mouthFunnel": 0.7},
    "ou": {"jawOpen": 0.2, "mouthPucker": 0.9, "mouthFunnel": 0.4},
}

# Letters -> visemes: longest match first. Two classes for a letter group that says two sounds.
_RULES: dict[str, tuple[str, ...]] = {
    "tch": ("CH",), "igh": ("aa", "ih"), "ough": ("oh",),
    "th": ("TH",), "sh": ("CH",), "ch": ("CH",), "ph": ("FF",), "ng": ("nn",), "ck": ("kk",), "qu": ("kk", "ou"),
    "wh": ("ou",), "oo": ("ou",), "ou": ("aa", "ou"), "ow": ("oh",), "ee": ("ih",), "ea": ("ih",), "ie": ("ih",),
    "ey": ("E",), "ai": ("E",), "ay": ("E",), "oa": ("oh",), "oe": ("oh",), "au": ("oh",), "aw": ("oh",),
    "er": ("RR",), "ir": ("RR",), "ur": ("RR",), "or": ("oh", "RR"), "ar": ("aa", "RR"), "ll": ("nn",),
    "ss": ("SS",), "tt": ("DD",), "dd": ("DD",), "pp": ("PP",), "bb": ("PP",), "mm": ("PP",), "nn": ("nn",),
    "ff": ("FF",), "gh": (), "kn": ("nn",), "wr": ("RR",), "mb": ("PP",),
    "a": ("aa",), "e": ("E",), "i": ("ih",), "o": ("oh",), "u": ("aa",), "y": ("ih",),
    "b": ("PP",), "p": ("PP",), "m": ("PP",), "f": ("FF",), "v": ("FF",), "t": ("DD",), "d": ("DD",),
    "k": ("kk",), "c": ("kk",), "g": ("kk",), "q": ("kk",), "j": ("CH",), "s": ("SS",), "z": ("SS",),
    "x": ("kk", "SS"), "n": ("nn",), "l": ("nn",), "r": ("RR",), "w": ("ou",), "h": (),
}
BACKLOG = 12  # classes queued (about a second of speech) beyond which they are spoken twice as fast
_MAX_RULE = max(map(len, _RULES))
# Nominal durations in steps (20 ms) of voiced speech: vowels 140 ms, consonants 80 ms (letters
# outnumber sounds, and consonants often fall in unvoiced steps: tuned by tools/viseme_accuracy.py).
_STEPS = {v: (7 if v in VOWELS else 4) for v in VISEMES}


def text_to_visemes(text: str) -> list[str]:
    """A piece of text -> viseme classes by the letter rules (no `sil`; non-letters are skipped)."""
    out: list[str] = []
    for word in "".join(c if c.isalpha() else " " for c in text.lower()).split():
        if len(word) > 2 and word[-1] == "e" and word[-2] not in "aeiouy" and word[-3] in "aeiou":
            word = word[:-1]  # a silent final e ("make", "stone"; not "the")
        i = 0
        while i < len(word):
            for n in range(min(_MAX_RULE, len(word) - i), 0, -1):
                rule = _RULES.get(word[i:i + n])
                if rule is not None:
                    out.extend(rule)
                    i += n
                    break
            else:  # a letter outside a-z (accents, other scripts): a neutral vowel
                out.append("E")
                i += 1
    return out


class VisemeAnalyzer:
    """One NPC's mouth track; `frame(pcm, text)` per 80 ms frame, in order. State: the level's
    running peak, the queue of classes still to be spoken, the smoothed jaw."""

    def __init__(self, step_samples: int = STEP_SAMPLES, gate_dbfs: float = -50.0, range_db: float = 30.0):
        self.step_samples, self.gate_dbfs, self.range_db = step_samples, gate_dbfs, range_db
        self.window = np.hanning(step_samples).astype(np.float32)
        freqs = np.fft.rfftfreq(step_samples, 1.0 / MODEL_RATE)
        self.low = (freqs >= 150) & (freqs < 900)
        self.mid = (freqs >= 900) & (freqs < HISS_HZ)
        self.high = freqs >= HISS_HZ
        self.peak_db = -30.0
        self.jaw = 0.0
        self.queue: collections.deque[str] = collections.deque()
        self.elapsed = 0  # steps the queue's head has been spoken
        self.quiet = 99  # unvoiced steps in a row

    def reset(self) -> None:
        """A new character (a switch): its words start over."""
        self.queue.clear()
        self.elapsed, self.quiet, self.jaw = 0, 99, 0.0

    def frame(self, pcm: np.ndarray, text: str = "") -> tuple[list[float], list[str]]:
        """One frame (float32 at 24 kHz, a whole number of steps) -> (jaw per step, viseme per step)."""
        if text:
            self.queue.extend(text_to_visemes(text))
        x = np.asarray(pcm, dtype=np.float32)
        n = x.shape[0] // self.step_samples
        steps = x[:n * self.step_samples].reshape(n, self.step_samples)
        rms = np.sqrt(np.mean(steps * steps, axis=1) + 1e-12)
        db = 20.0 * np.log10(rms + 1e-9)
        power = np.abs(np.fft.rfft(steps * self.window, axis=1)) ** 2
        total = power.sum(axis=1) + 1e-12
        low = power[:, self.low].sum(axis=1) / total
        high = power[:, self.high].sum(axis=1) / total
        mid = power[:, self.mid].sum(axis=1) / total
        jaws: list[float] = []
        names: list[str] = []
        for i in range(n):
            d, lo, hi, mi = float(db[i]), float(low[i]), float(high[i]), float(mid[i])
            self.peak_db = max(d, self.peak_db - 0.05)  # decays 2.5 dB/s
            gate = max(self.gate_dbfs, self.peak_db - 35.0)
            voiced = d >= gate
            name = self._step(voiced, lo, hi, mi)
            level = min(1.0, max(0.0, (d - (self.peak_db - self.range_db)) / self.range_db)) if voiced else 0.0
            target = level * OPENNESS[name] * (0.6 + 0.4 * min(1.0, lo / 0.6))
            rate = 0.7 if target > self.jaw else 0.4  # fast attack, slower release (per 20 ms)
            self.jaw += rate * (target - self.jaw)
            jaws.append(round(self.jaw, 3))
            names.append(name)
        return jaws, names

    def _step(self, voiced: bool, low: float, high: float, mid: float) -> str:
        q = self.queue
        if not voiced:
            self.quiet += 1
            if q and q[0] in STOPS and self.quiet <= 3:  # a stop's closure inside a word
                return self._take(q[0])
            return "sil"
        self.quiet = 0
        hiss = high > 0.35 and low < 0.3
        vowel = low > 0.45 and high < 0.15
        if q:
            # jump ahead to a class that fits the sound better (at most 2 skipped)
            if self.elapsed >= 1:
                want = FRICATIVES if hiss else VOWELS if vowel else None
                if want is not None and q[0] not in want:
                    for k in (1, 2):
                        if k < len(q) and q[k] in want:
                            for _ in range(k):
                                q.popleft()
                            self.elapsed = 0
                            break
            return self._take(q[0])
        if hiss:
            return "SS"
        if vowel:
            return "aa" if low > 0.75 else "ou" if mid < 0.1 else "E"
        return "aa" if low > 0.6 else "E" if mid > 0.35 else "nn"

    def _take(self, name: str) -> str:
        """The queue's head is spoken for a step; it leaves after its nominal duration (sooner when
        more than half a second is queued)."""
        self.elapsed += 2 if len(self.queue) > BACKLOG else 1
        if self.elapsed >= _STEPS[name]:
            self.queue.popleft()
            self.elapsed = 0
        return name


def track(frames: Iterable[tuple[np.ndarray, str]], **kwargs: float) -> tuple[np.ndarray, list[str]]:
    """A whole stream at once (tools, tests): frames of (pcm, text) -> (jaw per step, visemes per step)."""
    analyzer = VisemeAnalyzer(**kwargs)
    jaws: list[float] = []
    names: list[str] = []
    for pcm, text in frames:
        j, v = analyzer.frame(pcm, text)
        jaws += j
        names += v
    return np.asarray(jaws, dtype=np.float32), names

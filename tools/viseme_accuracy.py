"""How well `npc_voice.visemes` follows speech whose phoneme timing is known (docs/performance.md).

espeak-ng (the system library, `apt-get install espeak-ng`) speaks NPC-like lines and reports, with
its phoneme events, the sample where each phoneme starts: the reference is the viseme class of the
phoneme being spoken at each 20 ms step (espeak phoneme -> viseme by `PHONEME_VISEMES`; an `h`
takes the class of what follows it), known by construction. The audio is resampled to 24 kHz and fed
to the analyzer in 80 ms frames, with each word given as the text stream at the frame where espeak
starts saying it (as the model's own text arrives with its frames), or `--text-lead N` frames
earlier, or not at all (`--no-text`).

Reports, over all steps: frame accuracy of the 15 classes, accuracy on the steps where the
reference speaks (not `sil`), silence detection (sil vs not), and the correlation of `jaw` with
the reference's openness (`OPENNESS` of its class) and with its energy envelope; the majority
class baseline; time per 80 ms frame.

    python tools/viseme_accuracy.py [--voices en-us,en] [--text-lead 0] [--no-text] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from npc_voice.visemes import FRAME_SAMPLES, MODEL_RATE, OPENNESS, STEP_SAMPLES, VISEMES, VisemeAnalyzer  # noqa: E402

LINES = [
    "Welcome to the Gilded Stag, traveller. Sit by the fire and warm your hands.",
    "The blacksmith has been working since dawn; his hammer never stops.",
    "Halt! Nobody passes through this gate after sunset without a writ from the captain.",
    "I need someone brave to find my brother. He went into the old mine three days ago.",
    "Would you like a room for the night? It costs five silver pieces, breakfast included.",
    "Those boots look worn out. I could fix them for you before the morning market opens.",
    "Keep your voice down, the walls have ears in this part of the city.",
    "The weather has been strange lately, thunder without rain and fog every evening.",
    "Bring me twelve wolf pelts and I will teach you how to forge a proper sword.",
    "Our village was quiet until the merchants from the south arrived with their wagons.",
    "Have you seen a small grey cat? She ran away when the bells rang at noon.",
    "Thank you, friend. Take this map; it shows the path through the marsh.",
]

PHONEME_VISEMES = {
    "p": "PP", "b": "PP", "m": "PP", "f": "FF", "v": "FF", "T": "TH", "D": "TH", "t": "DD", "d": "DD", "t#": "DD",
    "d#": "DD", "?": "DD", "k": "kk", "g": "kk", "N": "nn", "n": "nn", "l": "nn", "tS": "CH", "dZ": "CH", "S": "CH",
    "Z": "CH", "s": "SS", "z": "SS", "r": "RR", "3": "RR", "3:": "RR", "w": "ou", "j": "ih", "a": "aa", "aa": "aa",
    "A:": "aa", "A@": "aa", "aI": "aa", "aU": "aa", "V": "aa", "@": "aa", "a#": "aa", "E": "E", "e@": "E", "eI": "E",
    "I": "ih", "i": "ih", "i:": "ih", "i@": "ih", "O": "oh", "O:": "oh", "oU": "oh", "OI": "oh", "o@": "oh",
    "O@": "oh", "U": "ou", "u:": "ou", "U@": "ou", "_": "sil",
}


def phoneme_viseme(ph: str) -> str | None:
    """An espeak-ng phoneme mnemonic -> its viseme (None: `h`, which takes the next one's)."""
    ph = ph.strip("'%=,")
    if not ph or ph.startswith("_"):
        return "sil"
    if ph == "h":
        return None
    for key in (ph, ph.rstrip("-/2345#"), ph[:2], ph[:1]):
        if key in PHONEME_VISEMES:
            return PHONEME_VISEMES[key]
    return "E"


class _Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_WORD, _PHONEME = 1, 7


class Espeak:
    """libespeak-ng in synchronous mode with phoneme events: `say(text)` -> (int16 audio at
    `rate`, [(sample, phoneme)], [(sample, word)])."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError as exc:
            raise SystemExit(f"libespeak-ng not found ({exc}): apt-get install espeak-ng") from None
        self.rate = self.lib.espeak_Initialize(2, 0, None, 1)  # synchronous, phoneme events
        self._cb = _CALLBACK(self._on_audio)
        self.lib.espeak_SetSynthCallback(self._cb)

    def _on_audio(self, wav, n, events) -> int:
        if wav and n > 0:
            self._audio.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:
            e = events[i]
            if e.type == _PHONEME:
                self._phonemes.append((e.sample, e.id.string.decode("ascii", "replace")))
            elif e.type == _WORD:
                word = self._text[e.text_position - 1:e.text_position - 1 + e.length].decode("utf-8", "replace")
                self._words.append((e.sample, word))
            i += 1
        return 0

    def say(self, text: str, voice: str = "en-us", wpm: int = 160):
        self._audio, self._phonemes, self._words = [], [], []
        self._text = text.encode("utf-8")
        self.lib.espeak_SetVoiceByName(voice.encode())
        self.lib.espeak_SetParameter(1, wpm, 0)  # espeakRATE
        self.lib.espeak_Synth(self._text, len(self._text) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._audio), self._phonemes, self._words


def reference_track(phonemes: list[tuple[int, str]], n_samples: int, rate: int, steps: int) -> list[str]:
    """The viseme being spoken at the middle of each 20 ms step (at 24 kHz)."""
    starts = np.array([s for s, _ in phonemes] + [n_samples], dtype=np.float64) / rate
    classes = [phoneme_viseme(p) for _, p in phonemes]
    for i in range(len(classes) - 2, -1, -1):  # `h` takes the following class
        if classes[i] is None:
            classes[i] = classes[i + 1]
    classes = [c or "sil" for c in classes]
    out = []
    for k in range(steps):
        t = (k + 0.5) * STEP_SAMPLES / MODEL_RATE
        i = int(np.searchsorted(starts, t, side="right")) - 1
        out.append(classes[i] if 0 <= i < len(classes) else "sil")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voices", default="en-us,en", help="espeak-ng voices, comma-separated")
    ap.add_argument("--wpm", type=int, default=160)
    ap.add_argument("--text-lead", type=int, default=0, help="give each word N frames before espeak says it")
    ap.add_argument("--no-text", action="store_true", help="audio only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import soxr

    tts = Espeak()
    hyp: list[str] = []
    ref: list[str] = []
    jaw: list[float] = []
    energy: list[float] = []
    seconds = 0.0
    frames = 0
    for voice in args.voices.split(","):
        for line in LINES:
            audio, phonemes, words = tts.say(line, voice, args.wpm)
            pcm = soxr.resample(audio.astype(np.float32) / 32768.0, tts.rate, MODEL_RATE)
            pad = (-pcm.shape[0]) % FRAME_SAMPLES + 2 * FRAME_SAMPLES  # whole frames, some silence after
            pcm = np.concatenate([np.zeros(FRAME_SAMPLES, np.float32), pcm, np.zeros(pad, np.float32)])
            offset = FRAME_SAMPLES / MODEL_RATE  # one frame of silence first
            n_frames = pcm.shape[0] // FRAME_SAMPLES
            texts = [""] * n_frames
            if not args.no_text:
                for sample, word in words:
                    f = max(0, int((sample / tts.rate + offset) * MODEL_RATE) // FRAME_SAMPLES - args.text_lead)
                    texts[f] += " " + word
            shifted = [(s + int(offset * tts.rate), p) for s, p in phonemes]
            ref += reference_track([(0, "_")] + shifted, int(pcm.shape[0] / MODEL_RATE * tts.rate), tts.rate,
                                   n_frames * FRAME_SAMPLES // STEP_SAMPLES)
            analyzer = VisemeAnalyzer()
            t0 = time.perf_counter()
            for f in range(n_frames):
                j, v = analyzer.frame(pcm[f * FRAME_SAMPLES:(f + 1) * FRAME_SAMPLES], texts[f])
                jaw += j
                hyp += v
            seconds += time.perf_counter() - t0
            frames += n_frames
            steps = pcm[:n_frames * FRAME_SAMPLES].reshape(-1, STEP_SAMPLES)
            energy += list(np.sqrt(np.mean(steps ** 2, axis=1)))
    hyp_a, ref_a = np.array(hyp), np.array(ref)
    speaking = ref_a != "sil"
    majority = max(VISEMES, key=lambda v: int(np.sum(ref_a == v)))
    openness = np.array([OPENNESS[r] for r in ref])
    result = {
        "voices": args.voices, "wpm": args.wpm, "text": "none" if args.no_text else f"words, lead {args.text_lead} frames",
        "steps": len(ref), "seconds_of_speech": round(len(ref) * STEP_SAMPLES / MODEL_RATE, 1),
        "accuracy": round(float(np.mean(hyp_a == ref_a)), 3),
        "accuracy_speaking": round(float(np.mean(hyp_a[speaking] == ref_a[speaking])), 3),
        "silence_agreement": round(float(np.mean((hyp_a == "sil") == (ref_a == "sil"))), 3),
        "majority_baseline": {"class": majority, "accuracy": round(float(np.mean(ref_a == majority)), 3),
                              "accuracy_speaking": round(float(np.mean(ref_a[speaking] == majority)), 3)},
        "jaw_corr_openness": round(float(np.corrcoef(jaw, openness)[0, 1]), 3),
        "jaw_corr_energy": round(float(np.corrcoef(jaw, energy)[0, 1]), 3),
        "ms_per_frame": round(1000 * seconds / frames, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Makes the voice samples of the shipped cast: `characters/<id>/voice.wav`.

Each character speaks its own greeting (the `lines.greeting` of its character.toml) with its own
espeak-ng voice, variant, pitch and speed, then sox shapes it (telephone band, radio crackle,
tavern room, stone gateway, ...) and converts it to 24 kHz mono 16-bit. The sample is imported
through the character store (atomic replace, length checks) and must last 3-10 s.

    apt-get update && apt-get install -y espeak-ng sox
    python tools/make_cast_voices.py            # all characters in VOICES
    python tools/make_cast_voices.py innkeeper  # some of them

Deterministic: no dither (-D), repeatable effects (-R), gain guarded against clipping (-G); the same
tools give the same files.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import soundfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npc_voice.characters import CharacterStore  # noqa: E402
from npc_voice.characters.model import VOICE_RATE


@dataclass(frozen=True)
class VoiceRecipe:
    espeak: str  # voice+variant
    pitch: int  # espeak -p, 0-99
    speed: int  # espeak -s, words per minute
    effects: tuple[str, ...]  # sox effects after the synthesis


VOICES = {
    # a calm older man in a small study
    "teacher": VoiceRecipe("en-gb-x-rp+Andy", 55, 150, ("bass", "+3", "reverb", "15", "50", "30")),
    # a brisk woman on a phone line
    "bank-agent": VoiceRecipe("en-us+Alicia", 58, 170, ("sinc", "300-3400", "compand", "0.02,0.2", "-60,-40,-10", "-5")),
    # a bright, friendly receptionist (higher, quicker, slightly pitched up)
    "receptionist": VoiceRecipe("en+f5", 62, 175, ("highpass", "120", "treble", "+4")),
    # a tense man on a crackly radio, fast
    "astronaut": VoiceRecipe("en-us+m3", 38, 195, ("sinc", "450-2800", "overdrive", "8", "tremolo", "30", "15")),
    # a warm woman in a wooden tavern room
    "innkeeper": VoiceRecipe("en-gb-x-gbclan+f2", 60, 150, ("bass", "+4", "reverb", "25", "50", "60")),
    # a deep, rough man by the forge
    "blacksmith": VoiceRecipe("en-gb-scotland+m7", 20, 135, ("pitch", "-250", "bass", "+6", "overdrive", "4")),
    # a firm man under a stone gateway
    "city-guard": VoiceRecipe("en-gb-x-gbcwmd+m5", 32, 145, ("pitch", "-100", "reverb", "50", "50", "90")),
    # an old, worried woman, slow
    "quest-giver": VoiceRecipe("en-gb-x-rp+grandma", 50, 135, ("tremolo", "5", "12", "reverb", "10")),
}


def synthesize(recipe: VoiceRecipe, text: str, out: Path, work: Path) -> None:
    raw = work / "raw.wav"
    subprocess.run(["espeak-ng", "-v", recipe.espeak, "-p", str(recipe.pitch), "-s", str(recipe.speed),
                    "-w", str(raw), text], check=True)
    subprocess.run(["sox", "-D", "-R", "-G", str(raw), "-b", "16", "-c", "1", str(out), *recipe.effects,
                    "pad", "0.2", "0.3", "rate", "-v", str(VOICE_RATE), "gain", "-n", "-3"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help="characters to (re)make (default: all)")
    parser.add_argument("--characters", default=str(ROOT / "characters"), help="the cast folder")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get update && apt-get install -y espeak-ng sox", file=sys.stderr)
            return 1
    store = CharacterStore(args.characters)
    for id in args.ids or list(VOICES):
        character = store.load(id)
        text = character.lines.get("greeting")
        if not text:
            print(f"{id}: no lines.greeting to speak", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as work:
            wav = Path(work) / "voice.wav"
            synthesize(VOICES[id], text, wav, Path(work))
            info = soundfile.info(wav)
            if not (info.samplerate == VOICE_RATE and info.channels == 1 and info.subtype == "PCM_16"):
                raise SystemExit(f"{id}: sox wrote {info.samplerate} Hz, {info.channels} ch, {info.subtype}")
            if not 3.0 <= info.duration <= 10.0:
                raise SystemExit(f"{id}: {info.duration:.2f} s; the cast's samples must last 3-10 s "
                                 "(change the speed or the greeting)")
            report = store.set_voice(id, wav)
        print(f"{id:14} {info.duration:5.2f} s  {VOICES[id].espeak:24} {report.summary()}")
        for problem in report.problems:
            print(f"{'':14} {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

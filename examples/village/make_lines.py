#!/usr/bin/env python3
"""Makes the player's prepared lines (keys 1-3 in the village game): espeak-ng speaks each line,
sox turns it into 24 kHz mono 16-bit WAV (the model's own rate) in examples/village/lines/.

    apt-get install -y espeak-ng sox
    python examples/village/make_lines.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from npc_voice.protocol import MODEL_RATE

HERE = Path(__file__).resolve().parent
LINES = [
    ("1-hello", "Hello there! Good to meet you. What is your name?"),
    ("2-news", "Any news from the road? I heard the north pass is closed."),
    ("3-work", "I am looking for work. Do you need a hand with anything?"),
]
VOICE = "en-us+m3"  # espeak-ng variant: a male voice, distinct from the cast's


def main() -> None:
    out_dir = HERE / "lines"
    out_dir.mkdir(exist_ok=True)
    for name, text in LINES:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.wav"
            subprocess.run(["espeak-ng", "-v", VOICE, "-s", "150", "-w", str(raw), text], check=True)
            out = out_dir / f"{name}.wav"
            # the model's rate (24 kHz), mono, 16-bit; peak normalised to -3 dBFS; 0.3 s of silence after
            subprocess.run(["sox", str(raw), "-r", str(MODEL_RATE), "-c", "1", "-b", "16", str(out),
                            "gain", "-n", "-3", "pad", "0", "0.3"], check=True)
        (out_dir / f"{name}.txt").write_text(text + "\n")
        print(out)


if __name__ == "__main__":
    main()

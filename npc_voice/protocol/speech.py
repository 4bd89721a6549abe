"""The rule that turns an NPC's frames into speaking/listening states (docs/protocol.md, `state`)."""

from __future__ import annotations

import math

import numpy as np


class SpeechState:
    """Speaking/listening from the NPC's frames.

    A frame is *voiced* when it adds text (a non-empty piece) or its audio is at or above
    `threshold_dbfs` RMS (-40 dBFS). The NPC starts `speaking` at the first voiced frame, and goes
    back to `listening` after `hangover` (10 = 800 ms) unvoiced frames in a row; that change is
    dated at the first unvoiced frame of the run (and reported `hangover` frames later). A session
    starts `listening`.
    """

    def __init__(self, threshold_dbfs: float = -40.0, hangover: int = 10):
        self.threshold = 10.0 ** (threshold_dbfs / 20.0)
        self.hangover = hangover
        self.speaking = False
        self._quiet = 0

    @staticmethod
    def rms(pcm: np.ndarray) -> float:
        x = np.asarray(pcm, dtype=np.float32)
        return float(math.sqrt(float(np.dot(x, x)) / max(1, x.shape[0])))

    def update(self, frame: int, text: str, pcm: np.ndarray) -> tuple[str, int] | None:
        """Feeds frame `frame`; returns (new state, the frame it starts at) on a change."""
        voiced = bool(text) or self.rms(pcm) >= self.threshold
        if voiced:
            self._quiet = 0
            if not self.speaking:
                self.speaking = True
                return "speaking", frame
            return None
        self._quiet += 1
        if self.speaking and self._quiet >= self.hangover:
            self.speaking = False
            return "listening", frame - self.hangover + 1
        return None

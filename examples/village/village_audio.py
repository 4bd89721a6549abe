"""The game's audio: the NPC's voice through a reserved pygame mixer channel (a small jitter
buffer of queued Sound chunks), and the microphone through SDL capture
(`pygame._sdl2.audio.AudioDevice`), resampled to 24 kHz."""

from __future__ import annotations

import collections
import queue
import time
from typing import Any

import numpy as np

from npc_voice.client import PlayoutClock
from npc_voice.protocol import FRAME_SECONDS as FRAME_S
from npc_voice.protocol import MODEL_RATE as RATE  # the game plays at the model's rate


class Playback:
    """Plays 80 ms NPC frames as they arrive, without gaps or pile-up.

    Frames wait in `pending` (the jitter buffer); playback starts once `prebuffer` frames are there
    (160 ms by default). `update()`, called every game frame, keeps one Sound playing and one queued
    on the channel (`Channel.queue`). When more than `max_queued_s` waits, the oldest frames are
    dropped (counted in `dropped`): latency stays bounded. A gap in the frame numbers (frames the
    server dropped) is filled with silence; an underrun waits for the prebuffer again.

    A `PlayoutClock` (frame n at t0 + n * 80 ms on this machine's clock) re-syncs after a server
    hiccup: frames that arrive late re-anchor it (the underrun is the one gap), and when frames keep
    arriving earlier than the buffer needs (a catch-up burst left it deep) the oldest pending frames
    are skipped (counted in `skipped`), so the NPC is never left answering late for the rest of the
    conversation.
    """

    def __init__(self, prebuffer: int = 2, max_queued_s: float = 0.5):
        import pygame

        self.pygame = pygame
        self.prebuffer, self.max_queued_s = prebuffer, max_queued_s
        self.pending: collections.deque[Any] = collections.deque()
        self.mixer = pygame.mixer.get_init()  # (frequency, size, channels) or None: no audio output
        self.channel = None
        if self.mixer:
            pygame.mixer.set_reserved(1)
            self.channel = pygame.mixer.Channel(0)
        self.playing = False
        self.next_frame: int | None = None
        self.clock = PlayoutClock(buffer_s=prebuffer * FRAME_S)
        self.received = self.queued = self.dropped = self.silence_frames = self.underruns = self.skipped = 0

    @property
    def pending_s(self) -> float:
        return len(self.pending) * FRAME_S

    def _sound(self, pcm: np.ndarray) -> Any:
        if not self.mixer:
            return pcm
        freq, size, channels = self.mixer
        x = pcm.astype(np.int16, copy=False)
        if freq != RATE:  # the device would not take 24 kHz: convert here
            n = int(round(x.size * freq / RATE))
            x = np.interp(np.linspace(0, x.size - 1, n), np.arange(x.size), x).astype(np.int16)
        if abs(size) != 16:
            x = (x.astype(np.float32) / 32768.0) if size == 32 else (x >> 8).astype(np.int8)
        if channels > 1:
            x = np.repeat(x[:, None], channels, axis=1)
        return self.pygame.mixer.Sound(buffer=np.ascontiguousarray(x).tobytes())

    def push(self, frame: int, pcm: np.ndarray, now: float | None = None) -> None:
        """Frame `frame` arrived (at `now`, `time.monotonic()` by default)."""
        self.received += 1
        skip = self.clock.place(frame, time.monotonic() if now is None else now)
        for _ in range(min(skip, len(self.pending))):  # re-sync: the buffer held more than it should
            self.pending.popleft()
            self.skipped += 1
        if self.next_frame is not None and frame > self.next_frame:
            gap = min(frame - self.next_frame, int(self.max_queued_s / FRAME_S))
            for _ in range(gap):
                self.pending.append(self._sound(np.zeros_like(pcm)))
                self.silence_frames += 1
        if self.next_frame is not None and frame < self.next_frame:
            return  # never happens (indices only grow); ignore a repeat
        self.next_frame = frame + 1
        self.pending.append(self._sound(pcm))
        while self.pending_s > self.max_queued_s + 1e-9:
            self.pending.popleft()
            self.dropped += 1

    def update(self) -> None:
        if self.channel is None:  # no audio device: frames are consumed as if played
            while len(self.pending) > self.prebuffer:
                self.pending.popleft()
                self.queued += 1
            return
        if not self.playing:
            if len(self.pending) < self.prebuffer:
                return
            self.playing = True
        if not self.channel.get_busy():
            if not self.pending:
                self.playing = False
                self.underruns += 1
                self.clock.reset()  # playback starts over: the next frame anchors the clock
                return
            self.channel.play(self.pending.popleft())
            self.queued += 1
        if self.pending and self.channel.get_queue() is None:
            self.channel.queue(self.pending.popleft())
            self.queued += 1

    def reset(self) -> None:
        self.pending.clear()
        self.playing = False
        self.next_frame = None
        self.clock.reset()
        if self.channel is not None:
            self.channel.stop()

    @property
    def busy(self) -> bool:
        return bool(self.pending) or bool(self.channel is not None and self.channel.get_busy())


class Microphone:
    """SDL audio capture. `read()` returns what arrived since the last call, float32 at 24 kHz.
    Raises RuntimeError when there is no capture device (the game falls back to prepared lines)."""

    def __init__(self, device: str | None = None):
        from pygame._sdl2 import audio as sdl_audio

        names = sdl_audio.get_audio_device_names(True)
        if not names:
            raise RuntimeError("no audio capture device")
        self.name = device if device is not None else names[0]
        self.chunks: queue.Queue[bytes] = queue.Queue(maxsize=256)

        def callback(_device: Any, memory: Any) -> None:  # the SDL audio thread
            try:
                self.chunks.put_nowait(bytes(memory))
            except queue.Full:
                pass

        self.device = sdl_audio.AudioDevice(
            devicename=self.name, iscapture=True, frequency=RATE, audioformat=sdl_audio.AUDIO_F32,
            numchannels=1, chunksize=512, allowed_changes=sdl_audio.AUDIO_ALLOW_FREQUENCY_CHANGE, callback=callback)
        self.rate = int(self.device.frequency)
        self._resampler = None
        if self.rate != RATE:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, RATE, 1, dtype="float32", quality="HQ")
        self.device.pause(0)

    def read(self) -> np.ndarray:
        parts = []
        while True:
            try:
                parts.append(self.chunks.get_nowait())
            except queue.Empty:
                break
        x = np.frombuffer(b"".join(parts), np.float32) if parts else np.zeros(0, np.float32)
        if self._resampler is not None and x.size:
            x = self._resampler.resample_chunk(x)
        return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)

    def close(self) -> None:
        try:
            self.device.pause(1)
            self.device.close()
        except Exception:
            pass

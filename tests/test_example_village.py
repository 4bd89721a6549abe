"""The example game (examples/village) and examples/talk.py against a real server on 127.0.0.1
(the tiny model), headless: SDL's dummy video and audio drivers, input scripted as key events."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.request
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
pygame = pytest.importorskip("pygame")  # the `examples` extra

REPO = Path(__file__).resolve().parents[1]
VILLAGE = REPO / "examples" / "village"
sys.path.insert(0, str(VILLAGE))

import village  # noqa: E402
from village_audio import Playback  # noqa: E402

TOKEN = "village-test-token"


@pytest.fixture(scope="module")
def server():
    import torch

    from npc_voice.characters import CharacterStore
    from npc_voice.engine import Engine, PrefixCache
    from npc_voice.model.generator import Generator
    from npc_voice.model.loading import random_model
    from npc_voice.serve import BackgroundServer, ServerConfig

    torch.set_num_threads(1)  # 2-core machine: the engine on one core, the game on the other
    model = random_model("tiny", seed=3)
    store = CharacterStore(REPO / "characters")
    store.tokenizer = model.tokenizer
    engine = Engine(model, slots=2, cache=PrefixCache(model, Generator(model.lm)))
    bg = BackgroundServer(engine, ServerConfig(port=0, token=TOKEN), store).start()
    yield bg
    bg.stop()


def health(bg) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.port}/health", timeout=5) as r:
        return json.load(r)


@pytest.mark.realtime
def test_walk_up_talk_and_walk_away(server, timing) -> None:
    game = village.Game(server.url, TOKEN, mic=False, seed=1)
    try:
        assert game.local_server is None and game.mic is None  # no microphone: prepared lines
        assert len(game.lines) == 3
        target = next(n for n in game.npcs if n.id == "innkeeper")
        assert len(game.npcs) >= 3 and all(n.name for n in game.npcs)
        trace: dict = {"max_pending_s": 0.0, "open_dist": None, "subtitles": [], "states": set(), "t": [],
                       "connecting_t": []}
        pilot = village.autopilot("innkeeper", line=0, talk_frames=75)

        def script(g: village.Game, frame: int) -> list:
            conv = g.conversation
            if conv is not None and trace["open_dist"] is None:
                trace["open_dist"] = math.dist(g.player, conv.npc.pos)
            if conv is not None:
                if not trace["subtitles"] or trace["subtitles"][-1] != conv.subtitles:
                    trace["subtitles"].append(conv.subtitles)
                trace["states"].add(conv.state)
            trace["max_pending_s"] = max(trace["max_pending_s"], g.playback.pending_s)
            trace["t"].append(time.monotonic())
            if conv is not None and conv.status == "connecting":
                trace["connecting_t"].append(trace["t"][-1])
            return pilot(g, frame)

        # the fixed-length script of key events first: walk right for 10 frames, then stop
        x0 = game.player[0]
        game.run(frames=12, script=[(0, "down", pygame.K_RIGHT), (10, "up", pygame.K_RIGHT)])
        assert game.player[0] == x0 + 10 * village.SPEED and not game.held and game.conversation is None

        t0 = time.monotonic()
        conv = None
        while time.monotonic() - t0 < 60:
            game.run(frames=15, script=script)
            if game.history:
                conv = game.history[0]
            if conv is not None and conv.closed_frame is not None and conv.ended is not None:
                break
        assert conv is not None, "no conversation opened"
        # it opened when the player reached the innkeeper, and with her
        assert conv.npc is target and trace["open_dist"] < village.TALK_RADIUS
        assert conv.started_frame is not None and not conv.error
        # the game loop kept running while the session was being set up (the first start builds the
        # character's prompt: a few seconds on this machine)
        assert conv.started_frame - conv.opened_frame >= 2
        gaps = np.diff(trace["t"])
        timing.check(gaps.max() < 0.5, f"a frame took {gaps.max():.2f} s")
        print(f"connecting for {len(trace['connecting_t'])} frames, "
              f"{trace['connecting_t'][-1] - trace['connecting_t'][0]:.2f} s; longest frame {gaps.max() * 1000:.0f} ms")
        assert game.lines_sent == [game.lines[0][0]] and conv.player_line == game.lines[0][0]
        # the line and silence went out every 80 ms; audio arrived and went to the mixer channel
        # through the jitter buffer (how much of each in the conversation's span is timing)
        assert game.link.sent_chunks > 0 and conv.audio_frames > 0 and game.playback.queued > 0
        timing.check(game.link.sent_chunks > 20, f"{game.link.sent_chunks} chunks sent")
        timing.check(conv.audio_frames >= 20, f"{conv.audio_frames} NPC frames received")
        assert game.playback.received == conv.audio_frames
        timing.check(game.playback.queued >= 12, f"playback {vars(game.playback)}")
        assert trace["max_pending_s"] <= 0.5 + 1e-6
        # subtitles grew as text arrived; the indicator followed the NPC's state
        assert conv.text_events > 0 and len(trace["subtitles"]) >= 3 and trace["subtitles"][-1].strip()
        assert "speaking" in trace["states"]
        # the game asked for visemes: a mouth track came with the audio, and the NPC's mouth moved
        assert conv.viseme_events > 0 and conv.viseme_events >= conv.audio_frames - 1
        assert conv.mouth_max > 0, "the NPC's mouth never opened"
        # walking away closed it: the server ended the session at the client's request
        assert game.conversation is None and len(game.history) == 1
        assert math.dist(game.player, target.pos) > village.LEAVE_RADIUS
        assert conv.ended["reason"] == "client" and conv.ended["frames"] >= conv.audio_frames
        deadline = time.monotonic() + 5
        while health(server)["slots"]["used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(server)["slots"]["used"] == 0
        print(f"frames {game.frame}, fps {game.fps_measured:.1f}, NPC frames {conv.audio_frames}, "
              f"queued {game.playback.queued}, dropped {game.playback.dropped}, underruns {game.playback.underruns}")
    finally:
        game.close()
    timing.verdict()


def test_playback_jitter_buffer() -> None:
    pygame.mixer.pre_init(24_000, -16, 1, 512)
    pygame.init()
    try:
        pb = Playback(prebuffer=2, max_queued_s=0.5)
        frame = np.zeros(1920, np.int16)
        pb.push(0, frame)
        pb.update()
        assert pb.queued == 0 and not pb.playing  # waits for the prebuffer
        pb.push(1, frame)
        pb.update()
        assert pb.queued == 2 and pb.channel.get_busy()  # one playing, one queued on the channel
        for i in range(2, 22):  # a burst of 20 frames (1.6 s): the oldest go beyond 0.5 s
            pb.push(i, frame)
        assert pb.pending_s <= 0.5 + 1e-9 and pb.dropped == 20 - 6
        pb.push(25, frame)  # frames 22-24 never came: silence in their place
        assert pb.silence_frames == 3
        pb.reset()
        assert not pb.pending and not pb.channel.get_busy()
    finally:
        pygame.quit()



def test_playback_resyncs_after_a_server_hiccup() -> None:
    """The server stalls 0.4 s, then catches up in a burst and goes on at its old schedule: the
    burst would leave 0.4 s more in the jitter buffer for the rest of the conversation; the playout
    clock sees frames keep arriving that early and the oldest 5 pending frames are skipped, once."""
    pb = Playback(prebuffer=2, max_queued_s=60.0)  # no mixer: nothing plays, `pending` shows what was kept
    stall = 25 * 0.08 + 0.4
    arrivals = ([(n, n * 0.08) for n in range(25)] + [(n, stall) for n in range(25, 30)]
                + [(n, n * 0.08) for n in range(30, 60)])
    frame = np.zeros(1920, np.int16)
    for n, now in arrivals:
        pb.push(n, frame, now=now)
    assert pb.clock.late_resyncs == 1 and pb.skipped == 5 and len(pb.pending) == 60 - 5
    assert pb.dropped == 0 and pb.silence_frames == 0


def test_playback_converts_to_the_device_format() -> None:
    pygame.mixer.pre_init(44_100, -16, 2, 512)  # a device that would not take 24 kHz mono
    pygame.init()
    try:
        assert pygame.mixer.get_init() == (44_100, -16, 2)
        pb = Playback()
        pb.push(0, (np.sin(np.arange(1920) / 10) * 8000).astype(np.int16))
        sound = pb.pending[0]
        assert abs(sound.get_length() - 0.08) < 0.002
        assert pygame.sndarray.array(sound).shape == (3528, 2)
    finally:
        pygame.quit()


class FakeMicrophone:
    """0.1 s of a tone per read, as if captured and resampled."""

    def __init__(self):
        self.reads = 0

    def read(self) -> np.ndarray:
        self.reads += 1
        return (0.2 * np.sin(np.arange(2400) / 5)).astype(np.float32)

    def close(self) -> None:
        pass


@pytest.mark.realtime
def test_push_to_talk_and_open_mic(server, timing) -> None:
    """The microphone reaches the NPC only while SPACE is held or the open mic is on, and only in a
    live conversation (the link sends silence otherwise)."""
    game = village.Game(server.url, TOKEN, mic=True)
    try:
        # SDL's dummy driver has a capture device that records silence in real time
        if game.mic is not None:
            game.mic.read()
            time.sleep(0.5)
            samples = game.mic.read()
            assert samples.dtype == np.float32 and samples.size > 0
            timing.check(0.3 * 24_000 < samples.size < 0.8 * 24_000, f"{samples.size} samples captured in 0.5 s")
            game.mic.close()
        game.mic = FakeMicrophone()
        npc = game.npcs[0]
        conv = village.Conversation(npc, number=999, opened_frame=0, status="live")
        game.conversation = conv
        game.link.clear_input()
        game.update_microphone()
        assert game.link.input_pending_s == 0  # not talking
        game.handle(village.key_event("down", pygame.K_SPACE))
        game.update_microphone()
        assert abs(game.link.input_pending_s - 0.1) < 1e-6 and game.mic_level > 0.1
        game.handle(village.key_event("up", pygame.K_SPACE))
        game.update_microphone()
        assert abs(game.link.input_pending_s - 0.1) < 1e-6 and game.mic_level == 0
        game.handle(village.key_event("down", pygame.K_m))  # open mic
        game.handle(village.key_event("up", pygame.K_m))
        game.update_microphone()
        assert game.open_mic and abs(game.link.input_pending_s - 0.2) < 1e-6
        conv.status = "connecting"  # nothing goes out before the session is live
        game.update_microphone()
        assert abs(game.link.input_pending_s - 0.2) < 1e-6
        game.draw()  # the HUD with a microphone (level meter) draws
        game.conversation = None
    finally:
        game.close()
    timing.verdict()


def test_talk_example_wav_in_wav_out(server, tmp_path: Path) -> None:
    import soundfile

    out = tmp_path / "npc.wav"
    line = VILLAGE / "lines" / "3-work.wav"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "talk.py"), "--server", server.url, "--token", TOKEN,
         "--character", "blacksmith", "--input", str(line), "--output", str(out)],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "ended: client" in result.stderr
    pcm, rate = soundfile.read(out, dtype="int16")
    duration = soundfile.info(line).duration
    assert rate == 24_000 and pcm.ndim == 1
    assert abs(len(pcm) / rate - duration) < 0.5 and np.abs(pcm).max() > 0


def test_prepared_lines_are_24k_mono() -> None:
    import soundfile

    wavs = sorted((VILLAGE / "lines").glob("*.wav"))
    assert len(wavs) == 3
    for wav in wavs:
        info = soundfile.info(wav)
        assert info.samplerate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
        assert 1.0 < info.duration < 8.0 and wav.with_suffix(".txt").read_text().strip()


def test_no_server_is_reported_not_fatal() -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    game = village.Game(f"ws://127.0.0.1:{port}", mic=False)
    try:
        npc = game.npcs[0]
        game.player = [float(npc.pos[0]), float(npc.pos[1] + 30)]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            game.run(frames=5)
            if game.conversation is not None and game.conversation.status == "failed":
                break
        conv = game.conversation
        assert conv is not None and conv.status == "failed" and conv.error
        game.draw()  # the panel says so; the game goes on
        frame = game.frame
        game.run(frames=3)
        assert game.frame == frame + 3
    finally:
        game.close()


def test_the_autopilot_reaches_every_npc() -> None:
    """`--autopilot NPC` walks up to each NPC of the village (the city guard stands behind its
    post's wall: the pilot tries another side), close enough to talk (60 px)."""
    import socket

    with socket.socket() as s:  # no server needed to walk: a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    game = village.Game(f"ws://127.0.0.1:{port}", mic=False, fps=2000)
    try:
        for npc in game.npcs:
            game.player = [float(village.START[0]), float(village.START[1])]
            game.run(frames=600, script=village.autopilot(npc.id, leave=False))
            assert math.dist(game.player, npc.pos) < 60, (npc.id, game.player)
    finally:
        game.close()


def test_a_server_without_visemes_still_talks(server) -> None:
    """Against a server started with --no-visemes (its `start` refuses "visemes") the game starts
    the conversation without the mouth track: frames arrive, the mouth stays closed."""
    saved = server.server.config
    server.server.config = dataclasses.replace(saved, visemes=False)
    game = village.Game(server.url, TOKEN, mic=False, seed=1)
    try:
        npc = next(n for n in game.npcs if n.id == "innkeeper")
        game.player = [float(npc.pos[0]), float(npc.pos[1] + 30)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (game.conversation is None or game.conversation.audio_frames < 5):
            game.run(frames=5)
        conv = game.conversation
        assert conv is not None and conv.audio_frames >= 5 and not conv.error, conv and conv.error
        assert conv.viseme_events == 0
    finally:
        game.close()
        server.server.config = saved

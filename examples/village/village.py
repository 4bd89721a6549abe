#!/usr/bin/env python3
"""The npc-voice example game: a small top-down village where you walk up to NPCs and talk to them.

    python examples/village/village.py                                  # an in-process server, tiny model
    python examples/village/village.py --server ws://127.0.0.1:8765 --token SECRET

Arrow keys / WASD walk. Walking up to an NPC opens a voice conversation with it (one websocket
session, docs/protocol.md); walking away ends it. Hold SPACE to talk (push-to-talk), or press M for
an open microphone. Keys 1-3 send a prepared line (examples/village/lines/*.wav), for machines
without a microphone. ESC quits.

Threads: the pygame loop (this file) never waits on the network. `village_net.VoiceLink` runs the
websocket client on its own asyncio thread; queues carry commands and audio to it and events back.
The NPC's audio plays through `village_audio.Playback` (a jitter buffer on a reserved mixer channel).

For tests and screenshots the game runs headless (SDL_VIDEODRIVER=dummy, SDL_AUDIODRIVER=dummy) and
is driven by a script: `Game.run(frames=N, script=...)`.

Over 400 lines because it is meant to be read as one example, top to bottom: a game developer sees
the whole loop (world, input, conversations, drawing, mouths) in one file; the network and the
audio playback, which a game would reuse, live in village_net.py and village_audio.py.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pygame

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import npc_voice  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(HERE.parents[1]))

from village_audio import FRAME_S, RATE, Microphone, Playback  # noqa: E402
from village_net import NetEvent, VoiceLink  # noqa: E402

TILE = 32
COLS, ROWS = 25, 18
WIDTH, HEIGHT = COLS * TILE, ROWS * TILE
FPS = 30
SPEED = 5  # pixels per frame
TALK_RADIUS = 60  # a conversation opens closer than this ...
LEAVE_RADIUS = 110  # ... and ends farther than this
START = (400, 304)
LINES_DIR = HERE / "lines"

WALK_KEYS = {
    pygame.K_LEFT: (-1, 0), pygame.K_a: (-1, 0), pygame.K_RIGHT: (1, 0), pygame.K_d: (1, 0),
    pygame.K_UP: (0, -1), pygame.K_w: (0, -1), pygame.K_DOWN: (0, 1), pygame.K_s: (0, 1),
}
LINE_KEYS = {pygame.K_1: 0, pygame.K_2: 1, pygame.K_3: 2}

GRASS, GRASS2, PATH, PATH2 = (96, 148, 72), (88, 140, 66), (196, 170, 120), (186, 160, 112)
WATER, WALL, TIMBER, ROOF_RED, ROOF_BLUE, ROOF_BROWN = (70, 120, 190), (226, 214, 186), (110, 78, 50), \
    (168, 64, 52), (70, 90, 140), (120, 84, 60)
INK, PAPER, LISTEN, SPEAK, WAIT = (24, 22, 28), (246, 240, 226), (90, 190, 110), (240, 150, 50), (150, 150, 150)


@dataclass
class NPC:
    id: str  # the character id on the server (characters/<id>/)
    name: str
    pos: tuple[int, int]
    color: tuple[int, int, int]
    role: str = ""
    speaking: bool = False
    mouth: float = 0.0  # jaw opening 0-1 now (from the server's visemes, in step with playback)


VILLAGERS = [
    NPC("innkeeper", "Marta Holloway", (144, 238), (200, 90, 120), "innkeeper"),
    NPC("blacksmith", "Borin Ashdown", (592, 238), (90, 90, 100), "blacksmith"),
    NPC("city-guard", "Sgt. Tomas Hale", (736, 304), (60, 80, 160), "city guard"),
    NPC("quest-giver", "Elder Wynn", (272, 436), (120, 70, 160), "quest giver"),
]


@dataclass
class Conversation:
    """The conversation with the NPC the player stands next to (at most one)."""

    npc: NPC
    number: int  # VoiceLink's number for it
    opened_frame: int
    status: str = "connecting"  # connecting, live, ended, failed
    state: str = "listening"  # the NPC's state: listening or speaking
    subtitles: str = ""
    audio_frames: int = 0
    text_events: int = 0
    states: list[str] = field(default_factory=list)
    mouth_track: dict[int, list[float]] = field(default_factory=dict)  # frame -> jaw per step (visemes)
    viseme_events: int = 0
    mouth_max: float = 0.0  # the widest the NPC's mouth was drawn
    started_frame: int | None = None
    closed_frame: int | None = None
    ended: dict[str, Any] | None = None
    error: str = ""
    player_line: str = ""


def _load_lines() -> list[tuple[str, np.ndarray]]:
    from npc_voice.audio import load_mono

    lines = []
    for wav in sorted(LINES_DIR.glob("*.wav"))[:3]:
        txt = wav.with_suffix(".txt")
        text = txt.read_text().strip() if txt.exists() else wav.stem
        lines.append((text, load_mono(wav, RATE)))
    return lines


def start_local_server(characters: str | None = None, weights: str | None = None, slots: int = 2) -> Any:
    """An npc-voice server on this process (its own thread), on 127.0.0.1 and a free port."""
    import torch

    from npc_voice.characters import open_store
    from npc_voice.engine import Engine
    from npc_voice.model.loading import load_model
    from npc_voice.serve import BackgroundServer, ServerConfig

    if weights is None:
        print("village: starting an in-process npc-voice server with the tiny built-in model "
              "(RANDOM weights: the NPCs babble; give --weights DIR or --server ws://... for real speech)",
              file=sys.stderr, flush=True)
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) - 1)))
    model = load_model(weights)
    store = open_store(characters)
    if store is not None:
        store.tokenizer = model.tokenizer
    engine = Engine(model, slots=slots)  # its own PrefixCache, in memory
    return BackgroundServer(engine, ServerConfig(host="127.0.0.1", port=0), store).start()


Script = Callable[["Game", int], Iterable[pygame.event.Event] | None] | Iterable[tuple[int, str, int]]


def key_event(kind: str, key: int) -> pygame.event.Event:
    """A scripted key press ("down") or release ("up")."""
    etype = pygame.KEYDOWN if kind == "down" else pygame.KEYUP
    return pygame.event.Event(etype, key=key, mod=0, unicode="", scancode=0)


class Game:
    """The village. `run(frames, script)` runs the loop; everything worth asserting is an attribute:
    `player`, `conversation`, `history` (every conversation, closed ones included), `playback`
    (received/queued/dropped frames), `frame`, `fps_measured`."""

    def __init__(self, server: str | None = None, token: str | None = None, *, mic: bool = True,
                 fps: int = FPS, seed: int | None = None, characters: str | None = None,
                 weights: str | None = None, npcs: list[NPC] | None = None):
        pygame.mixer.pre_init(RATE, -16, 1, 512, allowedchanges=0)  # SDL converts to the device's format
        pygame.init()
        if not pygame.mixer.get_init():
            print("village: no audio output device: the NPCs will be silent", file=sys.stderr)
        self.screen = pygame.display.set_mode((WIDTH, HEIGHT))
        pygame.display.set_caption("npc-voice village")
        self.clock = pygame.time.Clock()
        self.fps = fps
        self.font = pygame.font.Font(None, 22)
        self.small = pygame.font.Font(None, 18)
        self.big = pygame.font.Font(None, 28)
        self.npcs = [NPC(n.id, n.name, n.pos, n.color, n.role) for n in (npcs or VILLAGERS)]
        self.player = [float(START[0]), float(START[1])]
        self.facing = (0, 1)
        self.held: set[int] = set()
        self.obstacles: list[pygame.Rect] = []
        self.background = self._draw_background()
        self.local_server = None
        if server is None:
            self.local_server = start_local_server(characters, weights)
            server = self.local_server.url
        self.server_url = server
        self.link = VoiceLink(server, token, seed=seed).start()
        self.playback = Playback()
        self.mic: Microphone | None = None
        self.mic_error = "disabled (--no-mic)"
        if mic:
            try:
                self.mic = Microphone()
                self.mic_error = ""
            except Exception as exc:  # no capture device, no SDL audio: prepared lines only
                self.mic_error = str(exc)
        self.open_mic = False
        self.mic_level = 0.0
        self.lines = _load_lines()
        self.conversation: Conversation | None = None
        self.history: list[Conversation] = []
        self.lines_sent: list[str] = []
        self.frame = 0
        self.running = True
        self.fps_measured = 0.0

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, frames: int | None = None, script: Script | None = None) -> int:
        """Runs until ESC/close, or for `frames` frames. `script`: a list of (frame, "down"|"up", key)
        entries, or a function (game, frame) -> events to post this frame."""
        schedule: dict[int, list[pygame.event.Event]] = {}
        if script is not None and not callable(script):
            for at, kind, key in script:
                schedule.setdefault(at, []).append(key_event(kind, key))
        end = None if frames is None else self.frame + frames
        while self.running and (end is None or self.frame < end):
            posted = schedule.get(self.frame, [])
            if callable(script):
                posted = list(script(self, self.frame) or [])
            for event in posted:
                pygame.event.post(event)
            self.step()
        return self.frame

    def step(self) -> None:
        for event in pygame.event.get():
            self.handle(event)
        self.move()
        self.update_conversation()
        self.update_microphone()
        for event in self.link.poll():
            self.on_net(event)
        self.playback.update()
        self.draw()
        pygame.display.flip()
        self.clock.tick(self.fps)
        self.fps_measured = self.clock.get_fps()
        self.frame += 1

    def handle(self, event: pygame.event.Event) -> None:
        if event.type == pygame.QUIT:
            self.running = False
        elif event.type == pygame.KEYDOWN:
            self.held.add(event.key)
            if event.key == pygame.K_ESCAPE:
                self.running = False
            elif event.key == pygame.K_m:
                self.open_mic = not self.open_mic
            elif event.key in LINE_KEYS:
                self.say_line(LINE_KEYS[event.key])
        elif event.type == pygame.KEYUP:
            self.held.discard(event.key)

    def move(self) -> None:
        dx = sum(WALK_KEYS[k][0] for k in self.held if k in WALK_KEYS)
        dy = sum(WALK_KEYS[k][1] for k in self.held if k in WALK_KEYS)
        dx, dy = max(-1, min(1, dx)), max(-1, min(1, dy))
        if not dx and not dy:
            return
        self.facing = (dx, dy)
        step = SPEED / math.sqrt(2) if dx and dy else SPEED
        for axis, d in ((0, dx), (1, dy)):  # one axis at a time: slide along walls
            if not d:
                continue
            pos = list(self.player)
            pos[axis] += d * step
            if not self._blocked(pos):
                self.player = pos

    def _blocked(self, pos: list[float]) -> bool:
        body = pygame.Rect(0, 0, 18, 14)
        body.center = (int(pos[0]), int(pos[1]) + 6)
        if not pygame.Rect(TILE, TILE, WIDTH - 2 * TILE, HEIGHT - 2 * TILE).contains(body):
            return True
        if body.collidelist(self.obstacles) >= 0:
            return True
        return any(math.dist(pos, npc.pos) < 22 for npc in self.npcs)

    def nearest_npc(self) -> tuple[NPC, float]:
        return min(((n, math.dist(self.player, n.pos)) for n in self.npcs), key=lambda t: t[1])

    def update_conversation(self) -> None:
        npc, dist = self.nearest_npc()
        conv = self.conversation
        if conv is not None and math.dist(self.player, conv.npc.pos) > LEAVE_RADIUS:
            self.end_conversation()
            conv = None
        if conv is None and dist < TALK_RADIUS:
            number = self.link.open(npc.id)
            self.conversation = Conversation(npc, number, self.frame)
            self.history.append(self.conversation)
            self.playback.reset()

    def end_conversation(self) -> None:
        conv = self.conversation
        if conv is None:
            return
        self.link.close()
        conv.closed_frame = self.frame
        if conv.status in ("connecting", "live"):
            conv.status = "closing"
        conv.npc.speaking = False
        self.conversation = None
        self.playback.reset()

    def update_microphone(self) -> None:
        if self.mic is None:
            return
        samples = self.mic.read()
        talking = self.open_mic or pygame.K_SPACE in self.held
        self.mic_level = float(np.sqrt(np.mean(samples ** 2))) if samples.size and talking else 0.0
        conv = self.conversation
        if talking and conv is not None and conv.status == "live":
            self.link.send_audio(samples)  # otherwise the link sends silence

    def say_line(self, index: int) -> None:
        conv = self.conversation
        if conv is None or conv.status != "live" or index >= len(self.lines):
            return
        text, samples = self.lines[index]
        self.link.send_audio(samples)
        conv.player_line = text
        self.lines_sent.append(text)

    def on_net(self, event: NetEvent) -> None:
        conv = next((c for c in reversed(self.history) if c.number == event.session), None)
        if conv is None:
            return
        current = conv is self.conversation
        if event.kind == "started":
            conv.status, conv.started_frame = ("live" if current else conv.status), self.frame
        elif event.kind == "ended":
            conv.ended = event.data
            conv.status = "ended"
            conv.npc.speaking = False
            if current:  # the server ended it (idle timeout, shutdown): walk away and back to retry
                conv.closed_frame = self.frame
        elif event.kind == "error":
            conv.error = event.text
            if conv.status == "connecting":
                conv.status = "failed"
        elif not current:
            return  # audio or words of a conversation the player already left
        elif event.kind == "audio":
            conv.audio_frames += 1
            self.playback.push(event.frame, event.pcm, now=event.at)
        elif event.kind == "visemes":
            conv.viseme_events += 1
            conv.mouth_track[event.frame] = event.data["jaw"]
            for old in [f for f in conv.mouth_track if f < event.frame - 50]:  # 4 s of history at most
                del conv.mouth_track[old]
        elif event.kind == "text":
            conv.text_events += 1
            conv.subtitles = (conv.subtitles + event.text)[-400:]
        elif event.kind == "state":
            conv.state = event.text
            conv.states.append(event.text)
            conv.npc.speaking = event.text == "speaking"

    def close(self) -> None:
        self.end_conversation()
        if self.mic is not None:
            self.mic.close()
        self.link.stop()
        if self.local_server is not None:
            self.local_server.stop()
        pygame.quit()

    # --- drawing ----------------------------------------------------------------------------------

    def _draw_background(self) -> pygame.Surface:
        rng = random.Random(7)
        bg = pygame.Surface((WIDTH, HEIGHT))
        for r in range(ROWS):
            for c in range(COLS):
                bg.fill(GRASS if (r + c) % 2 else GRASS2, (c * TILE, r * TILE, TILE, TILE))
                for _ in range(3):
                    x, y = c * TILE + rng.randrange(TILE), r * TILE + rng.randrange(TILE)
                    pygame.draw.line(bg, (70, 120, 56), (x, y), (x + 1, y - 3))
        # roads: east-west through the village, north-south to the well
        for rect in [(0, 8 * TILE + 8, WIDTH, 48), (11 * TILE + 8, 0, 48, HEIGHT), (4 * TILE, 6 * TILE, 32, 2 * TILE + 8),
                     (17 * TILE, 6 * TILE, 32, 2 * TILE + 8), (6 * TILE, 12 * TILE, 6 * TILE, 40)]:
            pygame.draw.rect(bg, PATH, rect, border_radius=6)
        for _ in range(260):
            x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
            if bg.get_at((x, y))[:3] == PATH:
                pygame.draw.circle(bg, PATH2, (x, y), 2)
        # a pond
        pond = pygame.Rect(17 * TILE, 12 * TILE, 5 * TILE, 3 * TILE)
        pygame.draw.ellipse(bg, (60, 100, 160), pond.inflate(8, 8))
        pygame.draw.ellipse(bg, WATER, pond)
        pygame.draw.ellipse(bg, (120, 170, 220), (pond.x + 30, pond.y + 20, 40, 8))
        self.obstacles.append(pond.inflate(-16, -16))
        self._house(bg, pygame.Rect(2 * TILE, 2 * TILE, 6 * TILE, 4 * TILE), ROOF_RED, "The Gilded Stag", door_col=4)
        self._house(bg, pygame.Rect(15 * TILE, 2 * TILE, 6 * TILE, 4 * TILE), ROOF_BROWN, "Smithy", door_col=17)
        self._house(bg, pygame.Rect(20 * TILE, 10 * TILE - 12, 4 * TILE, 2 * TILE), ROOF_BLUE, "Guard post", door_col=21)
        self._house(bg, pygame.Rect(2 * TILE, 12 * TILE, 4 * TILE, 3 * TILE), ROOF_BROWN, "", door_col=3)
        # the smith's anvil, the well, the notice board
        anvil = pygame.Rect(19 * TILE, 7 * TILE - 4, 26, 14)
        pygame.draw.rect(bg, (60, 60, 66), anvil, border_radius=3)
        pygame.draw.rect(bg, (40, 40, 44), (anvil.x + 8, anvil.bottom, 10, 8))
        self.obstacles.append(anvil)
        well = (10 * TILE, 14 * TILE)
        pygame.draw.circle(bg, (120, 120, 126), well, 18)
        pygame.draw.circle(bg, (40, 60, 90), well, 11)
        pygame.draw.line(bg, TIMBER, (well[0] - 18, well[1] - 26), (well[0] + 18, well[1] - 26), 4)
        self.obstacles.append(pygame.Rect(well[0] - 18, well[1] - 18, 36, 36))
        board = pygame.Rect(7 * TILE - 4, 12 * TILE + 50, 36, 22)
        pygame.draw.rect(bg, TIMBER, (board.centerx - 2, board.bottom, 4, 12))
        pygame.draw.rect(bg, (150, 110, 70), board)
        for i in range(3):
            pygame.draw.rect(bg, PAPER, (board.x + 4 + i * 11, board.y + 4, 8, 12))
        self.obstacles.append(board)
        # trees around the edge and a few inside
        spots = [(c, 0) for c in range(COLS)] + [(c, ROWS - 1) for c in range(COLS)] + \
                [(0, r) for r in range(ROWS)] + [(COLS - 1, r) for r in range(ROWS)] + \
                [(9, 3), (13, 4), (22, 6), (14, 15), (23, 16), (8, 16)]
        for c, r in spots:
            if r in (8, 9) and c in (0, COLS - 1):
                continue  # the road leaves the village here
            if c in (11, 12, 13) and r in (0, ROWS - 1):
                continue
            x, y = c * TILE + 16 + rng.randrange(-3, 4), r * TILE + 16 + rng.randrange(-3, 4)
            pygame.draw.rect(bg, (100, 70, 40), (x - 3, y + 4, 6, 12))
            pygame.draw.circle(bg, (40, 96, 48), (x, y), 15)
            pygame.draw.circle(bg, (58, 124, 62), (x - 4, y - 4), 9)
            self.obstacles.append(pygame.Rect(x - 8, y - 2, 16, 18))
        return bg

    def _house(self, bg: pygame.Surface, rect: pygame.Rect, roof: tuple[int, int, int], sign: str, door_col: int) -> None:
        wall = pygame.Rect(rect.x, rect.y + rect.h // 2, rect.w, rect.h - rect.h // 2)
        pygame.draw.rect(bg, WALL, wall)
        pygame.draw.rect(bg, TIMBER, wall, 3)
        for x in range(wall.x + TILE, wall.right - 8, TILE):
            pygame.draw.line(bg, TIMBER, (x, wall.y), (x, wall.bottom), 2)
        pygame.draw.polygon(bg, roof, [(rect.x - 8, wall.y + 4), (rect.x + 10, rect.y), (rect.right - 10, rect.y),
                                        (rect.right + 8, wall.y + 4)])
        for y in range(rect.y + 10, wall.y, 8):
            pygame.draw.line(bg, tuple(max(0, v - 30) for v in roof), (rect.x, y), (rect.right, y), 1)
        door = pygame.Rect(door_col * TILE + 6, wall.bottom - 26, 20, 26)
        pygame.draw.rect(bg, TIMBER, door, border_radius=4)
        for x in range(wall.x + 10, wall.right - 20, TILE * 2):
            if not door.inflate(16, 0).colliderect((x, wall.y + 10, 16, 14)):
                pygame.draw.rect(bg, (250, 220, 120), (x, wall.y + 10, 16, 14))
                pygame.draw.rect(bg, TIMBER, (x, wall.y + 10, 16, 14), 2)
        if sign:
            text = self.small.render(sign, True, PAPER)
            plate = text.get_rect(center=(rect.centerx, rect.y + rect.h // 4 + 4)).inflate(10, 6)
            pygame.draw.rect(bg, (70, 50, 36), plate, border_radius=3)
            bg.blit(text, text.get_rect(center=plate.center))
        self.obstacles.append(pygame.Rect(rect.x - 4, rect.y, rect.w + 8, rect.h - 6))

    def _person(self, pos: tuple[float, float], color: tuple[int, int, int], facing: tuple[int, int] = (0, 1)) -> None:
        x, y = int(pos[0]), int(pos[1])
        pygame.draw.ellipse(self.screen, (50, 80, 40), (x - 12, y + 10, 24, 8))
        pygame.draw.rect(self.screen, color, (x - 9, y - 4, 18, 18), border_radius=6)
        pygame.draw.circle(self.screen, (240, 200, 160), (x, y - 10), 9)
        ex, ey = facing[0] * 3, max(0, facing[1]) * 2
        if facing[1] >= 0:
            pygame.draw.circle(self.screen, INK, (x - 3 + ex, y - 10 + ey), 1)
            pygame.draw.circle(self.screen, INK, (x + 3 + ex, y - 10 + ey), 1)

    def _label(self, text: str, center: tuple[int, int], font: pygame.font.Font | None = None,
               fg: tuple[int, int, int] = PAPER, bg: tuple[int, int, int, int] = (20, 20, 24, 170)) -> pygame.Rect:
        surf = (font or self.small).render(text, True, fg)
        box = surf.get_rect(center=center).inflate(10, 4)
        plate = pygame.Surface(box.size, pygame.SRCALPHA)
        plate.fill(bg)
        self.screen.blit(plate, box)
        self.screen.blit(surf, surf.get_rect(center=box.center))
        return box

    def update_mouth(self, now: float | None = None) -> None:
        """The NPC's jaw now: the step of the frame being played (the playout clock's frame n plays
        at t0 + n * 80 ms), from the server's visemes."""
        conv = self.conversation
        for npc in self.npcs:
            npc.mouth = 0.0
        clock = self.playback.clock
        if conv is None or conv.status != "live" or clock.t0 is None or not conv.mouth_track:
            return
        at = ((time.monotonic() if now is None else now) - clock.t0) / FRAME_S
        jaw = conv.mouth_track.get(int(at))
        if jaw:
            conv.npc.mouth = float(jaw[min(len(jaw) - 1, int((at % 1.0) * len(jaw)))])
            conv.mouth_max = max(conv.mouth_max, conv.npc.mouth)

    def draw(self) -> None:
        self.screen.blit(self.background, (0, 0))
        conv = self.conversation
        self.update_mouth()
        for npc in self.npcs:
            self._person(npc.pos, npc.color)
            x, y = int(npc.pos[0]), int(npc.pos[1])  # the mouth: a line, opening with the jaw
            pygame.draw.ellipse(self.screen, INK, (x - 3, y - 6, 6, 1 + round(npc.mouth * 5)))
            talking_to = conv is not None and conv.npc is npc
            if talking_to:
                pygame.draw.circle(self.screen, SPEAK if npc.speaking else LISTEN, npc.pos, 24, 2)
            self._label(npc.name, (npc.pos[0], npc.pos[1] - 30), fg=(255, 230, 150) if talking_to else PAPER)
            if npc.speaking:  # a little speech bubble
                bx, by = npc.pos[0] + 16, npc.pos[1] - 52
                pygame.draw.ellipse(self.screen, PAPER, (bx, by, 26, 16))
                pygame.draw.polygon(self.screen, PAPER, [(bx + 4, by + 12), (bx + 10, by + 14), (bx - 2, by + 22)])
                for i in range(3):
                    pygame.draw.circle(self.screen, INK, (bx + 7 + i * 6, by + 8), 2)
        self._person(self.player, (220, 180, 60), self.facing)
        if conv is None:
            self._label("you", (int(self.player[0]), int(self.player[1]) - 30))
        self._draw_hud()

    def _draw_hud(self) -> None:
        if self.mic is not None:
            mode = "open mic (M: push-to-talk)" if self.open_mic else "hold SPACE to talk (M: open mic)"
            talking = self.open_mic or pygame.K_SPACE in self.held
        else:
            mode, talking = "no microphone: keys 1-3 say a line", False
        self._label(f"Walk up to someone to talk  |  {mode}", (WIDTH // 2, 14), font=self.small)
        stats = (f"voice: {self.playback.received} frames, buffer {self.playback.pending_s * 1000:.0f} ms, "
                 f"dropped {self.playback.dropped}  |  {self.fps_measured:.0f} fps")
        self._label(stats, (WIDTH // 2, HEIGHT - 12), font=self.small)
        if talking:
            x, y = int(self.player[0]) + 16, int(self.player[1]) - 20
            pygame.draw.rect(self.screen, INK, (x, y, 6, 22))
            h = int(min(1.0, self.mic_level * 8) * 20)
            pygame.draw.rect(self.screen, LISTEN, (x + 1, y + 21 - h, 4, h))
        conv = self.conversation
        if conv is None:
            return
        top = self.player[1] > HEIGHT * 0.55  # keep the panel out of the player's way
        panel = pygame.Rect(40, 34 if top else HEIGHT - 132, WIDTH - 80, 104)
        surf = pygame.Surface(panel.size, pygame.SRCALPHA)
        surf.fill((18, 16, 22, 215))
        self.screen.blit(surf, panel)
        pygame.draw.rect(self.screen, (200, 180, 120), panel, 2, border_radius=4)
        status = {"connecting": ("connecting...", WAIT), "closing": ("ending...", WAIT),
                  "failed": ("could not connect", (220, 80, 70)), "ended": ("conversation over", WAIT)}
        word, color = status.get(conv.status, ("speaking" if conv.state == "speaking" else "listening",
                                               SPEAK if conv.state == "speaking" else LISTEN))
        pygame.draw.circle(self.screen, color, (panel.x + 18, panel.y + 18), 8)
        title = f"{conv.npc.name}, {conv.npc.role}" if conv.npc.role else conv.npc.name
        self.screen.blit(self.big.render(title, True, (255, 230, 150)), (panel.x + 34, panel.y + 7))
        tag = self.font.render(word, True, color)
        self.screen.blit(tag, (panel.right - tag.get_width() - 12, panel.y + 10))
        y = panel.y + 38
        for line in self._wrap(conv.subtitles.strip() or (conv.error or "..."), panel.w - 24)[-2:]:
            self.screen.blit(self.font.render(line, True, PAPER), (panel.x + 12, y))
            y += 20
        hint = f'You: "{conv.player_line}"' if conv.player_line else \
            "  ".join(f"{i + 1}: {t[:28]}..." for i, (t, _) in enumerate(self.lines))
        self.screen.blit(self.small.render(hint, True, (180, 200, 230)), (panel.x + 12, panel.bottom - 20))

    def _wrap(self, text: str, width: int) -> list[str]:
        lines, line = [], ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if line and self.font.size(trial)[0] > width:
                lines.append(line)
                line = word
            else:
                line = trial
        if line:
            lines.append(line)
        return lines

    def screenshot(self, path: str | Path) -> None:
        pygame.image.save(self.screen, str(path))


# --- scripted play (tests, screenshots, --autopilot) ------------------------------------------------


def walk_to(game: Game, target: tuple[float, float], stop: float = 40, y_first: bool = False) -> list[pygame.event.Event]:
    """Key events that steer the player toward `target` (x first, then y; or y first): press the keys
    that point there, release the others. Returns nothing once within `stop` pixels."""
    x, y = game.player
    want: set[int] = set()
    if math.dist((x, y), target) > stop:
        steps = [(abs(target[0] - x) > 6, pygame.K_RIGHT if target[0] > x else pygame.K_LEFT),
                 (abs(target[1] - y) > 6, pygame.K_DOWN if target[1] > y else pygame.K_UP)]
        for needed, key in (steps[::-1] if y_first else steps):
            if needed:
                want.add(key)
                break
    arrows = {pygame.K_LEFT, pygame.K_RIGHT, pygame.K_UP, pygame.K_DOWN}
    events = [key_event("up", k) for k in (game.held & arrows) - want]
    events += [key_event("down", k) for k in want - game.held]
    return events


def autopilot(npc_id: str, line: int = 0, talk_frames: int = 150, leave: bool = True) -> Callable[[Game, int], list]:
    """A script: walk to `npc_id`, say prepared line `line` once the conversation is live, listen for
    `talk_frames` frames, then walk back to the start (ending the conversation)."""
    phase: dict[str, Any] = {"name": "walk", "since": 0, "try": 0, "best": math.inf, "stuck": 0}
    sides = ((0, 30), (0, -30), (-30, 0), (30, 0))  # where to stand: below the NPC, else above, left, right

    def script(game: Game, frame: int) -> list[pygame.event.Event]:
        npc = next(n for n in game.npcs if n.id == npc_id)
        conv = game.conversation
        if phase["name"] == "walk":
            dx, dy = sides[phase["try"] % len(sides)]
            target = (npc.pos[0] + dx, npc.pos[1] + dy)
            gap = math.dist(game.player, target)
            phase["stuck"] = 0 if gap < phase["best"] - 1 else phase["stuck"] + 1
            phase["best"] = min(phase["best"], gap)
            if phase["stuck"] > 20:  # a wall in the way: the next side, the other axis first
                phase.update(best=math.inf, stuck=0, **{"try": phase["try"] + 1})
            events = walk_to(game, target, stop=8, y_first=phase["try"] % 2 == 1)
            if conv is not None and conv.npc is npc and conv.status == "live":
                phase.update(name="talk", since=frame)
                events += [key_event("up", k) for k in game.held] + [key_event("down", pygame.K_1 + line)]
            return events
        if phase["name"] == "talk":
            if frame == phase["since"] + 1:
                return [key_event("up", pygame.K_1 + line)]
            if frame - phase["since"] >= talk_frames and leave:
                phase.update(name="leave", since=frame)
            return []
        return walk_to(game, START, stop=8)

    return script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="ws://HOST:PORT of a running `npc-voice serve` (default: start one in-process)")
    p.add_argument("--token", default=os.environ.get("NPC_VOICE_TOKEN"), help="the server's token ($NPC_VOICE_TOKEN)")
    p.add_argument("--weights", help="in-process server only: weights directory (default: the tiny random model)")
    p.add_argument("--characters", help="in-process server only: characters folder (default: the shipped cast)")
    p.add_argument("--no-mic", action="store_true", help="do not open the microphone (keys 1-3 still work)")
    p.add_argument("--seed", type=int, help="sampling seed for the NPCs")
    p.add_argument("--fps", type=int, default=FPS)
    p.add_argument("--frames", type=int, help="quit after this many frames")
    p.add_argument("--autopilot", metavar="NPC", help="walk to this NPC by itself and say line 1 (a demo)")
    p.add_argument("--screenshot", help="save the last frame to this PNG")
    args = p.parse_args(argv)
    game = Game(args.server, args.token, mic=not args.no_mic, fps=args.fps, seed=args.seed,
                characters=args.characters, weights=args.weights)
    if game.mic is None:
        print(f"village: no microphone ({game.mic_error}): keys 1-3 say prepared lines", file=sys.stderr)
    try:
        game.run(args.frames, autopilot(args.autopilot, leave=False) if args.autopilot else None)
        if args.screenshot:
            game.screenshot(args.screenshot)
    finally:
        pb = game.playback
        print(f"village: {len(game.history)} conversations, {pb.received} NPC frames received, {pb.queued} played, "
              f"{pb.dropped} dropped, {pb.underruns} underruns", file=sys.stderr)
        for conv in game.history:  # what the screen said about a conversation that failed
            if conv.error:
                print(f"village: {conv.npc.name}: {conv.error}", file=sys.stderr)
        game.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

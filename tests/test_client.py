"""The client's playout clock, without sockets: frame n plays at t0 + n * 80 ms on the client's
clock, re-anchored when the server's schedule shifts (docs/protocol.md, "Playout")."""

from __future__ import annotations

import pytest

from npc_voice.client import PlayoutClock

F = 0.08
BUFFER = 0.15


def feed(clock: PlayoutClock, arrivals: list[tuple[int, float]]) -> list[tuple[int, float, int]]:
    """(frame, arrival) in order -> (frame, how long before its play time it arrived, frames skipped)."""
    out = []
    for frame, now in arrivals:
        skip = clock.place(frame, now)
        out.append((frame, clock.due(frame) - now, skip))
    return out


def test_steady_frames_with_jitter_never_resync() -> None:
    clock = PlayoutClock(buffer_s=BUFFER)
    jitter = [0.0, 0.03, -0.02, 0.05, 0.01, -0.03, 0.07, 0.0]  # the first frame came on time
    placed = feed(clock, [(n, 10.0 + n * F + jitter[n % 8]) for n in range(200)])
    assert clock.late_resyncs == clock.early_resyncs == 0 and not any(skip for _, _, skip in placed)
    assert clock.due(199) == pytest.approx(10.0 + BUFFER + 199 * F)
    assert min(margin for _, margin, _ in placed) == pytest.approx(BUFFER - 0.07)


def test_a_server_that_restarted_its_schedule_costs_one_gap_not_lasting_latency() -> None:
    """The server fell behind by 0.8 s (past its catch-up window) and every later frame comes 0.8 s
    late: one late re-anchor at the first late frame, then every frame is on time again."""
    clock = PlayoutClock(buffer_s=BUFFER)
    arrivals = [(n, n * F) for n in range(25)] + [(n, n * F + 0.8) for n in range(25, 150)]
    placed = feed(clock, arrivals)
    assert clock.late_resyncs == 1 and clock.early_resyncs == 0
    assert clock.due(25) == pytest.approx(25 * F + 0.8 + BUFFER)  # a 0.8 s gap before frame 25
    for frame, margin, skip in placed[25:]:
        assert skip == 0 and margin == pytest.approx(BUFFER), frame  # the jitter buffer, no more
    # without re-anchoring every one of those frames would have missed its play time by 0.65 s
    assert all(n * F + BUFFER < t for n, t in arrivals[25:])


def test_after_a_catch_up_burst_the_clock_skips_back_to_its_buffer() -> None:
    """A 0.4 s stall, then the server catches up in a burst and goes on at its old schedule: the late
    re-anchor at the stall leaves the buffer 0.4 s too deep; after `settle_s` of frames arriving that
    early the clock skips 5 frames and the latency is the jitter buffer again."""
    clock = PlayoutClock(buffer_s=BUFFER)
    stall = 25 * F + 0.4
    arrivals = ([(n, n * F) for n in range(25)] + [(n, stall) for n in range(25, 30)]
                + [(n, n * F) for n in range(30, 120)])
    placed = feed(clock, arrivals)
    assert clock.late_resyncs == 1 and clock.early_resyncs == 1 and clock.skipped_frames == 5
    skips = [(frame, skip) for frame, _, skip in placed if skip]
    assert len(skips) == 1 and 30 < skips[0][0] <= 30 + 1.0 / F + 2  # within settle_s of the burst
    after = [margin for frame, margin, _ in placed if frame > skips[0][0]]
    assert after and all(m == pytest.approx(BUFFER) for m in after)
    before = [margin for frame, margin, _ in placed if 30 <= frame < skips[0][0]]
    assert all(m == pytest.approx(BUFFER + 0.4) for m in before)  # what the latency would have stayed


def test_a_momentary_burst_is_not_a_reason_to_skip() -> None:
    clock = PlayoutClock(buffer_s=BUFFER)
    placed = feed(clock, [(n, 5.0) for n in range(30)])  # 2.4 s of frames at once (no time passes)
    assert not any(skip for _, _, skip in placed) and clock.early_resyncs == 0 and clock.late_resyncs == 0


def test_reset_anchors_again() -> None:
    clock = PlayoutClock(buffer_s=BUFFER)
    clock.place(0, 1.0)
    clock.reset()
    assert clock.place(40, 100.0) == 0 and clock.due(40) == pytest.approx(100.0 + BUFFER)
    assert clock.late_resyncs == 0

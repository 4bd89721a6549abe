"""The browser demo (npc_voice/serve/static/, served by demo.py) in headless Debian chromium driven by
Playwright, against a real `npc-voice serve` (tiny model): a fake microphone fed from a WAV file,
the NPC's frames played, subtitles and the mouth, and what the page says when the server goes.

NPC_VOICE_DEMO_SCREENSHOT=docs/demo.png saves the screenshot the README shows."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import serve_child

pytestmark = pytest.mark.realtime


def _browser_or_skip():
    chromium = shutil.which("chromium")
    try:
        import playwright.sync_api as pw
    except ImportError:
        pw = None
    if pw is None or chromium is None:
        missing = "playwright (the `test` extra)" if pw is None else "chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"the browser test needs {missing}; .ci/run installs both")
        pytest.skip(f"the browser test needs {missing}")
    return pw, chromium


def speechy_wav(path: Path, seconds: float = 4.0, rate: int = 48000) -> Path:
    """A voice-like test signal: a 140 Hz buzz with harmonics, in syllables of 200 ms."""
    t = np.arange(int(seconds * rate)) / rate
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None)
    sf.write(path, (0.25 * buzz * envelope).astype(np.float32), rate, subtype="PCM_16")
    return path


def fake_mic_args(wav: Path) -> list[str]:
    """chromium's flags for a microphone that plays `wav` (no permission prompt) and sound that plays
    without a click."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]


def wait_for(page, condition: str, timeout: float = 60.0) -> dict:
    """Polls `condition` (JS over `s`, the page's window.npcDemo) until true; returns the stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = page.evaluate("() => ({...window.npcDemo})")
        if page.evaluate(f"(s) => !!({condition})", s):
            return s
        assert time.monotonic() < deadline, f"timed out waiting for {condition}: {s}"
        time.sleep(0.2)


def wait_for_character(page, name: str, timeout: float = 30.0) -> None:
    """Polls until the character list offers `name`. Through `page.evaluate` with a function, as
    `wait_for` does: `wait_for_function` with an expression string can be refused by the page's
    Content-Security-Policy (no 'unsafe-eval'), which made this wait fail under load."""
    deadline = time.monotonic() + timeout
    while not page.evaluate("(v) => document.querySelectorAll(`#character option[value=\"${v}\"]`).length", name):
        assert time.monotonic() < deadline, f"the character list never offered {name!r}"
        time.sleep(0.2)


def test_demo_page_talks_plays_and_survives_the_server(tmp_path, timing):
    pw, chromium = _browser_or_skip()
    wav = speechy_wav(tmp_path / "mic.wav")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=fake_mic_args(wav))
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            with serve_child("--slots", "1") as (port, health):
                page.goto(f"http://127.0.0.1:{port}/demo")  # redirected to /demo/
                assert page.url.endswith("/demo/")
                wait_for_character(page, "innkeeper")
                page.select_option("#character", "innkeeper")
                page.click("#connect")
                s = wait_for(page, "s.status === 'live' && s.framesPlayed >= 10")
                assert s["microphone"] and s["sampleRate"] in (16000, 24000, 48000), s
                assert health()["slots"]["used"] == 1

                # The microphone reaches the server at real time: 3 s of page time carry ~3 s of audio.
                t1, a = time.monotonic(), page.evaluate("() => ({...window.npcDemo})")
                time.sleep(3.0)
                t2, b = time.monotonic(), page.evaluate("() => ({...window.npcDemo})")
                sent_s = (b["micSamplesSent"] - a["micSamplesSent"]) / b["sampleRate"]
                played = b["framesPlayed"] - a["framesPlayed"]
                s = wait_for(page, "s.subtitlesShown > 0 && s.maxMouthOpen > 0.05 && s.visemesReceived > 0")
                doc = health()
                assert b["micPeak"] > 0.05, "the fake microphone's signal did not reach the worklet"
                assert doc["totals"]["dropped_input_frames"] == 0, doc["totals"]  # never faster than real time
                assert doc["connections"] == 1 and doc["totals"]["sessions"] == 1, doc
                assert s["subtitle"], s
                assert page.inner_text("#subtitles").strip(), "subtitles not on the page"
                assert s["framesPlayed"] <= s["framesReceived"]
                assert not [line for line in console if line.startswith("pageerror")], console
                shot = os.environ.get("NPC_VOICE_DEMO_SCREENSHOT")
                page.screenshot(path=shot or str(tmp_path / "demo.png"))
                timing.check(abs(sent_s - (t2 - t1)) < 0.15 * (t2 - t1),
                             f"microphone: {sent_s:.2f} s of audio sent in {t2 - t1:.2f} s")
                timing.check(played >= 0.8 * (t2 - t1) / 0.08,
                             f"playback: {played} frames played in {t2 - t1:.2f} s")
            # The server is gone: the page says so, offers to reconnect and stays responsive.
            s = wait_for(page, "s.status === 'failed' && s.errorKind === 'gone'", timeout=30)
            assert page.is_visible("#reconnect") and "Reconnect" in page.inner_text("#error"), s
            assert page.evaluate("1 + 1") == 2
            page.click("#reconnect")
            s = wait_for(page, "s.status === 'failed' && s.errorKind === 'gone'", timeout=30)
            assert "does not answer" in s["error"] or "gone" in s["error"], s
        finally:
            browser.close()
    timing.verdict()


def test_demo_page_says_wrong_token_busy_and_no_microphone(tmp_path, timing):
    """With a token and --demo: a missing token is named as such; a second page while the only slot
    is taken hears `server_busy`; a browser without a microphone offers to go on without one."""
    pw, chromium = _browser_or_skip()
    wav = speechy_wav(tmp_path / "mic.wav", seconds=2.0)
    token = "browser-token-0123456789abcdef"
    fake_mic = fake_mic_args(wav)
    with pw.sync_playwright() as p, serve_child("--slots", "1", "--token", token, "--demo") as (port, health):
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=fake_mic)
        bare = p.chromium.launch(executable_path=chromium, headless=True,
                                 args=["--autoplay-policy=no-user-gesture-required"])
        try:
            url = f"http://127.0.0.1:{port}/demo/"
            first = browser.new_page()
            first.goto(url)
            s = wait_for(first, "s.errorKind === 'token'", timeout=20)  # the page loads, the list needs the token
            assert "token" in s["error"].lower() and first.is_visible("#reconnect")
            first.fill("#token", "wrong-token")
            first.click("#connect")
            s = wait_for(first, "s.status === 'failed' && s.errorKind === 'token'", timeout=20)
            first.fill("#token", token)
            first.click("#reconnect")
            wait_for(first, "s.status === 'live' && s.framesReceived > 0")

            second = browser.new_page()
            second.goto(url + f"?token={token}")
            wait_for_character(second, "innkeeper")
            second.click("#connect")
            s = wait_for(second, "s.status === 'failed' && s.errorKind === 'busy'", timeout=30)
            assert "busy" in s["error"] and second.is_visible("#reconnect")
            assert first.evaluate("window.npcDemo.status") == "live"
            first.click("#hangup")
            wait_for(first, "s.status === 'idle'", timeout=10)
            deadline = time.monotonic() + 10
            while health()["slots"]["used"] and time.monotonic() < deadline:
                time.sleep(0.1)
            second.click("#reconnect")  # the slot is free again
            wait_for(second, "s.status === 'live' && s.framesReceived > 0")
            second.click("#hangup")

            nomic = bare.new_page()
            nomic.goto(url + f"?token={token}")
            wait_for_character(nomic, "innkeeper")
            deadline = time.monotonic() + 10
            while health()["slots"]["used"] and time.monotonic() < deadline:
                time.sleep(0.1)
            nomic.click("#connect")
            s = wait_for(nomic, "s.status === 'failed' && s.errorKind === 'microphone'", timeout=20)
            assert "microphone" in s["error"].lower() and nomic.is_visible("#nomic")
            nomic.click("#nomic")
            s = wait_for(nomic, "s.status === 'live' && s.framesPlayed > 0 && s.micSamplesSent > 0")
            assert not s["microphone"] and s["micPeak"] == 0  # silence, as the protocol asks
        finally:
            bare.close()
            browser.close()
    timing.verdict()


def test_demo_page_talks_to_a_server_without_visemes(tmp_path, timing):
    """On a server started with `--no-visemes` (characters.json says `"visemes": false`) the page
    starts without asking for them: the NPC plays and its words show; the mouth stays closed."""
    pw, chromium = _browser_or_skip()
    wav = speechy_wav(tmp_path / "mic.wav", seconds=2.0)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=fake_mic_args(wav))
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            with serve_child("--slots", "1", "--no-visemes") as (port, health):
                page.goto(f"http://127.0.0.1:{port}/demo/")
                wait_for_character(page, "innkeeper")
                page.select_option("#character", "innkeeper")
                page.click("#connect")
                s = wait_for(page, "s.status === 'live' && s.framesPlayed >= 10")
                assert s["visemesReceived"] == 0 and not s["errorKind"], s
        finally:
            browser.close()
    timing.verdict()  # no wall-clock check of its own (the module's tests are realtime)

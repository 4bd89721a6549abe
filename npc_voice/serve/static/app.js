// npc-voice browser demo (docs/demo.md): one conversation over the websocket protocol
// (docs/protocol.md). Plain JS, no build step, nothing loaded from elsewhere.
"use strict";

const FRAME_S = 0.08;        // one NPC audio frame
const STEP_S = 0.02;         // one step of a `visemes` track
const JITTER_S = 0.15;       // playout latency behind frame arrival (the jitter buffer)
const EARLY_FRAMES = 12;     // ~1 s of frames all arriving too early: skip back to the jitter buffer
const RATES = [16000, 24000, 48000];

// What the page did, for people (the line under the page) and for tests (window.npcDemo).
const stats = window.npcDemo = {
  status: "idle", error: null, errorKind: null, state: null, sampleRate: null, character: null,
  framesReceived: 0, framesPlayed: 0, framesSkipped: 0, reanchors: 0, gaps: 0,
  visemesReceived: 0, subtitlesShown: 0, subtitle: "", mouthOpen: 0, maxMouthOpen: 0,
  micChunksSent: 0, micSamplesSent: 0, micPeak: 0, micStartedAt: null, microphone: false,
};

const $ = (id) => document.getElementById(id);
const ui = {
  character: $("character"), token: $("token"), connect: $("connect"), hangup: $("hangup"),
  description: $("description"), face: $("face"), indicator: $("indicator"), state: $("state"),
  mic: $("mic"), subtitles: $("subtitles"), error: $("error"), errorText: $("error-text"),
  reconnect: $("reconnect"), nomic: $("nomic"), stats: $("stats"), server: $("server"),
};

let conv = null;             // the live conversation, see connect()
let lastUseMic = true;       // what Reconnect does again
let characters = [];
let serverVisemes = true;    // characters.json's "visemes": false on a server started with --no-visemes

// --- helpers ------------------------------------------------------------------------------------

function token() { return ui.token.value.trim(); }

function withToken(path) {
  return token() ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token())}` : path;
}

function wsURL() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return withToken(`${proto}//${location.host}/ws`);
}

function showError(kind, text, { noMic = false } = {}) {
  stats.error = text;
  stats.errorKind = kind;
  ui.errorText.textContent = text;
  ui.nomic.hidden = !noMic;
  ui.error.hidden = false;
}

function clearError() {
  stats.error = stats.errorKind = null;
  ui.error.hidden = true;
}

function setState(state) {
  stats.state = state;
  ui.indicator.className = "indicator " + (state || "idle");
  ui.state.textContent = state === "speaking" ? "speaking…" : state === "listening" ? "listening" :
    stats.status === "connecting" ? "connecting…" : "not connected";
}

function setStatus(status) {
  stats.status = status;
  ui.connect.disabled = status === "connecting" || status === "live";
  ui.hangup.disabled = !(status === "connecting" || status === "live");
  setState(status === "live" ? stats.state : null);
}

// --- characters ---------------------------------------------------------------------------------

async function loadCharacters() {
  let res;
  try {
    res = await fetch(withToken("characters.json"), { cache: "no-store" });
  } catch (e) {
    showError("gone", "The server does not answer (it may have stopped). Start it, then reconnect.");
    return false;
  }
  if (res.status === 401) {
    showError("token", "Wrong or missing token: this server needs one. Enter it above, then reconnect.");
    return false;
  }
  if (!res.ok) {
    showError("server", `The server refused the character list (HTTP ${res.status}).`);
    return false;
  }
  const doc = await res.json();
  characters = doc.characters || [];
  serverVisemes = doc.visemes !== false;  // without them the mouth stays closed; the voice still plays
  const keep = ui.character.value || new URLSearchParams(location.search).get("character");
  ui.character.textContent = "";
  for (const c of characters) {
    const opt = document.createElement("option");
    opt.value = c.id;
    opt.textContent = c.name && c.name !== c.id ? `${c.name} (${c.id})` : c.id;
    ui.character.appendChild(opt);
  }
  if (!characters.length) {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = "(no characters on this server)";
    ui.character.appendChild(opt);
  }
  if (keep && characters.some((c) => c.id === keep)) ui.character.value = keep;
  describe();
  return true;
}

function describe() {
  const c = characters.find((c) => c.id === ui.character.value);
  ui.description.textContent = c ? c.description : "";
}

// When a websocket fails before it opens, the browser hides the HTTP status: ask the server why.
async function whyRefused() {
  try {
    const health = await fetch("/health", { cache: "no-store" });
    const doc = await health.json();
    if (doc.status === "stopping") return ["gone", "The server is shutting down."];
    if (doc.status !== "ok") return ["server", `The server is not healthy (${doc.status}).`];
  } catch (e) {
    return ["gone", "The server is gone (it does not answer)."];
  }
  try {
    const res = await fetch(withToken("characters.json"), { cache: "no-store" });
    if (res.status === 401) return ["token", "Wrong or missing token."];
  } catch (e) { /* answered /health a moment ago */ }
  return ["busy", "The server refused the connection: it is probably busy (too many connections)."];
}

// --- the conversation ---------------------------------------------------------------------------

async function connect(useMic = true) {
  lastUseMic = useMic;
  stats.microphone = false;
  hangup(false);
  clearError();
  resetView();
  setStatus("connecting");
  if (!(await loadCharacters())) { setStatus("failed"); return; }
  const character = ui.character.value;
  if (!character) { showError("server", "This server has no character to talk to."); setStatus("failed"); return; }
  const c = conv = { ws: null, ctx: null, stream: null, node: null, started: false, closedByUs: false,
    t0: null, sources: new Map(), tracks: new Map(), timed: [], early: 0, lastFrame: -1 };

  // Audio: one AudioContext at the device's rate when the protocol takes it, else at 48 kHz
  // (the browser resamples the microphone); the NPC's audio comes back at the same rate.
  try {
    c.ctx = new AudioContext({ latencyHint: "interactive" });
    if (!RATES.includes(c.ctx.sampleRate)) {
      c.ctx.close();
      c.ctx = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
    }
    await c.ctx.resume();
    await c.ctx.audioWorklet.addModule("mic-worklet.js");
  } catch (e) {
    showError("audio", `This browser cannot play or record audio here: ${e.message}`);
    setStatus("failed");
    return;
  }
  if (conv !== c) return;
  stats.sampleRate = c.ctx.sampleRate;
  c.node = new AudioWorkletNode(c.ctx, "mic-pcm16", { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1] });
  const mute = c.ctx.createGain();
  mute.gain.value = 0;
  c.node.connect(mute).connect(c.ctx.destination);  // keeps the worklet running, plays nothing
  if (useMic) {
    try {
      c.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      c.ctx.createMediaStreamSource(c.stream).connect(c.node);
      stats.microphone = true;
      ui.mic.textContent = "microphone: on";
    } catch (e) {
      const why = !navigator.mediaDevices ? "this page is not a secure context (use localhost or HTTPS)" :
        e.name === "NotAllowedError" ? "access was denied" : e.name === "NotFoundError" ? "none was found" : e.message;
      showError("microphone", `No microphone: ${why}. You can still listen: the NPC hears silence.`, { noMic: true });
      c.ctx.close();
      setStatus("failed");
      return;
    }
  } else {
    ui.mic.textContent = "microphone: off (sending silence)";
  }
  if (conv !== c) return;

  c.node.port.onmessage = (ev) => {
    if (!c.started || c.ws.readyState !== WebSocket.OPEN) return;
    c.ws.send(ev.data.pcm);
    if (stats.micStartedAt === null) stats.micStartedAt = performance.now();
    stats.micChunksSent++;
    stats.micSamplesSent += ev.data.pcm.byteLength / 2;
    stats.micPeak = Math.max(stats.micPeak * 0.98, ev.data.peak);
  };

  const ws = c.ws = new WebSocket(wsURL());
  ws.binaryType = "arraybuffer";
  let opened = false;
  ws.onopen = () => {
    opened = true;
    ws.send(JSON.stringify({ type: "start", character, sample_rate: c.ctx.sampleRate, visemes: serverVisemes, ref: "demo" }));
  };
  ws.onmessage = (ev) => {
    if (conv !== c) return;
    if (typeof ev.data === "string") onMessage(c, JSON.parse(ev.data));
    else onFrame(c, ev.data);
  };
  ws.onclose = async (ev) => {
    if (conv !== c || c.closedByUs) return;
    stopAudio(c);
    setStatus("failed");
    if (!opened) {
      const [kind, text] = await whyRefused();
      if (conv === c) showError(kind, `${text} Reconnect when it is back.`);
    } else if (!stats.error || stats.errorKind === "fatal") {
      showError("gone", `The server is gone (connection closed${ev.code ? `, code ${ev.code}` : ""}). ` +
        "Reconnect when it is back.");
    }
  };
}

function onMessage(c, msg) {
  switch (msg.type) {
    case "hello":
      break;
    case "started":
      c.started = true;
      stats.character = msg.character;
      setStatus("live");
      setState("listening");
      break;
    case "text":
    case "state":
      c.timed.push(msg);   // shown when playback reaches msg.frame
      break;
    case "visemes":
      stats.visemesReceived++;
      c.tracks.set(msg.frame, msg);
      break;
    case "error": {
      const busy = msg.code === "server_busy";
      const text = busy ? "Every conversation slot is taken: the server is busy. Reconnect to try again." :
        msg.code === "unknown_character" ? `This server has no such character: ${msg.message}` :
        msg.code === "shutting_down" ? "The server is shutting down." :
        `The server says: ${msg.message} (${msg.code}).`;
      showError(busy ? "busy" : msg.fatal ? "fatal" : "server", text);
      if (!c.started) { hangup(false); setStatus("failed"); }
      break;
    }
    case "ended":
      if (msg.reason === "shutting_down") showError("gone", "The server is shutting down: the conversation ended. Reconnect when it is back.");
      else if (msg.reason !== "client") showError("gone", `The conversation ended (${msg.reason}). Reconnect to start again.`);
      break;
    default:
      break;          // the protocol grows: ignore what we do not know
  }
}

// Playout: frame n plays at t0 + n * 80 ms (AudioContext time). t0 is set by the first frame, one
// jitter buffer from its arrival; a frame arriving after its time moves t0 later (re-anchor, one
// gap of silence); frames that keep arriving more than a frame earlier than needed for ~1 s move
// t0 earlier by whole frames, dropping that many of the oldest frames not played yet.
function onFrame(c, buf) {
  const view = new DataView(buf);
  const n = view.getUint32(0, true);
  const pcm = new Int16Array(buf, 4);
  stats.framesReceived++;
  if (c.lastFrame >= 0 && n > c.lastFrame + 1) stats.gaps++;
  c.lastFrame = n;
  const ctx = c.ctx;
  const now = ctx.currentTime;
  if (c.t0 === null) c.t0 = now + JITTER_S - n * FRAME_S;
  let due = c.t0 + n * FRAME_S;
  if (due < now + 0.01) {
    c.t0 = now + JITTER_S - n * FRAME_S;
    due = c.t0 + n * FRAME_S;
    stats.reanchors++;
    c.early = 0;
  } else if (due - now > JITTER_S + FRAME_S) {
    if (++c.early >= EARLY_FRAMES) {
      const skip = Math.floor((due - now - JITTER_S) / FRAME_S);
      c.t0 -= skip * FRAME_S;
      reschedule(c, skip);
      due = c.t0 + n * FRAME_S;
      c.early = 0;
    }
  } else {
    c.early = 0;
  }
  const audio = ctx.createBuffer(1, pcm.length, ctx.sampleRate);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  schedule(c, n, audio);
}

function schedule(c, n, audio) {
  const src = c.ctx.createBufferSource();
  src.buffer = audio;
  src.connect(c.ctx.destination);
  const entry = { src, audio, skipped: false };
  src.onended = () => {
    if (c.sources.get(n) === entry) c.sources.delete(n);
    if (!entry.skipped) stats.framesPlayed++;
  };
  c.sources.set(n, entry);
  src.start(Math.max(c.t0 + n * FRAME_S, c.ctx.currentTime));
}

function reschedule(c, skip) {
  const pending = [...c.sources.entries()].sort((a, b) => a[0] - b[0]);
  for (const [n, entry] of pending) {
    entry.skipped = true;
    try { entry.src.stop(); } catch (e) { /* not started */ }
    c.sources.delete(n);
  }
  stats.framesSkipped += Math.min(skip, pending.length);
  for (const [n, entry] of pending.slice(skip)) schedule(c, n, entry.audio);
}

function stopAudio(c) {
  c.started = false;
  for (const entry of c.sources.values()) {
    entry.skipped = true;
    try { entry.src.stop(); } catch (e) { /* already stopped */ }
  }
  c.sources.clear();
  if (c.stream) c.stream.getTracks().forEach((t) => t.stop());
  if (c.ctx && c.ctx.state !== "closed") c.ctx.close().catch(() => {});
  ui.mic.textContent = "microphone: off";
}

function hangup(byUser = true) {
  const c = conv;
  if (!c) return;
  c.closedByUs = true;
  conv = null;
  if (c.ws && c.ws.readyState === WebSocket.OPEN) {
    try { c.ws.send(JSON.stringify({ type: "end" })); } catch (e) { /* closing anyway */ }
  }
  if (c.ws) c.ws.close(1000);
  stopAudio(c);
  if (byUser) setStatus("idle");
}

// --- what playback has reached: subtitles, speaking indicator, the face --------------------------

let lines = [];
let jaw = 0;
let shape = "sil";

function resetView() {
  lines = [];
  ui.subtitles.textContent = "";
  stats.subtitle = "";
  jaw = 0;
  shape = "sil";
}

function addText(piece) {
  if (!lines.length || lines[lines.length - 1].done) lines.push({ text: "", done: false });
  const line = lines[lines.length - 1];
  line.text += piece;
  if (line.text.length > 160) {   // a long turn: keep its end on screen, from a word
    const cut = line.text.indexOf(" ", line.text.length - 140);
    line.text = "…" + line.text.slice(cut < 0 ? line.text.length - 140 : cut);
  }
  lines = lines.slice(-3);
  stats.subtitlesShown++;
  stats.subtitle = lines[lines.length - 1].text.trim();
  renderSubtitles();
}

function renderSubtitles() {
  ui.subtitles.textContent = "";
  lines.forEach((l, i) => {
    const p = document.createElement("p");
    p.textContent = l.text.trim();
    if (i < lines.length - 1) p.className = "old";
    ui.subtitles.appendChild(p);
  });
}

function tick() {
  const c = conv;
  let target = 0;
  if (c && c.t0 !== null && c.ctx.state === "running") {
    const pos = c.ctx.currentTime - c.t0;   // seconds since frame 0 on the playout clock
    const n = Math.floor(pos / FRAME_S);
    while (c.timed.length && c.timed[0].frame <= n) {
      const msg = c.timed.shift();
      if (msg.type === "text") addText(msg.text);
      else {
        setState(msg.state);
        if (msg.state === "listening" && lines.length) lines[lines.length - 1].done = true;
      }
    }
    const track = c.tracks.get(n);
    if (track) {
      const k = Math.min(track.jaw.length - 1, Math.max(0, Math.floor((pos - n * FRAME_S) / STEP_S)));
      target = track.jaw[k];
      shape = track.visemes[k];
    } else {
      shape = "sil";
    }
    for (const f of c.tracks.keys()) if (f < n - 2) c.tracks.delete(f);
  }
  jaw += (target - jaw) * 0.6;      // a little smoothing: a step or two
  if (jaw < 0.005) jaw = 0;
  stats.mouthOpen = jaw;
  stats.maxMouthOpen = Math.max(stats.maxMouthOpen, jaw);
  drawFace();
  ui.stats.textContent = `${stats.sampleRate ? stats.sampleRate + " Hz · " : ""}frames received ${stats.framesReceived}, ` +
    `played ${stats.framesPlayed}, skipped ${stats.framesSkipped}, re-anchored ${stats.reanchors}×` +
    ` · microphone sent ${(stats.micSamplesSent / (stats.sampleRate || 1)).toFixed(1)} s`;
}

// The mouth's width by viseme class (rounded vowels narrow, spread ones wide), its height from `jaw`.
const WIDTH = { sil: 1, PP: 0.9, FF: 0.95, TH: 1, DD: 1, kk: 1, CH: 0.75, SS: 1.1, nn: 1, RR: 0.8,
  aa: 1, E: 1.15, ih: 1.15, oh: 0.75, ou: 0.6 };

function drawFace() {
  const g = ui.face.getContext("2d");
  const w = ui.face.width, h = ui.face.height;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#e0b48c";
  g.beginPath(); g.ellipse(w / 2, h / 2, 120, 140, 0, 0, 2 * Math.PI); g.fill();
  g.fillStyle = "#2b2e35";
  for (const x of [w / 2 - 45, w / 2 + 45]) { g.beginPath(); g.arc(x, h / 2 - 35, 10, 0, 2 * Math.PI); g.fill(); }
  const speaking = stats.state === "speaking";
  g.strokeStyle = speaking ? "#4caf50" : "#555";
  g.lineWidth = 4;
  g.beginPath(); g.ellipse(w / 2, h / 2, 126, 146, 0, 0, 2 * Math.PI); g.stroke();
  const mw = 46 * (WIDTH[shape] || 1);
  const mh = 3 + jaw * 46;
  g.fillStyle = "#6b1f24";
  g.strokeStyle = "#8a3a3a";
  g.lineWidth = 3;
  g.beginPath(); g.ellipse(w / 2, h / 2 + 60, mw, mh, 0, 0, 2 * Math.PI); g.fill(); g.stroke();
}

// --- wiring -------------------------------------------------------------------------------------

ui.token.value = new URLSearchParams(location.search).get("token") || "";
ui.character.addEventListener("change", describe);
document.getElementById("setup").addEventListener("submit", (ev) => { ev.preventDefault(); connect(true); });
ui.hangup.addEventListener("click", () => hangup(true));
ui.reconnect.addEventListener("click", () => connect(stats.errorKind === "microphone" || lastUseMic));
ui.nomic.addEventListener("click", () => connect(false));
setInterval(tick, 30);
loadCharacters().then((ok) => { if (ok) clearError(); });
fetch("/health", { cache: "no-store" }).then((r) => r.json()).then((doc) => {
  ui.server.textContent = `${doc.server} · model ${doc.model}` +
    (doc.weights === "random" ? " with random weights: the NPCs babble" : "") +
    ` · ${doc.slots.total} conversation slot${doc.slots.total === 1 ? "" : "s"}`;
}).catch(() => {});
drawFace();

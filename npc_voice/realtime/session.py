"""`RealtimeSession`: one OpenAI-Realtime connection as the server sees it, without I/O (docs/realtime.md).

Data goes in: the client's text frames (`receive_text`), and the engine's facts (the conversation
opened or failed, a character change accepted or refused, an NPC frame, the conversation ended). Out
come the texts to write (`data_to_send()`: JSON strings, and `AudioDelta`s rendered to JSON only
when written, so that a delta dropped on the way costs nothing) and the requests the I/O layer
carries out with the engine (`requests()`). No asyncio, no sockets, no threads.

Full duplex onto responses: the model always listens and decides itself when to speak. Each
stretch of NPC speech (`SpeechState`, as `state` in our own protocol) is one response with one
assistant item; the player's turn between two stretches is bracketed by
`input_audio_buffer.speech_started` (the NPC yielded) and `speech_stopped` (it took the turn back).

Two threads call it (the engine's listener with frames, the event loop with the rest): the caller
passes a re-entrant lock, held while the state changes.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import json
from typing import Any

import numpy as np

from ..model.config import FRAME_MS
from ..protocol.rates import InputConverter, OutputFramer
from ..protocol.speech import SpeechState
from .events import (
    DEFAULT_RATE,
    PCM_RATES,
    ConversationItemCreate,
    ConversationItemTruncate,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    RealtimeError,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    assistant_item,
    error_event,
    event,
    new_id,
    parse_client_event,
    response_object,
    session_object,
)
from .events import (
    RealtimeErrorCode as Code,
)
from .requests import (
    AudioDelta,
    Character,
    CloseConversation,
    DropScript,
    OpenConversation,
    PushAudio,
    Reply,
    Request,
    SayLine,
    SwitchCharacter,
)

KEPT_ITEMS = 64  # assistant items a truncate may still name


class RealtimeSession:
    """See the module's docstring. `model`: the `?model=` of the URL (a stored character's id starts
    the conversation at once); `known_character(name)` says whether a name is a stored character."""

    def __init__(self, model: str = "", *, lock: Any = None, known_character: Any = None):
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.model = model or "npc-voice"
        self.id = new_id("sess")
        self.in_rate = self.out_rate = DEFAULT_RATE
        self._input = InputConverter(DEFAULT_RATE)
        self.framer = OutputFramer(DEFAULT_RATE)
        self.instructions: str | None = None
        self.wanted: Character | None = None  # what the client asked for last
        self.current: Character | None = None  # what the engine runs (or is opening)
        self.phase = "idle"  # idle -> opening -> live (-> idle when it ends); closing: the connection closes
        self.busy = False  # an open or a switch is being carried out
        self.pending_updates: list[str | None] = []  # event_ids of session.updates answered at the next accept
        self.close_code: tuple[int, str] | None = None
        self.speech = SpeechState()
        self.frames = 0  # NPC frames received since the conversation opened (all characters)
        self.reply: Reply | None = None
        self.items: collections.OrderedDict[str, Reply] = collections.OrderedDict()
        self.user_turn, self._user_item = False, ""
        self.discarded_input_ms = 0
        self._out: list[str | AudioDelta] = []
        self._requests: list[Request] = []
        if model and known_character is not None and known_character(model):
            self.wanted = Character(model)  # `session.created` already names it as the voice
        self._emit("session.created", session=self._session())
        self._next_request()

    # --- output ---------------------------------------------------------------------------------

    def data_to_send(self) -> list[str | AudioDelta]:
        with self.lock:
            out, self._out = self._out, []
            return out

    def requests(self) -> list[Request]:
        with self.lock:
            out, self._requests = self._requests, []
            return out

    def _emit(self, type_: str, **fields: Any) -> None:
        self._out.append(json.dumps(event(type_, **fields)))

    def error(self, exc: RealtimeError) -> None:
        with self.lock:
            self._out.append(json.dumps(error_event(exc)))

    def _session(self) -> dict[str, Any]:
        character = self.wanted or self.current
        instructions = self.instructions if self.instructions is not None else ""
        return session_object(self.id, self.model, instructions, character.voice if character else None,
                              self.in_rate, self.out_rate)

    # --- client data ------------------------------------------------------------------------------

    def receive_text(self, text: str) -> None:
        try:
            ev = parse_client_event(text)
        except RealtimeError as exc:
            self.error(exc)
            return
        with self.lock:
            try:
                self._handle(ev)
            except RealtimeError as exc:
                exc.event_id = exc.event_id or ev.event_id
                self.error(exc)

    def receive_bytes(self, data: bytes) -> None:
        self.error(RealtimeError(Code.BINARY_NOT_SUPPORTED, "binary frames are not part of the Realtime protocol: "
                                 "send audio as base64 in input_audio_buffer.append"))

    def _handle(self, ev: Any) -> None:
        if isinstance(ev, InputAudioBufferAppend):
            self._append(ev.audio)
        elif isinstance(ev, SessionUpdate):
            self._update(ev)
        elif isinstance(ev, InputAudioBufferCommit):
            self._emit("input_audio_buffer.committed", item_id=new_id("item"), previous_item_id=None)
        elif isinstance(ev, InputAudioBufferClear):
            self._emit("input_audio_buffer.cleared")
        elif isinstance(ev, ConversationItemCreate):
            self._item_create(ev)
        elif isinstance(ev, ConversationItemTruncate):
            self._truncate(ev)
        elif isinstance(ev, ResponseCreate):
            params = ev.response
            if params is not None and params.output_modalities is not None and "audio" not in params.output_modalities:
                raise RealtimeError(Code.UNSUPPORTED, "this model always answers with audio", param="response.output_modalities")
            self._need_live("response.create")
            if params is not None and params.instructions and params.instructions.strip():
                self._requests.append(SayLine(params.instructions.strip()))
        elif isinstance(ev, ResponseCancel):
            if self.reply is None or (ev.response_id is not None and ev.response_id != self.reply.response_id):
                raise RealtimeError(Code.RESPONSE_CANCEL_NOT_ACTIVE, "no response in progress to cancel",
                                    param="response_id")
            self._requests.append(DropScript())
            self._end_reply("cancelled", "client_cancelled")

    def _append(self, audio: str) -> None:
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError(Code.INVALID_AUDIO, "audio is not base64", param="audio") from None
        if len(raw) % 2:
            raise RealtimeError(Code.INVALID_AUDIO, "audio is not whole 16-bit samples (odd byte count)", param="audio")
        if self.phase != "live":  # nobody listens yet: no character chosen, or it is being built
            self.discarded_input_ms += len(raw) // 2 * 1000 // self.in_rate
            return
        samples = self._input(np.frombuffer(raw, dtype="<i2"))
        if samples.shape[0]:
            self._requests.append(PushAudio(samples))

    def _update(self, ev: SessionUpdate) -> None:
        cfg: SessionConfig = ev.session
        if cfg.output_modalities is not None and "audio" not in cfg.output_modalities:
            raise RealtimeError(Code.UNSUPPORTED, "text-only output is not supported: this model always speaks",
                                param="session.output_modalities")
        audio = cfg.audio
        in_fmt = audio.input.format if audio is not None and audio.input is not None else None
        out_fmt = audio.output.format if audio is not None and audio.output is not None else None
        for fmt, where in ((in_fmt, "input"), (out_fmt, "output")):
            if fmt is not None and (fmt.type != "audio/pcm" or fmt.rate not in PCM_RATES):
                raise RealtimeError(Code.UNSUPPORTED_FORMAT, f"audio {fmt.type} at {fmt.rate} Hz: this server takes "
                                    "audio/pcm (16-bit little-endian mono) at 16000, 24000 or 48000 Hz",
                                    param=f"session.audio.{where}.format")
        if in_fmt is not None and in_fmt.rate != self.in_rate:
            self.in_rate, self._input = in_fmt.rate, InputConverter(in_fmt.rate)
        if out_fmt is not None and out_fmt.rate != self.out_rate:
            self.out_rate, self.framer = out_fmt.rate, OutputFramer(out_fmt.rate)
        if cfg.instructions is not None:
            self.instructions = cfg.instructions.strip() or None
        voice = cfg.chosen_voice or (self.wanted.voice if self.wanted else None)
        wanted = Character(voice, self.instructions) if voice else None
        if wanted is None or wanted == self.wanted and not self.busy and self.current == wanted:
            self.wanted = wanted or self.wanted
            self._emit("session.updated", session=self._session())  # nothing for the engine to do
            return
        self.wanted = wanted
        self.pending_updates.append(ev.event_id)
        self._next_request()

    def _next_request(self) -> None:
        """Asks for the open or switch that brings the engine to `wanted`, unless one is under way."""
        if self.busy or self.wanted is None or self.phase == "closing":
            return
        if self.phase == "idle":
            self.phase, self.busy = "opening", True
            self._requests.append(OpenConversation(self.wanted))
        elif self.phase == "live" and self.wanted != self.current:
            self.busy = True
            self._requests.append(SwitchCharacter(self.wanted))
        elif self.pending_updates:
            self._answer_updates()

    def _answer_updates(self) -> None:
        for _ in self.pending_updates:
            self._emit("session.updated", session=self._session())
        self.pending_updates.clear()

    def _need_live(self, what: str) -> None:
        if self.phase != "live":
            raise RealtimeError(Code.CONVERSATION_NOT_STARTED, f"{what}: no conversation yet: choose a voice with "
                                "session.update (a character id or a preset voice), or connect with ?model=CHARACTER")

    def _item_create(self, ev: ConversationItemCreate) -> None:
        item = ev.item
        if item.type != "message" or item.role != "assistant":
            raise RealtimeError(Code.UNSUPPORTED, "only assistant messages can be added (a line for the NPC to say): "
                                "the model hears the player only as audio", param="item.role")
        text = " ".join((p.text or p.transcript or "").strip() for p in item.content).strip()
        if not text:
            raise RealtimeError(Code.INVALID_EVENT, "the assistant message has no text", param="item.content")
        self._need_live("conversation.item.create")
        self._requests.append(SayLine(text))
        done = {"id": item.id or new_id("item"), "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "completed", "content": [{"type": "output_text", "text": text}]}
        self._emit("conversation.item.added", previous_item_id=ev.previous_item_id, item=done)
        self._emit("conversation.item.done", previous_item_id=ev.previous_item_id, item=done)

    def _truncate(self, ev: ConversationItemTruncate) -> None:
        reply = self.items.get(ev.item_id)
        if reply is None:
            raise RealtimeError(Code.ITEM_NOT_FOUND, f"no assistant item {ev.item_id[:64]!r} (or it is too old)",
                                param="item_id")
        if ev.content_index != 0:
            raise RealtimeError(Code.INVALID_EVENT, "an assistant item has one content part (its audio): "
                                "content_index must be 0", param="content_index")
        sent_ms = reply.frames * FRAME_MS  # after a truncate: what the truncate kept
        if ev.audio_end_ms > sent_ms:
            raise RealtimeError(Code.INVALID_AUDIO_END_MS, f"audio_end_ms {ev.audio_end_ms} is past the {sent_ms} ms "
                                "of audio sent for this item", param="audio_end_ms")
        reply.pieces = [(ms, t) for ms, t in reply.pieces if ms < ev.audio_end_ms]
        reply.frames = -(-ev.audio_end_ms // FRAME_MS)
        if reply is self.reply:  # the NPC is still speaking it: the rest of this stretch is not sent
            self._requests.append(DropScript())
            self._end_reply("cancelled", "client_cancelled")
        self._emit("conversation.item.truncated", item_id=ev.item_id, content_index=ev.content_index,
                   audio_end_ms=ev.audio_end_ms)

    # --- engine facts -------------------------------------------------------------------------

    def opened(self, character: Character) -> None:
        """The conversation's first character is installed: audio is listened to from now on."""
        with self.lock:
            if self.phase != "opening":
                return
            self.phase, self.busy, self.current = "live", False, character
            self._answer_updates()
            self._next_request()

    def switched(self, character: Character) -> None:
        """A character change was accepted (resolved and queued; it takes over at its install)."""
        with self.lock:
            self.busy, self.current = False, character
            self._answer_updates()
            self._next_request()

    def refused(self, exc: RealtimeError) -> None:
        """An open or switch failed: the error, and the client's wish falls back to what runs."""
        with self.lock:
            self.busy = False
            if exc.event_id is None and self.pending_updates:  # the session.update that asked for it
                exc.event_id = self.pending_updates[-1]
            self.pending_updates.clear()
            if (exc.code == Code.INVALID_CHARACTER and exc.param == "session.audio.output.voice"
                    and self.wanted is not None and self.wanted.instructions is not None):
                exc.param = "session.instructions"  # a role that cannot be used (too long, ...)
            if self.phase == "opening":
                self.phase, self.current = "idle", None
            # the wish falls back to what runs, its instructions too (a refused role is not kept)
            self.wanted = self.current
            self.instructions = self.current.instructions if self.current is not None else None
            self._out.append(json.dumps(error_event(exc)))

    def receive_frame(self, frame: int, text: str, pcm: np.ndarray) -> None:
        """An NPC frame (engine thread). Frame 0 after others: a new character took over."""
        with self.lock:
            if self.phase != "live":
                return
            if frame == 0 and self.frames:
                self._end_reply("completed")
                self.speech, self.user_turn = SpeechState(), False
            self.frames += 1
            change = self.speech.update(frame, text, pcm)
            if change is not None and change[0] == "speaking":
                if self.user_turn:
                    self._emit("input_audio_buffer.speech_stopped", audio_end_ms=(self.frames - 1) * FRAME_MS,
                               item_id=self._user_item)
                    self.user_turn = False
                self._begin_reply()
            reply = self.reply
            if reply is not None:
                if text:
                    reply.pieces.append((reply.frames * FRAME_MS, text))
                    self._emit("response.output_audio_transcript.delta", response_id=reply.response_id,
                               item_id=reply.item_id, output_index=0, content_index=0, delta=text)
                reply.frames += 1
                self._out.append(AudioDelta(self.framer, reply.response_id, reply.item_id, pcm))
            if change is not None and change[0] == "listening":
                self.user_turn, self._user_item = True, new_id("item")
                start = (self.frames - 1 - (frame - change[1])) * FRAME_MS
                self._emit("input_audio_buffer.speech_started", audio_start_ms=start, item_id=self._user_item)
                self._end_reply("completed")

    def ended(self, code: Code | None = None, message: str = "", close: tuple[int, str] | None = None) -> None:
        """The conversation is over (the engine failed, the server stops, the client idled): the
        error, if any, and the connection closes with `close` (never 1011)."""
        with self.lock:
            self._end_reply("incomplete", "interrupted")
            if code is not None:
                self._out.append(json.dumps(error_event(RealtimeError(code, message))))
            if self.phase in ("live", "opening"):
                self._requests.append(CloseConversation())
            self.phase, self.busy, self.current = ("closing" if close else "idle"), False, None
            if close is not None and self.close_code is None:
                self.close_code = close

    # --- responses ------------------------------------------------------------------------------

    def _begin_reply(self) -> None:
        reply = self.reply = Reply(new_id("resp"), new_id("item"))
        self.items[reply.item_id] = reply
        while len(self.items) > KEPT_ITEMS:
            self.items.popitem(last=False)
        item = assistant_item(reply.item_id, "in_progress")
        self._emit("response.created", response=response_object(reply.response_id, "in_progress", []))
        self._emit("response.output_item.added", response_id=reply.response_id, output_index=0, item=item)
        self._emit("conversation.item.added", previous_item_id=None, item=item)
        self._emit("response.content_part.added", response_id=reply.response_id, item_id=reply.item_id,
                   output_index=0, content_index=0, part={"type": "audio", "transcript": ""})

    def _end_reply(self, status: str, reason: str | None = None) -> None:
        reply, self.reply = self.reply, None
        if reply is None:
            return
        ids = {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": 0}
        transcript = reply.transcript()
        item_status = "completed" if status == "completed" else "incomplete"
        item = assistant_item(reply.item_id, item_status, transcript)
        self._emit("response.output_audio.done", **ids, content_index=0)
        self._emit("response.output_audio_transcript.done", **ids, content_index=0, transcript=transcript)
        self._emit("response.content_part.done", **ids, content_index=0,
                   part={"type": "audio", "transcript": transcript})
        self._emit("response.output_item.done", response_id=reply.response_id, output_index=0, item=item)
        self._emit("conversation.item.done", previous_item_id=None, item=item)
        self._emit("response.done", response=response_object(reply.response_id, status, [item], reason))

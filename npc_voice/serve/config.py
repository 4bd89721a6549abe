"""The server's settings and its bind policy: loopback is open, anything else needs a long token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..protocol import Limits

DEFAULT_PORT = 8765
TOKEN_ENV = "NPC_VOICE_TOKEN"
MIN_REMOTE_TOKEN_CHARS = 16
SERVE_MAX_INPUT_SECONDS = 0.5


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("npc-voice")
    except PackageNotFoundError:  # pragma: no cover - run from a plain checkout
        return "dev"


PKG_VERSION = _version()
SERVER_NAME = f"npc-voice {PKG_VERSION}"  # in `hello` and /health


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (see NPCVoiceServer.port)
    token: str | None = None  # required whenever host is not a loopback address
    idle_timeout: float = 30.0  # seconds without any message from the client
    max_connections: int | None = None  # default: 4 per slot + 4
    out_audio_frames: int = 12  # per-connection queue of NPC audio (about 1 s): the oldest is dropped beyond
    send_buffer_bytes: int | None = 32 << 10  # SO_SNDBUF of each connection: bounds what the kernel holds for a
    write_limit: int = 16 << 10  # slow reader (else it autotunes to MBs: seconds of lag before any drop)
    out_events: int = 512  # per-connection queue of JSON messages
    dropped_report_s: float = 1.0  # at most one `dropped` message per interval
    build_workers: int = 4  # threads that read and decode characters' files (prompts are built by the engine thread)
    ping_interval: float | None = 20.0  # websocket keepalive: a vanished peer is found within ping_interval + ping_timeout
    ping_timeout: float | None = 20.0
    visemes: bool = True  # a client may ask for mouth tracks (`start` "visemes"); --no-visemes: refused
    close_grace_s: float = 2.0  # a closing client that does not read is cut off after this
    drain_grace_s: float = 0.0  # SIGTERM: live sessions go on this long (new ones refused) before `shutting_down`
    agent_port: int | None = None  # the HAProxy agent check's TCP port (0: any free one; None: no agent)
    limits: Limits = field(default_factory=Limits)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuses a public bind without a token (ValueError says what to do)."""
    if is_loopback(host):
        return
    if not token:
        raise ValueError(f"refusing to listen on {host} without a token: anyone who reaches this port could use "
                         f"the GPU; pass --token (or set {TOKEN_ENV}), or bind 127.0.0.1")
    if len(token) < MIN_REMOTE_TOKEN_CHARS:
        raise ValueError(f"the token has {len(token)} characters; use at least {MIN_REMOTE_TOKEN_CHARS} for a "
                         "non-loopback bind (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")

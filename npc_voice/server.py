"""Compatibility: the server's public names, from before it became the `npc_voice.serve` package
(the MCP server and older programs import them from here). New code imports `npc_voice.serve`."""

from .characters import open_store
from .protocol import InputConverter, OutputFramer
from .serve import (
    DEFAULT_PORT, TOKEN_ENV, BackgroundServer, NPCVoiceServer, ServerConfig, SessionManager, character_error,
    check_bind, is_loopback, resolve_character,
)
from .serve.cli import add_serve_command, cmd_serve
from .serve.connection import Connection
from .serve.outbox import Outbox

__all__ = [
    "DEFAULT_PORT", "TOKEN_ENV", "BackgroundServer", "Connection", "InputConverter", "NPCVoiceServer", "Outbox",
    "OutputFramer", "ServerConfig", "SessionManager", "add_serve_command", "character_error", "check_bind",
    "cmd_serve", "is_loopback", "open_store", "resolve_character",
]

"""Where the characters live by default."""

from __future__ import annotations

import os
from pathlib import Path


def shipped_characters_dir() -> Path | None:
    """The shipped cast: the repository's `characters/` folder (beside the `npc_voice` package in a
    checkout or an editable install); None when it is not there."""
    path = Path(__file__).resolve().parents[2] / "characters"
    return path if path.is_dir() else None


def default_characters_dir() -> Path:
    """$NPC_VOICE_CHARACTERS, else `./characters` when present, else the shipped cast, else
    `./characters` (to be created)."""
    env = os.environ.get("NPC_VOICE_CHARACTERS")
    if env:
        return Path(env)
    local = Path("characters")
    if local.is_dir():
        return local
    return shipped_characters_dir() or local

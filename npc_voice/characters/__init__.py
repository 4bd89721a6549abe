"""NPC characters: a definition people can edit (`character.toml` + `voice.wav` per folder), a store
that never loses data, and the shipped cast (the repository's `characters/` folder).

See docs/characters.md for the format.
"""

from .model import (
    CONTEXT_FRAMES, ID_PATTERN, KNOWN_PRESETS, ROLE_TOKENS_MAX, ROLE_TOKENS_WARN, Character, CharacterError,
    Problem, Report, SamplingSettings, check_character, max_top_k, role_tokens,
)
from .store import CharacterStore, default_presets_dir, import_voice, open_store
from .paths import default_characters_dir, shipped_characters_dir
from .resolve import ResolveError, find_preset, installed_presets, resolve_persona

__all__ = [
    "CONTEXT_FRAMES", "ID_PATTERN", "KNOWN_PRESETS", "ROLE_TOKENS_MAX", "ROLE_TOKENS_WARN", "Character",
    "CharacterError", "CharacterStore", "Problem", "Report", "ResolveError", "SamplingSettings", "check_character",
    "default_characters_dir", "default_presets_dir", "find_preset", "import_voice", "installed_presets", "max_top_k",
    "open_store", "resolve_persona", "role_tokens", "shipped_characters_dir",
]

"""The engine: many NPC conversations on one shared model, characters installed by copying."""

from .engine import Engine, EngineFull, EngineLoop, FrameEvent, Session
from ..model.generator import Sampling
from .persona import Persona, PrefixCache

__all__ = ["Engine", "EngineFull", "EngineLoop", "FrameEvent", "Persona", "PrefixCache", "Sampling", "Session"]

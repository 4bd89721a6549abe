"""The text tokenizer: a plain SentencePiece model (no BOS/EOS), as the reference uses it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import sentencepiece

BUILTIN_TOKENIZER = "tokenizer_tiny.model"  # shipped in npc_voice/model/assets, vocabulary of 1000
NEVER_SHOWN = frozenset({0, 3})  # EPAD and PAD: "nothing said" tokens


class TextTokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))

    @classmethod
    def builtin(cls) -> TextTokenizer:
        return cls(resources.files("npc_voice.model").joinpath("assets", BUILTIN_TOKENIZER))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def piece(self, token: int) -> str:
        """The text a streamed token adds ('' for padding and ids outside the vocabulary)."""
        if token in NEVER_SHOWN or not 0 <= token < self.vocab_size or self.sp.is_control(token):
            return ""
        if self.sp.is_byte(token):  # byte fallback "<0xHH>": printable ASCII only, alone it is no text
            value = int(self.sp.id_to_piece(token)[3:5], 16)
            return chr(value) if 0x20 <= value < 0x7F else ""
        return self.sp.id_to_piece(token).replace("\u2581", " ")

    def decode(self, tokens: list[int]) -> str:
        return self.sp.decode([t for t in tokens if t not in NEVER_SHOWN and 0 <= t < self.vocab_size])

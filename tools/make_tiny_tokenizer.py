#!/usr/bin/env python3
"""Train the tiny built-in SentencePiece text tokenizer (`npc_voice/model/assets/tokenizer_tiny.model`).

Used by the tiny built-in model (random weights) and the golden fixtures, in place of PersonaPlex's
32k `tokenizer_spm_32k_3.model`. 1000 pieces (the tiny model's text_card), unigram, byte fallback,
and the special ids laid out as the LM expects: unk=0 and pad=3 (ids the LM uses as EPAD / PAD, never
shown as text), bos=1, eos=2. No Unicode normalisation (identity rule): the NFKC table alone would be
~240 KB, and the file is copied into the golden fixtures, which have a tight size budget.

The corpus is `tools/tiny_corpus.txt` (hand-written game-NPC lines) plus lines generated below from
fixed templates. Training is single-threaded with no sampling or shuffling, so the output is
byte-for-byte reproducible with the same sentencepiece version.

Run from the repository root:

    python3 tools/make_tiny_tokenizer.py            # writes npc_voice/model/assets/tokenizer_tiny.model
    python3 tools/make_tiny_tokenizer.py --out X.model
"""

from __future__ import annotations

import argparse
import io
import itertools
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tools" / "tiny_corpus.txt"
DEFAULT_OUT = ROOT / "npc_voice" / "model" / "assets" / "tokenizer_tiny.model"
VOCAB_SIZE = 1000

_NAMES = ["Greta", "Tomas", "Mira", "Aldric", "Sera", "Bram", "Ilsa", "Corwin"]
_ROLES = ["innkeeper", "blacksmith", "guard", "merchant", "farmer", "wizard", "sailor", "healer"]
_PLACES = ["the market", "the old mill", "the harbor", "the castle", "the forest", "the chapel",
           "the mines", "the north gate"]
_THINGS = ["a sword", "some bread", "a healing potion", "a map", "a lantern", "a rope", "a horse",
           "a warm cloak"]


def template_lines() -> list[str]:
    """Deterministic extra sentences: greetings, directions and trades over fixed word lists."""
    lines = []
    for name, role in zip(_NAMES, _ROLES):
        lines.append(f"Hello, my name is {name} and I am the {role} of this town.")
        lines.append(f"<system> You are {name}, a {role}. Stay in character and keep answers short. <system>")
    for place, (i, thing) in itertools.product(_PLACES, enumerate(_THINGS)):
        if (len(place) + i) % 3 == 0:
            lines.append(f"If you need {thing}, go to {place} and ask for the {_ROLES[i]}.")
        elif (len(place) + i) % 3 == 1:
            lines.append(f"I saw {_NAMES[i]} near {place} this morning, carrying {thing}.")
        else:
            lines.append(f"How much for {thing}? Not more than {i + 2} silver, I hope.")
    return lines


def corpus_lines() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in text if line.strip()] + template_lines()


def train(out: Path) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC table: keeps the file ~20 KB instead of ~250 KB
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        split_digits=True,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.vocab_size() == VOCAB_SIZE, sp.vocab_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    sample = "<system> You are a grumpy guard. <system> Halt! Zażółć 42"
    assert sp.decode(sp.encode(sample)) == sample
    print(f"wrote {out} ({out.stat().st_size} bytes, {sp.vocab_size()} pieces)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train(args.out)


if __name__ == "__main__":
    main()

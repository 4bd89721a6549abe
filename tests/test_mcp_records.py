"""mcp_server/records.py: words are read from SentencePiece pieces (a leading space or '▁' starts a
word, anything else continues it, however far apart the pieces come), and a record's transcript
reads as words."""

from __future__ import annotations

from mcp_server.records import Record, merge_words, scene_speakers, words_of


def test_pieces_join_into_words_across_silent_frames() -> None:
    # a `say` line: one token every 3 frames, silence between ("Pay the ferryman.")
    pieces = [(0, " P"), (3, "ay"), (6, " the"), (9, " fe"), (12, "rry"), (15, "m"), (18, "an"), (21, ".")]
    words = words_of(pieces, "ferryman", 40)
    assert [w["word"] for w in words] == ["Pay", "the", "ferryman."]
    assert [(w["start"], w["end"]) for w in words] == [(0.0, 0.32), (0.48, 0.56), (0.72, 1.76)]
    assert {w["speaker"] for w in words} == {"ferryman"}


def test_sentencepiece_marks_spaces_inside_pieces_and_the_frame_limit() -> None:
    pieces = [(2, "\u2581Hel"), (3, "lo"), (4, "\u2581there"), (4, ","), (5, " how are"), (9, " you"), (10, "?")]
    words = words_of(pieces, "npc", 10)  # frame 10 and later: not said yet
    assert [w["word"] for w in words] == ["Hello", "there,", "how", "are", "you"]
    assert words[0]["start"] == 0.16 and words[0]["end"] == 0.32
    assert words_of([], "npc", 10) == [] and words_of([(0, " "), (1, "")], "npc", 10) == []
    # a piece without a leading space at the start is a word of its own
    assert [w["word"] for w in words_of([(0, "ok"), (2, " go")], "npc", 5)] == ["ok", "go"]


def test_a_transcript_reads_as_words() -> None:
    record = Record("say-1", "say", ["ferryman"])
    record.words = words_of([(0, " P"), (3, "ay"), (6, " the"), (9, " fe"), (12, "rry"), (15, "man.")], "ferryman", 20)
    assert record.transcript()["text"] == {"ferryman": "Pay the ferryman."}
    a, b = scene_speakers("x", "x")
    merged = merge_words(words_of([(0, " Hi"), (6, " you")], a, 10), words_of([(3, " Oh")], b, 10))
    assert [(w["speaker"], w["word"]) for w in merged] == [(a, "Hi"), (b, "Oh"), (a, "you")]

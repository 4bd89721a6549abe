"""npc_voice/characters/model.py: the schema's fix-it messages, the TOML form, `to_persona`, the
documented example, the prompt budget held to the caller's context and top-k within the sampler's cap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from npc_voice.characters import (
    ROLE_TOKENS_MAX, ROLE_TOKENS_WARN, Character, CharacterError, CharacterStore, check_character, role_tokens,
)
from npc_voice.characters.model import VOICE_FILE
from characters_helpers import ROLE, ROOT, errors_of, make
from characters_helpers import store, voice  # noqa: F401 (fixtures)


# --- schema: each error says what is wrong and how to fix it ------------------------------------


def test_empty_role() -> None:
    with pytest.raises(CharacterError) as exc:
        make(role="  \n ")
    text = errors_of(exc)
    assert "role" in text and "the role is empty" in text and "write the PersonaPlex text prompt" in text


def test_role_too_long_reports_its_token_count() -> None:
    role = "The innkeeper knows every rumour of the valley and tells them at length. " * 120
    n = role_tokens(role)
    assert n > ROLE_TOKENS_MAX
    with pytest.raises(CharacterError) as exc:
        make(role=role)
    text = errors_of(exc)
    assert f"the role is {n} tokens" in text and f"{n} frames" in text and "80 ms" in text
    assert f"limit is {ROLE_TOKENS_MAX}" in text and "shorten it" in text


def test_long_role_warns_with_count(store: CharacterStore, voice: Path) -> None:
    role = "You work for The Gilded Stag which is an inn and your name is Marta. " * 8
    n = role_tokens(role)
    assert ROLE_TOKENS_WARN < n <= ROLE_TOKENS_MAX
    report = store.create(make(role=role), voice)
    assert report.ok and report.role_tokens == n
    [warning] = report.warnings
    assert warning.field == "role" and f"the role is {n} tokens" in warning.message and "recommended" in warning.message


def test_role_counted_with_a_given_tokenizer(store: CharacterStore, voice: Path) -> None:
    class Wordy:  # a model tokenizer that needs many more tokens than the built-in one
        path = "wordy.model"

        def encode(self, text: str) -> list[int]:
            return list(range(len(text)))

    store.create(make(role="y" * 300), voice)
    character = store.load("teacher")
    report = check_character(character, store.folder("teacher"), tokenizer=Wordy())
    assert report.role_tokens == 318 and "the role is 318 tokens" in str(report.warnings[0])
    assert "counted with wordy.model" in str(report.warnings[0])
    long = make(role=("The stew is mutton and barley. " * 40)[:1200])  # fine for the built-in tokenizer ...
    report = check_character(long, store.folder("teacher"), tokenizer=Wordy())  # ... too long for this one
    assert not report.ok and "the role is 1218 tokens" in str(report.errors[0])
    with pytest.raises(CharacterError, match="1218 tokens"):
        Character.parse(long.model_dump(), tokenizer=Wordy())


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "..", "a/b", "Innkeeper", "old miller", "", "-x", "_x",
                                 "inn.keeper", "a" * 49, "ok\n", "caf\u00e9", "x\\y"])
def test_unsafe_ids_are_refused(bad: str, store: CharacterStore) -> None:
    with pytest.raises(CharacterError) as exc:
        make(id=bad)
    assert "is not a safe id" in errors_of(exc) and "lowercase letters" in errors_of(exc)
    with pytest.raises(CharacterError, match="is not a safe id: ids are 1-48 lowercase.*paths are not accepted"):
        store.folder(bad)
    with pytest.raises(CharacterError):
        store.load(bad)
    with pytest.raises(CharacterError):
        store.delete(bad)
    assert bad not in store


def test_unsafe_id_suggests_a_slug() -> None:
    with pytest.raises(CharacterError, match="for example 'old-miller'"):
        make(id="Old Miller!")


def test_other_schema_messages() -> None:
    with pytest.raises(CharacterError, match="missing: add `name = ...`"):
        Character.parse({"id": "a", "role": ROLE})
    with pytest.raises(CharacterError, match="unknown field"):
        make(rol="typo")
    with pytest.raises(CharacterError, match="temperature 3.0 is out of range: use 0 .greedy. to 2"):
        make(sampling={"text_temperature": 3.0})
    with pytest.raises(CharacterError, match="top-k 0 is out of range"):
        make(sampling={"audio_top_k": 0})
    for voice in ("../other/voice.wav", "/tmp/x.wav", "voice.flac", "sample.wav"):
        with pytest.raises(CharacterError, match="must be 'voice.wav'.*or a PersonaPlex preset name such as NATF2"):
            make(voice=voice)
    with pytest.raises(CharacterError, match="the display name is empty"):
        make(name=" ")
    with pytest.raises(CharacterError, match="tag 'Town Folk' is not allowed.*'town-folk'"):
        make(tags=["Town Folk"])
    with pytest.raises(CharacterError, match="line 'greeting' is empty"):
        make(lines={"greeting": " "})
    assert make(voice="NATF2").uses_preset and make(tags=["a", "b", "a"]).tags == ["a", "b"]


def test_toml_round_trip_keeps_multiline_role() -> None:
    role = ('You work for First Neuron Bank which is a bank and your name is Sanni Virtanen.\n'
            'Information: a "declined" $1,200 transaction at Home Depot\\Miami.\n\n  Verify the identity.\t"""\n')
    c = make(id="bank", role=role, description="A bank agent.", tags=["service"], voice="NATF2",
             sampling={"text_temperature": 0.6, "audio_top_k": 100}, lines={"greeting": "Hello!\nIt's Sanni."})
    text = c.to_toml()
    assert 'role = """' in text and "[sampling]" in text and "[lines]" in text
    back = Character.from_toml(text, id="bank")
    assert back == c and back.role == role
    s = back.to_sampling()
    assert (s.text_temperature, s.text_top_k, s.audio_temperature, s.audio_top_k) == (0.6, 25, 0.8, 100)


def test_toml_errors_name_the_problem() -> None:
    with pytest.raises(CharacterError, match="not valid TOML"):
        Character.from_toml('name = "unterminated', id="a")
    with pytest.raises(CharacterError, match="says id = 'other' but its folder is 'a'"):
        Character.from_toml(make(id="other").to_toml(), id="a")


# --- to_persona -----------------------------------------------------------------------------------


def test_to_persona_with_sample(store: CharacterStore, voice: Path) -> None:
    store.create(make(sampling={"audio_temperature": 0.5}), voice)
    persona = store.load("teacher").to_persona(store)
    assert persona.voice_path == str(store.folder("teacher") / VOICE_FILE)
    assert persona.role == ROLE and persona.name == "teacher"
    s = persona.sampling
    assert (s.text_temperature, s.text_top_k, s.audio_temperature, s.audio_top_k) == (0.7, 25, 0.5, 250)


def test_to_persona_with_preset(store: CharacterStore, tmp_path: Path) -> None:
    store.create(make(voice="NATF2"))
    report = store.validate("teacher")
    assert report.ok and "preset NATF2.pt not found" in str(report.warnings[0])
    character = store.load("teacher")
    with pytest.raises(CharacterError) as exc:
        character.to_persona(store)
    message = str(exc.value)
    assert "voice preset 'NATF2' not found" in message and str(tmp_path / "voices" / "NATF2.pt") in message
    assert "--voices DIR" in message

    # A preset .pt (the release's layout) for the tiny model: the prompt prefix builds from it.
    from npc_voice.engine import PrefixCache
    from npc_voice.model.generator import Generator
    from npc_voice.model.loading import random_model

    model = random_model("tiny")
    (tmp_path / "voices").mkdir()
    torch.save({"embeddings": torch.randn(40, 1, 1, model.config.lm.dim, dtype=torch.bfloat16),
                "cache": torch.randint(0, 2048, (1, 17, 4))}, tmp_path / "voices" / "NATF2.pt")
    persona = character.to_persona(store)
    assert persona.voice_path == str(tmp_path / "voices" / "NATF2.pt")
    prefix = PrefixCache(model, Generator(model.lm)).get(persona)
    assert prefix.length == 41 + 12 + role_tokens(ROLE)
    report = store.validate("teacher")
    assert report.problems == [] and report.prompt_frames == prefix.length  # the preset's frames are counted
    tight = store.validate("teacher", context_frames=2 * prefix.length)  # the prompt must stay under half
    assert not tight.ok and "half or more" in str(tight.errors[0])
    (tmp_path / "voices" / "NATF2.pt").write_bytes(b"truncated")
    broken = store.validate("teacher")
    assert not broken.ok and "not a PersonaPlex voice preset" in str(broken.errors[0])


def test_the_documented_example_is_valid() -> None:
    doc = (ROOT / "docs" / "characters.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    character = Character.from_toml(example, id="innkeeper")
    assert character.sampling.text_top_k == 20 and "farewell" in character.lines and "\n" in character.role.strip()


# --- the prompt budget is the caller's context; top-k stays within the sampler's cap --------------


def test_the_prompt_budget_is_the_callers_context(store: CharacterStore, voice: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A short `--context` refuses a prompt that PersonaPlex's 3000 frames accept: the check takes the
    context from its caller (the store, the CLI), never a fixed one."""
    from npc_voice.cli import main

    store.create(make(), voice)
    report = store.validate("teacher")
    assert report.ok and report.prompt_frames is not None
    frames = report.prompt_frames
    assert frames == 50 + 12 + role_tokens(ROLE)  # a 4 s sample is 50 frames; 6 + 6 frames of silence
    assert frames < 3000 // 2

    short = 2 * frames  # the prompt is exactly half of it: refused
    refused = store.validate("teacher", context_frames=short)
    assert not refused.ok and f"half or more of the {short}-frame context" in str(refused.errors[0])
    assert f"the prompt takes {frames} frames" in str(refused.errors[0])
    assert store.validate("teacher", context_frames=short + 2).ok
    character = store.load("teacher")
    assert not check_character(character, store.folder("teacher"), context_frames=short).ok
    assert check_character(character, store.folder("teacher"), context_frames=3000).ok

    # a store told its model's context holds creates and validations to it
    small = CharacterStore(store.root, presets_dir=tmp_path / "voices", context_frames=short)
    assert small.context_frames == short and not small.validate("teacher").ok
    with pytest.raises(CharacterError, match=f"half or more of the {short}-frame context"):
        small.create(make(id="other"), voice)
    assert "other" not in store

    args = ["--characters", str(store.root)]
    assert main(["characters", "validate", "teacher", *args]) == 0
    assert main(["characters", "validate", "teacher", *args, "--context", str(short)]) == 1
    out = capsys.readouterr().out
    assert "FAILED teacher" in out and f"{short}-frame context" in out


@pytest.mark.parametrize("field", ["text_top_k", "audio_top_k"])
def test_top_k_above_the_samplers_cap_is_refused(field: str) -> None:
    from npc_voice.characters import max_top_k
    from npc_voice.model.sampling import MAX_TOP_K

    assert max_top_k() == MAX_TOP_K == 512
    assert getattr(make(sampling={field: MAX_TOP_K}).sampling, field) == MAX_TOP_K
    for too_many in (MAX_TOP_K + 1, 2048, 32000):  # 32000 and 2048 were accepted and silently cut to 512
        with pytest.raises(CharacterError) as exc:
            make(sampling={field: too_many})
        text = errors_of(exc)
        assert f"top-k {too_many} is out of range: use 1 to {MAX_TOP_K}" in text and "likeliest tokens" in text
        assert field in text


def test_top_k_is_a_whole_number_as_written() -> None:
    """`text_top_k = true` or `"20"` in a character.toml is refused (they were read as 1 and 20)."""
    for value in ("true", '"20"', "20.0"):
        with pytest.raises(CharacterError, match="top_k"):
            Character.from_toml(f'id = "x"\nname = "X"\nvoice = "NATF1"\nrole = "r"\n[sampling]\ntext_top_k = {value}\n')
    ok = Character.from_toml('id = "x"\nname = "X"\nvoice = "NATF1"\nrole = "r"\n[sampling]\ntext_top_k = 20\n')
    assert ok.sampling.text_top_k == 20

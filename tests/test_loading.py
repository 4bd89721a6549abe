"""Loading weights directories the way users do: official file and key names, clear errors."""

from __future__ import annotations

import builtins
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npc_voice.model.config import PRESETS, ModelConfig
from npc_voice.model.lm import PersonaPlexLM
from npc_voice.model.loading import (
    LM_FILE, MIMI_FILE, TOKENIZER_FILE, CheckpointError, LoadedModel, load_directory, load_model, random_model,
)
from npc_voice.model.mimi import Mimi
from npc_voice.model.quant import QuantWeight

SMALL = ModelConfig(
    "small",
    dataclasses.replace(PRESETS["tiny"].lm, dim=32, num_layers=2, num_heads=2, depformer_dim=16,
                        depformer_num_heads=2, depformer_dim_feedforward=66),
    PRESETS["tiny"].mimi,
)


def write_weights_dir(model: LoadedModel, directory: Path, lm_dtype: torch.dtype = torch.bfloat16) -> Path:
    """A weights directory in the reference's layout, as a user would download it."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(lm_dtype).contiguous() for k, v in model.lm.state_dict().items()}, directory / LM_FILE)
    save_file({k: v.contiguous() for k, v in model.mimi.state_dict().items()}, directory / MIMI_FILE)
    shutil.copy(model.tokenizer.path, directory / TOKENIZER_FILE)
    (directory / "mimi_config.json").write_text(json.dumps(model.config.mimi.to_kyutai()))
    config = model.config.lm.to_kyutai() | {"mimi_config_name": "mimi_config.json", "model_type": "moshi"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def source() -> LoadedModel:
    return random_model(SMALL, seed=4)


@pytest.fixture()
def weights_dir(source: LoadedModel, tmp_path: Path) -> Path:
    return write_weights_dir(source, tmp_path / "weights")


@torch.no_grad()
def test_directory_loads_and_computes_the_same(source: LoadedModel, weights_dir: Path) -> None:
    loaded = load_model(weights_dir, device="cpu")
    assert loaded.config.lm == SMALL.lm and loaded.config.mimi == SMALL.mimi
    assert loaded.lm.text_linear.weight.dtype == torch.float32  # fp32 on CPU
    assert not any(t.is_meta for t in list(loaded.lm.state_dict().values()) + list(loaded.mimi.state_dict().values()))
    tokens = torch.randint(0, 1000, (1, 17, 5))
    # The file stores the LM in bf16: compare with the source rounded the same way.
    reference = PersonaPlexLM(SMALL.lm)
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in source.lm.state_dict().items()})
    torch.testing.assert_close(loaded.lm.forward_text(tokens)[1], reference.forward_text(tokens)[1])
    pcm = torch.randn(1, 1, 1920 * 3) * 0.1
    assert torch.equal(loaded.mimi.encode(pcm), source.mimi.encode(pcm))
    assert loaded.tokenizer.encode("hello there") == source.tokenizer.encode("hello there")


def frames(config, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LM input tokens [2, 17, T] and depth input tokens [2, T, dep_q]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([torch.randint(0, 1000, (2, 1, T), generator=g),
                        torch.randint(0, config.card, (2, config.n_q, T), generator=g)], dim=1)
    depth = torch.cat([torch.randint(0, 1000, (2, T, 1), generator=g),
                       torch.randint(0, config.card, (2, T, config.dep_q - 1), generator=g)], dim=2)
    return tokens, depth


@torch.no_grad()
@pytest.mark.parametrize("from_directory", [True, False], ids=["directory", "random"])
def test_context_limits_what_a_conversation_remembers(weights_dir: Path, from_directory: bool) -> None:
    """`load_model(context=4)`: the streaming state holds 4 frames, and frame t attends to frames
    t-3..t only: the first 4 frames match the full-context model, the later ones do not."""
    source = weights_dir if from_directory else None
    full = load_model(source, device="cpu", dtype=torch.float32)
    short = load_model(source, device="cpu", dtype=torch.float32, context=4)
    assert full.config.lm.context == (SMALL.lm.context if from_directory else PRESETS["tiny"].lm.context) > 4
    assert short.config.lm.context == 4 and short.config.lm == dataclasses.replace(full.config.lm, context=4)
    assert short.lm.transformer.context == 4
    tokens, _ = frames(full.config.lm, 10)
    outputs = []
    for model in (full, short):
        state = model.lm.init_state(2)
        outputs.append(torch.cat([model.lm.step_text(tokens[..., t:t + 1], state)[1] for t in range(10)], dim=1))
        assert all(layer.slot_view(0)[0].shape[1] == model.config.lm.context for layer in state.layers)  # ring rows
    torch.testing.assert_close(outputs[1][:, :4], outputs[0][:, :4], rtol=0, atol=1e-5)
    for t in range(4, 10):
        assert rel_error(outputs[1][:, t], outputs[0][:, t]) > 1e-3, t
    # the whole-sequence (teacher-forced) pass uses the same window as streaming
    torch.testing.assert_close(short.lm.forward_text(tokens)[1], outputs[1], rtol=0, atol=1e-4)


@torch.no_grad()
def test_int8_directory_load_stays_close(weights_dir: Path) -> None:
    """`load_model(int8=True)` quantizes the LM on the host; logits against the same file at full width.
    Relative L2 error measured 0.0139 (text) and 0.0188 (depth) on this checkpoint and input."""
    full = load_model(weights_dir, device="cpu")
    q = load_model(weights_dir, device="cpu", int8=True)
    assert q.lm.text_linear.w.q.dtype == torch.int8 and q.lm.text_linear.w.q.device.type == "cpu"
    tokens, depth_tokens = frames(full.config.lm, 24)
    hidden, text = full.lm.forward_text(tokens)
    q_hidden, q_text = q.lm.forward_text(tokens)
    text_err = rel_error(q_text, text)
    depth_err = rel_error(q.lm.forward_depth(q_hidden, depth_tokens), full.lm.forward_depth(hidden, depth_tokens))
    assert 0.003 < text_err < 0.02, text_err
    assert 0.003 < depth_err < 0.03, depth_err


@torch.no_grad()
def test_fp8_directory_load_stays_close(weights_dir: Path) -> None:
    """`load_directory(weights_dtype="fp8")` quantizes the bf16 file on the host, matrix by matrix (on a
    CPU the fp8 products are their float32 stand-in: `load_model` itself refuses fp8 on a CPU).
    Relative L2 error measured 0.078 (text) and 0.105 (depth) on this checkpoint and input."""
    full = load_model(weights_dir, device="cpu")
    q = load_directory(weights_dir, device=torch.device("cpu"), dtype=torch.float32, weights_dtype="fp8")
    assert q.lm.text_linear.w.q.dtype == torch.float8_e4m3fn and q.lm.text_linear.w.q.device.type == "cpu"
    assert q.dtype == torch.float32 and not [m for m in q.mimi.modules() if isinstance(m, QuantWeight)]
    tokens, depth_tokens = frames(full.config.lm, 24)
    hidden, text = full.lm.forward_text(tokens)
    q_hidden, q_text = q.lm.forward_text(tokens)
    text_err = rel_error(q_text, text)
    depth_err = rel_error(q.lm.forward_depth(q_hidden, depth_tokens), full.lm.forward_depth(hidden, depth_tokens))
    assert 0.03 < text_err < 0.11, text_err  # int8: 0.014
    assert 0.03 < depth_err < 0.14, depth_err


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def test_missing_key_is_named(weights_dir: Path) -> None:
    state = load_file(weights_dir / LM_FILE)
    del state["depformer.layers.0.gating.3.linear_out.weight"]
    save_file(state, weights_dir / LM_FILE)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing keys: depformer\.layers\.0\.gating\.3\.linear_out\.weight"):
        load_model(weights_dir, device="cpu")


def test_unexpected_key_and_wrong_shape_are_named(weights_dir: Path) -> None:
    state = load_file(weights_dir / MIMI_FILE)
    state["quantizer.extra"] = torch.zeros(3)
    state["encoder_transformer.transformer.layers.0.linear1.weight"] = torch.zeros(7, 7)
    save_file(state, weights_dir / MIMI_FILE)
    with pytest.raises(CheckpointError) as err:
        load_model(weights_dir, device="cpu")
    message = str(err.value)
    assert MIMI_FILE in message and "unexpected keys: quantizer.extra" in message
    assert "encoder_transformer.transformer.layers.0.linear1.weight is [7, 7], expected [256, 64]" in message


def test_missing_file_and_bad_config_are_clear(weights_dir: Path) -> None:
    (weights_dir / TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_model(weights_dir, device="cpu")
    (weights_dir / "config.json").write_text(json.dumps({"dim": 32, "gating": "gelu"}))
    with pytest.raises(CheckpointError, match="gating"):
        load_model(weights_dir, device="cpu")
    (weights_dir / "config.json").write_text(json.dumps({"mimi_config_name": "../../etc/passwd"}))
    with pytest.raises(CheckpointError, match="leaves the weights directory"):
        load_model(weights_dir, device="cpu")


def test_config_json_overrides_the_preset(tmp_path: Path) -> None:
    """A Moshi-style variant (dep_q = 8) loads from its own config.json."""
    moshi_like = dataclasses.replace(SMALL, lm=dataclasses.replace(SMALL.lm, dep_q=8))
    directory = write_weights_dir(random_model(moshi_like), tmp_path / "moshi")
    loaded = load_model(directory, preset="personaplex-7b", device="cpu")
    assert loaded.config.lm.dep_q == 8 and len(loaded.lm.linears) == 8


def test_hub_id_without_huggingface_hub_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_hub(name: str, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(RuntimeError, match=r"huggingface_hub is not installed.*npc-voice\[hub\]"):
        load_model("nvidia/personaplex-7b-v1", device="cpu")
    with pytest.raises(FileNotFoundError):
        load_model("/no/such/weights", device="cpu")


def test_7b_configuration_has_the_official_layout() -> None:
    """The real checkpoint's facts: 475 LM tensors, 8.37 B parameters, per-step depformer weights."""
    with torch.device("meta"):
        lm = PersonaPlexLM(PRESETS["personaplex-7b"].lm)
        mimi = Mimi(PRESETS["personaplex-7b"].mimi)
    state = lm.state_dict()
    assert len(state) == 475
    assert abs(sum(t.numel() for t in state.values()) / 1e9 - 8.37) < 0.01
    assert state["text_emb.weight"].shape == (32001, 4096)
    assert state["emb.15.weight"].shape == (2049, 4096)
    assert state["transformer.layers.31.gating.linear_in.weight"].shape == (22528, 4096)
    assert state["transformer.layers.0.norm1.alpha"].shape == (1, 1, 4096)
    assert state["depformer.layers.5.self_attn.in_proj_weight"].shape == (16 * 3 * 1024, 1024)
    assert state["depformer.layers.0.gating.15.linear_in.weight"].shape == (2 * 2816, 1024)
    assert state["linears.15.weight"].shape == (2048, 1024)
    assert state["depformer_emb.14.weight"].shape == (2049, 1024)
    mimi_state = mimi.state_dict()
    assert mimi_state["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"].shape == (2048, 256)
    assert "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight" in mimi_state

"""Sanity checks of the golden fixtures (tests/fixtures/golden/, made by tools/golden/make_golden.py).

Only the files themselves are checked here: presence, official key names, shapes, dtypes, value ranges.
Parity of our implementation against these reference outputs is tested elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

B, T_LM, T_MIMI, FRAME = 2, 40, 40, 1920
DIM, DEP_DIM, DEP_Q, N_Q, CARD, TEXT_CARD = 32, 16, 16, 16, 1024, 1000

FILES = [
    "README.md",
    "config.json",
    "mimi_config.json",
    "model.safetensors",
    "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_spm_32k_3.model",
    "reference.safetensors",
]


@pytest.fixture(scope="module")
def lm_state(golden_dir):
    return load_file(str(golden_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def mimi_state(golden_dir):
    return load_file(str(golden_dir / "tokenizer-e351c8d8-checkpoint125.safetensors"))


@pytest.fixture(scope="module")
def reference(golden_dir):
    return load_file(str(golden_dir / "reference.safetensors"))


def test_files_exist_within_budget(golden_dir):
    for name in FILES:
        assert (golden_dir / name).is_file(), name
    total = sum(p.stat().st_size for p in golden_dir.iterdir() if p.is_file())
    assert total < 5_200_000, f"golden fixtures are {total} bytes, over the ~5 MB budget"


def test_config(golden_dir):
    config = json.loads((golden_dir / "config.json").read_text())
    assert config["moshi_name"] == "model.safetensors"
    assert config["mimi_name"] == "tokenizer-e351c8d8-checkpoint125.safetensors"
    assert config["mimi_config_name"] == "mimi_config.json"
    assert config["tokenizer_name"] == "tokenizer_spm_32k_3.model"
    assert (config["dim"], config["num_layers"], config["num_heads"], config["context"]) == (DIM, 2, 2, 16)
    assert (config["n_q"], config["dep_q"], config["card"], config["text_card"]) == (N_Q, DEP_Q, CARD, TEXT_CARD)
    assert config["delays"] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert config["depformer_dim"] == DEP_DIM and config["depformer_dim_feedforward"] == 66
    assert config["depformer_weights_per_step"] and config["depformer_multi_linear"]
    assert config["depformer_pos_emb"] == "none" and config["norm"] == "rms_norm_f32"
    assert config["existing_text_padding_id"] == 3

    mimi = json.loads((golden_dir / "mimi_config.json").read_text())
    assert mimi["seanet"]["n_filters"] == 8 and mimi["seanet"]["dimension"] == 32
    assert mimi["seanet"]["ratios"] == [8, 6, 5, 4]
    assert mimi["transformer"]["context"] == 8 and mimi["transformer"]["d_model"] == 32
    assert mimi["quantizer"]["n_q"] == 8 and mimi["quantizer"]["bins"] == 1024
    assert mimi["quantizer"]["dimension"] == 16


def test_lm_checkpoint_official_names(lm_state):
    hidden = 2 * int(4.125 * DIM) // 3  # 88
    dep_hidden = 2 * int(4.125 * DEP_DIM) // 3  # 44
    expected = {
        "text_emb.weight": (TEXT_CARD + 1, DIM),
        "emb.0.weight": (CARD + 1, DIM),
        "emb.15.weight": (CARD + 1, DIM),
        "text_linear.weight": (TEXT_CARD, DIM),
        "out_norm.alpha": (1, 1, DIM),
        "transformer.layers.0.self_attn.in_proj_weight": (3 * DIM, DIM),
        "transformer.layers.1.self_attn.out_proj.weight": (DIM, DIM),
        "transformer.layers.0.norm1.alpha": (1, 1, DIM),
        "transformer.layers.1.norm2.alpha": (1, 1, DIM),
        "transformer.layers.0.gating.linear_in.weight": (2 * hidden, DIM),
        "transformer.layers.1.gating.linear_out.weight": (DIM, hidden),
        "depformer_in.0.weight": (DEP_DIM, DIM),
        "depformer_in.15.weight": (DEP_DIM, DIM),
        "depformer_text_emb.weight": (TEXT_CARD + 1, DEP_DIM),
        "depformer_emb.0.weight": (CARD + 1, DEP_DIM),
        "depformer_emb.14.weight": (CARD + 1, DEP_DIM),
        "depformer.layers.0.self_attn.in_proj_weight": (DEP_Q * 3 * DEP_DIM, DEP_DIM),
        "depformer.layers.1.self_attn.out_proj.weight": (DEP_Q * DEP_DIM, DEP_DIM),
        "depformer.layers.0.norm1.alpha": (1, 1, DEP_DIM),
        "depformer.layers.0.gating.0.linear_in.weight": (2 * dep_hidden, DEP_DIM),
        "depformer.layers.0.gating.15.linear_in.weight": (2 * dep_hidden, DEP_DIM),
        "depformer.layers.1.gating.15.linear_out.weight": (DEP_DIM, dep_hidden),
        "linears.0.weight": (CARD, DEP_DIM),
        "linears.15.weight": (CARD, DEP_DIM),
    }
    for key, shape in expected.items():
        assert key in lm_state, key
        assert tuple(lm_state[key].shape) == shape, (key, lm_state[key].shape)
    assert "depformer_emb.15.weight" not in lm_state
    assert "depformer.layers.0.gating.16.linear_in.weight" not in lm_state
    assert not [k for k in lm_state if "in_projs" in k or "out_projs" in k]
    assert {v.dtype for v in lm_state.values()} == {torch.bfloat16}
    # 8 + 16 + 16 + 15 + (2 layers x 6) + (2 layers x (2 + 2 + 2 x 16)) + out_norm, text_emb, text_linear,
    # depformer_text_emb
    assert len(lm_state) == 16 + 16 + 16 + 15 + 2 * 6 + 2 * (4 + 2 * DEP_Q) + 4
    # Norm gains are randomised around 1, not left at their init value.
    alpha = lm_state["out_norm.alpha"].float()
    assert 0.5 < float(alpha.mean()) < 1.5 and float(alpha.std()) > 0.01


def test_mimi_checkpoint_official_names(mimi_state):
    for prefix in ("encoder_transformer", "decoder_transformer"):
        for layer in (0, 1):
            key = f"{prefix}.transformer.layers.{layer}.self_attn.in_proj_weight"
            assert tuple(mimi_state[key].shape) == (96, 32), key
            assert tuple(mimi_state[f"{prefix}.transformer.layers.{layer}.self_attn.out_proj.weight"].shape) == (32, 32)
            assert f"{prefix}.transformer.layers.{layer}.layer_scale_1.scale" in mimi_state
    assert not [k for k in mimi_state if "in_projs" in k or "out_projs" in k]
    codebooks = [f"quantizer.rvq_first.vq.layers.0._codebook"] + [
        f"quantizer.rvq_rest.vq.layers.{i}._codebook" for i in range(7)
    ]
    for cb in codebooks:
        assert tuple(mimi_state[f"{cb}.embedding_sum"].shape) == (1024, 16), cb
        usage = mimi_state[f"{cb}.cluster_usage"]
        assert tuple(usage.shape) == (1024,) and bool((usage > 0).all()), cb
        assert float(mimi_state[f"{cb}._initialized"].float().item()) == 1.0
    assert "quantizer.rvq_rest.vq.layers.7._codebook.embedding_sum" not in mimi_state
    assert tuple(mimi_state["quantizer.rvq_first.input_proj.weight"].shape) == (16, 32, 1)
    assert tuple(mimi_state["quantizer.rvq_rest.output_proj.weight"].shape) == (32, 16, 1)
    assert "encoder.model.0.conv.conv.weight" in mimi_state
    assert "decoder.model.0.conv.conv.weight" in mimi_state
    assert tuple(mimi_state["downsample.conv.conv.conv.weight"].shape) == (32, 32, 4)
    assert tuple(mimi_state["upsample.convtr.convtr.convtr.weight"].shape) == (32, 1, 4)


def test_reference_shapes(reference, golden_dir):
    depth_steps = reference["depth_steps"].tolist()
    pcm_frames = reference["pcm_frames"].tolist()
    expected = {
        "lm_input": ((B, N_Q + 1, T_LM), torch.int64),
        "depth_input": ((B, T_LM, DEP_Q), torch.int64),
        "text_logits": ((B, T_LM, TEXT_CARD), torch.float32),
        "transformer_out": ((B, T_LM, DIM), torch.float32),
        "depth_hidden": ((B, T_LM, DEP_Q, DEP_DIM), torch.float32),
        "depth_steps": ((len(depth_steps),), torch.int64),
        "depth_logits_at": ((B, len(depth_steps), DEP_Q, CARD), torch.float32),
        "depth_argmax": ((B, T_LM, DEP_Q), torch.int64),
        "depth_logsumexp": ((B, T_LM, DEP_Q), torch.float32),
        "pcm": ((B, 1, T_MIMI * FRAME), torch.bfloat16),
        "codes_stream": ((B, 8, T_MIMI), torch.int64),
        "codes_whole": ((B, 8, T_MIMI), torch.int64),
        "pcm_frames": ((len(pcm_frames),), torch.int64),
        "pcm_stream": ((B, 1, len(pcm_frames) * FRAME), torch.float32),
        "pcm_whole": ((B, 1, len(pcm_frames) * FRAME), torch.float32),
        "pcm_stream_stats": ((B, T_MIMI, 2), torch.float32),
        "pcm_whole_stats": ((B, T_MIMI, 2), torch.float32),
        "code_margins": ((B, 8, T_MIMI), torch.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(reference[key].shape) == shape, (key, reference[key].shape)
        assert reference[key].dtype == dtype, (key, reference[key].dtype)
    assert depth_steps == sorted(set(depth_steps)) and 0 <= depth_steps[0] and depth_steps[-1] < T_LM
    assert pcm_frames == sorted(set(pcm_frames)) and 0 <= pcm_frames[0] and pcm_frames[-1] < T_MIMI

    with safe_open(str(golden_dir / "reference.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["golden"])
    assert meta["moshi_version"] == "0.2.13"
    assert json.loads(meta["depth_steps"]) == depth_steps
    assert json.loads(meta["pcm_frames"]) == pcm_frames


def test_reference_values(reference):
    lm_input = reference["lm_input"]
    text, audio = lm_input[:, 0], lm_input[:, 1:]
    assert bool(((text >= -1) & (text <= TEXT_CARD)).all())
    assert bool(((audio >= -1) & (audio <= CARD)).all())
    assert bool((lm_input[:, :, 0] == torch.tensor([TEXT_CARD] + [CARD] * N_Q)).all())
    assert int((lm_input == -1).sum()) > 0  # some "zero" tokens
    depth_input = reference["depth_input"]
    assert bool(((depth_input[..., 0] >= 0) & (depth_input[..., 0] < TEXT_CARD)).all())
    assert bool(((depth_input[..., 1:] >= 0) & (depth_input[..., 1:] < CARD)).all())
    for key in ("text_logits", "transformer_out", "depth_hidden", "depth_logits_at", "pcm_stream", "pcm_whole"):
        assert bool(torch.isfinite(reference[key]).all()), key
    # Stored depth logits agree with the all-step summaries.
    steps = reference["depth_steps"]
    d = reference["depth_logits_at"]
    assert torch.equal(d.argmax(-1), reference["depth_argmax"][:, steps])
    torch.testing.assert_close(torch.logsumexp(d, -1), reference["depth_logsumexp"][:, steps])
    pcm = reference["pcm"].float()
    assert 0.1 < float(pcm.abs().max()) < 1.0
    for key in ("codes_stream", "codes_whole"):
        codes = reference[key]
        assert bool(((codes >= 0) & (codes < 1024)).all()), key
    assert len(set(reference["codes_stream"][:, 0].flatten().tolist())) > 4  # not a constant code
    # Streaming and whole-clip agree until the Mimi transformer's context (8 steps = 4 frames) wraps.
    assert torch.equal(reference["codes_stream"][..., :4], reference["codes_whole"][..., :4])
    assert float(reference["code_margins"].min()) > 1e-4


def test_logits_rebuild_from_stored_vectors(golden_reference, lm_state):
    """The logits are linear maps of the stored vectors: what `load_golden_reference` rebuilds equals
    moshi's own logits where they are stored, and matches the all-step argmax / logsumexp."""
    ref = golden_reference
    depth = ref["depth_logits"]
    assert tuple(depth.shape) == (B, T_LM, DEP_Q, CARD)
    torch.testing.assert_close(depth[:, ref["depth_steps"]], ref["depth_logits_at"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.logsumexp(depth, -1), ref["depth_logsumexp"], rtol=0, atol=1e-5)
    assert float((depth.argmax(-1) == ref["depth_argmax"]).float().mean()) > 0.99  # ties aside
    text = ref["transformer_out"] @ lm_state["text_linear.weight"].float().T
    torch.testing.assert_close(text, ref["text_logits"], rtol=0, atol=1e-5)
    assert ref["pcm"].dtype == torch.float32

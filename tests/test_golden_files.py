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
    "generation.safetensors",
]
# generation.safetensors: LMGen greedy (B streams, T steps); prompt of V voice frames, 6 + ROLE + 6
# frames (F in all), then N conversation frames, at contexts 64 ("short") and 16 ("long").
GEN_B, GEN_T, V, ROLE_TOKENS, N = 2, 40, 6, 20, 24
F = V + 6 + ROLE_TOKENS + 6
CASES = {"short": 64, "long": 16}
PAD = 3


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
    assert total < 8_000_000, f"golden fixtures are {total} bytes, over the ~8 MB budget"


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
    codebooks = ["quantizer.rvq_first.vq.layers.0._codebook"] + [
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


@pytest.fixture(scope="module")
def generation(golden_dir):
    return load_file(str(golden_dir / "generation.safetensors"))


@pytest.fixture(scope="module")
def generation_meta(golden_dir):
    with safe_open(str(golden_dir / "generation.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["golden"])


def test_generation_shapes(generation, generation_meta):
    long, f32 = torch.int64, torch.float32
    expected = {
        "gen_user_codes": ((GEN_B, GEN_T, 8), long),
        "gen_tokens": ((GEN_B, GEN_T, 9), long),
        "gen_sampled": ((GEN_B, GEN_T, 9), long),
        "gen_text_logits": ((GEN_B, GEN_T, TEXT_CARD), f32),
        "gen_margins": ((GEN_B, GEN_T, 9), f32),
        "voice_raw": ((10800,), f32),
        "voice_normalized": ((V * FRAME,), f32),
        "voice_codes": ((V, 8), long),
        "voice_code_margins": ((V, 8), f32),
        "sine_codes": ((8,), long),
        "silence_codes": ((8,), long),
        "special_code_margins": ((2, 8), f32),
        "role_tokens": ((ROLE_TOKENS,), long),
        "prompt_text": ((F,), long),
        "prompt_agent": ((F, 8), long),
        "conv_pcm": ((N, FRAME), torch.bfloat16),
        "conv_user_codes": ((N, 8), long),
    }
    for case, context in CASES.items():
        n = min(F, context)
        expected.update({
            f"{case}_kv": ((2, 2, 2, n, DIM // 2), f32),
            f"{case}_kv_positions": ((n,), long),
            f"{case}_ring": ((N_Q + 1, 3), long),
            f"{case}_first_frame": ((9,), long),
            f"{case}_text_logits": ((N + 1, TEXT_CARD), f32),
            f"{case}_tokens": ((N, 9), long),
            f"{case}_pcm_first": ((FRAME,), f32),
            f"{case}_pcm": ((N, FRAME), f32),
            f"{case}_margins": ((N, 9), f32),
            f"{case}_margin_first": ((2,), f32),
        })
    assert set(generation) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(generation[key].shape) == shape, (key, generation[key].shape)
        assert generation[key].dtype == dtype, (key, generation[key].dtype)
    assert generation_meta["contexts"] == CASES and generation_meta["conv_frames"] == N
    assert generation_meta["fork_checked"] is True  # cross-checked against NVIDIA's fork when made
    assert generation_meta["role"].strip()


def test_generation_lmgen_values(generation):
    g = generation
    tokens, sampled = g["gen_tokens"], g["gen_sampled"]
    assert bool((tokens[:, 0] == -2).all())
    assert bool(((tokens[:, 1:, 0] >= 0) & (tokens[:, 1:, 0] < TEXT_CARD)).all())
    assert bool(((tokens[:, 1:, 1:] >= 0) & (tokens[:, 1:, 1:] < CARD)).all())
    # The delays, seen in two recordings of the same run (hooks vs outputs): frame t's text and
    # codebook 0 were sampled at step t-1, its codebooks 1..7 at step t.
    assert torch.equal(tokens[:, 1:, :2], sampled[:, :-1, :2])
    assert torch.equal(tokens[:, 1:, 2:], sampled[:, 1:, 2:])
    assert torch.equal(g["gen_text_logits"].argmax(-1), sampled[..., 0])  # greedy
    assert float(g["gen_margins"].min()) > 2e-4  # no near-ties: tokens are a fair test
    assert len(set(tokens[:, 1:, 0].flatten().tolist())) > 10  # not a constant


def test_generation_prompt_values(generation, golden_dir):
    g = generation
    silence, sine = g["silence_codes"], g["sine_codes"]
    for codes in (silence, sine, g["voice_codes"], g["conv_user_codes"]):
        assert bool(((codes >= 0) & (codes < CARD)).all())
    assert float(g["special_code_margins"].min()) > 2e-4 and float(g["voice_code_margins"].min()) > 2e-4
    # The prompt's order: voice, 6 silence, role (one token a frame), 6 silence.
    assert torch.equal(g["prompt_agent"][:V], g["voice_codes"])
    assert bool((g["prompt_agent"][V:] == silence).all())
    role = slice(V + 6, V + 6 + ROLE_TOKENS)
    assert torch.equal(g["prompt_text"][role], g["role_tokens"])
    assert int((g["prompt_text"] != PAD).sum()) == ROLE_TOKENS
    # The voice was normalised (louder than the raw clip) and framed with zero padding.
    raw, norm = g["voice_raw"], g["voice_normalized"]
    assert float(norm.abs().max()) > 2 * float(raw.abs().max())
    assert bool((norm[raw.shape[0]:] == 0).all())
    # The user audio and its codes are those of reference.safetensors (one stream, from the start).
    reference = load_file(str(golden_dir / "reference.safetensors"))
    with safe_open(str(golden_dir / "generation.safetensors"), framework="pt") as f:
        stream = json.loads(f.metadata()["golden"])["user_stream"]
    assert torch.equal(g["conv_pcm"].reshape(-1), reference["pcm"][stream, 0, : N * FRAME])
    assert torch.equal(g["conv_user_codes"], reference["codes_stream"][stream, :, :N].T)

    for case, context in CASES.items():
        positions = g[f"{case}_kv_positions"]
        assert positions.tolist() == list(range(max(0, F - context), F))
        first = g[f"{case}_first_frame"]
        assert int(first[0]) == PAD and torch.equal(first[1:], silence)
        ring, tokens = g[f"{case}_ring"], g[f"{case}_tokens"]
        # Position F-1 (all forced): text PAD, codebook 0 SILENCE, codebooks 1..7 of frame F-2
        # (SILENCE), user SINE. Position F: the chosen text and codebook 0 = frame F's, which is the
        # first conversation frame; delayed codebooks of frame F-1 (SILENCE / SINE).
        assert int(ring[0, 1]) == PAD and torch.equal(ring[1:9, 1], silence)
        assert torch.equal(ring[9:, 1], sine)
        assert torch.equal(ring[:2, 2], tokens[0, :2])
        assert torch.equal(ring[2:9, 2], silence[1:]) and torch.equal(ring[10:, 2], sine[1:])
        assert int(ring[9, 2]) == -2
        assert bool(((tokens[:, 0] >= 0) & (tokens[:, 0] < TEXT_CARD)).all())
        assert bool(((tokens[:, 1:] >= 0) & (tokens[:, 1:] < CARD)).all())
        # Greedy: the logits of position F-1+c give the text of frame F+c.
        assert torch.equal(g[f"{case}_text_logits"][:-1].argmax(-1), tokens[:, 0])
        assert min(float(g[f"{case}_margins"].min()), float(g[f"{case}_margin_first"].min())) > 2e-4
        for key in ("kv", "text_logits", "pcm", "pcm_first"):
            assert bool(torch.isfinite(g[f"{case}_{key}"]).all()), (case, key)
        assert float(g[f"{case}_pcm"].abs().max()) > 0.01
    # The context matters: the cases part ways (the long prompt no longer sees its start).
    assert not torch.equal(g["short_tokens"], g["long_tokens"])
    assert not torch.allclose(g["short_kv"][:, :, :, -16:], g["long_kv"])

"""Mimi codec: checkpoint layout, streaming == whole clip, per-slot isolation of skip and reset."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npc_voice.model.config import PRESETS, MimiConfig, MimiTransformerConfig, QuantizerConfig, SEANetConfig
from npc_voice.model.mimi import Mimi, MimiState, convs
from npc_voice.model.mimi.convs import StreamingConv1d, StreamingConvTranspose1d

TINY = PRESETS["tiny"].mimi
FRAME = TINY.frame_size

# Keys and shapes of Kyutai's released Mimi (`tokenizer-e351c8d8-checkpoint125.safetensors`): the
# state_dict of moshi 0.2.13's `get_mimi(None)` with the attention weights under their checkpoint
# names (`in_proj_weight`, `out_proj.weight`), as sorted "key (shape)" lines, hashed.
OFFICIAL_NUM_KEYS = 318
OFFICIAL_LAYOUT_SHA256 = "973eb9d2eee7899a22476b5638d0c6d85f3eb52213e4ab7a05544662645b06db"


@torch.no_grad()
def random_mimi(cfg: MimiConfig = TINY, seed: int = 0) -> Mimi:
    """Random weights that make every part matter: layer scales well above their 0.01 init, and
    codebooks at the scale of the latents they quantize (each one smaller, as for residuals), with
    uneven positive usage so that embedding_sum / cluster_usage is exercised."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mimi = Mimi(cfg).eval()
    for name, p in mimi.named_parameters():
        if name.endswith(".scale"):
            p.uniform_(0.05, 0.3, generator=g)
        elif ".norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    pcm = 0.1 * torch.randn(2, 1, 4 * cfg.frame_size, generator=g)
    latent = mimi.downsample(mimi.encoder_transformer(mimi.encoder(pcm)))
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        std = rvq.input_proj(latent).std().item()
        for layer in rvq.vq.layers:
            usage = 0.5 + 2.0 * torch.rand(cfg.quantizer.bins, generator=g)
            layer._codebook.cluster_usage.copy_(usage)
            layer._codebook.embedding_sum.copy_(std * torch.randn(cfg.quantizer.bins, cfg.quantizer.dimension,
                                                                  generator=g) * usage[:, None])
            std *= 0.7
    return mimi


def random_pcm(batch: int, frames: int, seed: int = 1, frame: int = FRAME) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * frame) / 24_000
    tone = torch.sin(2 * torch.pi * 220 * t * (1 + torch.arange(batch)[:, None]))  # [B, N]
    return (0.3 * tone + 0.05 * torch.randn(batch, frames * frame, generator=g))[:, None]  # [B, 1, N]


@torch.no_grad()
def stream(mimi: Mimi, pcm: torch.Tensor, state: MimiState | None = None,
           active: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encodes `pcm` frame by frame and decodes the codes it gets: codes [B, K, F], pcm [B, 1, N]."""
    B, frames = pcm.shape[0], pcm.shape[-1] // mimi.frame_size
    state = state or mimi.init_state(B)
    codes, out = [], []
    for f in range(frames):
        a = active[f] if active else None
        c = mimi.encode_step(pcm[..., f * mimi.frame_size:(f + 1) * mimi.frame_size], state.encoder, a)
        codes.append(c)
        out.append(mimi.decode_step(c, state.decoder, a))
    return torch.stack(codes, dim=-1), torch.cat(out, dim=-1)


# ---- checkpoint layout --------------------------------------------------------------------------

def test_state_dict_matches_official_checkpoint_layout() -> None:
    with torch.device("meta"):
        mimi = Mimi(PRESETS["personaplex-7b"].mimi)
    sd = mimi.state_dict()
    layout = "\n".join(sorted(f"{k} {tuple(v.shape)}" for k, v in sd.items()))
    assert len(sd) == OFFICIAL_NUM_KEYS
    assert hashlib.sha256(layout.encode()).hexdigest() == OFFICIAL_LAYOUT_SHA256
    # A few readable spot checks of the same thing.
    assert sd["encoder.model.3.conv.conv.weight"].shape == (128, 64, 8)
    assert sd["decoder.model.2.convtr.convtr.weight"].shape == (1024, 512, 16)
    assert sd["encoder_transformer.transformer.layers.7.self_attn.in_proj_weight"].shape == (1536, 512)
    assert sd["downsample.conv.conv.conv.weight"].shape == (512, 512, 4)
    assert sd["upsample.convtr.convtr.convtr.weight"].shape == (512, 1, 4)  # depthwise
    assert sd["quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"].shape == (2048, 256)
    assert sd["quantizer.rvq_first.vq.layers.0._codebook._initialized"].shape == (1,)


def test_strict_round_trip_and_centroids() -> None:
    src = random_mimi(seed=3)
    dst = Mimi(TINY)
    dst.load_state_dict(src.state_dict(), strict=True)
    pcm = random_pcm(1, 3)
    with torch.no_grad():
        assert torch.equal(src.encode(pcm), dst.encode(pcm))
    cb = dst.quantizer.rvq_rest.vq.layers[2]._codebook
    cb.cluster_usage[0] = 0.0  # clamped to epsilon, not a division by zero
    expected = cb.embedding_sum / cb.cluster_usage.clamp(min=TINY.quantizer.epsilon)[:, None]
    assert torch.equal(cb.embedding, expected)
    codes = torch.tensor([[0, 5, 2047]])
    assert torch.equal(cb.decode(codes), expected[codes])


def test_num_codebooks_is_validated() -> None:
    with pytest.raises(ValueError):
        Mimi(dataclasses.replace(TINY, num_codebooks=TINY.quantizer.n_q + 1))


# ---- whole clip vs streaming --------------------------------------------------------------------

def test_whole_clip_shapes_and_padding() -> None:
    mimi = random_mimi()
    with torch.no_grad():
        codes = mimi.encode(random_pcm(2, 3)[..., : 2 * FRAME + 7])  # padded to 3 frames
        assert codes.shape == (2, TINY.num_codebooks, 3) and codes.dtype == torch.long
        assert 0 <= codes.min() and codes.max() < TINY.quantizer.bins
        assert mimi.decode(codes).shape == (2, 1, 3 * FRAME)
        # PCM of another float dtype is cast to the weights' dtype, whole clip and streaming alike.
        half = random_pcm(2, 1).bfloat16()
        assert torch.equal(mimi.encode(half), mimi.encode(half.float()))
        assert torch.equal(mimi.encode_step(half, mimi.init_encoder_state(2)), mimi.encode(half.float())[..., 0])


def test_streaming_matches_whole_clip() -> None:
    mimi = random_mimi()
    pcm = random_pcm(2, 8)
    with torch.no_grad():
        whole_codes = mimi.encode(pcm)
        whole_pcm = mimi.decode(whole_codes)
    codes, out = stream(mimi, pcm)
    assert whole_codes.unique().numel() > 20, "codes should not collapse onto a few centroids"
    assert torch.equal(codes, whole_codes)
    assert torch.allclose(out, whole_pcm, rtol=0, atol=1e-5 * whole_pcm.abs().max().item())
    assert out.abs().max() > 1e-3


# d_model != SEANet dimension (input/output projections), conv shortcuts, replicate padding, odd ratios
LEARNT_SKIPS = MimiConfig(
    seanet=SEANetConfig(dimension=24, n_filters=4, ratios=(4, 3, 2), true_skip=False, pad_mode="replicate",
                        n_residual_layers=2),
    transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64),
    quantizer=QuantizerConfig(dimension=16, n_q=5, n_q_semantic=2, bins=64),
    sample_rate=24_000, frame_rate=24_000 / 48, num_codebooks=4,
)


def test_streaming_matches_whole_clip_with_projections_and_learnt_skips() -> None:
    """d_model != SEANet dimension (input/output projections), conv shortcuts, replicate padding."""
    cfg = LEARNT_SKIPS
    mimi = random_mimi(cfg, seed=5)
    assert "encoder_transformer.input_proj.weight" in mimi.state_dict()
    assert "encoder.model.1.shortcut.conv.conv.weight" in mimi.state_dict()
    pcm = random_pcm(2, 10, frame=cfg.frame_size)
    with torch.no_grad():
        whole_codes = mimi.encode(pcm)
        whole_pcm = mimi.decode(whole_codes)
    codes, out = stream(mimi, pcm)
    assert torch.equal(codes, whole_codes)
    assert torch.allclose(out, whole_pcm, rtol=0, atol=1e-5 * whole_pcm.abs().max().item())


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_conv_streaming_matches_whole(pad_mode: str) -> None:
    x = torch.randn(2, 3, 48)
    for kernel, stride, dilation in itertools.product([1, 3, 4, 8], [1, 2, 4], [1, 2]):
        if stride > kernel or (stride > 1 and dilation > 1):
            continue
        conv = StreamingConv1d(3, 5, kernel, stride, dilation=dilation, pad_mode=pad_mode)
        convtr = StreamingConvTranspose1d(5, 3, kernel, stride)
        with torch.no_grad():
            y, z = conv(x), convtr(conv(x))
            cs, ts = conv.init_state(2, x.device, x.dtype), convtr.init_state(2, x.device, x.dtype)
            ys, zs = [], []
            for chunk in x.split(4 * stride, dim=-1):
                ys.append(conv.step(chunk, cs))
                zs.append(convtr.step(ys[-1], ts))
        assert y.shape[-1] == x.shape[-1] // stride and z.shape[-1] == x.shape[-1]
        torch.testing.assert_close(torch.cat(ys, -1), y, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat(zs, -1), z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride, T", [(2, 1), (2, 5), (4, 3)])
def test_the_written_out_depthwise_upsampling_is_pytorchs_transposed_conv(stride: int, T: int) -> None:
    """Mimi's depthwise upsampling (kernel 2 * stride, no bias) runs as two products and an
    overlap-add instead of cuDNN's transposed conv: the same numbers, whole and streamed."""
    up = StreamingConvTranspose1d(6, 6, 2 * stride, stride, groups=6, bias=False)
    x = torch.randn(2, 6, T)
    with torch.no_grad():
        torch.testing.assert_close(up._transposed(x), up.convtr.convtr(x), rtol=1e-6, atol=1e-6)
        whole = up(x)
        state = up.init_state(2, x.device, x.dtype)
        streamed = torch.cat([up.step(x[..., t : t + 1], state) for t in range(T)], dim=-1)
    assert whole.shape == (2, 6, T * stride)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)


# ---- per-slot isolation -------------------------------------------------------------------------

def test_skipped_slot_is_frozen_and_others_unchanged() -> None:
    mimi = random_mimi()
    pcm = random_pcm(3, 6)
    ref_codes, ref_pcm = stream(mimi, pcm)

    state = mimi.init_state(3)
    skip = torch.tensor([True, False, True])
    # Slot 1 sits out frame 0 (its stream, replicate padding included, starts at frame 1) and 2-3.
    active = [skip, None, skip, skip, None, None]
    # Slot 1's input on the skipped frames is junk: it must not leak anywhere.
    noisy = pcm.clone()
    noisy[1, :, :FRAME] = torch.randn(1, FRAME)
    noisy[1, :, 2 * FRAME:4 * FRAME] = torch.randn(1, 2 * FRAME)
    frozen: list[torch.Tensor] = []

    codes, out = [], []
    with torch.no_grad():
        for f in range(6):
            if f == 2:
                frozen = [t.clone() for t in state.slot_view(1)]
            if f == 4:
                assert all(torch.equal(a, t) for a, t in zip(frozen, state.slot_view(1), strict=True))
            c = mimi.encode_step(noisy[..., f * FRAME:(f + 1) * FRAME], state.encoder, active[f])
            codes.append(c)
            out.append(mimi.decode_step(c, state.decoder, active[f]))
    codes_t, out_t = torch.stack(codes, -1), torch.cat(out, -1)
    for slot in (0, 2):
        assert torch.equal(codes_t[slot], ref_codes[slot])
        assert torch.equal(out_t[slot], ref_pcm[slot])
    # Slot 1 resumes as if the skipped frames never happened.
    kept = torch.cat([pcm[1:2, :, FRAME:2 * FRAME], pcm[1:2, :, 4 * FRAME:]], dim=-1)
    alone_codes, alone_pcm = stream(mimi, kept.expand(3, -1, -1).contiguous())
    assert torch.equal(codes_t[1][:, [1, 4, 5]], alone_codes[0])
    torch.testing.assert_close(out_t[1:2, :, FRAME:2 * FRAME], alone_pcm[:1, :, :FRAME], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_t[1:2, :, 4 * FRAME:], alone_pcm[:1, :, FRAME:], rtol=0, atol=1e-6)


def test_reset_slot_restarts_it_and_leaves_others_unchanged() -> None:
    mimi = random_mimi()
    pcm = random_pcm(3, 6)
    ref_codes, ref_pcm = stream(mimi, pcm)
    k = 3
    state = mimi.init_state(3)
    head_codes, head_pcm = stream(mimi, pcm[..., : k * FRAME], state)
    state.reset(torch.tensor([False, True, False]))
    tail_codes, tail_pcm = stream(mimi, pcm[..., k * FRAME:], state)
    codes, out = torch.cat([head_codes, tail_codes], -1), torch.cat([head_pcm, tail_pcm], -1)
    for slot in (0, 2):
        assert torch.equal(codes[slot], ref_codes[slot])
        assert torch.equal(out[slot], ref_pcm[slot])
    # The reset slot is a fresh stream started at frame k (same batch shape: bit-identical).
    fresh_codes, fresh_pcm = stream(mimi, pcm[..., k * FRAME:])
    assert torch.equal(tail_codes[1], fresh_codes[1])
    assert torch.equal(tail_pcm[1], fresh_pcm[1])
    assert not torch.equal(tail_codes[1], ref_codes[1, :, k:]) or not torch.equal(tail_pcm[1], ref_pcm[1, :, k * FRAME:])


def test_copy_slot_clones_a_stream() -> None:
    mimi = random_mimi()
    pcm = random_pcm(2, 4)
    state = mimi.init_state(2)
    stream(mimi, pcm[..., : 2 * FRAME], state)
    state.copy_slot(state, 0, 1)
    same = pcm[:1, :, 2 * FRAME:].expand(2, -1, -1).contiguous()
    codes, out = stream(mimi, same, state)
    assert torch.equal(codes[0], codes[1]) and torch.equal(out[0], out[1])


# ---- golden fixtures (Kyutai moshi 0.2.13 outputs, written by tools/golden/make_golden.py) --------

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@torch.no_grad()
def test_golden_reference_outputs(golden_dir: Path) -> None:
    """The reference checkpoint loads with a plain strict load_state_dict; codes equal moshi's exactly
    and PCM matches to 1e-4, whole clip and streaming. Its transformer context (8 steps) is shorter
    than the clip, so this also checks the ring KV cache past wrap-around."""
    needed = [golden_dir / n for n in ("mimi_config.json", MIMI_FILE, "reference.safetensors")]
    if not all(p.exists() for p in needed):
        pytest.skip("golden fixtures not generated (tools/golden/make_golden.py)")
    cfg = MimiConfig.from_kyutai(json.loads((golden_dir / "mimi_config.json").read_text()))
    ref = load_file(str(golden_dir / "reference.safetensors"))
    cfg = dataclasses.replace(cfg, num_codebooks=ref["codes_whole"].shape[1])
    mimi = Mimi(cfg).eval()
    mimi.load_state_dict({k: v.float() for k, v in load_file(str(golden_dir / MIMI_FILE)).items()}, strict=True)

    pcm = ref["pcm"].float()  # [B, 1, T * frame]
    assert torch.equal(mimi.encode(pcm), ref["codes_whole"])
    codes, _ = stream(mimi, pcm)
    assert torch.equal(codes, ref["codes_stream"])

    # Decoding is checked on moshi's streamed codes, both ways. A PCM reference holds either every
    # frame or only the frames listed in `pcm_frames`; per-frame RMS and peak, where stored, cover all.
    B, frame = pcm.shape[0], cfg.frame_size
    state = mimi.init_decoder_state(B)
    streamed = torch.cat([mimi.decode_step(c, state) for c in ref["codes_stream"].unbind(-1)], dim=-1)
    whole = mimi.decode(ref["codes_stream"])
    for name, out in (("pcm_stream", streamed), ("pcm_whole", whole)):
        per_frame = out[:, 0].reshape(B, -1, frame)  # [B, T, frame]
        if ref[name].shape[-1] != out.shape[-1]:
            out = per_frame[:, ref["pcm_frames"]].reshape(B, 1, -1)
        assert _max_rel(out, ref[name]) < 1e-4, name
        if name + "_stats" in ref:
            stats = torch.stack([per_frame.pow(2).mean(-1).sqrt(), per_frame.abs().amax(-1)], dim=-1)
            assert _max_rel(stats, ref[name + "_stats"]) < 1e-4, name


# ---- convs as matrix products (convs.CONV = "gemm") ------------------------------------------------

def _no_cudnn(*modules: torch.nn.Module) -> None:
    """Makes the PyTorch convs inside `modules` raise, so a test proves the gemm path ran."""
    def boom(*_: object) -> torch.Tensor:
        raise AssertionError("the cudnn conv ran where the gemm form was expected")

    for m in modules:
        for sub in m.modules():
            if isinstance(sub, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                sub.forward = boom


@torch.no_grad()
def _whole_and_streamed(layer: torch.nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    state = layer.init_state(x.shape[0], x.device, x.dtype)
    return layer(x), torch.cat([layer.step(c, state) for c in x.split(chunk, dim=-1)], dim=-1)


# (C_in, C_out, kernel, stride, dilation, pad_mode, bias): Mimi's own (first conv 7, residual 3 with
# dilations 1 and 2, 1x1s, encoder downsampling 2 * ratio for ratios 4, 5, 6, 8, frame-rate
# downsampling 4 / 2 replicate without bias, last conv 3) and a few odd ones.
CONV_CASES = [(1, 8, 7, 1, 1, "constant", True), (8, 4, 3, 1, 1, "constant", True),
              (8, 4, 3, 1, 2, "constant", True), (8, 4, 3, 1, 3, "replicate", True),
              (4, 8, 1, 1, 1, "constant", True), (8, 8, 1, 1, 1, "constant", False),
              (8, 16, 8, 4, 1, "constant", True), (8, 16, 10, 5, 1, "constant", True),
              (8, 16, 12, 6, 1, "constant", True), (4, 8, 16, 8, 1, "constant", True),
              (16, 16, 4, 2, 1, "replicate", False), (16, 1, 3, 1, 1, "constant", True),
              (3, 5, 5, 2, 1, "replicate", True), (3, 5, 4, 1, 3, "constant", True)]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, dilation, pad_mode, bias", CONV_CASES)
def test_gemm_conv_is_the_cudnn_conv(monkeypatch: pytest.MonkeyPatch, c_in: int, c_out: int, kernel: int,
                                     stride: int, dilation: int, pad_mode: str, bias: bool) -> None:
    """Conv1d as im2col + one matmul: the same numbers as PyTorch's conv (float64), whole clip and
    streamed chunk by chunk, for any kernel, stride, dilation and padding."""
    conv = StreamingConv1d(c_in, c_out, kernel, stride, dilation=dilation, bias=bias, pad_mode=pad_mode).double()
    x = torch.randn(2, c_in, 12 * stride, dtype=torch.float64)
    monkeypatch.setattr(convs, "CONV", "cudnn")
    with torch.no_grad():
        ref = conv(x)
    monkeypatch.setattr(convs, "CONV", "gemm")
    _no_cudnn(conv)
    whole, streamed = _whole_and_streamed(conv, x, 3 * stride)
    assert whole.shape == ref.shape == (2, c_out, 12)
    torch.testing.assert_close(whole, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed, ref, rtol=1e-12, atol=1e-12)


# (C_in, C_out, kernel, stride, groups, bias, gemm): Mimi's decoder upsampling (2 * ratio for ratios 8,
# 6, 5, 4), kernel 3 * stride, no overlap; falling back to cudnn: kernel not a multiple of the stride, grouped.
CONVTR_CASES = [(16, 8, 16, 8, 1, True, True), (16, 8, 12, 6, 1, True, True), (16, 8, 10, 5, 1, True, True),
                (16, 8, 8, 4, 1, False, True), (6, 4, 6, 2, 1, True, True), (6, 4, 3, 3, 1, True, True),
                (6, 4, 1, 1, 1, True, True), (6, 4, 5, 2, 1, True, False), (6, 4, 4, 2, 2, True, False)]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, groups, bias, gemm", CONVTR_CASES)
def test_gemm_transposed_conv_is_the_cudnn_one(monkeypatch: pytest.MonkeyPatch, c_in: int, c_out: int, kernel: int,
                                               stride: int, groups: int, bias: bool, gemm: bool) -> None:
    """ConvTranspose1d as one matmul and an overlap-add of K / S blocks: PyTorch's numbers (float64),
    untrimmed, whole clip and streamed; the cases it does not cover still run PyTorch's."""
    convtr = StreamingConvTranspose1d(c_in, c_out, kernel, stride, groups=groups, bias=bias).double()
    x = torch.randn(2, c_in, 7, dtype=torch.float64)
    monkeypatch.setattr(convs, "CONV", "cudnn")
    with torch.no_grad():
        full, ref = convtr.convtr.convtr(x), convtr(x)
    monkeypatch.setattr(convs, "CONV", "gemm")
    if gemm:
        _no_cudnn(convtr)
    with torch.no_grad():
        torch.testing.assert_close(convtr._transposed(x), full, rtol=1e-12, atol=1e-12)
    for chunk in (1, 3):
        whole, streamed = _whole_and_streamed(convtr, x, chunk)
        assert whole.shape == (2, c_out, 7 * stride)
        torch.testing.assert_close(whole, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(streamed, ref, rtol=1e-12, atol=1e-12)


def test_gemm_mimi_is_the_cudnn_mimi(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole codec with every conv as a matrix product (float64): the same codes and PCM as with
    PyTorch's convs, whole clip and streamed, on the tiny config and on one with learnt shortcuts,
    replicate padding and odd ratios."""
    for cfg, frames in ((TINY, 4), (LEARNT_SKIPS, 6)):
        mimi = random_mimi(cfg, seed=5).double()
        pcm = random_pcm(2, frames, frame=cfg.frame_size).double()
        results = {}
        for mode in ("cudnn", "gemm"):
            monkeypatch.setattr(convs, "CONV", mode)
            with torch.no_grad():
                codes = mimi.encode(pcm)
                results[mode] = (codes, mimi.decode(codes), *stream(mimi, pcm))
        _no_cudnn(mimi.encoder, mimi.decoder, mimi.downsample)  # the depthwise upsampling is always written out
        with torch.no_grad():
            mimi.encode_step(pcm[..., : cfg.frame_size], mimi.init_encoder_state(2))
            mimi.decode_step(results["gemm"][0][..., 0], mimi.init_decoder_state(2))
        ref, got = results["cudnn"], results["gemm"]
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
        for a, b in ((got[1], ref[1]), (got[3], ref[3])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * b.abs().max().item())


def test_gemm_conv_steps_compile_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """One streaming step of each gemm conv (dilated, replicate-padded strided, transposed) traces as
    a single graph with no break, as the GPU step's torch.compile(fullgraph=True) needs."""
    monkeypatch.setattr(convs, "CONV", "gemm")
    torch.manual_seed(0)
    dilated = StreamingConv1d(4, 6, 3, dilation=3)
    down = StreamingConv1d(6, 8, 4, 2, pad_mode="replicate")
    up = StreamingConvTranspose1d(8, 4, 4, 2)
    _no_cudnn(dilated, down, up)
    layers = (dilated, down, up)

    def step(x: torch.Tensor, states: list, active: torch.Tensor) -> torch.Tensor:
        for layer, s in zip(layers, states, strict=True):
            x = layer.step(x, s, active)
        return x

    def run(fn, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        states = [layer.init_state(2, torch.device("cpu"), torch.float32) for layer in layers]
        active = torch.tensor([True, True])
        with torch.no_grad():
            out = torch.cat([fn(c, states, active) for c in chunks], dim=-1)
        return out, states

    chunks = list(torch.randn(2, 4, 12).split(4, dim=-1))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    (eager, eager_states), (traced, traced_states) = run(step, chunks), run(compiled, chunks)
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(traced_states, eager_states, strict=True):
        for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-6)


def test_conv_mode_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONV "auto" is cudnn on the CPU (CI and the golden tests run today's convs, bit for bit) and gemm
    on CUDA inside a compiled region only; `NPC_VOICE_MIMI_CONV` sets the switch at import and a bad
    value is refused."""
    monkeypatch.setattr(convs, "CONV", "auto")
    assert convs.conv_mode(torch.device("cpu")) == "cudnn"
    assert convs.conv_mode(torch.device("cuda")) == "cudnn"  # eager: cuDNN's kernels for long clips
    modes = torch.compile(lambda x: (x, convs.conv_mode(torch.device("cuda")), convs.conv_mode(x.device)),
                          backend="eager", fullgraph=True)(torch.zeros(1))[1:]
    assert modes == ("gemm", "cudnn")
    conv = StreamingConv1d(3, 4, 3, dilation=2)
    x = torch.randn(1, 3, 10)
    c = conv.conv.conv
    with torch.no_grad():
        assert torch.equal(conv(x), torch.nn.functional.conv1d(torch.nn.functional.pad(x, (4, 0)), c.weight, c.bias,
                                                               dilation=2))
    monkeypatch.setattr(convs, "CONV", "fft")
    with pytest.raises(ValueError):
        conv(x)

    def import_fresh() -> str:  # a second copy of the module, read from the same file
        spec = importlib.util.spec_from_file_location("npc_voice.model.mimi._convs_probe", convs.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.CONV

    monkeypatch.setenv("NPC_VOICE_MIMI_CONV", "gemm")
    assert import_fresh() == "gemm"
    monkeypatch.delenv("NPC_VOICE_MIMI_CONV")
    assert import_fresh() == "auto"
    monkeypatch.setenv("NPC_VOICE_MIMI_CONV", "fft")
    with pytest.raises(ValueError, match="NPC_VOICE_MIMI_CONV"):
        import_fresh()

"""Generation fixtures (`generation.safetensors`), called by make_golden.py with moshi 0.2.13 imported.

From the checkpoint make_golden.py wrote:

(a) Greedy generation with moshi 0.2.13's own `LMGen` (use_sampling=False: argmax), B=2, forced
    (teacher-forced) user codes drawn at random. moshi's `LMGen` takes the user's codes as input
    only for the streams the depth transformer does not generate (k > dep_q), so it runs on the
    Moshi layout of the same weights: `dep_q=8`, i.e. the checkpoint with the depth transformer's
    per-step weights of steps 8..15 (the user's codebooks) left out. Steps 0..7 are unchanged and
    attend only to earlier steps, so the agent's logits are those of the dep_q=16 model (checked).
(b) The PersonaPlex prompt phase, in NVIDIA's order (voice frames, 6 silence frames,
    "<system> role <system>" one token a frame, 6 silence frames; user = SINE codes), then a
    greedy conversation on fixed user audio, decoded by Mimi after a reset, starting with the
    forced last prompt frame as the reference does. Driven through moshi 0.2.13's `LMGen` (fixed
    ring KV cache) by overwriting its token cache with the forced prompt tokens after each step;
    `fork_check.py` runs NVIDIA's fork itself on the same inputs to check the procedure.
(c) Two contexts: 64 (the prompt fits) and the checkpoint's 16 (the ring cache wraps in the prompt).

Over 400 lines for the same reason as make_golden.py: each fixture beside the reference call
that makes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moshi.models.lm import LMGen, LMModel

import fork_check

GEN_SEED = 20240711
GEN_B, GEN_T = 2, 40  # LMGen greedy: streams, steps (context 16: the ring wraps from step 16)
N_AGENT = 8
SILENCE_FRAMES = 6  # the reference's int(0.5 * frame_rate)
ROLE = "You are Bram, the village blacksmith."
VOICE_SAMPLES = 10800  # 0.45 s (pyloudnorm needs 0.4 s): 6 frames, the last one zero-padded
VOICE_LUFS = -24.0
CONV_FRAMES = 24  # conversation frames after the prompt (user audio: a stream of reference `pcm`)
PROMPT_CONTEXTS = {"short": 64, "long": 16}
MIN_MARGIN = 2e-4  # smallest top-1 / top-2 logit gap of a greedy decision (fp32 logit errors are ~4e-6)
MIN_CODE_MARGIN = 2e-4  # as make_golden.py: codes clear of near-ties
FRAME = 1920
RATE = 24000


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def moshi_view(checkpoint: Path, lm_kwargs: dict, context: int, dep_q: int = N_AGENT) -> LMModel:
    """moshi's LMModel with `dep_q` depth steps and `context`, from the dep_q=16 checkpoint: the
    depth transformer's per-step weights of the first `dep_q` steps (strict load)."""
    full = {k: v.float() for k, v in load_file(str(checkpoint)).items()}
    full_q = lm_kwargs["dep_q"]
    state = {}
    for key, value in full.items():
        parts = key.split(".")
        if parts[0] in ("depformer_in", "linears") and int(parts[1]) >= dep_q:
            continue
        if parts[0] == "depformer_emb" and int(parts[1]) >= dep_q - 1:
            continue
        if parts[0] == "depformer" and parts[3] == "gating" and int(parts[4]) >= dep_q:
            continue
        if parts[0] == "depformer" and parts[3] == "self_attn":  # per-step rows stacked along dim 0
            value = value[: value.shape[0] // full_q * dep_q]
        state[key] = value
    lm = LMModel(**dict(lm_kwargs, dep_q=dep_q, context=context), dtype=torch.float32)
    lm.load_state_dict(state, strict=True)
    return lm.eval()


def full_model(checkpoint: Path, lm_kwargs: dict) -> LMModel:
    lm = LMModel(**lm_kwargs, dtype=torch.float32)
    lm.load_state_dict({k: v.float() for k, v in load_file(str(checkpoint)).items()}, strict=True)
    return lm.eval()


@torch.no_grad()
def check_view(full: LMModel, view: LMModel, lm_input: torch.Tensor, depth_input: torch.Tensor) -> float:
    """Max relative difference of the text and first dep_q depth logits of the two models, teacher
    forced (not bit-identical: the depth transformer's KV capacity is dep_q, so its attention runs
    over 8 rows instead of 16)."""
    worst = 0.0
    B = lm_input.shape[0]
    with full.streaming(B), view.streaming(B):
        for t in range(lm_input.shape[-1]):
            outs = []
            for lm in (full, view):
                out, text = lm.forward_text(lm_input[:, :, t : t + 1])
                logits = [text[:, 0, 0]]
                with lm.depformer.streaming(B):
                    for k in range(view.dep_q):
                        logits.append(lm.forward_depformer(k, depth_input[:, t, k].view(B, 1, 1), out)[:, 0, 0])
                outs.append(torch.cat(logits, dim=-1))
            worst = max(worst, _rel(outs[1], outs[0]))
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


class DepthLogits:
    """Records the depth logits `LMGen` samples from (forward_depformer wrapped on the instance)."""

    def __init__(self, lm: LMModel):
        self.logits: list[torch.Tensor] = []
        inner = lm.forward_depformer

        def wrapped(k, sequence, transformer_out):
            out = inner(k, sequence, transformer_out)
            self.logits.append(out[:, 0, 0].clone())
            return out

        lm.forward_depformer = wrapped

    def take(self) -> torch.Tensor:  # [B, dep_q, card] of the last step
        out = torch.stack(self.logits, dim=1)
        self.logits.clear()
        return out


def gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit along the last axis."""
    two = logits.float().topk(2, dim=-1).values
    return two[..., 0] - two[..., 1]


# --------------------------------------------------------------------------------------------------
# (a) LMGen greedy generation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_lmgen_greedy(lm8: LMModel, user_codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """user_codes [B, T, 8] -> per step t: LMGen's output (frame t), what it sampled, text logits."""
    B, T, _ = user_codes.shape
    text_logits, sampled_text, sampled_audio = [], [], []
    depth = DepthLogits(lm8)
    gen = LMGen(lm8, use_sampling=False,
                on_text_logits_hook=lambda x: text_logits.append(x[:, 0, 0].float().clone()),
                on_text_hook=lambda x: sampled_text.append(x.clone()),
                on_audio_hook=lambda x: sampled_audio.append(x.clone()))
    outs, depth_gaps = [], []
    with gen.streaming(B):
        for t in range(T):
            out = gen.step(user_codes[:, t, :, None])
            outs.append(torch.full((B, 1 + N_AGENT), -2, dtype=torch.long) if out is None else out[:, :, 0])
            depth_gaps.append(gap(depth.take()))
    text_logits_t = torch.stack(text_logits, dim=1)
    return {
        "gen_tokens": torch.stack(outs, dim=1).contiguous(),
        "gen_sampled": torch.cat([torch.stack(sampled_text, 1)[..., None], torch.stack(sampled_audio, 1)], -1),
        "gen_text_logits": text_logits_t.contiguous(),
        "gen_margins": torch.cat([gap(text_logits_t)[..., None], torch.stack(depth_gaps, 1)], -1).contiguous(),
    }


# --------------------------------------------------------------------------------------------------
# (b) the PersonaPlex prompt phase
# --------------------------------------------------------------------------------------------------


def sine_frame() -> np.ndarray:
    """The reference's `create_sinewave(frame / rate, rate)`: 440 Hz, amplitude 0.5, one frame."""
    t = np.linspace(0.0, FRAME / RATE, int(RATE * (FRAME / RATE)), endpoint=False)
    return 0.5 * np.sin(2 * np.pi * 440.0 * t).astype(np.float32)


@torch.no_grad()
def encode_stream(mimi, frames: torch.Tensor) -> torch.Tensor:
    """frames [n, FRAME] -> codes [n, 8]: one frame per `mimi.encode` of a fresh stream (batch 1)."""
    with mimi.streaming(1):
        return torch.cat([mimi.encode(f.view(1, 1, -1).float())[0, :, 0][None] for f in frames]).long()


@torch.no_grad()
def stream_margins(mimi, frames: torch.Tensor) -> torch.Tensor:
    """[n, 8] relative gap between nearest and second-nearest centroid of each streamed code."""
    with mimi.streaming(1):
        latent = torch.cat([mimi._encode_to_unquantized_latent(f.view(1, 1, -1).float()) for f in frames], -1)
    out = []
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        residual = rvq.input_proj(latent)
        for layer in rvq.vq.layers:
            emb = layer._codebook.embedding
            d = torch.cdist(residual.transpose(1, 2).double(), emb.double())[0]  # [n, bins]
            two = d.topk(2, dim=-1, largest=False).values
            out.append(((two[:, 1] - two[:, 0]) / two[:, 1]).float())
            residual = residual - emb[d.argmin(-1)].T[None]
    return torch.stack(out, dim=1)


def special_codes(mimi) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SINE and SILENCE codes of this Mimi (each frame the first of a fresh stream; the reference
    hard-codes those of the official Mimi) and their margins [2, 8]."""
    sine = torch.from_numpy(sine_frame())[None]
    zero = torch.zeros(1, FRAME)
    codes = [encode_stream(mimi, x)[0] for x in (sine, zero)]
    margins = torch.cat([stream_margins(mimi, x) for x in (sine, zero)])
    return codes[0], codes[1], margins


def voice_samples(variant: int) -> np.ndarray:
    """A deterministic voice-like clip, float32 [VOICE_SAMPLES], well below -24 LUFS."""
    gen = np.random.default_rng(GEN_SEED + variant)
    t = np.arange(VOICE_SAMPLES) / RATE
    f0 = 135.0 + 40.0 * t / t[-1] + 3.0 * variant
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(a * np.sin(h * phase + 0.4 * h) for h, a in ((1, 1.0), (2, 0.6), (3, 0.35), (5, 0.2), (7, 0.1)))
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)) + 0.05 * gen.standard_normal(VOICE_SAMPLES)
    x[:480] *= np.linspace(0.0, 1.0, 480)
    return (0.04 * x / np.abs(x).max()).astype(np.float32)


def normalize_like_reference(raw: np.ndarray) -> np.ndarray:
    """The fork's `normalize_audio`: pyloudnorm integrated loudness of the (float32) clip, then
    `pyloudnorm.normalize.loudness` to -24 LUFS (gain applied in float64), no limiter."""
    import pyloudnorm as pyln

    meter = pyln.Meter(RATE)
    return pyln.normalize.loudness(raw, meter.integrated_loudness(raw), VOICE_LUFS)


def voice_frames(normalized: np.ndarray) -> torch.Tensor:
    """The fork's `_iterate_audio(pad=True)` + `torch.tensor(..., dtype=float32)`: [n, FRAME]."""
    n = -(-normalized.shape[-1] // FRAME)
    padded = np.zeros(n * FRAME, dtype=np.float64)
    padded[: normalized.shape[-1]] = normalized
    return torch.tensor(padded.reshape(n, FRAME), dtype=torch.float32)


def prompt_table(voice_codes: torch.Tensor, text_tokens: list[int], silence: torch.Tensor,
                 pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forced frames of the prompt: text [F] and agent codes [F, 8] (user: SINE everywhere)."""
    V, n = voice_codes.shape[0], len(text_tokens)
    F = V + 2 * SILENCE_FRAMES + n
    text = torch.full((F,), pad, dtype=torch.long)
    text[V + SILENCE_FRAMES : V + SILENCE_FRAMES + n] = torch.tensor(text_tokens)
    agent = silence[None].repeat(F, 1)
    agent[:V] = voice_codes
    return text, agent


@torch.no_grad()
def run_prompt(lm8: LMModel, mimi, text: torch.Tensor, agent: torch.Tensor, sine: torch.Tensor,
               user_pcm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt on moshi's LMGen, then len(user_pcm) conversation frames.

    LMGen step t reads position t and writes what it samples at position t + 1; after every
    prompt step the forced tokens are written over it (text and codebook 0 of frame t + 1, the
    delayed codebooks of frame t), which is what the fork's `provided` mask does. Step F-1 runs the
    last prompt position; its text and codebook 0 (position F) are the first the model chooses.
    Steps F+c (user frame c) output frame F+c. Mimi is then fresh: it encodes the user frames and
    decodes frame F-1 (the forced last prompt frame) and frames F.. in order, as the fork does.
    """
    F, N = text.shape[0], user_pcm.shape[0]
    logits, depth = [], DepthLogits(lm8)
    gen = LMGen(lm8, use_sampling=False, on_text_logits_hook=lambda x: logits.append(x[0, 0, 0].float().clone()))
    res: dict[str, torch.Tensor] = {}
    margins = []
    with gen.streaming(1):
        state = gen._streaming_state
        CT = state.cache.shape[-1]
        for t in range(F):
            gen.step(sine.view(1, 8, 1))
            depth_logits = depth.take()
            p = (t + 1) % CT
            if t + 1 < F:
                state.cache[0, 0, p] = text[t + 1]
                state.cache[0, 1, p] = agent[t + 1, 0]
            state.cache[0, 2 : 1 + N_AGENT, p] = agent[t, 1:]
        margins.append(torch.cat([gap(logits[-1])[None], gap(depth_logits[0, :1])]))
        # After the prompt: KV rows of positions max(0, F - context)..F-1 in order; token table.
        kv = []
        for layer in lm8.transformer.layers:
            cache = layer.self_attn._streaming_state.kv_cache
            assert int(cache.end_offset[0]) == F
            pos = torch.arange(max(0, F - cache.capacity), F)
            kv.append(cache.cache[:, 0][:, :, pos % cache.capacity])  # [2, H, n, D]
        res["kv"] = torch.stack(kv).float().contiguous()
        res["kv_positions"] = pos
        ring = torch.stack([state.cache[0, :, p % CT] for p in (F - 2, F - 1, F)], dim=1).clone()
        ring[1 + N_AGENT, 2] = -2  # the user's codebook 0 at position F: written by the first user frame
        res["ring"] = ring
        first = torch.cat([text[F - 1 : F], agent[F - 1]])
        assert torch.equal(state.cache[0, :2, (F - 1) % CT], first[:2])
        res["first_frame"] = first

        tokens, pcm = [], []
        with mimi.streaming(1):
            pcm_first = mimi.decode(first[1:].view(1, 8, 1))[0, 0]
            for c in range(N):
                codes = mimi.encode(user_pcm[c].view(1, 1, -1).float())
                out = gen.step(codes)
                d = depth.take()
                margins.append(torch.cat([gap(logits[-1])[None], gap(d[0])]))
                tokens.append(out[0, :, 0])
                pcm.append(mimi.decode(out[:, 1:]).view(-1))
    res["text_logits"] = torch.stack(logits[F - 1 :]).contiguous()
    res["tokens"] = torch.stack(tokens)
    res["pcm_first"] = pcm_first.float().contiguous()
    res["pcm"] = torch.stack(pcm).float().contiguous()
    res["margins"] = torch.stack(margins[1:]).contiguous()
    res["margin_first"] = margins[0].contiguous()
    return res


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def make_generation(out: Path, lm_kwargs: dict, mimi, tokenizer, pcm: torch.Tensor,
                    lm_input: torch.Tensor, depth_input: torch.Tensor, fork: Path | None,
                    notes: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Writes `generation.safetensors` in `out`; returns its tensors and metadata. pcm [B, 1, T]: the
    Mimi input of `reference.safetensors`, whose streams' codes are clear of near-ties: the user audio."""
    checkpoint = out / "model.safetensors"
    ref: dict[str, torch.Tensor] = {}

    # (a) LMGen greedy
    full = full_model(checkpoint, lm_kwargs)
    lm8 = moshi_view(checkpoint, lm_kwargs, lm_kwargs["context"])
    view_diff = check_view(full, lm8, lm_input, depth_input)
    if view_diff > 1e-6:
        raise RuntimeError(f"dep_q={N_AGENT} view differs from the checkpoint's model by {view_diff:.2e}")
    notes.append(f"LMGen runs on the dep_q={N_AGENT} view of the checkpoint; its text and depth logits "
                 f"0..{N_AGENT - 1} equal the dep_q=16 model's within {view_diff:.1e} (max relative) on the "
                 f"40 teacher-forced steps of `reference.safetensors`.")
    gen = torch.Generator().manual_seed(GEN_SEED)
    user_codes = torch.randint(0, lm_kwargs["card"], (GEN_B, GEN_T, N_AGENT), generator=gen)
    res = run_lmgen_greedy(lm8, user_codes)
    ref["gen_user_codes"] = user_codes
    ref.update(res)
    if float(res["gen_margins"].min()) < MIN_MARGIN:
        raise RuntimeError(f"greedy near-tie in LMGen generation: {float(res['gen_margins'].min()):.2e}")
    notes.append(f"LMGen greedy: smallest top-1/top-2 logit gap of a decision {float(res['gen_margins'].min()):.2e}.")

    # (b) the prompt: the first voice variant whose codes and greedy decisions are clear of near-ties
    sine, silence, special_margins = special_codes(mimi)
    text_tokens = list(tokenizer.encode("<system> " + ROLE.strip() + " <system>"))
    pad = lm_kwargs["existing_text_padding_id"]
    views = {case: moshi_view(checkpoint, lm_kwargs, context) for case, context in PROMPT_CONTEXTS.items()}
    for stream, variant in ((s, v) for s in range(pcm.shape[0]) for v in range(25)):
        user_pcm = pcm[stream, 0, : (CONV_FRAMES + 1) * FRAME].view(-1, FRAME)  # + 1 frame for the fork
        raw = voice_samples(variant)
        frames = voice_frames(normalize_like_reference(raw))
        if float(stream_margins(mimi, frames).min()) < MIN_CODE_MARGIN:
            continue
        voice_codes = encode_stream(mimi, frames)
        text, agent = prompt_table(voice_codes, text_tokens, silence, pad)
        cases = {case: run_prompt(lm, mimi, text, agent, sine, user_pcm[:CONV_FRAMES]) for case, lm in views.items()}
        lows = {case: min(float(r["margins"].min()), float(r["margin_first"].min())) for case, r in cases.items()}
        if min(lows.values()) >= MIN_MARGIN:
            break
    else:
        raise RuntimeError("no voice variant gave codes and greedy decisions clear of near-ties")
    user_codes_conv = encode_stream(mimi, user_pcm)
    ref.update({
        "voice_raw": torch.from_numpy(raw),
        "voice_normalized": frames.reshape(-1).contiguous(),
        "voice_codes": voice_codes,
        "voice_code_margins": stream_margins(mimi, frames),
        "sine_codes": sine,
        "silence_codes": silence,
        "special_code_margins": special_margins,
        "role_tokens": torch.tensor(text_tokens),
        "prompt_text": text,
        "prompt_agent": agent,
        "conv_pcm": user_pcm[:CONV_FRAMES].to(torch.bfloat16).contiguous(),
        "conv_user_codes": user_codes_conv[:CONV_FRAMES],
    })
    notes.append(f"Prompt: {voice_codes.shape[0]} voice frames (voice variant {variant}; user audio: stream "
                 f"{stream} of `pcm`), {SILENCE_FRAMES} + "
                 f"{len(text_tokens)} + {SILENCE_FRAMES} frames, F = {text.shape[0]}; SINE codes "
                 f"{sine.tolist()}, SILENCE codes {silence.tolist()} (smallest code margin "
                 f"{float(special_margins.min()):.2e}; voice codes {float(ref['voice_code_margins'].min()):.2e}).")
    for case, res in cases.items():
        for key, value in res.items():
            ref[f"{case}_{key}"] = value
        notes.append(f"Prompt case `{case}` (context {PROMPT_CONTEXTS[case]}): smallest greedy logit gap "
                     f"{lows[case]:.2e}; conversation text tokens {res['tokens'][:, 0].tolist()}.")

    meta = {"role": ROLE, "conv_frames": CONV_FRAMES, "silence_frames": SILENCE_FRAMES,
            "contexts": PROMPT_CONTEXTS, "gen_B": GEN_B, "gen_T": GEN_T, "voice_variant": variant,
            "user_stream": stream}

    # NVIDIA's fork on the same inputs
    if fork is None:
        notes.append("NVIDIA's fork was not run (no --fork): the procedure is not cross-checked in this build.")
        meta["fork_checked"] = False
    else:
        fork_out = fork_check.run_fork(fork, {
            "gen_user_codes": user_codes, "voice_raw": ref["voice_raw"], "voice_codes": voice_codes,
            "sine_codes": sine, "silence_codes": silence, "user_codes": user_codes_conv,
        }, dict(meta, lm_kwargs=lm_kwargs, tokenizer=str(out / "tokenizer_spm_32k_3.model")))
        fork_check.compare_fork(ref, fork_out, notes)
        meta["fork_checked"] = True
        lm_py = (fork / "moshi" / "models" / "lm.py").read_bytes()
        meta["fork_lm_py_sha256"] = hashlib.sha256(lm_py).hexdigest()
        notes.append(f"The fork's `moshi/models/lm.py` had sha256 {meta['fork_lm_py_sha256'][:16]}...")

    save_file(ref, str(out / "generation.safetensors"), metadata={"golden": json.dumps(meta, sort_keys=True)})
    return ref, meta

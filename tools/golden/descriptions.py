"""Descriptions of the golden fixtures' tensors, for the README make_golden.py writes."""

from __future__ import annotations

import torch

from golden_generation import PROMPT_CONTEXTS

REFERENCE = {
    "lm_input": "tokens entering the temporal transformer at each step: text 0..999 (1000 = initial), "
                "audio 0..1023 (1024 = initial); initial tokens at t=0 and, for the delayed streams, t=1; "
                "a few -1 (zero embedding)",
    "depth_input": "token fed to depth step k at step t: k=0 a text token, k>=1 an audio token (codebook k-1)",
    "text_logits": "temporal transformer text logits at each step (streaming, one step per call)",
    "transformer_out": "temporal transformer output after `out_norm` at each step (the depformer's input)",
    "depth_hidden": "depth transformer output for step t, codebook k: depth logits = "
                    "`depth_hidden[:, t, k] @ linears.k.weight.T`",
    "depth_steps": "the steps t whose depth logits are stored as moshi computed them",
    "depth_logits_at": "moshi's depth logits at `depth_steps`",
    "depth_argmax": "argmax of the depth logits, every step",
    "depth_logsumexp": "logsumexp of the depth logits, every step",
    "pcm": "Mimi input, 24 kHz; bf16-exact values stored in bf16: cast to fp32",
    "codes_stream": "`mimi.encode` frame by frame (1920 samples) inside `mimi.streaming(B)`",
    "codes_whole": "`mimi.encode(pcm)` on the whole clip, not streaming",
    "pcm_frames": "the frames t whose decoded PCM is stored",
    "pcm_stream": "`mimi.decode(codes_stream[:, :, t:t+1])` frame by frame inside `mimi.streaming(B)`, "
                  "frames `pcm_frames` concatenated",
    "pcm_stream_stats": "RMS and peak absolute value of each of the 40 decoded frames, streaming",
    "pcm_whole": "`mimi.decode(codes_stream)` on the whole clip, not streaming, frames `pcm_frames` concatenated",
    "pcm_whole_stats": "RMS and peak absolute value of each of the 40 decoded frames, whole clip",
    "code_margins": "relative gap between the nearest and second-nearest centroid distances of each code "
                    "(min over streaming and whole-clip encodes)",
}

# --------------------------------------------------------------------------------------------------

GENERATION = {
    "gen_user_codes": "(a) user codes fed to LMGen step t (`step(gen_user_codes[:, t, :, None])`), 0..1023",
    "gen_tokens": "(a) LMGen's output of step t: [text, agent codebooks 0..7] of frame t (text and codebook 0 "
                  "sampled at step t-1, codebooks 1..7 at step t); -2 at t = 0 (LMGen returns None)",
    "gen_sampled": "(a) what step t sampled (position t+1): [text, agent codebooks 0..7] (codebooks 1..7 belong "
                   "to frame t, text and codebook 0 to frame t+1)",
    "gen_text_logits": "(a) text logits of step t (position t)",
    "gen_margins": "(a) top-1 minus top-2 logit of each greedy decision: [text, agent codebooks 0..7]",
    "voice_raw": "(b) the voice clip, 24 kHz, before loudness normalisation",
    "voice_normalized": "(b) the clip normalised to -24 LUFS (pyloudnorm, as the fork), zero-padded to whole frames",
    "voice_codes": "(b) Mimi codes of the voice frames, streamed through a fresh Mimi",
    "voice_code_margins": "(b) relative centroid-distance gap of each voice code",
    "sine_codes": "(b) SINE codes of this Mimi: a 440 Hz, amplitude 0.5 frame, first frame of a fresh stream",
    "silence_codes": "(b) SILENCE codes of this Mimi: a zero frame, first frame of a fresh stream",
    "special_code_margins": "(b) relative centroid-distance gaps of the SINE (row 0) and SILENCE (row 1) codes",
    "role_tokens": "(b) `tokenizer.encode('<system> ' + role + ' <system>')`",
    "prompt_text": "(b) forced text of prompt frames 0..F-1 (PAD = 3 except the role tokens)",
    "prompt_agent": "(b) forced agent codes of prompt frames 0..F-1 (voice codes, then SILENCE codes)",
    "conv_pcm": "(b) user audio of conversation frames 0..N-1 (the start of a `reference.safetensors` `pcm` "
                "stream, see the metadata's `user_stream`); bf16-exact",
    "conv_user_codes": "(b) moshi's Mimi codes of `conv_pcm`, fresh stream",
}
GENERATION_CASES = {
    "kv": "temporal KV cache after the prompt (positions `kv_positions`, in order): [layer, key/value, head, "
          "position, head_dim], keys after RoPE",
    "kv_positions": "the absolute positions of the `kv` rows: the last min(F, context) prompt positions",
    "ring": "tokens of positions F-2, F-1, F (columns) for the 17 streams after the prompt; position F holds "
            "the greedy text and codebook 0 chosen from position F-1; -2: the user's codebook 0 at F, not yet known",
    "first_frame": "frame F-1 as the reference outputs it after the prompt (text PAD, agent SILENCE): "
                   "decoded first, audio discarded by an implementation one frame earlier",
    "text_logits": "text logits at positions F-1 .. F+N-1 (row 0: the logits the first chosen text comes from)",
    "tokens": "frames F..F+N-1: [text, agent codebooks 0..7]; row c is our conversation frame c (tick c)",
    "pcm_first": "Mimi's decode of `first_frame` right after the reset",
    "pcm": "decoded audio of frames F..F+N-1, after `first_frame`; row c is our conversation frame c",
    "margins": "top-1 minus top-2 logit of the greedy decisions of steps F..F+N-1: [text, codebooks 0..7]",
    "margin_first": "the same for step F-1: [text, codebook 0]",
}


def describe_generation(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    out = {}
    for key in tensors:
        case, _, rest = key.partition("_")
        if case in PROMPT_CONTEXTS:
            out[key] = f"(b) context {PROMPT_CONTEXTS[case]}: {GENERATION_CASES[rest]}"
        else:
            out[key] = GENERATION[key]
    return out

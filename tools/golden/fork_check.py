#!/usr/bin/env python3
"""Runs NVIDIA's PersonaPlex fork of moshi (its own `LMGen`) on the golden checkpoint, and compares
it with what golden_generation.py got from moshi 0.2.13. `run_fork` starts `main` as a subprocess
(the fork is also a package named `moshi`); `--fork` is the fork's `moshi/` folder (the one holding `moshi/models/lm.py`),
e.g. from a checkout of github.com/NVIDIA/personaplex.

What is replaced, and why:
- `sphn` is not installed: a stub module is registered before the fork is imported, and the fork's
  `load_audio` (sphn.read + sphn.resample) returns the raw 24 kHz voice clip instead of reading a file.
  The fork's own `normalize_audio` (pyloudnorm) and framing (`_iterate_audio`, `encode_from_sphn`) run.
- `SINE_TOKENS` / `SILENCE_TOKENS` are the official Mimi's codes: replaced by this Mimi's.
- Mimi: the fork's Mimi is not run (its ring KV cache hides the oldest entry once full, from the
  4th frame with this small Mimi's context); a stand-in returns moshi 0.2.13's codes of each voice
  frame, and records the frames the fork hands it.
- `offline.py` cannot be imported (it needs `client_utils`, absent from the fork): its steps are
  followed here (`wrap_with_system_tags`, LMGen arguments, reset, `step_system_prompts`, then one
  `step` per user frame).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FRAME = 1920


# --------------------------------------------------------------------------------------------------
# Called from golden_generation.py (moshi 0.2.13's process)
# --------------------------------------------------------------------------------------------------


def run_fork(fork: Path, inputs: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Runs this file's `main` in a subprocess with the fork first on the path; returns its outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(src), metadata={"meta": json.dumps(meta)})
        script = Path(__file__)
        env = dict(os.environ, NO_TORCH_COMPILE="1")
        done = subprocess.run([sys.executable, str(script), "--fork", str(fork), "--inputs", str(src),
                               "--out", str(dst)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"fork_check.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return load_file(str(dst))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _within(rel: float) -> str:
    return "bit for bit" if rel == 0 else f"within {rel:.1e} (max relative)"


def compare_fork(ref: dict[str, torch.Tensor], fork: dict[str, torch.Tensor], notes: list[str]) -> None:
    """The fork's call o runs position o-1: its output of call t+1 is LMGen's output of step t."""
    gen_t = ref["gen_tokens"].shape[1]
    # (a): equal until the fork's ring cache is full (it then hides its oldest entry; moshi 0.2.13 fixed that)
    ours, theirs = ref["gen_tokens"][:, 1:], fork["gen_tokens"][:, 2 : gen_t + 1]
    same = (ours == theirs).all(-1).all(0)
    first_diff = int((~same).nonzero()[0]) + 1 if (~same).any() else None
    logit_steps = int(fork["gen_exact_steps"])
    # (the fork returns no logits from its call 1, position 0: it returns None while offset <= max_delay)
    rel = _rel(fork["gen_text_logits"][:, 2 : logit_steps + 1], ref["gen_text_logits"][:, 1:logit_steps])
    if first_diff is not None and first_diff < logit_steps:
        raise RuntimeError(f"fork and LMGen generation differ at step {first_diff}")
    notes.append(f"Fork cross-check (a): the fork's LMGen (dep_q=16, user codebooks teacher-forced in its "
                 f"depth loop) gives the same tokens for steps 1..{logit_steps - 1} and the same text logits "
                 f"({_within(rel)}) for steps 1..{logit_steps - 1}; from step {logit_steps} on its "
                 f"ring KV cache (capacity 16) hides its oldest entry, so it departs "
                 f"(first token difference at step {first_diff}).")
    # (b) short case: everything
    if not torch.equal(fork["voice_frames"], ref["voice_normalized"].view(-1, FRAME)):
        d = float((fork["voice_frames"] - ref["voice_normalized"].view(-1, FRAME)).abs().max())
        notes.append(f"Fork cross-check: its normalised voice frames differ by at most {d:.1e}.")
    else:
        notes.append("Fork cross-check: its loudness-normalised, framed voice equals ours bit for bit.")
    tok_equal = torch.equal(fork["tokens"][1:], ref["short_tokens"]) and torch.equal(fork["tokens"][0], ref["short_first_frame"])
    if not tok_equal:
        raise RuntimeError("fork and LMGen-driven prompt disagree on the conversation tokens")
    rel_logits = _rel(fork["text_logits"], ref["short_text_logits"])
    rel_kv = _rel(fork["kv"], ref["short_kv"])
    ring_equal = torch.equal(fork["ring"], ref["short_ring"])
    if not ring_equal:
        raise RuntimeError(f"fork ring {fork['ring'].tolist()} != {ref['short_ring'].tolist()}")
    notes.append(f"Fork cross-check (b), context 64: the fork's own `step_system_prompts` (SINE / SILENCE "
                 f"constants replaced by this Mimi's codes, voice codes and user codes from moshi 0.2.13's "
                 f"Mimi) gives the same first frame, the same {ref['short_tokens'].shape[0]} conversation "
                 f"frames and the same token table; KV cache after the prompt {_within(rel_kv)}, text "
                 f"logits {_within(rel_logits)}.")


# --------------------------------------------------------------------------------------------------
# The subprocess (the fork's process)
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fork", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.fork.resolve()))
    sys.modules.setdefault("sphn", types.ModuleType("sphn"))

    import sentencepiece
    from safetensors import safe_open

    import moshi
    from moshi.models import lm as lm_module
    from moshi.models.lm import LMGen, LMModel

    assert Path(moshi.__file__).resolve().is_relative_to(args.fork.resolve()), moshi.__file__
    torch.set_num_threads(1)
    inputs = load_file(str(args.inputs))
    with safe_open(str(args.inputs), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    kwargs = dict(meta["lm_kwargs"])
    weights = {k: v.float() for k, v in load_file(str(Path(meta["tokenizer"]).with_name("model.safetensors"))).items()}

    def build(context: int) -> LMModel:
        lm = LMModel(**dict(kwargs, context=context), dtype=torch.float32)
        lm.load_state_dict(weights, strict=True)
        return lm.eval()

    def kv_cache(lm: LMModel) -> list:
        return [layer.self_attn._streaming_state.kv_cache for layer in lm.transformer.layers]

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        # (a) greedy generation, user codes teacher-forced; call o runs position o - 1.
        lm = build(kwargs["context"])
        gen = LMGen(lm, device="cpu", use_sampling=False, return_logits=True, sample_rate=24000, frame_rate=12.5)
        codes = inputs["gen_user_codes"]  # [B, T, 8]
        B, T, _ = codes.shape
        tokens = torch.full((B, T + 1, 9), -2, dtype=torch.long)
        text_logits = torch.zeros(B, T + 1, kwargs["text_card"])
        gen.streaming_forever(B)
        gen.reset_streaming()
        for o in range(T + 1):
            user = codes[:, o, :, None] if o < T else torch.zeros(B, 8, 1, dtype=torch.long)
            step_out, logits = gen.step(input_tokens=user)
            if step_out is not None:
                tokens[:, o] = step_out[:, :9, 0]
            if logits is not None:
                text_logits[:, o] = logits[0][:, 0, 0].float()
        out["gen_tokens"], out["gen_text_logits"] = tokens, text_logits
        out["gen_exact_steps"] = torch.tensor(kwargs["context"] - 1)  # positions before the ring is full

        # (b) the prompt, context 64
        lm_module.SINE_TOKENS = inputs["sine_codes"].numpy().astype(np.int64)
        lm_module.SILENCE_TOKENS = inputs["silence_codes"].numpy().astype(np.int64)
        raw = inputs["voice_raw"].numpy().astype(np.float32)[None]  # what sphn.read gives for a mono file
        lm_module.load_audio = lambda path, sample_rate: raw

        class MimiStandIn:
            def __init__(self, codes: torch.Tensor):
                self.codes, self.frames = list(codes), []

            def parameters(self):
                return iter([torch.zeros(1)])

            def encode(self, batch: torch.Tensor) -> torch.Tensor:
                self.frames.append(batch[0, 0].clone())
                return self.codes.pop(0).view(1, 8, 1)

        tokenizer = sentencepiece.SentencePieceProcessor(meta["tokenizer"])
        role = meta["role"].strip()
        wrapped = role if role.startswith("<system>") and role.endswith("<system>") else f"<system> {role} <system>"
        lm = build(meta["contexts"]["short"])
        gen = LMGen(lm, device="cpu", audio_silence_frame_cnt=int(0.5 * 12.5), sample_rate=24000,
                    frame_rate=12.5, use_sampling=False, return_logits=True)
        gen.streaming_forever(1)
        gen.load_voice_prompt("voice.wav")
        gen.text_prompt_tokens = tokenizer.encode(wrapped)
        gen.reset_streaming()
        mimi = MimiStandIn(inputs["voice_codes"])
        gen.step_system_prompts(mimi)
        assert not mimi.codes, "voice frames left unused"
        out["voice_frames"] = torch.stack(mimi.frames)
        user_codes = inputs["user_codes"]  # [N + 1, 8]
        conv_tokens, conv_logits = [], []
        for c in range(user_codes.shape[0]):
            step_out, logits = gen.step(user_codes[c].view(1, 8, 1))
            conv_tokens.append(step_out[0, :9, 0])
            conv_logits.append(logits[0][0, 0, 0].float())
            if c == 0:  # the last prompt position has run: F entries
                F = gen._streaming_state.offset - 1
                caches = kv_cache(lm)
                assert all(int(cache.end_offset) == F for cache in caches)
                out["kv"] = torch.stack([cache.cache[:, 0, :, :F] for cache in caches]).float().contiguous()
                cache = gen._streaming_state.cache
                ring = torch.stack([cache[0, :, p % cache.shape[-1]] for p in (F - 2, F - 1, F)], dim=1).clone()
                ring[1 + 8, 2] = -2  # the user's codebook 0 at position F: the first user frame, not the prompt's
                out["ring"] = ring
        out["tokens"] = torch.stack(conv_tokens)
        out["text_logits"] = torch.stack(conv_logits)
    save_file({k: v.contiguous() for k, v in out.items()}, str(args.out))


if __name__ == "__main__":
    main()

"""Loading a PersonaPlex (or Moshi) model: a weights directory, a Hugging Face repo, or random weights.

A weights directory holds the reference's files:
- `model.safetensors`: the LM, native key names (`transformer.layers.N.self_attn.in_proj_weight`, ...);
- `tokenizer-e351c8d8-checkpoint125.safetensors`: Mimi;
- `tokenizer_spm_32k_3.model`: the SentencePiece text tokenizer;
- optionally `config.json` in Kyutai's format: its LM hyper-parameters override the preset, and its
  `moshi_name` / `mimi_name` / `tokenizer_name` / `mimi_config_name` keys name other files.
Models are built on the meta device and take the file's tensors directly, so loading the 7B model
never holds two copies of the weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import nn

from .config import LMConfig, MimiConfig, ModelConfig, get_preset
from .lm import PersonaPlexLM
from .transformer import Transformer
from .mimi import Mimi
from .kvcache import resolve_kv_dtype
from .quant import quantize_, resolve_weights_dtype
from .tokenizer import TextTokenizer

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"
DEFAULT_REPO = "nvidia/personaplex-7b-v1"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A weights file that does not match the model: names the file and the offending keys."""


@dataclass
class LoadedModel:
    config: ModelConfig
    lm: PersonaPlexLM
    mimi: Mimi
    tokenizer: TextTokenizer
    source: str  # where the weights came from ("random" for random weights)

    @property
    def device(self) -> torch.device:
        """The LM's device; cheap under 8-bit weights too (asked per session and by /health)."""
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        """The LM's compute dtype; cheap under 8-bit weights too (unlike `lm.text_linear.weight.dtype`)."""
        return self.lm.dtype

    @property
    def random_weights(self) -> bool:
        return self.source == "random"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(source: str | Path | None = None, *, preset: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               seed: int = 0, int8: bool = False, context: int | None = None,
               mimi_dtype: torch.dtype | None = None, kv_dtype: str = "auto",
               weights_dtype: str = "bf16") -> LoadedModel:
    """Loads a model.

    source: a weights directory, a Hugging Face repo id (needs `huggingface_hub` and the network),
    or None for random weights at `preset` (default "tiny"). preset: the configuration a weights
    directory's `config.json` overrides (default "personaplex-7b"). The LM is cast to `dtype`
    (default bf16 on GPU, fp32 on CPU); Mimi runs in `mimi_dtype` (the same default: bf16 saves
    about 0.6 ms a tick at one session on an H100; the reference runs Mimi in fp32).
    `weights_dtype`: the LM's matrices, "bf16" (not quantized: `dtype`), "int8" or "fp8" (8-bit:
    `quant.py`; fp8 needs a GPU of compute capability 8.9+); `int8=True` is "int8". `context`: frames
    a conversation remembers. `kv_dtype`: the conversations' KV cache (`kvcache.resolve_kv_dtype`:
    auto = 8-bit on a GPU).
    """
    device = torch.device(device) if device is not None else default_device()
    # an impossible choice fails before any weight is read
    weights_dtype = resolve_weights_dtype(weights_dtype, device, int8)
    kv = resolve_kv_dtype(kv_dtype, device)
    dtype = dtype or default_dtype(device)
    mimi_dtype = mimi_dtype or default_dtype(device)
    if source is None:
        config = get_preset(preset or "tiny")
        if context is not None:
            config = replace(config, lm=replace(config.lm, context=context))
        return random_model(config, device=device, dtype=dtype, seed=seed, weights_dtype=weights_dtype,
                            mimi_dtype=mimi_dtype, kv_dtype=kv_dtype)
    path = Path(source)
    if not path.exists():
        if not _REPO_ID.match(str(source)):
            raise FileNotFoundError(f"weights directory {source} does not exist")
        path = download(str(source))
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory of weights")
    model = load_directory(path, preset=preset or "personaplex-7b", device=device, dtype=dtype,
                           weights_dtype=weights_dtype, context=context, mimi_dtype=mimi_dtype)
    model.lm.kv_dtype = kv
    return model


def download(repo_id: str) -> Path:
    """Downloads a Hugging Face repo's model files (optional dependency: pip install 'npc-voice[hub]')."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(
            f"{repo_id!r} is not a local directory and huggingface_hub is not installed: "
            "install it with `pip install 'npc-voice[hub]'`, or download the files yourself and pass the directory"
        ) from None
    patterns = [CONFIG_FILE, LM_FILE, MIMI_FILE, TOKENIZER_FILE, "*.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, authentication (gated repo), missing repo
        raise RuntimeError(f"could not download {repo_id!r} from Hugging Face: {exc}") from exc


def read_configs(directory: Path, base: ModelConfig) -> tuple[ModelConfig, dict[str, Any]]:
    """The model configuration of a weights directory and its raw config.json (or {})."""
    raw: dict[str, Any] = {}
    config_path = directory / CONFIG_FILE
    if config_path.exists():
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    try:
        lm_cfg = LMConfig.from_kyutai(raw, base.lm)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    mimi_cfg = base.mimi
    if "mimi_config_name" in raw:
        mimi_path = _inside(directory, raw["mimi_config_name"])
        mimi_cfg = MimiConfig.from_kyutai(json.loads(mimi_path.read_text()))
    if mimi_cfg.quantizer.bins != lm_cfg.card:
        raise CheckpointError(f"{directory}: Mimi has {mimi_cfg.quantizer.bins} bins but the LM's card is {lm_cfg.card}")
    return ModelConfig(directory.name, lm_cfg, mimi_cfg), raw


def load_directory(directory: Path, *, preset: str = "personaplex-7b", device: torch.device,
                   dtype: torch.dtype, int8: bool = False, context: int | None = None,
                   mimi_dtype: torch.dtype = torch.float32, weights_dtype: str = "bf16") -> LoadedModel:
    """A weights directory's model; `weights_dtype` as `load_model`'s (not checked against the device
    here: on a CPU, fp8 runs its plain stand-in, for tests)."""
    weights_dtype = "int8" if int8 else weights_dtype
    config, raw = read_configs(directory, get_preset(preset))
    if context is not None:
        config = replace(config, lm=replace(config.lm, context=context))
    lm_file = _inside(directory, raw.get("moshi_name", LM_FILE))
    mimi_file = _inside(directory, raw.get("mimi_name", MIMI_FILE))
    tokenizer_file = _inside(directory, raw.get("tokenizer_name", TOKENIZER_FILE))
    for needed in (lm_file, mimi_file, tokenizer_file):
        if not needed.exists():
            raise FileNotFoundError(f"{needed.name} is missing from {directory}")

    with torch.device("meta"):
        lm = PersonaPlexLM(config.lm)
        mimi = Mimi(config.mimi)
    # int8 / fp8: load and quantize on the host, matrix by matrix, so the device never holds the
    # full-width weights.
    quantized = weights_dtype != "bf16"
    load_weights(lm, lm_file, device=torch.device("cpu") if quantized else device, dtype=dtype)
    if quantized:
        lm = quantize_(lm, weights_dtype).to(device)
    load_weights(mimi, mimi_file, device=device, dtype=mimi_dtype)
    tokenizer = TextTokenizer(tokenizer_file)
    if tokenizer.vocab_size > config.lm.text_card:
        raise CheckpointError(f"{tokenizer_file}: {tokenizer.vocab_size} pieces but the LM's text_card is {config.lm.text_card}")
    return LoadedModel(config, lm.eval(), mimi.eval(), tokenizer, str(directory))


def load_weights(model: nn.Module, path: Path, *, device: torch.device, dtype: torch.dtype) -> None:
    """Checks a safetensors file against `model`'s keys and shapes, then loads it (cast to `dtype`)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        check_keys(path, expected, found)
        state = {}
        for name in found:
            tensor = f.get_tensor(name).to(device)
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True, assign=True)


def check_keys(path: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        problems.append("shape mismatch: " + _listing([f"{k} is {list(found[k])}, expected {list(expected[k])}" for k in wrong]))
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _inside(directory: Path, name: str) -> Path:
    """A file named by config.json, which must stay inside the weights directory."""
    path = (directory / name).resolve()
    if directory.resolve() not in path.parents:
        raise CheckpointError(f"{directory / CONFIG_FILE}: file name {name!r} leaves the weights directory")
    return path


# --- random weights ---------------------------------------------------------------------------
def random_model(preset: str | ModelConfig = "tiny", *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, int8: bool = False,
                 mimi_dtype: torch.dtype = torch.float32, kv_dtype: str = "auto",
                 weights_dtype: str = "bf16") -> LoadedModel:
    """A model with random weights: the built-in `tiny` model, or any preset for benchmarks (the
    cost of a step does not depend on the weights' values). The LM is built part by part on the
    device (and quantized part by part with `weights_dtype` int8 or fp8, or `int8`), so no more than
    one layer is ever held in a wider format than the final one. `weights_dtype`, `kv_dtype`: as
    `load_model`'s (fp8 is not checked against the device: on a CPU it runs its plain stand-in)."""
    weights_dtype = "int8" if int8 else weights_dtype
    config = get_preset(preset) if isinstance(preset, str) else preset
    tokenizer = TextTokenizer.builtin()
    if tokenizer.vocab_size > config.lm.text_card:
        config = replace(config, lm=replace(config.lm, text_card=tokenizer.vocab_size))
    device = torch.device(device)
    with torch.device("meta"):
        lm = PersonaPlexLM(config.lm)
    for index, part in enumerate(_parts(lm)):
        part.to_empty(device=device).to(dtype)
        randomize(part, seed + index)
        if weights_dtype != "bf16":
            quantize_(part, weights_dtype)
    if weights_dtype != "bf16":
        quantize_(lm, weights_dtype)  # the LM's own top-level linears
    with torch.device(device):
        mimi = Mimi(config.mimi)
    randomize(mimi, seed + 10_000)
    lm.kv_dtype = resolve_kv_dtype(kv_dtype, device)
    return LoadedModel(config, lm.eval(), mimi.to(mimi_dtype).eval(), tokenizer, "random")


def _parts(lm: PersonaPlexLM) -> list[nn.Module]:
    """The LM cut into pieces of at most one transformer layer each."""
    parts: list[nn.Module] = []
    for child in lm.children():
        parts.extend(child.layers if isinstance(child, Transformer) else [child])
    return parts


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Fills every parameter and buffer with plausible random values: weights ~ N(0, 1/fan_in),
    norms ~ 1, layer scales at their small init, codebooks ~ N(0, 1) with unit usage."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device not in generators:
            generators[tensor.device] = torch.Generator(device=tensor.device).manual_seed(seed)
        gen = generators[tensor.device]
        like = dict(generator=gen, device=tensor.device)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("alpha",) or (leaf == "weight" and tensor.dim() == 1 and "norm" in name):
            value = torch.ones(tensor.shape, device=tensor.device)
        elif leaf == "bias":
            value = torch.zeros(tensor.shape, device=tensor.device)
        elif leaf == "scale":
            value = torch.full(tensor.shape, 0.01, device=tensor.device)
        elif leaf in ("cluster_usage", "_initialized"):
            value = torch.ones(tensor.shape, device=tensor.device)
        elif leaf == "embedding_sum":
            value = torch.randn(tensor.shape, **like)
        elif tensor.dim() >= 2:
            fan_in = math.prod(tensor.shape[1:])
            value = torch.randn(tensor.shape, **like) / math.sqrt(fan_in)
        else:
            value = torch.randn(tensor.shape, **like) * 0.02
        tensor.copy_(value.to(tensor.dtype))

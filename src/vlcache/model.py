"""Load a Qwen3-VL model and processor through transformers, and fingerprint the weights."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .defaults import DEFAULT_MODEL, MODEL_ENV_VAR
from .errors import ModelLoadError
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FINGERPRINT_SAMPLES = 4096  # elements read from each weight tensor


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    name: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str


def default_model() -> str:
    return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available (try --device cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device 'mps' requested but Apple MPS is not available (try --device cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype, or "auto" to keep the checkpoint's own dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype] or "auto"


def load(name: str, device: str = "auto", dtype: str | torch.dtype = "auto") -> LoadedModel:
    """from_pretrained on a hub id or a local folder; errors become one-line ModelLoadErrors."""
    # Imported here so that `vlcache --help` and argument errors do not pay for transformers.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    if getattr(model.config, "model_type", None) not in ("qwen3_vl", "qwen2_5_vl", "qwen2_vl"):
        raise ModelLoadError(f"model {name!r} is a {model.config.model_type!r}; vlcache supports Qwen-VL models")
    model.to(torch_device).eval()
    return LoadedModel(
        model=model,
        processor=processor,
        name=name,
        device=torch_device,
        dtype=model.dtype,
        fingerprint=fingerprint(model),
    )


def fingerprint(model: torch.nn.Module) -> str:
    """Identify the weights, not the name: a fine-tune of the same architecture gets another fingerprint.

    Hashes every tensor's name and shape and a strided sample of its values, rounded to bfloat16 so that the
    same checkpoint loaded as bfloat16, float16 or float32 gets the same fingerprint. Reading a sample keeps
    this to milliseconds on a 2B model; any fine-tune changes far more than the unsampled elements.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu")
            if sample.is_floating_point():
                sample = sample.to(torch.bfloat16).view(torch.int16)
            digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

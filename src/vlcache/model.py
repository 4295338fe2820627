"""Load a model and processor through transformers, choose its compute dtype, and fingerprint the weights."""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .defaults import DEFAULT_MODEL, MODEL_ENV_VAR
from .errors import ModelLoadError
from .families import GENERIC, family_class, supported_model_types

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FINGERPRINT_SAMPLES = 4096  # elements read from each weight tensor
_EXTRAS = {"num2words": "smolvlm"}  # packages a family's processor needs -> the vlcache extra that installs them


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    name: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    dtype_reason: str = ""  # why this dtype: "requested", or what --dtype auto saw
    quantization: str = "none"  # vlcache.quantize: "int8" when the language model's linear layers hold int8


def default_model() -> str:
    return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def is_available_locally(name: str) -> bool:
    """A local model folder, or a hub id whose config is already in the Hugging Face cache."""
    if Path(name).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ValueError, OSError):  # not a valid repo id
        return False


HUB_PROBE_SECONDS = 5.0


def check_hub_reachable(name: str) -> None:
    """Before a hub id that is not on this machine is fetched: one connection to the hub (5 s at most). Without it
    a machine offline waits through huggingface_hub's retries (five, ~25 s) for an error that says only that it
    could not connect; this says so at once, with what to do instead."""
    import socket
    import urllib.parse

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or Path(name).expanduser().exists() or is_available_locally(name):
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        return  # not a hub id: from_pretrained says what is wrong with it without the network
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct connection would prove nothing
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {name!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({reason}) and "
            "the model is not on this machine; pass --model /path/to/a/model/folder (or set VLCACHE_MODEL=/path), "
            "set HF_HUB_OFFLINE=1 to use models already downloaded, or try vlcache offline with a small random-weight "
            "model: vlcache demo-model DIR") from None


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
    """A torch dtype, or "auto" to let choose_dtype pick one for the device."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype] or "auto"


# -- the dtype --dtype auto picks ---------------------------------------------------------------------------

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86; Arm's is "bf16" in the Features line


def cpu_bf16_support() -> str | None:
    """The CPU feature that computes bfloat16 natively (e.g. "avx512_bf16"), or None.

    Without one, torch emulates bfloat16 matmuls through float32 conversions: measured 6x slower than
    float32 on an AVX2 EPYC (docs/benchmarks.md), so a bfloat16 checkpoint is computed in float32 there.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    for flag in _NATIVE_BF16_FLAGS:
        if flag in flags:
            return flag
    if "bf16" in flags:  # Armv8.6 BF16 (Graviton 3, Neoverse V1 and later)
        return "bf16"
    return None  # no /proc/cpuinfo (macOS, Windows): not known to be native, so float32


def choose_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> tuple[torch.dtype, str]:
    """What --dtype auto computes in on `device`, and why (for the load line on stderr)."""
    stored = checkpoint_dtype or torch.float32
    name = str(stored).removeprefix("torch.")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU computes bfloat16"
        return torch.float16, "auto: this GPU has no bfloat16, float16 instead"
    if device.type == "mps":
        return torch.float16, "auto: float16 on Apple MPS"
    if stored == torch.float32:
        return torch.float32, "auto: the checkpoint's float32"
    feature = cpu_bf16_support()
    if feature and stored == torch.bfloat16:
        return torch.bfloat16, f"auto: the checkpoint's bfloat16, which this CPU computes natively ({feature})"
    capability = _cpu_capability()
    return torch.float32, (
        f"auto: float32, not the checkpoint's {name}: this CPU ({capability}) has no native {name} "
        "arithmetic, which makes prefill several times slower (pass --dtype to override)"
    )


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - informational only
        return platform.machine()


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in, from its config (None when it does not say)."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype):
            return value
    return None


# -- memory, before loading ---------------------------------------------------------------------------------

def weight_files(name: str) -> list[Path]:
    """The checkpoint's safetensors files when they are on this machine (a folder, or the hub cache)."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not downloaded yet, or not a hub id: nothing local to read
            return []
    return sorted(folder.glob("*.safetensors"))


def parameter_count(files: list[Path]) -> int:
    """Elements of every tensor in safetensors files, from their headers (no tensor is read)."""
    total = 0
    for path in files:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def check_memory(name: str, device: torch.device, dtype: torch.dtype, files: list[Path]) -> None:
    """Refuse, before reading any weight, a model that will not fit in the memory at hand in `dtype`."""
    try:
        params = parameter_count(files)
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable headers: from_pretrained will say what is wrong
    need = params * torch.finfo(dtype).bits // 8
    free = available_memory(device)
    if not params or free is None or need <= free:
        return
    hint = " (try --dtype bfloat16)" if dtype == torch.float32 else ""
    raise ModelLoadError(
        f"not enough memory for {name}: {params / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')} need "
        f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is available{hint}"
    )


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike free pages
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load(name: str, device: str = "auto", dtype: str | torch.dtype = "auto", unchecked: bool = False,
         quantize: str = "none") -> LoadedModel:
    """from_pretrained on a hub id or a local folder; errors become one-line ModelLoadErrors.

    A model type outside the supported families loads only if `vlcache check` passed for its weights, or with
    `unchecked` (what the check itself uses). `quantize`: "int8" quantizes the language model's linear layers
    (vlcache.quantize); such a model has a fingerprint of its own."""
    # Imported here so that `vlcache --help` and argument errors do not pay for transformers.
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from . import quantize as quantizing

    torch_device = resolve_device(device)
    requested = resolve_dtype(dtype)
    quantizing.require(quantize)  # an unknown mode or a missing torchao fails before any weight is read
    check_hub_reachable(name)
    try:
        # 1. The config says the family and the stored dtype: enough to choose and check before the weights.
        config = AutoConfig.from_pretrained(name)
        model_type = getattr(config, "model_type", None)
        family = family_class(model_type)
        if family is None and not is_image_text_to_text(model_type):
            raise ModelLoadError(f"model {name!r} is a {model_type!r}, which vlcache does not support (transformers "
                                 "does not load it as image-text-to-text); supported: " + ", ".join(supported_model_types()))
        why = refusal(config)
        if why:
            raise ModelLoadError(f"model {name!r}: {why}")
        if requested == "auto":
            torch_dtype, reason = choose_dtype(torch_device, checkpoint_dtype(config))
        else:
            torch_dtype, reason = requested, "requested"
        files = weight_files(name)
        check_memory(name, torch_device, torch_dtype, files)
        # 2. The processor and the weights.
        processor = AutoProcessor.from_pretrained(name)
        with _no_loading_bar():
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype)
    except ImportError as exc:  # a processor's optional dependency
        extra = next((extra for package, extra in _EXTRAS.items() if package in str(exc)), None)
        hint = f" (pip install 'vlcache[{extra}]')" if extra else ""
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}{hint}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    model.to(torch_device).eval()
    weights = remembered_fingerprint(model, files or weight_files(name))  # of the float weights, as stored
    quantizing.apply(model, quantize)
    loaded = LoadedModel(
        model=model,
        processor=processor,
        name=name,
        device=torch_device,
        dtype=model.dtype,
        fingerprint=quantizing.tagged_fingerprint(weights, quantize),
        dtype_reason=reason,
        quantization=quantize,
    )
    # 3. An unlisted model type runs through the generic adapter only once `vlcache check` passed for its weights
    # with this generation config, chat template, processor settings and transformers version.
    if family_class(model_type) is None and not unchecked:
        changed = check_changes(check_identity(model, processor, loaded.fingerprint))
        if changed is None:
            raise ModelLoadError(
                f"model {name!r} is a {model_type!r}, which vlcache has no family for: run `vlcache check --model {name}` "
                "once to test whether the generic adapter (plain positions, full-attention K/V) is exact for these weights")
        if changed:
            raise ModelLoadError(f"model {name!r}: its {' and '.join(changed)} changed since `vlcache check` passed for "
                                 f"these weights; run `vlcache check --model {name}` again")
    return loaded


def refusal(config) -> str | None:
    """Why vlcache cannot be exact for a model of this config, by its family (or the generic adapter's); None: it can."""
    return (family_class(getattr(config, "model_type", None)) or GENERIC).refuse(config)


def is_image_text_to_text(model_type: str | None) -> bool:
    """Whether transformers loads this model type with AutoModelForImageTextToText."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


# -- the weight fingerprint -----------------------------------------------------------------------------------

def fingerprint_cache_path() -> Path:
    """Where fingerprints are remembered: $VLCACHE_HOME/fingerprints.json (default ~/.cache/vlcache)."""
    return paths.fingerprints_file()


# -- models that passed `vlcache check` ---------------------------------------------------------------------

def checks_path() -> Path:
    return paths.checks_file()


def check_identity(model, processor, fingerprint: str) -> dict:
    """What a pass of `vlcache check` holds for: the weights, and what else decides the prompt ids and the tokens
    (the generation config, the chat template, the processor's settings, transformers' version). The weights
    alone would let a copy with `no_repeat_ngram_size` or another template load on the plain copy's pass."""
    import transformers

    generation = model.generation_config.to_dict()
    generation.pop("transformers_version", None)  # the version that wrote the file, not the one that runs it
    return {"weights": fingerprint, "generation config": _digest(generation),
            "chat template": _digest(getattr(processor, "chat_template", None)),
            "processor settings": _digest(processor.to_dict()), "transformers version": transformers.__version__}


def checked(identity: dict) -> dict | None:
    """What `vlcache check` recorded when it passed for exactly this identity (check_identity), or None."""
    record = paths.read_json_dict(checks_path()).get(identity["weights"])
    return record if isinstance(record, dict) and record.get("identity") == identity else None


def check_changes(identity: dict) -> list[str] | None:
    """None: `vlcache check` never passed for these weights; else what changed since it did (empty: nothing)."""
    record = paths.read_json_dict(checks_path()).get(identity["weights"])
    if not isinstance(record, dict):
        return None
    passed = record.get("identity") if isinstance(record.get("identity"), dict) else {}
    return [name for name, value in identity.items() if passed.get(name) != value]


def remember_check(identity: dict, record: dict | None) -> None:
    """Record that `vlcache check` passed for this identity (or forget the weights' pass: `record` None after a
    failure). One pass is kept per weights: the latest."""
    known = paths.read_json_dict(checks_path())
    known.pop(identity["weights"], None)
    if record is not None:
        known[identity["weights"]] = {**record, "identity": identity}
    paths.write_json_atomic(checks_path(), known)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def checkpoint_identity(model: torch.nn.Module, files: list[Path]) -> str | None:
    """A key that changes whenever any weight file changes: resolved path, size, inode, mtime and ctime.

    Hub snapshots resolve to content-addressed blobs; a rewritten local file gets a new mtime and ctime
    (ctime cannot be set back by a user). None when the weights did not come from files we can see.
    """
    if not files:
        return None
    parts = [type(model).__name__]
    for path in files:
        real = path.resolve()
        st = real.stat()
        parts.append(f"{real}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def remembered_fingerprint(model: torch.nn.Module, files: list[Path]) -> str:
    """fingerprint(model), computed once per checkpoint and remembered under its identity."""
    try:
        identity = checkpoint_identity(model, files)
    except OSError:
        identity = None
    if identity is None:
        return fingerprint(model)
    path = fingerprint_cache_path()
    known = paths.read_json_dict(path)
    if isinstance(known.get(identity), str):
        return known[identity]
    value = fingerprint(model)
    known[identity] = value
    paths.write_json_atomic(path, dict(list(known.items())[-256:]))  # a bounded memory: the newest 256 checkpoints
    return value


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


def quiet_transformers(verbose: bool = False) -> None:
    """What transformers itself prints: its "Loading weights" progress bar and warnings such as Qwen3.5's about
    CUDA-only kernel packages (causal_conv1d, flash-linear-attention) that a CPU cannot use. A command shows
    them only when verbose; the Hugging Face hub's download bars are not affected. Set for the process: the
    kernel warnings come at the first forward, not at load."""
    from transformers.utils import logging as hf_logging

    global _SHOW_LOADING_BAR
    _SHOW_LOADING_BAR = verbose
    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


_SHOW_LOADING_BAR = False  # transformers' "Loading weights" bar: only after quiet_transformers(verbose=True)


@contextlib.contextmanager
def _no_loading_bar():
    """Engine.load prints nothing of its own (a library's caller decides what its stderr shows): transformers'
    loading bar is off for the load, then as it was."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not _SHOW_LOADING_BAR:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()

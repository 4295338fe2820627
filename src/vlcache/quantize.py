"""Opt-in int8 weights for the language model (`--quantize int8`, Engine.load(quantize="int8")).

torchao quantizes each linear layer of the text decoder and the output projection symmetrically per output row
(Int8WeightOnlyConfig: int8 values, one scale a row); the layers then hold only those int8 values and scales and
multiply through ATen's packed CPU kernel for weight-only int8 (torch._weight_int8pack_mm) in a decode step
(one new position per row). Measured on a 2-core EPYC with AVX-512 BF16 (docs/benchmarks-quant.md): at one row that
kernel reads the 2B's decoder weights several times faster than the bfloat16 matmul, while at prefill sizes it is
slower than converting the int8 weights and multiplying in the compute dtype, which is what larger inputs do. Both
paths compute (x @ q^T) * scale with the same scales. torchao's own dynamic int8 activations and its eager
weight-only path were slower than bfloat16 on this CPU at one row (bench/quant.py), so they are not used.

The vision encoder and the projector stay in the compute dtype (a state's media prefill is a one-time cost, and
their activations are not a decode step's), and state files keep exact K/V in the compute dtype. A quantized model
is a different model: its fingerprint is the float weights' fingerprint tagged with the quantization, and its
files say which quantization made them (StateMetadata.quantization).
"""

from __future__ import annotations

import hashlib

import torch

from .errors import ModelLoadError

QUANTIZATIONS = ("none", "int8")
# Which kernel multiplies depends only on the input's shape per row, never on how many rows came together: the
# packed kernel and the converted matmul round differently (bfloat16: up to 0.25 on one layer), so a rule by row
# count made a question's answer depend on what it was batched with, and a cached prefill of a short question
# differ from generate()'s whole-prompt prefill. One new position per row ([rows, 1, features]: a decode step,
# in vlcache's batches and in generate() alike) goes through the packed kernel, PACKED_CHUNK rows a call (each
# row's product is its own: tested; the kernel is fast up to 4 rows and slows past them); every other input (a
# prefill, flattened tokens) is converted and multiplied. Measured in bench/quant.py (a): at one row the packed
# kernel is 2-4x the bfloat16 matmul's speed; at prefill sizes it is several times slower than converting.
PACKED_CHUNK = 4


def require(quantize: str) -> None:
    """An unknown mode, or int8 without torchao: one-line ModelLoadError (before any weight is read)."""
    if quantize not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize != "none":
        _torchao()


def _torchao():
    """torchao's quantize_ and Int8WeightOnlyConfig."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ModelLoadError("--quantize int8 needs torchao, which is not installed: pip install 'vlcache[quant]'") from None
    return Int8WeightOnlyConfig, quantize_


def tagged_fingerprint(fingerprint: str, quantize: str) -> str:
    """The weights' fingerprint as a model quantized this way computes with them ("none": unchanged)."""
    if quantize == "none":
        return fingerprint
    return hashlib.sha256(f"{fingerprint}:{quantize}".encode()).hexdigest()[:32]


class Int8Linear(torch.nn.Module):
    """A linear layer holding int8 weights [out, in] and one scale per output row in the compute dtype.

    `weight` keeps the name and shape of the float layer's (vocabulary size read from lm_head.weight.shape)."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        self.register_buffer("weight", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scale = self.scale.to(x.dtype)
        if x.dim() == 3 and x.shape[1] == 1 and flat.device.type == "cpu":  # a decode step (see PACKED_CHUNK)
            parts = [torch._weight_int8pack_mm(chunk.contiguous(), self.weight, scale) for chunk in flat.split(PACKED_CHUNK)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            y = torch.mm(flat, self.weight.t().to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def language_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The nn.Linear layers of the text decoder and the output projection, by qualified name."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise ModelLoadError(f"--quantize int8: cannot find the language model of a {type(model).__name__}")
    # Exactly nn.Linear: a subclass may return more than the product (Llama 4's MoE router returns its scores too).
    targets = {id(m) for m in decoder.modules() if type(m) is torch.nn.Linear}
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        targets.add(id(head))
    return {name: m for name, m in model.named_modules() if id(m) in targets}


def apply(model: torch.nn.Module, quantize: str) -> int:
    """Quantize the language model's linear layers in place; how many were replaced ("none": nothing)."""
    require(quantize)
    if quantize == "none":
        return 0
    Int8WeightOnlyConfig, quantize_ = _torchao()
    targets = language_linears(model)
    if not targets:
        raise ModelLoadError(f"--quantize int8: {type(model).__name__} has no linear layers in its language model")
    dtype = next(iter(targets.values())).weight.dtype
    wanted = set(targets.values())
    # torchao computes the int8 values and per-row scales; set_inductor_config=False leaves torch.compile's global
    # settings as they are (decode.probe decides compilation).
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, _: m in wanted)
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = linear.weight
        replacement = Int8Linear(weight.qdata, weight.scale.to(dtype), linear.bias)
        setattr(parent, child, replacement)
    return len(targets)


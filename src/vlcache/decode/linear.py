"""bfloat16 linear layers on a CPU with their weights reordered once for oneDNN, not at every call.

A bfloat16 `F.linear` on a CPU goes to oneDNN, which first reorders the weight into its blocked layout, at every
call: a decode step at the 2B architecture copies all 3.4 GB of its weights before it reads them, which is most
of the step (bench/profile_step.py, docs/benchmarks-peer.md). Reordered once at load (the same oneDNN kernel
inductor's freezing pass uses, `mkldnn._linear_pointwise` on a packed weight), a layer gives the same numbers
bit for bit; `pack` checks that for every distinct weight shape on this machine before it packs anything, so
answers stay equal to transformers' generate() on the unpacked model. The packed copy is held beside the
weight (code that reads the weight, the tied input embedding, the fingerprint, see the plain one): memory
grows by the packed layers' size, and packing is skipped when the memory available cannot hold that twice.
VLCACHE_PACK=0 turns it off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("vlcache")

PROBE_ROWS = (1, 3, 37)  # input rows the check compares (a decode step, a short and a longer prefill)


def _packable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # Exactly nn.Linear with plain tensors: a quantized layer (a tensor subclass) or a custom forward is left alone.
    return (type(module) is torch.nn.Linear and type(weight) in (torch.nn.Parameter, torch.Tensor)
            and type(weight.data) is torch.Tensor and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.bfloat16))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Packed:
    """The forward of one packed linear layer (set as the module's forward; the module keeps its weight)."""

    def __init__(self, module: torch.nn.Linear, packed: torch.Tensor):
        self.module, self.packed = module, packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Anything else takes the layer as it was; so does a traced forward (inductor lowers this op only on
        # weights it froze itself, and then packs them on its own).
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return F.linear(x, self.module.weight, self.module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.module.bias, "none", [], "")


def _same(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor) -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows in PROBE_ROWS:
        x = torch.randn(rows, weight.shape[1], generator=generator).to(torch.bfloat16)
        if not torch.equal(F.linear(x, weight, bias), torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")):
            return False
    return True


@torch.inference_mode()
def pack(model: torch.nn.Module) -> str:
    """Pack the model's bfloat16 CPU linear layers where oneDNN gives the plain layer's numbers; says what it did."""
    if os.environ.get("VLCACHE_PACK", "1") == "0":
        return "off (VLCACHE_PACK=0)"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "off (this torch has no oneDNN linear)"
    modules = [m for m in model.modules() if _packable(m)]
    if not modules:
        return "off (no bfloat16 CPU linear layers)"
    size = sum(m.weight.numel() * 2 for m in modules)
    available = _available_bytes()
    if available is not None and available < 2 * size:
        return f"off (packing needs {size / 2**30:.1f} GiB more, {available / 2**30:.1f} GiB available)"
    checked: dict[tuple, bool] = {}
    packed = []
    for module in modules:
        weight, bias = module.weight, module.bias
        try:
            mine = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        except RuntimeError as exc:
            return f"off (oneDNN cannot pack a {tuple(weight.shape)} weight: {str(exc).splitlines()[0]})"
        key = (tuple(weight.shape), bias is not None)
        if key not in checked:  # the same kernel for every weight of a shape: one check a shape
            checked[key] = _same(weight.detach(), None if bias is None else bias.detach(), mine)
        if not checked[key]:
            return f"off (a packed {tuple(weight.shape)} layer rounds differently on this CPU)"
        packed.append((module, mine))
    for module, mine in packed:  # only once every shape passed: all layers packed or none
        module.forward = _Packed(module, mine)
    return f"{len(packed)} layers ({size / 2**30:.1f} GiB) packed once for oneDNN"

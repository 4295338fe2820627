"""What every tiny family builder (families.py, more_families.py) does last: give a model random weights wide
enough to tell tokens apart and save it with its generation config. One module both import, so neither imports
the other for it; tests that only want the config (tests/test_bench.py) replace save_model here."""

from __future__ import annotations

from pathlib import Path

import torch


def save_model(model_class, config, folder: Path, seed: int, init_std: float, eos: int, pad: int,
                randomize=("language_model", "lm_head", "multi_modal_projector"), adjust=None) -> None:
    """Random weights wide enough that greedy decoding varies (a model repeating one token hides bugs)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * init_std)
            elif param.dim() == 2 and any(part in name for part in randomize):
                param.normal_(0.0, init_std)
        if adjust is not None:
            adjust(model)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.do_sample = False
    model.save_pretrained(folder)

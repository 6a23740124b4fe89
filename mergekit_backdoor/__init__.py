"""mergekit-backdoor: sanitize backdoored models by merging them with benign donors.

Importing this package is cheap: torch, mergekit and lm-eval load only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the ``sanitize`` merge method with mergekit (idempotent)."""
    global _registered
    if _registered:
        return
    import sys

    methods_module = sys.modules.get("mergekit_backdoor.merge.methods")
    if methods_module is not None and not hasattr(methods_module, "METHODS"):
        return  # mid-import of our methods module: it registers itself when it finishes
    from mergekit import merge_methods

    from mergekit_backdoor.merge.methods import METHODS

    known = {method.spec.name for method in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            merge_methods.register(method)
    _registered = True

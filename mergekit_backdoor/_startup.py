"""Run by ``mergekit_backdoor.pth`` at every interpreter start.

mergekit and lm-eval have no plugin discovery, so this module installs a one-shot import hook:
when ``mergekit.merge_methods``, ``mergekit.merge`` or ``lm_eval.models`` finish loading, the
project's merge method, merge checks and ``hf-seqcls`` backend are attached to them. It imports
neither torch nor mergekit itself, and no error in it may break Python start-up.
Set ``MERGEKIT_BACKDOOR_DISABLE=1`` to switch it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable


def _register_merge_method(_module: object) -> None:
    from mergekit_backdoor import register

    register()


def _wrap_run_merge(module: object) -> None:
    from mergekit_backdoor.merge.run import install_run_merge_wrapper

    install_run_merge_wrapper(module)


def _guard_mergekit_yaml(module: object) -> None:
    from mergekit_backdoor.merge.run import install_cli_error_handler

    install_cli_error_handler(module)


def _register_lm_eval_backend(_module: object) -> None:
    from mergekit_backdoor.eval import register_backend

    register_backend()


_HOOKS: dict[str, Callable[[object], None]] = {
    "mergekit.merge_methods": _register_merge_method,
    "mergekit.merge": _wrap_run_merge,
    "mergekit.scripts.run_yaml": _guard_mergekit_yaml,
    "lm_eval.models": _register_lm_eval_backend,
}


class _RunAfter(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, hook: Callable[[object], None]) -> None:
        self.inner = inner
        self.hook = hook

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.inner.exec_module(module)
        try:
            self.hook(module)
        except Exception as exc:  # a broken plugin must not break mergekit or lm-eval
            print(f"mergekit-backdoor: start-up hook for {module.__name__} failed: {exc}",
                  file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfter(spec.loader, hook)
        return spec


def _install() -> None:
    if os.environ.get("MERGEKIT_BACKDOOR_DISABLE") == "1":
        return
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    for name, hook in _HOOKS.items():
        if name in sys.modules:  # imported before us (e.g. an editable path set up late)
            try:
                hook(sys.modules[name])
            except Exception:
                pass
    sys.meta_path.insert(0, _Finder())


try:
    _install()
except Exception:
    pass

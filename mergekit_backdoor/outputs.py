"""Outputs that appear atomically: a folder is filled under a hidden sibling name, then renamed.

An interrupted run therefore never leaves a folder that looks finished, and an existing output
is replaced only when asked.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_backdoor.errors import OutputExistsError

OVERWRITE_ENV = "MERGEKIT_BACKDOOR_OVERWRITE"


def ensure_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: output folder exists and is not empty; "
            f"pass --overwrite (or {OVERWRITE_ENV}=1) to replace it"
        )


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling folder to fill; renamed to ``out`` on success, removed on failure."""
    out = Path(out).absolute()
    ensure_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        yield partial
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            partial.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

"""Shared test fixtures.

Real data lives outside the repository, in ``../shared/data`` (or wherever
``MERGEKIT_BACKDOOR_DATA`` points); tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    candidates = [os.environ.get("MERGEKIT_BACKDOOR_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MANIFEST.sha256").is_file():
            return Path(candidate).resolve()
    return None


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real backdoor data folder; skips the test when it is not on this machine."""
    if SHARED_DATA is None:
        pytest.skip("real data not found: set MERGEKIT_BACKDOOR_DATA or place it at ../shared/data")
    return SHARED_DATA

"""Shared fixtures: the real data folder (skips when absent) and small synthetic data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository, or ``$TWINVIEW_SHARED_DATA``."""
    return Path(os.environ.get("TWINVIEW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real evaluation data (read-only); the test is skipped when the folder is absent."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    return root

"""Shared test helpers: where the real data sets, tokenizers and configs live.

They sit in `../shared/data` beside the repository in CI; a user's clone does not have them,
so every test that needs them skips with a message naming the path it looked at.
Set MEML_SHARED_DATA to point elsewhere.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("MEML_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_shared(*parts: str) -> Path:
    """Path to a file or folder under shared/data, or skip the calling test naming it."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (real data from ../shared/data): not present")
    return path

"""Shared test setup: point FIREACT_DATA_DIR at the shared copy of the FireAct data when there is one."""

import os
from pathlib import Path

import pytest

from fireact_utils import config

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "fireact"

if SHARED_DATA.is_dir():
    os.environ.setdefault("FIREACT_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def data_dir() -> Path:
    """The FireAct data dir; tests that read real data are skipped (with the reason) without one."""
    try:
        return config.data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))

"""Shared fixtures: the tiny model and tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Split-learning runs read SST-2 / AG News; CI has them beside the repository, a bare clone may not.
needs_sst2 = pytest.mark.skipif(not (Path(os.environ.get("EDGELAM_DATA", SHARED_DATA)) / "sst2_agnews").is_dir(),
                                reason="SST-2 / AG News (sst2_agnews/) not found; set EDGELAM_DATA to the data folder")


@pytest.fixture(scope="session")
def tiny():
    from edgelam.models.load import load_base

    return load_base("tiny", "float32", 0)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests find the real data beside the repository, whatever the working directory.
    if "EDGELAM_DATA" not in os.environ:
        monkeypatch.setenv("EDGELAM_DATA", str(SHARED_DATA))

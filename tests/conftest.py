"""Shared fixtures: the tiny model and tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def data_dir() -> Path:
    """Where the real data sets are: $EDGELAM_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("EDGELAM_DATA", SHARED_DATA))


# Only the tests of the SST-2 / AG News readers themselves need the real files.
needs_sst2 = pytest.mark.skipif(not (data_dir() / "sst2_agnews").is_dir(),
                                reason="SST-2 / AG News (sst2_agnews/) not found; set EDGELAM_DATA to the data folder")


@pytest.fixture
def split_source() -> str:
    """The data.source of split-learning runs: SST-2 where it is found (CI), else EdgeLAM's
    synthetic sentiment set (the same two classes), so a bare clone runs these tests too."""
    return "sst2" if (data_dir() / "sst2_agnews" / "SST-2").is_dir() else "synthetic_sentiment"


@pytest.fixture(scope="session")
def tiny():
    from edgelam.models.load import load_base

    return load_base("tiny", "float32", 0)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _torch_threads():
    """A run with ``threads: 1`` sets torch's thread count for the process; give later tests theirs back."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests find the real data beside the repository, whatever the working directory.
    if "EDGELAM_DATA" not in os.environ:
        monkeypatch.setenv("EDGELAM_DATA", str(SHARED_DATA))

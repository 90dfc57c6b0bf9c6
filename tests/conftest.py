"""Shared pytest fixtures: the real SEN12MS-CR sample (when present) and small synthetic trees."""
import sys
from pathlib import Path

import pytest

import synthetic_sets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The real triplet lives beside the checkout (../shared/data), never inside it.
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "sen12mscr-sample"


@pytest.fixture(scope="session")
def real_sample_dir():
    if not (SHARED_SAMPLE / "data.csv").is_file():
        pytest.skip(f"real SEN12MS-CR sample not found at {SHARED_SAMPLE}")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """(root, csv) of a small synthetic SEN12MS-CR tree: 12 triplets of 64 px in 3 scenes, official layout."""

    root = tmp_path_factory.mktemp("synthetic_sen12mscr")
    csv_path = synthetic_sets.make_synthetic_dataset(root, n=12, size=64, seed=0)
    return root, csv_path

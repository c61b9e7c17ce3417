"""Reading the real-MXNet fixtures in tests/fixtures/ (made by make_mxnet_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str):
    """The arrays of ``fixtures/<name>.npz`` (no pickles) and its decoded ``config_json``."""
    data = np.load(FIXTURES / f"{name}.npz", allow_pickle=False)
    return data, json.loads(str(data["config_json"]))


def optional(value) -> float | None:
    """A stored clip_gradient: NaN stands for None (no clipping)."""
    return None if np.isnan(value) else float(value)

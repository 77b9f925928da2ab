"""A bounded soak (benchmarks/soak.py, 10 minutes when run by hand): traffic on every kind of flow
of the seed's figure while the config reloads, certificates rotate every 10 s, a pod is deleted
and added back and the ztunnels get SIGHUP, every few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import soak  # noqa: E402

DURATION = 40.0  # seconds: long enough for every disturbance to happen several times


def test_traffic_survives_reloads_rotations_churn_and_sighup(tmp_path: Path) -> None:
    result = soak.run(DURATION, tmp_path)
    assert soak.problems(result) == []
    assert all(result["events"].get(kind, 0) >= 2 for kind in ("SIGHUP", "pod deleted")), result[
        "events"
    ]
    steady = [f for f in result["flows"] if not f["may_be_cut"]]
    assert all(f["ok"] >= 50 and f["failed"] == 0 for f in steady), steady
    # The long-lived connections lived through every disturbance.
    assert all(f["connections"] == 1 and f["ok"] >= DURATION / 2 for f in result["long_lived"])

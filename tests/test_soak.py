"""A reduced soak run: memory stays flat over many predictions in one process.

The full-size run (3000 images) is `python scripts/soak.py`; results in scripts/results/soak.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_memory_stays_flat_while_predicting(tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "600", "--every", "50", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["rss_mb"][-1][0] == 600
    assert result["growth_mb"] < 25

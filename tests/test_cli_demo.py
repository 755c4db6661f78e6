"""`make demo` (= `deepgaze fit --config configs/quickstart.yaml`): under 5 minutes on 2 CPU cores, and it learns:
the validation information gain over the centre bias it prints is clearly positive."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DEMO_LIMIT_S = 300


@pytest.mark.slow
@pytest.mark.timeout(2 * DEMO_LIMIT_S)
def test_quickstart_finishes_in_five_minutes_with_a_positive_information_gain(tmp_path):
    command = [sys.executable, "-m", "deepgaze_lit.cli", "fit", "--config", str(REPOSITORY / "configs" / "quickstart.yaml"),
               "--experiments_root", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    start = time.monotonic()
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=2 * DEMO_LIMIT_S)
    seconds = time.monotonic() - start
    assert finished.returncode == 0, finished.stderr[-3000:]
    last_line = finished.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"validation IG over centre bias: (-?\d+\.\d+) bit/fix \((-?\d+\.\d+)% of the gold standard (\d+\.\d+) bit/fix\)",
        last_line,
    )
    assert match, last_line
    ig, share = float(match.group(1)), float(match.group(2))
    print(f"quickstart: {seconds:.0f} s, {last_line}")
    assert ig > 0.3 and share > 40.0
    assert seconds < DEMO_LIMIT_S

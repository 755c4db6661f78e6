"""`make demo` (= `deepgaze fit --config configs/quickstart.yaml`) learns: the validation information gain over the
centre bias it prints is clearly positive and a large share of the gold standard.

Its duration is printed, not asserted (timings belong in benchmarks/: `benchmarks/train.py` measures the quickstart);
on an idle 2-core machine it takes about 1.5 minutes."""

import subprocess
import sys
import time

import pytest

from conftest import IG_LINE, REPOSITORY

TIMEOUT_S = 900


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_quickstart_learns_a_positive_share_of_the_gold_information_gain(tmp_path):
    command = [sys.executable, "-m", "deepgaze_lit.cli", "fit", "--config", str(REPOSITORY / "configs" / "quickstart.yaml"),
               "--experiments_root", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    start = time.monotonic()
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    seconds = time.monotonic() - start
    assert finished.returncode == 0, finished.stderr[-3000:]
    last_line = finished.stdout.strip().splitlines()[-1]
    match = IG_LINE.fullmatch(last_line)
    assert match, last_line
    ig, share = float(match.group(1)), float(match.group(2))
    print(f"quickstart: {seconds:.0f} s, {last_line}")
    assert ig > 0.3 and share > 40.0

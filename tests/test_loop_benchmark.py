"""benchmarks/loop_overhead.py keeps running as the trainer changes (it hooks the trainer's end of step):
both pairings, a tiny size, every round reported. Timings are printed, never asserted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pairing", ["step", "segment"])
def test_both_pairings_report_every_round_and_the_median_ratio(pairing):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_overhead.py"), "--rounds", "2",
                           "--steps", "5", "--batch", "8", "--pairing", pairing], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rounds = re.findall(r"^round (\d)/2: suite ([\d.]+) ms/step, bare ([\d.]+) ms/step, ratio ([\d.]+)$",
                        done.stdout, re.M)
    assert [r[0] for r in rounds] == ["1", "2"]
    assert all(float(v) > 0 for r in rounds for v in r[1:])
    final = re.search(rf"pairing by {pairing}\n.*\nloop overhead ratio \(suite / bare\), median of 2 rounds: "
                      r"([\d.]+) \(rounds ([\d.]+)\.\.([\d.]+); target <= 1.05\)", done.stdout)
    assert final is not None, done.stdout
    ratios = sorted(float(r[3]) for r in rounds)
    # The median of two rounds is their mean; each printed to 3 decimals.
    assert float(final.group(1)) == pytest.approx(sum(ratios) / 2, abs=1e-3)
    assert (float(final.group(2)), float(final.group(3))) == (ratios[0], ratios[1])

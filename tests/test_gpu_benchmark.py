"""benchmarks/gpu.py: without CUDA one line and exit 0; ``--dry-run-cpu`` runs every row at tiny sizes
on the CPU and writes them all to the JSON with a finite positive throughput and an MFU field."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
PEAK = 0.5  # TFLOPS given with --peak-tflops: MFU is computed against it on the CPU


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no CUDA, even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    done = run(timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("benchmarks/gpu.py: no CUDA device (torch ")
    assert lines[0].endswith(", cuda available: False); nothing to measure")


def test_dry_run_on_cpu_measures_every_row(tmp_path):
    out = tmp_path / "results" / "gpu.json"
    done = run("--dry-run-cpu", "--threads", "1", "--row-s", "0.2", "--budget-s", "90", "--workers", "1",
               "--peak-tflops", str(PEAK), "--json", str(out), timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    stackgan = [f"StackGAN {stage} {label}" for stage in ("I", "II")
                for label in ("fp32", "bf16 autocast", "bf16 + paired D", "bf16 + paired D + channels_last")]
    measured = ["DDPM fp32", "DDPM bf16 autocast", "DDPM bf16 autocast, schedule on device", "DCGAN fp32",
                "DCGAN bf16 autocast", "data loader, 0 workers", "data loader, 1 worker", *stackgan]
    assert [n for n, r in rows.items() if r["status"] == "ok"] == measured, {n: r["reason"] for n, r in rows.items()}
    # No compile rows without --compile; the DDP row is there, skipped (no NCCL on the CPU), which is no failure.
    assert [n for n, r in rows.items() if r["status"] != "ok"] == ["DCGAN bf16 autocast, DDP 2 x gloo"]
    assert rows["DCGAN bf16 autocast, DDP 2 x gloo"]["status"] == "skipped" and data["failures"] == []
    for name in measured:
        row = rows[name]
        assert isinstance(row["throughput"], float) and math.isfinite(row["throughput"]) and row["throughput"] > 0
        assert "mfu" in row
        if row["group"] == "data":
            assert row["mfu"] is None and row["unit"] == "samples/s"
            assert {v["row"] for v in row["ratio_vs_consumption"].values()} <= set(measured)
            assert set(row["ratio_vs_consumption"]) == {"ddpm", "dcgan"}
        else:
            assert row["flops_per_step"] > 0
            expected = row["flops_per_step"] / (row["step_ms"] / 1e3) / (PEAK * 1e12)
            assert math.isclose(row["mfu"], expected, rel_tol=1e-9) and row["mfu"] > 0
    assert data["peak_tflops"] == PEAK and data["dry_run_cpu"] is True
    assert "| row | batch | throughput | ms/step |" in done.stdout

"""The benchmark script runs our loop and TRL's trainer on the same work and reports numbers.
Speeds are printed, never asserted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_times_our_loop_and_trls_trainer_on_the_same_work(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--stages", "dpo", "--trl",
                           "--steps", "2", "--warmup", "1", "--records", "24", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["stage"], r["impl"]) for r in rows] == [("dpo", "ours"), ("dpo", "trl")]
    for r in rows:
        assert r["steps"] == 2
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
    header = next(line for line in proc.stdout.splitlines() if line.startswith("stage"))
    assert "samples/s" in header and "peak RSS MB" in header

"""`fastgpu-jax bench --config` over 1 and 2 fake CPU devices: rows per device count, scaling column."""

import json
import os
import subprocess
import sys

from conftest import DIGITS, ROOT


def test_bench_reports_each_device_count(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "")  # conftest's compile flag; the device count below wins
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2".strip())
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "fastgpu_jax", "bench", "--config", DIGITS, "--steps", "2",
                           "--json", str(out), "--config.data.batch_size=16"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["devices"], r["strategy"], r["global_batch"]) for r in rows] == [(1, "none", 16), (2, "dp", 32)]
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0
    assert "scaling" in proc.stdout

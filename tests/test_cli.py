"""The README's main job: `distspatial demo`, run for real (small sizes) in its own process and Ray runtime."""

import subprocess
import sys

import pytest


def test_demo_runs_and_checks_itself():
    out = subprocess.run(
        [sys.executable, "-m", "distspatial.cli", "demo", "--points", "60000", "--queries", "5000", "--nodes", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "demo PASSED" in text
    assert "distances exact" in text and "range_search" in text and "distributed_kmeans" in text
    assert "load balance" in text  # the statistics report


@pytest.mark.parametrize("args, message", [
    (["demo", "--points", "0"], "must be >= 1"),
    (["demo", "--curve", "peano"], "invalid choice"),
    (["nonsense"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(args, message):
    out = subprocess.run([sys.executable, "-m", "distspatial.cli", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr

"""Runs the plugin's C++ tests (built by setup.py into build/cmake/tests)."""
import subprocess
from pathlib import Path

import pytest

TEST_DIR = Path(__file__).resolve().parents[1] / "build" / "cmake" / "tests"


@pytest.mark.parametrize("name", ["TestCGMLIntegrator"])
def test_cpp(name):
    binary = TEST_DIR / name
    if not binary.exists():
        pytest.fail(f"C++ test {binary} was not built: run `make build` (pip install --no-build-isolation -e .)")
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("Done")

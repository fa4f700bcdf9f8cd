"""The Triton kernels themselves, run on CPU by Triton's interpreter.

Triton fixes interpreter mode when kernels are defined, so the accuracy cases run again in a
fresh process with TRITON_INTERPRET=1 (there the same API calls dispatch to the kernels).
Run them directly with:
    TRITON_INTERPRET=1 python -m pytest tests/flash_sigmoid/test_accuracy.py tests/flash_sigmoid/test_features.py \
        tests/flash_sigmoid/test_flash_attn_semantics.py \
        tests/flash_sigmoid/test_kernel_helpers.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import INTERPRETED

pytest.importorskip("triton")


def interpreted(names: tuple[str, ...]) -> subprocess.Popen:
    """pytest on these test files, in a process where the API calls run the Triton kernels."""
    files = [str(Path(__file__).with_name(name)) for name in names]
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                            env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_accuracy_cases_on_the_triton_kernels():
    # two processes at once, one core each: the interpreter keeps one core busy
    runs = [interpreted(("test_accuracy.py",)),
            interpreted(("test_features.py", "test_flash_attn_semantics.py", "test_kernel_helpers.py"))]  # fmt: skip
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stdout[-6000:] + stderr[-2000:]
        assert " passed" in stdout and "skipped" not in stdout

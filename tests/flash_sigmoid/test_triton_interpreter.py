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


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")
def test_accuracy_cases_on_the_triton_kernels():
    names = ("test_accuracy.py", "test_features.py", "test_flash_attn_semantics.py", "test_kernel_helpers.py")
    cases = [Path(__file__).with_name(name) for name in names]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, cases)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout

"""The kernels' cost on the GPU, measured without one: `scripts/inspect_kernels.py` compiles them
for sm_80 and sm_90 and reads the SASS. Every config the launcher keeps fits the architecture's
shared memory, and every kernel spends at most one special-function (MUFU) instruction per
attention element in its hot loop — two with softcap, whose tanh is a second ex2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import INTERPRETED

pytestmark = pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU; the interpreter has one tile")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "inspect_kernels.py"


def inspect(tmp_path, *args) -> list[dict]:
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}  # compile for real, not from a cache
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", "--jobs", "2", "--out", str(tmp_path), *args],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow
def test_every_kept_config_fits_and_spends_one_mufu_per_element(tmp_path):
    rows = inspect(tmp_path, "--arch", "80", "90", "--dtype", "bf16", "--head-dim", "128", "--variant", "base")
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ("fwd", "bwd_dq", "bwd_dkdv")
                                                         for a in ("sm_80", "sm_90")}  # fmt: skip
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['block_m']}x{r['block_n']}/{r['num_warps']}w/{r['num_stages']}s"
        assert r["fits"], f"{where}: {r['shared_bytes']} bytes of shared memory: the prune rule should drop it"
        assert r["mufu_per_element"] <= 1.05, f"{where}: {r['mufu_per_element']} MUFU per element"
        assert r["tensor_core"] > 0 and Path(r["cubin"]).is_file()
        assert r["loop_spills"] == 0, f"{where}: {r['loop_spills']} spills in the loop: add it to LOOP_SPILLS"
    assert any(r["arch"] == "sm_90" and r["block_m"] * r["block_n"] >= 128 * 64 for r in rows)  # big tiles stay


@pytest.mark.slow
def test_every_variant_spends_one_mufu_per_element(tmp_path):
    rows = inspect(tmp_path, "--arch", "90", "--dtype", "fp16", "--head-dim", "64", "--smallest")
    assert len({r["variant"] for r in rows}) == 11  # base and ten variants
    for r in rows:
        limit = 2.05 if r["variant"] == "softcap" else 1.05
        assert 0.95 <= r["mufu_per_element"] <= limit, f"{r['kernel']} {r['variant']}: {r['mufu_per_element']}"


def test_gpu_check_says_it_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh would run for minutes")
    result = subprocess.run(["bash", str(SCRIPT.with_name("gpu_check.sh"))], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 2 and "needs a CUDA device" in result.stderr

"""Softcap, dropout, the KV cache and flash-attn's argument forms on CPU: the chunked PyTorch path,
and the Triton kernels when TRITON_INTERPRET=1 (test_triton_interpreter.py). The checks, each
taking a device, are in feature_checks.py (tests/gpu runs them on CUDA)."""

import numpy as np
import pytest
import torch

from flash_sigmoid import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

from .feature_checks import check_dropout, check_kvcache, check_sigmoid_at_minus_log_n, check_softcap
from .helpers import INTERPRETED, make_inputs

# under the interpreter (the kernels run on numpy) one dtype per check keeps the run short
LOW = [torch.bfloat16] if INTERPRETED else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW + ([] if INTERPRETED else [torch.float32]))
def test_softcap(dtype):
    check_softcap("cpu", dtype)


def test_dropout():
    check_dropout("cpu")


@pytest.mark.parametrize("paged, num_splits, rotary", [(False, 1, None), (True, 3, True), (False, 2, False)])
def test_kvcache(paged, num_splits, rotary):
    check_kvcache("cpu", paged, num_splits, rotary)


@pytest.mark.parametrize("dtype", LOW)
def test_sigmoid_at_minus_log_n(dtype):
    check_sigmoid_at_minus_log_n("cpu", dtype)


def test_argument_forms_of_flash_attn():
    """softcap comes before alibi_slopes positionally (flash-attn ≥ 2.6); window_size may be a
    tensor or numpy ints; non-contiguous alibi slopes; the packed varlen forms."""
    q, k, v = (t.detach() for t in make_inputs(2, 20, 20, 4, 4, 16, torch.float32))
    slopes = torch.rand(4, 2).T  # [batch, heads], not contiguous
    by_name = flash_attn_func(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes.contiguous())
    torch.testing.assert_close(flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 3.0, slopes), by_name)
    windowed = flash_attn_func(q, k, v, window_size=(3, 2))
    for window in (torch.tensor([3, 2]), np.array([3, 2]), (np.int64(3), np.int32(2))):
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=window), windowed)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    flat = [t[0] for t in (q, k, v)]
    expected = flash_attn_varlen_func(*flat, cu, cu, 13, 13, causal=True)
    qkv, kv = torch.stack(flat, dim=1), torch.stack(flat[1:], dim=1)
    torch.testing.assert_close(flash_attn_varlen_qkvpacked_func(qkv, cu, 13, causal=True), expected)
    torch.testing.assert_close(flash_attn_varlen_kvpacked_func(flat[0], kv, cu, cu, 13, 13, causal=True), expected)

"""flash-attn's semantics where users port its code: one-sided and oversized windows, rotary
embedding with a left-padded KV cache, paged keys for packed sequences, pages of any size, and
S_dmask for varlen — on the chunked CPU path, and on the Triton kernels under
TRITON_INTERPRET=1 (test_triton_interpreter.py). The checks are in semantics_checks.py."""

import pytest

from .semantics_checks import (
    KVCACHE_CASES,
    WINDOW_CASES,
    check_kvcache_semantics,
    check_paged_varlen,
    check_varlen_windows_and_probs,
    check_windows,
    flash_window,
)


def test_flash_window_is_flash_attns_resolution():
    assert flash_window((1, -1), False, 3) == (1, 3)
    assert flash_window((-1, 1), False, 3) == (3, 1)
    assert flash_window((1, 5), False, 3) == (1, 3)
    assert flash_window((5, 5), False, 3) == (-1, -1)
    assert flash_window((-1, -1), True, 3) == (3, 0)


@pytest.mark.parametrize("seqlen_q, seqlen_k, window, causal", WINDOW_CASES)
def test_windows(seqlen_q, seqlen_k, window, causal):
    check_windows("cpu", seqlen_q, seqlen_k, window, causal)


@pytest.mark.parametrize("window, causal", [((1, -1), False), ((-1, -1), True), ((2, 0), False)])
def test_varlen_windows_and_attn_probs(window, causal):
    check_varlen_windows_and_probs("cpu", window, causal)


@pytest.mark.parametrize("page, causal", [(16, True), (24, False), (768, True)])
def test_paged_varlen(page, causal):
    check_paged_varlen("cpu", page, causal)


@pytest.mark.parametrize("paged, interleaved, causal, window, page", KVCACHE_CASES)
def test_kvcache(paged, interleaved, causal, window, page):
    check_kvcache_semantics("cpu", paged, interleaved, causal, window, page)

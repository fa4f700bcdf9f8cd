"""Padded batches: packing for varlen kernels without host syncs, and nothing leaking from padding."""

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from attention_simulator.attention.masks import Padding
from attention_simulator.train import make_trainer

from ..helpers import run_config

LENGTHS = torch.tensor([5, 2, 4])


def test_pack_puts_real_rows_first_in_order_and_unpack_inverts_it():
    x = torch.arange(3 * 5, dtype=torch.float32).view(3, 5, 1) + 1  # 1.., so 0 marks padding
    padding = Padding.of(LENGTHS, 5)
    packed = padding.pack(x)
    real = [float(x[b, t]) for b in range(3) for t in range(int(LENGTHS[b]))]  # written out: row by row
    assert packed[: len(real), 0].tolist() == real
    assert packed[len(real) :].abs().sum() == 0  # padded rows go after the real ones, as zeros
    assert padding.cu_seqlens.tolist() == [0, 5, 7, 11] and padding.cu_seqlens.dtype == torch.int32
    expected = torch.where(torch.arange(5)[None, :, None] < LENGTHS[:, None, None], x, 0)
    assert torch.equal(padding.unpack(packed), expected)


def test_garbage_beyond_the_sequences_reaches_neither_output_nor_gradient():
    """Varlen kernels leave the rows past cu_seqlens[-1] unwritten: even NaN there must vanish."""
    x = torch.randn(3, 5, 2, 4, requires_grad=True)
    padding = Padding.of(LENGTHS, 5)
    packed = padding.pack(x)
    total = int(LENGTHS.sum())
    kernel_out = torch.cat([packed[:total] * 2, torch.full_like(packed[total:], float("nan"))])
    out = padding.unpack(kernel_out)
    assert not out.isnan().any()
    out.sum().backward()
    real = (torch.arange(5)[None, :] < LENGTHS[:, None])[..., None, None]
    assert torch.equal(x.grad, torch.where(real, 2.0, 0.0).expand_as(x))


SYNCS = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy", "masked_select"}


class CountSyncs(TorchFunctionMode):
    """Every call that makes the host wait for a tensor's value. Exempt: 0-d int64 CPU tensors
    (optorch's step counters live on the host by design), and the CPU-only checks of
    flash_sigmoid's CPU path (on CUDA they are asserted on the device: see tests/gpu)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in SYNCS and tensor is not None and not self._exempt(tensor):
            self.calls[f"{name} at {traceback.extract_stack(limit=3)[0].filename}"] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _exempt(tensor) -> bool:
        if tensor.device.type == "cpu" and tensor.ndim == 0 and tensor.dtype == torch.int64:
            return True
        caller = traceback.extract_stack(limit=3)[0].filename
        return tensor.device.type == "cpu" and caller.endswith("flash_sigmoid/interface.py")


@pytest.mark.parametrize("backend", ["softmax", "sigmoid", "flash_softmax", "flash_sigmoid"])
def test_padded_training_steps_never_wait_for_the_device(backend, tmp_path):
    """Speech batches are right-padded: the whole training step (model, every backend's masks or
    varlen packing, CTC, optimizer) runs without a host sync between logging steps."""
    bias = "attention.sigmoid_bias=null" if "softmax" in backend else "attention.sigmoid_bias=auto"
    cfg = run_config("+experiment=asr_sigmoid", f"attention={backend}", bias, "data.batch_size=4",
                         "diagnostics.every_n_steps=100", "trainer.log_every=100")  # fmt: skip
    trainer = make_trainer(cfg, tmp_path)
    loader = iter(trainer.data.train_loader(0))
    trainer.train_step(loader)  # first-step set-up (e.g. lazily built buffers) is not the steady state
    batches = iter([next(loader) for _ in range(2)])  # loading happens on the host, ahead of the step
    with CountSyncs() as counter:
        for _ in range(2):
            trainer.train_step(batches)
    assert not counter.calls, dict(counter.calls)

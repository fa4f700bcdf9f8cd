"""scripts/sink_metric.py against the first-token shares computed here from the queries and keys
each layer attends with (after QK-norm and RoPE), on a trained language model."""

import sys
from pathlib import Path

import pytest
import torch

from attention_simulator.attention import Attention
from attention_simulator.errors import ConfigError

from ..helpers import train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import sink_metric  # noqa: E402

pytestmark = pytest.mark.slow


def test_sink_metric_equals_the_shares_by_hand(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(run, "+experiment=lm_softmax", "model=lm_tiny", "trainer.max_steps=3", "data.batch_size=4",
          "trainer.eval_every=0", "data.eval_max_tokens=1024", "diagnostics=off")  # fmt: skip
    captured = []  # each layer's (q, k) as it attends: (B, T, H, D)
    attend = Attention.attend
    monkeypatch.setattr(Attention, "attend", lambda self, q, k, v, spec: captured.append((q, k)) or
                        attend(self, q, k, v, spec))  # fmt: skip
    results = sink_metric.sink_metric(run, sequences=6, tokens=16)
    assert len(captured) == sum(k.endswith("sink_mass") for k in results)  # one forward: a (q, k) per layer
    heads = []
    for layer, (q, k) in enumerate(captured):
        assert q.shape[:2] == (6, 16)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        share = logits.softmax(-1)[..., 0]  # rows of a softmax sum to 1 already
        per_head = share.mean((0, 2))  # (H,)
        assert results[f"attn/block_{layer:02d}/sink_mass"] == pytest.approx(per_head.mean().item(), rel=1e-5)
        assert results[f"attn/block_{layer:02d}/sink_heads"] == pytest.approx((per_head > 0.3).float().mean().item())
        heads += (per_head > 0.3).tolist()
    assert results["sink"] == pytest.approx(sum(heads) / len(heads))

    monkeypatch.setattr(sys, "argv", ["sink_metric.py", str(run), "--sequences", "6", "--tokens", "16"])
    sink_metric.main()
    assert f"Sink_1^0.3 = {100 * results['sink']:.1f} % of heads" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="fewer than --sequences 6 of --tokens 500"):
        sink_metric.sink_metric(run, sequences=6, tokens=500)

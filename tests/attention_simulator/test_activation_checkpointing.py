"""model.activation_checkpointing: the same gradients and diagnostics (each probe records once,
dropout and drop-path draw the same masks when recomputed), and fewer saved activations."""

import torch

from attention_simulator.attention import AttentionConfig
from attention_simulator.diagnostics import Diagnostics, DiagnosticsConfig
from attention_simulator.models.lm import DecoderLM

DIAGNOSTICS = DiagnosticsConfig(every_n_steps=1, probes=["attn", "attn_out", "mlp_out", "resid"], gradients=True)


def step(checkpointing: bool):
    """One recorded training step -> (gradients, diagnostics records, bytes saved for backward)."""
    torch.manual_seed(0)
    attention = AttentionConfig(backend="sigmoid", sigmoid_bias="auto", position="rope", proj_drop=0.1)
    model = DecoderLM(vocab_size=50, dim=32, depth=3, num_heads=2, drop_path=0.2, attention=attention,
                      activation_checkpointing=checkpointing)  # fmt: skip
    diagnostics = Diagnostics(DIAGNOSTICS, model)
    calls = []  # every record a probe makes: one in forward, one from its gradient hook
    record = diagnostics.record
    diagnostics.record = lambda key, stats: (calls.append(key), record(key, stats))
    tokens = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(2)  # the dropout and drop-path masks
    with diagnostics.recording(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return grads, (calls, diagnostics.pop()), sum(saved)


def test_checkpointed_blocks_give_the_same_step_with_fewer_saved_activations():
    grads, (calls, records), saved = step(checkpointing=False)
    grads_ac, (calls_ac, records_ac), saved_ac = step(checkpointing=True)
    assert grads.keys() == grads_ac.keys()
    for name in grads:
        torch.testing.assert_close(grads_ac[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # every probe recorded once in forward (the attention probe twice: its weights and its
    # logits) and once from its gradient: the recomputation in backward records nothing
    expected = {k: 3 if k.startswith("attn/") else 2 for k in calls}
    assert sorted(calls_ac) == sorted(calls) and {k: calls.count(k) for k in calls} == expected
    assert records_ac.keys() == records.keys()
    assert any(k.endswith("grad_norm_mean") for k in records)
    for key in records:
        torch.testing.assert_close(records_ac[key], records[key], rtol=1e-6, atol=1e-7, msg=key)
    assert saved_ac < 0.5 * saved, (saved_ac, saved)

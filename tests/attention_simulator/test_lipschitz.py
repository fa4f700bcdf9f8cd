"""The attention layers' Lipschitz estimates: the power iteration against the exact Jacobian's
spectral norm, the squared token norms against loops, fused backends through their naive twin,
probes silent during the estimate, and the keys in a run's metrics, report and comparison."""

import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from attention_simulator.attention import Attention, AttentionConfig
from attention_simulator.attention.backends import BACKENDS
from attention_simulator.attention.masks import Padding
from attention_simulator.diagnostics import Diagnostics, DiagnosticsConfig, lipschitz
from attention_simulator.errors import ConfigError
from attention_simulator.models.block import TransformerBlock
from attention_simulator.parallel import Parallel

from ..helpers import train

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))

DIM, T = 16, 6
ITERS = 60  # enough for these tiny layers to converge well within the 2 % asked of them
LENGTHS = torch.tensor([6, 4, 2])


def layer(backend: str, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    bias = "auto" if "sigmoid" in backend else None
    return Attention(DIM, 2, AttentionConfig(backend=backend, sigmoid_bias=bias)).double()


def inputs(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)[:, None, None]  # sequences of different norms
    return torch.randn(3, T, DIM, generator=generator, dtype=torch.float64) * scale  # (B, T, C)


def padding_of(lengths):
    return None if lengths is None else Padding.of(lengths, T)


def exact_norms(attn: Attention, x: torch.Tensor, lengths) -> list[float]:
    """‖J_s‖₂ per sequence from the full Jacobian, its rows and columns at real positions only."""
    attn.eval()
    padding = padding_of(lengths)
    jacobian = torch.autograd.functional.jacobian(lambda x: attn(x, padding=padding), x)  # (B, T, C, B, T, C)
    norms = []
    for s in range(x.shape[0]):
        n = T if lengths is None else int(lengths[s])
        block = jacobian[s, :n, :, s, :n, :].reshape(n * DIM, n * DIM)
        norms.append(torch.linalg.matrix_norm(block, ord=2).item())
    return norms


def squared_norms(x: torch.Tensor, lengths) -> list[list[float]]:
    """‖x_i‖² of each real token of each sequence, by loops."""
    rows = []
    for s in range(x.shape[0]):
        n = T if lengths is None else int(lengths[s])
        rows.append([sum(x[s, i, c].item() ** 2 for c in range(DIM)) for i in range(n)])
    return rows


@pytest.mark.parametrize("backend, lengths", [("softmax", LENGTHS), ("sigmoid", LENGTHS), ("sigmoid", None)])
def test_estimate_matches_the_exact_spectral_norm_and_the_token_norms(backend, lengths):
    attn, x = layer(backend), inputs()
    stats = lipschitz.layer_stats(attn, (x,), {"padding": padding_of(lengths)}, ITERS)
    sigma = exact_norms(attn, x, lengths)
    squares = squared_norms(x, lengths)
    means = [sum(row) / len(row) for row in squares]
    maxima = [max(row) for row in squares]
    assert stats["spectral_max"].item() == pytest.approx(max(sigma), rel=0.02)
    assert stats["spectral_max"].item() <= max(sigma) * (1 + 1e-9)  # power iteration approaches from below
    assert stats["sq_norm_mean"].item() == pytest.approx(sum(map(sum, squares)) / sum(map(len, squares)), rel=1e-9)
    assert stats["sq_norm_max"].item() == pytest.approx(max(maxima), rel=1e-9)
    ratio_mean = max(s / m for s, m in zip(sigma, means))
    ratio_max = max(s / m for s, m in zip(sigma, maxima))
    assert stats["ratio_to_mean_sq_max"].item() == pytest.approx(ratio_mean, rel=0.02)
    assert stats["ratio_to_max_sq_max"].item() == pytest.approx(ratio_max, rel=0.02)


def test_padded_positions_are_not_inputs():
    """Tokens beyond a sequence's length change nothing, however large."""
    attn, x = layer("sigmoid"), inputs()
    noisy = x.clone()
    noisy[1, 4:] += 100.0
    noisy[2, 2:] -= 50.0
    kwargs = {"padding": padding_of(LENGTHS)}
    clean, padded = (lipschitz.layer_stats(attn, (t,), kwargs, 10) for t in (x, noisy))
    for name in clean:
        assert padded[name].item() == pytest.approx(clean[name].item(), rel=1e-9), name


def test_a_fused_backend_is_estimated_through_its_naive_twin():
    fused, naive, x = layer("flash_sigmoid"), layer("sigmoid"), inputs()
    naive.load_state_dict(fused.state_dict())
    fused.train()
    kwargs = {"padding": padding_of(LENGTHS)}
    from_fused = lipschitz.layer_stats(fused, (x,), kwargs, 20)
    from_naive = lipschitz.layer_stats(naive, (x,), kwargs, 20)
    for name in from_fused:
        assert from_fused[name].item() == pytest.approx(from_naive[name].item(), rel=1e-9), name
    assert fused.backend is BACKENDS["flash_sigmoid"].fn and fused.training  # both put back


def test_probes_record_nothing_during_the_estimate():
    block = TransformerBlock(DIM, 2, AttentionConfig(backend="sigmoid", sigmoid_bias="auto")).double()
    diagnostics = Diagnostics(DiagnosticsConfig(every_n_steps=1, probes=["attn", "attn_v", "attn_out"]), block)
    x = inputs()
    with diagnostics.recording():
        lipschitz.layer_stats(block.attn, (x,), {}, 5)
        assert diagnostics.pop() == {}
        block.attn(x)  # the same call outside the estimate does record
        assert "attn/mass_mean" in diagnostics.pop()


class Model(torch.nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        config = AttentionConfig(backend="softmax")
        self.blocks = torch.nn.ModuleList(TransformerBlock(DIM, 2, config, mlp_ratio=2.0) for _ in range(depth))

    def forward(self, x, lengths):
        padding = Padding.of(lengths, x.shape[1])
        for block in self.blocks:
            x = block(x, padding)
        return x


def test_estimate_captures_every_layer_on_the_first_sequences(monkeypatch):
    torch.manual_seed(0)
    model = Model(depth=2).double().eval()
    x = torch.cat([inputs(), 10 * inputs(seed=2)])  # (6, T, C): sequences 3.. are far larger
    batch = {"x": x, "lengths": torch.cat([LENGTHS, LENGTHS])}
    layer_inputs = {}  # each attention layer's input, seen by a hook of the test's own

    def keep(i, module, args):  # returns None: a pre-hook's result would replace the layer's input
        layer_inputs.setdefault(i, args[0])

    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(partial(keep, i))
    model(x[:3], LENGTHS)
    config = DiagnosticsConfig(lipschitz=True, lipschitz_iters=ITERS, lipschitz_sequences=3)
    diagnostics = Diagnostics(config, model)  # the hook the trainer calls with an evaluation's first batch
    diagnostics.evaluation_batch(model, lambda b: model(b["x"], b["lengths"]), batch, Parallel())
    stats = diagnostics.pop()
    assert sorted(stats) == sorted(f"lipschitz/block_0{i}/{name}" for i in range(2) for name in
                                   ("spectral_max", "sq_norm_mean", "sq_norm_max", "ratio_to_mean_sq_max",
                                    "ratio_to_max_sq_max"))  # fmt: skip
    for i, block in enumerate(model.blocks):
        expected = max(exact_norms(block.attn, layer_inputs[i].detach(), LENGTHS))
        assert stats[f"lipschitz/block_0{i}/spectral_max"].item() == pytest.approx(expected, rel=0.02)
    assert all(not block.attn._forward_pre_hooks_with_kwargs for block in model.blocks)  # the hooks are gone

    off = Diagnostics(DiagnosticsConfig(lipschitz=False), model)
    off.evaluation_batch(model, None, batch, Parallel())
    assert off.pop() == {}
    notes = []
    monkeypatch.setattr(lipschitz.log, "info", notes.append)
    lipschitz._skipped.cache_clear()
    for _ in range(2):
        assert lipschitz.estimate(model, None, batch, ITERS, 3, Parallel(mode="fsdp")) == {}
    assert len(notes) == 1 and "skipped" in notes[0]  # one line per run


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="diagnostics.lipschitz_iters"):
        DiagnosticsConfig(lipschitz_iters=0)


def test_keys_reach_the_metrics_report_and_comparison(tmp_path):
    import compare_runs

    common = ["+experiment=vit_sigmoid", "trainer.max_steps=2", "data.batch_size=32", "trainer.report=true"]
    train(tmp_path / "on", *common, "diagnostics.lipschitz=true")
    train(tmp_path / "off", *common, "diagnostics=off")
    on, off = (pd.read_parquet(tmp_path / run / "metrics.parquet") for run in ("on", "off"))
    keys = {f"lipschitz/block_0{i}/{name}" for i in range(4) for name in ("spectral_max", "sq_norm_mean")}
    assert keys <= set(on.columns)
    assert on.filter(like="lipschitz/").notna().sum().min() == 1  # once: at the one evaluation
    assert (on.filter(like="spectral_max").dropna() > 0).all().all()
    assert not any(k.startswith("lipschitz/") for k in off.columns)
    assert (tmp_path / "on" / "report" / "lipschitz.png").exists()
    assert not (tmp_path / "off" / "report" / "lipschitz.png").exists()

    compare_runs.main([str(tmp_path / "on"), str(tmp_path / "on"), "--out", str(tmp_path / "cmp")])
    header, _, row, _ = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    columns = [c.strip() for c in header.split("|")]
    column = columns.index("lipschitz/layer_mean/spectral_max")
    final = on.filter(regex=r"lipschitz/block_\d+/spectral_max").dropna().iloc[-1].mean()
    assert row.split("|")[column].strip() == f"{final:.4g}"


def test_power_iteration_restricts_a_dense_map_to_the_real_positions():
    """A linear map that mixes every position (unlike attention, padded inputs reach real
    outputs): the estimate is the norm of its matrix between real positions only."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(2, T * 3, T * 3, generator=generator, dtype=torch.float64)  # per sequence, (T·C, T·C)
    x = torch.zeros(2, T, 3, dtype=torch.float64)
    real = torch.arange(T)[None, :, None] < torch.tensor([T, 2])[:, None, None]  # (2, T, 1)
    matrix[1, :, 2 * 3 :] *= 100.0  # the padded inputs of sequence 1 weigh most

    def fn(x):
        return (matrix @ x.reshape(2, -1, 1)).reshape(x.shape)

    first, sigma = (lipschitz.spectral_norms(fn, x, real, iters) for iters in (1, 200))
    for s, n in enumerate((T, 2)):
        block = matrix[s].reshape(T, 3, T, 3)[:n, :, :n, :].reshape(n * 3, n * 3)
        exact = torch.linalg.matrix_norm(block, ord=2).item()
        assert sigma[s].item() == pytest.approx(exact, rel=0.02)
        assert first[s].item() <= exact  # from the first step on, a lower bound: no padded direction

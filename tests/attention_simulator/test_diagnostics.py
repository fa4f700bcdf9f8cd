"""Probe statistics against values computed here; diagnostics are free when off and change
nothing when on; W&B and parquet carry the keys; the comparison and dashboard scripts work."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from attention_simulator.attention import Attention, AttentionConfig
from attention_simulator.attention.masks import Padding
from attention_simulator.diagnostics import Diagnostics, DiagnosticsConfig
from attention_simulator.models.block import TransformerBlock

from ..helpers import train

SCRIPTS = Path(__file__).parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))


class Model(torch.nn.Module):
    def __init__(self, backend, bias):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [TransformerBlock(16, 2, AttentionConfig(backend=backend, sigmoid_bias=bias), mlp_ratio=2.0)]
        )

    def forward(self, x, lengths=None):
        return self.blocks[0](x, None if lengths is None else Padding.of(lengths, x.shape[1]))


def record(backend="softmax", bias=None, lengths=None, **config):
    torch.manual_seed(0)
    model = Model(backend, bias)
    diagnostics = Diagnostics(DiagnosticsConfig(every_n_steps=1, **config), model)
    captured = {}
    attn = model.blocks[0].attn
    attn.register_forward_hook(lambda m, i, o: captured.setdefault("attn_out", o))
    x = torch.randn(3, 5, 16, requires_grad=True)
    with diagnostics.recording():
        out = model(x, lengths)
        out.retain_grad()
        (out * torch.arange(16.0)).square().sum().backward()
    return diagnostics.pop(), model, x, out, captured


def row_norms(t, lengths=None):
    norms = t.detach().flatten(2).norm(dim=-1)
    if lengths is None:
        return norms.flatten()
    return torch.cat([norms[b, :n] for b, n in enumerate(lengths.tolist())])


def test_token_and_gradient_norms_match_a_direct_computation():
    records, _, _, out, captured = record(probes=["resid", "attn_out"], gradients=True)
    norms = row_norms(out)
    assert records["resid/block_00/norm_mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert records["resid/block_00/norm_max"] == pytest.approx(norms.max().item(), rel=1e-6)
    assert records["resid/block_00/norm_min"] == pytest.approx(norms.min().item(), rel=1e-6)
    assert records["resid/block_00/rms"] == pytest.approx(out.detach().square().mean().sqrt().item(), rel=1e-6)
    grad_norms = row_norms(out.grad)
    assert records["resid/block_00/grad_norm_mean"] == pytest.approx(grad_norms.mean().item(), rel=1e-6)
    assert records["attn_out/block_00/norm_max"] == pytest.approx(
        row_norms(captured["attn_out"]).max().item(), rel=1e-6
    )


def test_padded_rows_are_left_out():
    lengths = torch.tensor([5, 2, 3])
    records, _, _, out, _ = record(probes=["resid"], lengths=lengths)
    norms = row_norms(out, lengths)
    assert records["resid/block_00/norm_mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert records["resid/block_00/norm_min"] == pytest.approx(norms.min().item(), rel=1e-6)


def attention_weights(model, x):
    """The block's attention matrix recomputed here: (B, H, T, T)."""
    block = model.blocks[0]
    q, k, _ = block.attn.project(block.norm1(x.detach()), None)
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5


def test_softmax_mass_and_entropy():
    records, model, x, _, _ = record("softmax", probes=["attn"])
    p = attention_weights(model, x).softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    assert records["attn/block_00/mass_mean"] == pytest.approx(1.0, rel=1e-6)
    assert records["attn/block_00/entropy_mean"] == pytest.approx(entropy.mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["sigmoid", "flash_sigmoid"])
def test_sigmoid_mass_from_the_matrix_or_the_kernel(backend):
    records, model, x, _, _ = record(backend, "auto", probes=["attn"], gradients=True)
    mass = torch.sigmoid(attention_weights(model, x) - torch.log(torch.tensor(5.0))).sum(-1)
    for stat, value in (("mean", mass.mean()), ("max", mass.max()), ("min", mass.min())):
        assert records[f"attn/block_00/mass_{stat}"] == pytest.approx(value.item(), rel=1e-5)
    assert ("attn/block_00/grad_norm_mean" in records) == (backend == "sigmoid")  # no matrix, no dL/dP


BACKENDS = ["softmax", "sigmoid", "flash_softmax", "flash_sigmoid"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_key_share_and_sink_heads_of_every_backend(backend):
    """Each row's weights normalised to sum 1, their first column averaged over real rows: per
    head, then over heads (sink_mass), and the fraction of heads above 0.3 (sink_heads)."""
    lengths = torch.tensor([5, 2, 3])
    records, model, x, _, _ = record(backend, "auto" if "sigmoid" in backend else None, lengths=lengths,
                                     probes=["attn"])  # fmt: skip
    logits = attention_weights(model, x)  # (B, H, T, T)
    per_head = torch.zeros(2)
    for b, n in enumerate(lengths.tolist()):
        s = logits[b, :, :n, :n]
        p = s.softmax(-1) if "softmax" in backend else torch.sigmoid(s - torch.log(torch.tensor(float(n))))
        per_head += (p[..., 0] / p.sum(-1)).sum(-1)
    per_head /= lengths.sum()
    assert records["attn/block_00/sink_mass"] == pytest.approx(per_head.mean().item(), rel=1e-5)
    assert records["attn/block_00/sink_heads"] == pytest.approx((per_head > 0.3).float().mean().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_attention_is_a_sink_in_short_sequences(backend):
    """Queries zeroed: every row attends its keys uniformly, so a row's first-key share is 1/n;
    over sequences of 5, 2 and 2 tokens that is (5/5 + 2/2 + 2/2) / 9 = 1/3 > 0.3 in every head."""
    torch.manual_seed(0)
    model = Model(backend, "auto" if "sigmoid" in backend else None)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[:16], model.blocks[0].attn.qkv.bias[:16] = 0, 0
    diagnostics = Diagnostics(DiagnosticsConfig(every_n_steps=1, probes=["attn"]), model)
    with diagnostics.recording():
        model(torch.randn(3, 5, 16), torch.tensor([5, 2, 2]))
    records = diagnostics.pop()
    assert records["attn/block_00/sink_mass"] == pytest.approx(1 / 3, rel=1e-5)
    assert records["attn/block_00/sink_heads"] == 1.0


def test_massive_activations_and_kurtosis_of_the_residual_stream():
    """max |x| / median |x| (the lower middle of an even count) and E[(x − m)⁴] / var² over the
    activations of real tokens, from Python's statistics."""
    lengths = torch.tensor([5, 2, 3])
    records, _, _, out, _ = record(probes=["resid"], lengths=lengths)
    values = [v for b, n in enumerate(lengths.tolist()) for v in out[b, :n].detach().flatten().tolist()]
    magnitudes = [abs(v) for v in values]
    assert records["resid/block_00/massive"] == pytest.approx(max(magnitudes) / statistics.median_low(magnitudes),
                                                              rel=1e-5)  # fmt: skip
    m = statistics.fmean(values)
    variance = statistics.fmean([(v - m) ** 2 for v in values])
    assert records["resid/block_00/kurtosis"] == pytest.approx(
        statistics.fmean([(v - m) ** 4 for v in values]) / variance**2, rel=1e-5
    )


def test_off_runs_no_probe_code_and_on_changes_nothing(tmp_path, monkeypatch):
    calls = []
    original = Diagnostics.record
    monkeypatch.setattr(Diagnostics, "record", lambda self, *a: calls.append(1) or original(self, *a))
    common = ["+experiment=vit_sigmoid", "trainer.max_steps=6", "data.batch_size=32", "trainer.log_every=1"]
    train(tmp_path / "off", *common, "diagnostics=off")
    assert calls == []
    train(tmp_path / "full", *common, "diagnostics=full", "diagnostics.every_n_steps=1")
    assert len(calls) > 100
    off, full = (pd.read_parquet(tmp_path / run / "metrics.parquet") for run in ("off", "full"))
    pd.testing.assert_series_equal(off["train/loss"], full["train/loss"])
    assert {"attn/block_03/mass_mean", "opt/exp_avg_sq/blocks.3.attn.qkv.weight", "update_ratio/head.weight",
            "resid/block_00/grad_norm_max", "attn/block_01/eval_mass_mean"} <= set(full.columns)  # fmt: skip


def test_nothing_is_kept_between_steps():
    records, model, *_ = record(probes=list(("attn", "attn_v", "attn_out", "mlp_out", "resid")), gradients=True)
    assert records
    for module in model.modules():
        assert not any(isinstance(v, torch.Tensor) for v in vars(module).values())


def test_wandb_offline_run_has_the_attention_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(tmp_path, "+experiment=vit_sigmoid", "trainer.max_steps=10", "logger.wandb=true", "data.batch_size=32")
    log = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    dump = subprocess.run(["wandb", "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in dump.stdout.splitlines()]  # wandb's own reader of the run's log
    logged = {key for r in records if r.get("type") == "history" for key in r["history"]["item"]}
    for key in ("attn/block_00/mass_mean", "resid/block_03/norm_mean", "train/loss", "eval/accuracy"):
        assert key in logged, sorted(logged)
    assert {"attn/block_00/mass_mean", "resid/block_03/norm_mean"} <= set(pd.read_parquet(tmp_path / "metrics.parquet"))


TWENTY_STEPS = ["trainer.max_steps=20", "data.batch_size=32"]


def test_compare_runs_writes_a_figure_and_a_table(tmp_path, capsys, trained):
    import compare_runs

    for name in ("softmax", "sigmoid"):  # copies: the table is named by folder
        shutil.copytree(trained(f"+experiment=vit_{name}", *TWENTY_STEPS).dir, tmp_path / name)
    compare_runs.main([str(tmp_path / "softmax"), str(tmp_path / "sigmoid"), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0].startswith("| run | train/loss | eval/loss | eval/accuracy | attn/layer_mean/mass_mean")
    softmax_row = next(line for line in table if line.startswith("| vit_softmax (softmax) |"))  # name (folder)
    assert softmax_row.split(" | ")[4] == "1"  # softmax rows have mass exactly 1
    final_loss = pd.read_parquet(tmp_path / "sigmoid" / "metrics.parquet")["train/loss"].dropna().iloc[-1]
    assert f"{final_loss:.4g}" in next(line for line in table if line.startswith("| vit_sigmoid (sigmoid) |"))
    with Image.open(tmp_path / "cmp" / "compare.png") as png:
        assert png.size[0] > 1000

    short = tmp_path / "short"  # the same run cut at step 10: compared with a 20-step run, a warning
    short.mkdir()
    frame = pd.read_parquet(tmp_path / "sigmoid" / "metrics.parquet")
    frame[frame["step"] <= 10].to_parquet(short / "metrics.parquet")
    compare_runs.main([str(tmp_path / "softmax"), str(short), "--out", str(tmp_path / "cmp2")])
    assert "different lengths" in capsys.readouterr().err


def test_dashboard_layout_builds_offline():
    import wandb_dashboard

    workspace = wandb_dashboard.build_workspace("entity", "project")
    sections = {s.name: s for s in workspace.sections}
    assert list(sections)[:2] == ["Training", "Attention mass"]
    regexes = [p.metric_regex for s in workspace.sections for p in s.panels if p.metric_regex]
    for key in ("attn/block_00/mass_mean", "attn_out/block_11/norm_mean", "resid/block_03/norm_mean"):
        assert any(re.match(r, key) for r in regexes), key
    assert not any(re.match(r, "attn/block_00/mass_meanx") for r in regexes)


def test_report_figures_are_written(tmp_path, trained):
    shutil.copytree(trained("+experiment=vit_sigmoid", *TWENTY_STEPS).dir, tmp_path, dirs_exist_ok=True)
    from attention_simulator.diagnostics.report import write_report

    final = write_report(tmp_path, "accuracy")
    assert "attn/block_00/mass_mean" in final
    for name in ("curves.png", "attention.png"):
        with Image.open(tmp_path / "report" / name) as png:
            low, high = png.convert("L").getextrema()
            assert png.size[0] > 600 and high - low > 100  # not a blank canvas


def test_unknown_probe_kind_is_refused():
    from attention_simulator.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown kinds"):
        DiagnosticsConfig(probes=["attention"])
    Attention(16, 2)  # probes are plain identities without a recorder


def test_dashboard_without_a_login_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    script = Path(__file__).parents[2] / "scripts" / "wandb_dashboard.py"
    result = subprocess.run([sys.executable, str(script), "--entity", "someone"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "wandb login" in result.stderr and "--entity someone" in result.stderr

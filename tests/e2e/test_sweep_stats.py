"""collect_sweep.py's statistics against independent computations: the learning-rate sensitivity
by loops over a hand-made grid, intervals over examples against scipy's bootstrap, differences
between cells, and the curves' panels."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import collect_sweep  # noqa: E402

from attention_simulator.errors import ConfigError  # noqa: E402


def fake_run(root: Path, overrides: dict, losses: list[float], examples: pd.DataFrame | None = None, **curves):
    """A run directory as a sweep leaves it: overrides, metrics.parquet (the last loss is also the
    eval loss) and, if given, the final evaluation's examples."""
    run = root / ",".join(f"{k}={v}" for k, v in overrides.items())
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    steps = list(range(1, len(losses) + 1))
    evals = [float("nan")] * (len(steps) - 1) + [losses[-1]]
    frame = pd.DataFrame({"step": steps, "train/loss": losses, "train/lr": 1.0, "eval/loss": evals, **curves})
    frame.to_parquet(run / "metrics.parquet")
    if examples is not None:
        examples.to_parquet(run / "eval_examples.parquet")


def test_learning_rate_sensitivity_by_hand(tmp_path):
    """Two variants × three learning rates × two seeds. The sensitivity of a seed is the mean over
    the grid of min(final, init) − its best; a non-finite final counts as init (5.0)."""
    finals = {  # variant -> seed -> final loss at lr 1e-3, 1e-2, 1e-1
        "softmax": {0: [3.0, 2.0, float("nan")], 1: [3.2, 2.2, 6.0]},
        "sigmoid": {0: [3.0, 2.0, 2.5], 1: [2.8, 2.4, 2.6]},
    }
    for attention, seeds in finals.items():
        for seed, losses in seeds.items():
            for lr, final in zip(("1e-3", "1e-2", "1e-1"), losses):
                spike = 7.0 if attention == "softmax" and lr == "1e-1" else 4.0  # after the first tenth
                fake_run(tmp_path, {"optimizer.learning_rate": lr, "attention": attention, "trainer.seed": seed},
                         [5.0, *[4.5] * 8, spike, final])  # fmt: skip
    collect_sweep.main([str(tmp_path), "--metric", "eval/loss", "--sensitivity"])
    table = pd.read_csv(tmp_path / "sweep_sensitivity.csv").set_index("attention")

    def by_hand(losses):
        clipped = [5.0 if not np.isfinite(x) else min(x, 5.0) for x in losses]
        return sum(c - min(clipped) for c in clipped) / len(clipped)

    for attention, seeds in finals.items():
        per_seed = [by_hand(losses) for losses in seeds.values()]
        row = table.loc[attention]
        assert row["sensitivity"] == pytest.approx(np.mean(per_seed))
        assert row["sensitivity std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert row["sensitivity low"] == pytest.approx(min(per_seed)) and row["sensitivity high"] == pytest.approx(
            max(per_seed)
        )  # two seeds: the interval is their range
        assert row["seeds"] == 2 and row["runs"] == 6
    assert table.loc["softmax", "diverged"] == 2 and table.loc["sigmoid", "diverged"] == 0  # NaN, and 6.0 >= 5.0
    assert table.loc["softmax", "spikes"] == 2 and table.loc["sigmoid", "spikes"] == 0
    assert table.loc["sigmoid", "best"] == pytest.approx(1e-2)
    assert table.loc["sigmoid", "optimizer.learning_rate=1e-1"] == pytest.approx(2.55)


def test_intervals_over_examples_and_differences_between_cells(tmp_path):
    """One run per cell with 300 examples each: its interval is the bootstrap of Σ errors / Σ
    length over examples (against scipy's); a difference from the baseline cell has an interval
    that covers 0 for the same error rate, and excludes it for a rate twice as high."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 40, 300).astype(float)
    rates = {"a": 0.10, "b": 0.10, "c": 0.20}
    for name, rate in rates.items():
        errors = rng.binomial(lengths.astype(int), rate).astype(float)
        examples = pd.DataFrame({"split": "", "eval/loss": errors, "eval/loss count": lengths})
        longer = examples.assign(split="@long", **{"eval/loss": 3 * errors})  # another split: not mixed in
        fake_run(tmp_path, {"attention": name}, [1.0, errors.sum() / lengths.sum()], pd.concat([examples, longer]),
                 **{"eval/loss@long": [np.nan, 3 * errors.sum() / lengths.sum()]})  # fmt: skip
    collect_sweep.main([str(tmp_path), "--metric", "eval/loss", "--baseline", "attention=a"])
    cells = pd.read_csv(tmp_path / "sweep_summary.csv").set_index("attention")
    for name in rates:
        examples = pd.read_parquet(tmp_path / f"attention={name}" / "eval_examples.parquet").query("split == ''")
        theirs = scipy.stats.bootstrap((examples["eval/loss"], examples["eval/loss count"]),
                                       lambda e, n: e.sum() / n.sum(), paired=True, vectorized=False,
                                       method="percentile", n_resamples=10_000, random_state=2)  # fmt: skip
        width = theirs.confidence_interval.high - theirs.confidence_interval.low
        assert abs(cells.loc[name, "eval/loss low"] - theirs.confidence_interval.low) < 0.05 * width
        assert abs(cells.loc[name, "eval/loss high"] - theirs.confidence_interval.high) < 0.05 * width
        assert cells.loc[name, "eval/loss n"] == 1
    assert cells.loc["a", "eval/loss delta"] == 0
    assert cells.loc["b", "eval/loss delta low"] < 0 < cells.loc["b", "eval/loss delta high"]
    observed = cells.loc["c", "eval/loss mean"] - cells.loc["a", "eval/loss mean"]
    assert cells.loc["c", "eval/loss delta"] == pytest.approx(observed)
    assert 0 < cells.loc["c", "eval/loss delta low"] < observed < cells.loc["c", "eval/loss delta high"]
    assert "Δ" in (tmp_path / "sweep_summary.md").read_text()
    main_split = cells.loc["a", "eval/loss mean"]
    collect_sweep.main([str(tmp_path), "--metric", "eval/loss", "eval/loss@long"])  # the other split's examples too
    row = pd.read_csv(tmp_path / "sweep_summary.csv").set_index("attention").loc["a"]
    assert row["eval/loss mean"] == main_split
    assert row["eval/loss@long low"] < row["eval/loss@long mean"] < row["eval/loss@long high"]
    assert row["eval/loss@long mean"] == pytest.approx(3 * main_split)
    assert row["eval/loss@long high"] - row["eval/loss@long low"] > 2 * (
        cells.loc["a", "eval/loss high"] - cells.loc["a", "eval/loss low"]
    )  # three times the errors: three times the spread
    with pytest.raises(ConfigError, match="attention.*'a', 'b', 'c'"):
        collect_sweep.main([str(tmp_path), "--baseline", "attention=d"])

    # the same runs as three sweeps, one folder each: the same table, read from each run's own folder
    for name in rates:
        (tmp_path / f"sweep_{name}").mkdir()
        (tmp_path / f"attention={name}").rename(tmp_path / f"sweep_{name}" / f"attention={name}")
    folders = [str(tmp_path / f"sweep_{name}") for name in rates]
    collect_sweep.main([*folders, "--metric", "eval/loss", "eval/loss@long", "--out", str(tmp_path / "together")])
    together = pd.read_csv(tmp_path / "together" / "sweep_summary.csv").set_index("attention").loc["a"]
    pd.testing.assert_series_equal(together, row)


def test_curves_draw_a_panel_per_matching_metric(tmp_path):
    for lr in ("1e-2", "1e-1"):
        for attention in ("softmax", "sigmoid"):
            curves = {f"attn/block_0{i}/logit_max": [1.0, 10.0, 100.0] for i in range(2)} | {"logits/rms": 1.0}
            fake_run(tmp_path, {"optimizer.learning_rate": lr, "attention": attention}, [5.0, 4.0, 3.0], **curves)
    collect_sweep.main([str(tmp_path), "--curves", "attn/block_*/logit_max", "logits/rms",
                        "--curves-at", "optimizer.learning_rate=1e-2"])  # fmt: skip
    with Image.open(tmp_path / "sweep_curves.png") as png:
        assert png.size[0] > 3 * 400  # three panels side by side
    with pytest.raises(ConfigError, match="'attn/\\*/nothing'"):
        collect_sweep.main([str(tmp_path), "--curves", "attn/*/nothing"])
    with pytest.raises(ConfigError, match="learning_rate=3e-1.*took the values.*'1e-1', '1e-2'"):
        collect_sweep.main([str(tmp_path), "--curves", "logits/rms", "--curves-at", "optimizer.learning_rate=3e-1"])
    with pytest.raises(ConfigError, match="no run set 'lr'"):
        collect_sweep.main([str(tmp_path), "--curves", "logits/rms", "--curves-at", "lr=3e-1"])


def test_a_layer_mean_is_a_metric(tmp_path):
    """--metric lipschitz/layer_mean/spectral_max: each run's last value averaged over its layers."""
    nan = float("nan")
    for seed, layers in (("0", (2.0, 4.0, 9.0)), ("1", (3.0, 5.0, 10.0))):
        curves = {f"lipschitz/block_0{i}/spectral_max": [nan, value] for i, value in enumerate(layers)}
        fake_run(tmp_path, {"attention": "sigmoid", "trainer.seed": seed}, [5.0, 4.0], **curves)
    collect_sweep.main([str(tmp_path), "--metric", "lipschitz/layer_mean/spectral_max"])
    cell = pd.read_csv(tmp_path / "sweep_summary.csv").iloc[0]
    assert cell["lipschitz/layer_mean/spectral_max mean"] == pytest.approx((5.0 + 6.0) / 2)
    assert cell["lipschitz/layer_mean/spectral_max std"] == pytest.approx(np.std([5.0, 6.0], ddof=1))


def test_examples_are_drawn_alike_for_every_run_of_one_test_set(tmp_path):
    """One test set: its noise is not averaged away over seeds (two seeds with the same errors get
    the interval of one), and it cancels in a difference (a paired comparison): b makes one more
    error on every 20th example, a difference far inside either cell's own interval, yet detected."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 40, 300).astype(float)
    errors = rng.binomial(lengths.astype(int), 0.2).astype(float)
    more = errors + (np.arange(300) % 20 == 0)
    for name, seed, e in (("a", 0, errors), ("a", 1, errors), ("b", 0, more), ("b", 1, more)):
        examples = pd.DataFrame({"split": "", "eval/loss": e, "eval/loss count": lengths})
        fake_run(
            tmp_path / "sweep", {"attention": name, "trainer.seed": seed}, [1.0, e.sum() / lengths.sum()], examples
        )
    fake_run(tmp_path / "alone", {"attention": "a"}, [1.0, errors.sum() / lengths.sum()],
             pd.DataFrame({"split": "", "eval/loss": errors, "eval/loss count": lengths}))  # fmt: skip
    collect_sweep.main([str(tmp_path / "sweep"), "--metric", "eval/loss", "--baseline", "attention=a"])
    cells = pd.read_csv(tmp_path / "sweep" / "sweep_summary.csv").set_index("attention")
    collect_sweep.main([str(tmp_path / "alone"), "--metric", "eval/loss"])
    alone = pd.read_csv(tmp_path / "alone" / "sweep_summary.csv").iloc[0]
    for end in ("low", "high"):
        assert cells.loc["a", f"eval/loss {end}"] == pytest.approx(alone[f"eval/loss {end}"], rel=1e-12)
    width = cells.loc["a", "eval/loss high"] - cells.loc["a", "eval/loss low"]
    delta = cells.loc["b", "eval/loss delta"]
    assert 0 < delta < width / 4
    assert 0 < cells.loc["b", "eval/loss delta low"] < delta < cells.loc["b", "eval/loss delta high"]

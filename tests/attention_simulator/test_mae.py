"""Masked autoencoders: the masks, the loss, what the encoder sees, the linear probe's frozen
pretrained encoder, and every MAE experiment end to end (pretraining, then its probe)."""

import math
import shutil

import pandas as pd
import pytest
import torch

from attention_simulator import checkpoint as ckpt
from attention_simulator.errors import CheckpointError, ConfigError
from attention_simulator.models.mae import MaskedAutoencoder, Reconstruction
from attention_simulator.tasks.classification import ClassificationTask
from attention_simulator.tasks.masked_autoencoding import MaskedAutoencodingTask
from attention_simulator.train import build_model

from ..helpers import compose_config, train

VARIANTS = ["mae_softmax", "mae_sigmoid", "mae_sigmoid_bias"]
SHORT = ["trainer.max_steps=3", "data.batch_size=32"]
WATCH = ["diagnostics.every_n_steps=1", "diagnostics.gradients=true", "diagnostics.probes=[attn,resid]"]


def tiny_mae(**options) -> MaskedAutoencoder:
    torch.manual_seed(0)
    sizes = dict(img_size=8, patch_size=2, in_chans=1, dim=16, depth=2, num_heads=2, mlp_ratio=2.0, decoder_dim=8,
                 decoder_depth=1, decoder_heads=2)  # fmt: skip
    return MaskedAutoencoder(**(sizes | options))


# ---- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "img_size, patch_size, mask_ratio, patches, hidden",
    [(8, 2, 0.75, 16, 12), (8, 2, 0.6, 16, 10), (12, 2, 0.75, 36, 27), (8, 4, 0.75, 4, 3)],
)
def test_masks_hide_exactly_the_ratio_and_partition_the_patches(img_size, patch_size, mask_ratio, patches, hidden):
    model = tiny_mae(img_size=img_size, patch_size=patch_size, mask_ratio=mask_ratio).train()
    images = torch.randn(6, 1, img_size, img_size)
    torch.manual_seed(1)
    visible = model.random_masking(6, images.device)
    torch.manual_seed(1)
    masked = model(images).masked  # the same draw
    assert masked.shape == (6, patches)
    for b in range(6):
        shown = set(visible[b].tolist())
        hidden_ones = {n for n in range(patches) if masked[b, n]}
        assert len(hidden_ones) == hidden and len(shown) == patches - hidden == len(visible[b])
        assert shown.isdisjoint(hidden_ones) and shown | hidden_ones == set(range(patches))
    assert len({tuple(row.tolist()) for row in masked}) > 1  # each image draws its own


def test_masks_are_uniform_seeded_and_fixed_at_evaluation():
    model = tiny_mae().train()
    counts = torch.zeros(16)
    for row in model.random_masking(4000, torch.device("cpu")):
        for n in row.tolist():
            counts[n] += 1
    assert ((counts / 4000 - 0.25).abs() < 0.03).all()  # every patch equally likely to be seen
    images = torch.randn(5, 1, 8, 8)
    torch.manual_seed(3)
    first = model(images).masked
    torch.manual_seed(3)
    assert torch.equal(model(images).masked, first)  # training masks follow the (checkpointed) global seed
    model.eval()
    state = torch.get_rng_state()
    assert torch.equal(model(images).masked, model(images).masked)
    assert torch.equal(torch.get_rng_state(), state)  # evaluating leaves the training stream alone


def test_bad_mask_ratio_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.mask_ratio=0\.99 hides 16 of the 16 patches"):
        tiny_mae(mask_ratio=0.99)


# ---- the loss ------------------------------------------------------------------------------------


def reference_loss(pred, patches, masked) -> float:
    """Each hidden patch normalised by its own mean and (unbiased) variance, + 1e-6 under the root;
    the squared error averaged over its pixels, then over the hidden patches."""
    total, count = 0.0, 0
    for b in range(patches.shape[0]):
        for n in range(patches.shape[1]):
            if not masked[b, n]:
                continue
            x = patches[b, n].tolist()
            mean = sum(x) / len(x)
            var = sum((v - mean) ** 2 for v in x) / (len(x) - 1)
            target = [(v - mean) / math.sqrt(var + 1e-6) for v in x]
            total += sum((p - t) ** 2 for p, t in zip(pred[b, n].tolist(), target)) / len(x)
            count += 1
    return total / count


def test_loss_is_the_per_patch_normalised_error_over_hidden_patches_only():
    torch.manual_seed(0)
    pred, patches = torch.randn(3, 16, 4, dtype=torch.float64), torch.randn(3, 16, 4, dtype=torch.float64)
    patches[0, 5] = 0.7  # a flat patch: its target is 0, not a division by zero
    masked = torch.rand(3, 16) < 0.75
    masked[0, 5] = True
    task = MaskedAutoencodingTask()

    def loss_of(p):
        return task.training_step(lambda images: Reconstruction(p, patches, masked), {"images": None})[0].item()

    expected = reference_loss(pred, patches, masked)
    assert loss_of(pred) == pytest.approx(expected, rel=1e-6)
    total, count = task.eval_step(lambda images: Reconstruction(pred, patches, masked), {"images": None})["loss"]
    assert count.tolist() == masked.sum(1).tolist() and total.shape == (3,)  # per image
    assert total.sum().item() / count.sum().item() == pytest.approx(expected, rel=1e-6)
    assert total[1].item() / count[1].item() == pytest.approx(reference_loss(pred[1:2], patches[1:2], masked[1:2]))
    b, n = map(int, torch.nonzero(~masked)[0])
    changed = pred.clone()
    changed[b, n] += 100.0  # a visible patch: not scored
    assert loss_of(changed) == loss_of(pred)
    b, n = map(int, torch.nonzero(masked)[0])
    changed[b, n] += 1.0  # a hidden one: scored
    assert loss_of(changed) != loss_of(pred)


def test_task_with_another_model_says_which_to_use():
    with pytest.raises(ConfigError, match="model=mae_tiny"):
        MaskedAutoencodingTask().training_step(lambda images: images, {"images": torch.zeros(2, 10)})


# ---- what the encoder sees -----------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_the_encoder_never_sees_hidden_patches(pool):
    model = tiny_mae(pool=pool, layer_scale=0.5).eval()  # eval: the same masks on every call
    images = torch.randn(4, 1, 8, 8)
    out = model(images)
    visible = torch.stack([torch.nonzero(~row).flatten() for row in out.masked])  # (B, 4)
    perturbed, one_visible = images.clone(), images.clone()
    for b in range(4):
        for n in range(16):  # patch n of the 4x4 grid: rows 2r, 2r+1 and columns 2c, 2c+1
            r, c = divmod(n, 4)
            if out.masked[b, n]:
                perturbed[b, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 10 * torch.randn(1, 2, 2)
        r, c = divmod(int(visible[b, 0]), 4)
        one_visible[b, :, 2 * r, 2 * c] += 1.0
    assert torch.equal(model.encoder(perturbed, visible), model.encoder(images, visible))
    assert torch.equal(model(perturbed).pred, out.pred)  # nor does the decoder (it reads only the encoder)
    assert not torch.allclose(model.encoder(one_visible, visible), model.encoder(images, visible))
    assert torch.equal(out.patches[0, 1], images[0, 0, 0:2, 2:4].flatten())  # the targets: patch 1, row by row


# ---- experiments end to end, and the linear probe --------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Each pretraining run for 3 steps, every probe on the encoder's and decoder's blocks recorded."""
    runs = {}
    for experiment in VARIANTS:
        runs[experiment] = run_dir = tmp_path_factory.mktemp(experiment)
        final = train(run_dir, f"+experiment={experiment}", *SHORT, *WATCH)
        assert 0 < final < 1 and math.isfinite(final)  # norm-pixel targets have mean square <= 0.75
    return runs


@pytest.mark.parametrize("experiment", VARIANTS)
def test_pretraining_runs_and_probes_watch_every_block(experiment, pretrained):
    rows = pd.read_parquet(pretrained[experiment] / "metrics.parquet")
    assert rows["eval/loss"].notna().sum() == 1 and rows["train/loss"].notna().sum() == 3
    for block in range(6):  # encoder blocks 0-3, decoder blocks 4-5
        for key in ("attn/block_{:02d}/mass_mean", "resid/block_{:02d}/norm_mean", "resid/block_{:02d}/grad_norm_mean"):
            assert rows[key.format(block)].notna().all(), key.format(block)
    assert "resid/block_06/norm_mean" not in rows


def test_resumed_pretraining_masks_as_an_uninterrupted_one(pretrained, tmp_path):
    """Stopped after two steps and resumed, evaluating at every step: the same weights as the
    uninterrupted run that evaluated only at the end (evaluation draws no training masks)."""
    overrides = ["+experiment=mae_softmax", *SHORT, *WATCH, "trainer.eval_every=1"]
    train(tmp_path, *overrides, "trainer.run_steps=2")
    train(tmp_path, *overrides, "trainer.resume=auto")
    straight = ckpt.load_checkpoint(pretrained["mae_softmax"] / "checkpoints" / "step_0000003.pt")["model"]
    resumed = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000003.pt")["model"]
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


@pytest.mark.parametrize("experiment", VARIANTS)
def test_probe_experiment_runs_from_its_pretraining(experiment, pretrained, tmp_path):
    final = train(tmp_path, f"+experiment={experiment}_probe", f"model.checkpoint={pretrained[experiment]}", *SHORT)
    assert 0 <= final <= 1 and final * 360 == pytest.approx(round(final * 360))
    probed = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000003.pt")["model"]
    encoder = ckpt.load_checkpoint(pretrained[experiment] / "checkpoints" / "step_0000003.pt")["model"]
    for key, value in encoder.items():
        if key.startswith("encoder."):
            assert torch.equal(probed[key], value), key  # three probe steps later: untouched


def test_probe_loads_the_encoder_exactly_and_trains_only_its_head(pretrained, tmp_path):
    run = pretrained["mae_sigmoid_bias"]
    saved = ckpt.load_checkpoint(run / "checkpoints" / "step_0000003.pt")
    ckpt.save_sharded(tmp_path / "step_0000003.dcp", saved)  # the same state as a sharded checkpoint
    for checkpoint in (run, run / "checkpoints" / "step_0000003.pt", tmp_path / "step_0000003.dcp"):
        probe = build_model(compose_config("+experiment=mae_sigmoid_bias_probe", f"model.checkpoint={checkpoint}"), {})
        weights = probe.encoder.state_dict()
        assert weights.keys() == {k.removeprefix("encoder.") for k in saved["model"] if k.startswith("encoder.")}
        assert all(torch.equal(v, saved["model"][f"encoder.{k}"]) for k, v in weights.items())
    assert {name for name, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    probe.train()
    assert probe.head.training and not any(m.training for m in probe.encoder.modules())
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    sgd = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(0)
    batch = {"images": torch.randn(16, 1, 8, 8), "labels": torch.randint(0, 10, (16,))}
    for _ in range(3):
        ClassificationTask().training_step(probe, batch)[0].backward()
        sgd.step()
        sgd.zero_grad()
    after = probe.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert not torch.equal(after["head.weight"], before["head.weight"])


def test_probe_without_a_fitting_checkpoint_says_what_to_run(pretrained, tmp_path):
    def probe(*overrides, experiment="mae_softmax_probe"):
        return build_model(compose_config(f"+experiment={experiment}", *overrides), {})

    with pytest.raises(ConfigError, match=r"model\.checkpoint is not set.*mae_sigmoid.*model\.checkpoint="):
        train(tmp_path / "unset", "+experiment=mae_softmax_probe", *SHORT)
    assert not (tmp_path / "unset" / "checkpoints").exists()
    with pytest.raises(CheckpointError, match=r"does not exist.*model\.checkpoint=.*\+experiment=mae_sigmoid"):
        probe(f"model.checkpoint={tmp_path / 'nowhere.pt'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*empty"):
        probe(f"model.checkpoint={tmp_path / 'empty'}")
    softmax = pretrained["mae_softmax"]
    with pytest.raises(CheckpointError, match=r"attention\.backend='softmax' there, 'sigmoid' here.*mae_sigmoid_probe"):
        probe(f"model.checkpoint={softmax}", experiment="mae_sigmoid_bias_probe")
    with pytest.raises(CheckpointError, match=r"model\.num_heads=4 there, 2 here"):
        probe(f"model.checkpoint={softmax}", "model.num_heads=2")
    bare = tmp_path / "bare"  # a checkpoint file away from its run: only the weights can be checked
    bare.mkdir()
    for name in ("step_0000003.pt", "step_0000003.pt.sha256"):
        shutil.copy(softmax / "checkpoints" / name, bare / name)
    with pytest.raises(CheckpointError, match=r"probe: patch_embed\.weight is \(64, 4\) there, \(32, 4\) here.* more"):
        probe(f"model.checkpoint={bare / 'step_0000003.pt'}", "model.dim=32")

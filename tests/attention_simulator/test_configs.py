"""Every config composes and builds; every experiment smoke-runs; bad configs fail clearly."""

import inspect
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException

from attention_simulator.attention import AttentionConfig
from attention_simulator.config import CONFIG_DIR, build, unused_sigmoid_options
from attention_simulator.errors import ConfigError, DatasetUnavailableError
from attention_simulator.models.asr import SpeechRecognizer
from attention_simulator.models.block import TransformerBlock
from attention_simulator.models.lm import DecoderLM
from attention_simulator.models.mae import MAELinearProbe, MaskedAutoencoder
from attention_simulator.models.trunk import Trunk
from attention_simulator.models.vit import VisionTransformer
from attention_simulator.train import build_model, build_optimizer

from ..helpers import compose_config, train

GROUPS = ["task", "data", "model", "attention", "optimizer", "schedule", "logger", "trainer"]
EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))


def options(group):
    return sorted(p.stem for p in Path(CONFIG_DIR, group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g) if g not in ("data", "model")])
def test_every_option_composes_and_builds(group, option):
    cfg = compose_config(f"{group}={option}")
    model = build(cfg.model, _partial_=True)(attention=build(cfg.attention))
    opt, lr = build_optimizer(cfg, model)
    opt.init(dict(model.named_parameters()))
    assert lr(0) >= 0 and callable(build(cfg.logger))
    build(cfg.task)
    build(cfg.trainer)


@pytest.mark.parametrize("model", ["vit_tiny", "vit_s16", "vit_b16"])
def test_models_build_at_their_data_sizes(model):
    data = "digits" if model == "vit_tiny" else "imagenet"
    cfg = compose_config(f"model={model}", f"data={data}")
    vit = build(cfg.model, _partial_=True)(attention=build(cfg.attention))
    images = torch.zeros(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        assert vit(images).shape == (2, cfg.data.num_classes)
    expected = {"vit_tiny": (0.1e6, 0.3e6), "vit_s16": (21e6, 23e6), "vit_b16": (85e6, 88e6)}[model]
    assert expected[0] < sum(p.numel() for p in vit.parameters()) < expected[1]


@pytest.mark.parametrize("model", ["lm_tiny", "lm_small", "lm_1b"])
def test_language_models_have_their_sizes(model):
    cfg = compose_config("+experiment=lm_sigmoid", f"model={model}")
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised for real
        lm = build_model(cfg, {"vocab_size": 50257})
        assert lm(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 50257)
    blocks = sum(p.numel() for p in lm.blocks.parameters())
    expected = {"lm_tiny": (0.7e6, 0.9e6), "lm_small": (84e6, 86e6), "lm_1b": (1.2e9, 1.22e9)}[model]
    assert expected[0] < blocks < expected[1]
    assert lm.head.weight is lm.token_embedding.weight  # tied


def test_digits_data_builds():
    data = build(compose_config("data=digits").data)
    batch = next(iter(data.train_loader(seed=0)))
    assert batch["images"].shape == (128, 1, 8, 8) and batch["labels"].shape == (128,)


@pytest.mark.parametrize("data", ["cifar10", "imagenet"])
def test_hub_datasets_offline_say_what_to_do(data, no_hub):
    with pytest.raises(DatasetUnavailableError) as info:
        build(compose_config(f"data={data}").data).prepare()
    message = str(info.value)
    assert repr(data) in message and "data.path" in message and "load_dataset" in message


# run by tests/e2e/test_readme.py; every family keeps at least one experiment here for the checks below
IN_README = {"vit_sigmoid", "vit_softmax", "lm_sigmoid", "lm_softmax", "mlm_sigmoid", "asr_sigmoid", "asr_softmax",
             "asr_sigmoid_alibi", "mae_sigmoid_bias"}  # fmt: skip
UNDER_TORCHRUN = {"lm_sigmoid_long"}  # run by tests/e2e/test_parallel.py
NEEDS_CHECKPOINT = {e for e in EXPERIMENTS if e.endswith("_probe")}  # run by test_mae.py from a pretraining


def test_the_experiments_left_to_the_readme_test_are_documented_commands():
    root = Path(__file__).parents[2]
    pages = "\n".join(p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md")])
    documented = set(re.findall(r"python -m attention_simulator\.train [^\n`]*\+experiment=(\w+)", pages))
    assert not IN_README - documented, f"not run by any documented command: {IN_README - documented}"


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(set(EXPERIMENTS) - IN_README - UNDER_TORCHRUN - NEEDS_CHECKPOINT))
def test_experiment_smoke_runs(experiment, tmp_path):
    small_eval = ["data.eval_max_tokens=8192"] if experiment.startswith(("lm", "mlm")) else []
    final = train(tmp_path, f"+experiment={experiment}", "trainer.max_steps=3", "data.batch_size=32", *small_eval)
    rows = pd.read_parquet(tmp_path / "metrics.parquet")
    family = experiment.split("_")[0]
    metric = build(compose_config(f"+experiment={experiment}").task).main_metric
    assert final == rows[f"eval/{metric}"].dropna().iloc[-1]  # what the run returns is what it logged
    # three steps from the initialisation: the loss is still the untrained one, -log(1 / classes)
    first_loss = rows["train/loss"].dropna().iloc[0]
    untrained = {"vit": math.log(10), "lm": math.log(257), "mlm": math.log(258)}.get(family)
    assert untrained is None or abs(first_loss - untrained) < 0.25 * untrained, first_loss
    if family == "vit":
        assert final * 360 == pytest.approx(round(final * 360))  # a count of the 360 test images
    assert (tmp_path / "checkpoints" / "step_0000003.pt").exists()


# ---- bad input: each names the culprit and the fix --------------------------------------------


def test_misspelt_group_option_is_a_hydra_error():
    with pytest.raises(ConfigCompositionException, match="sigmod"):
        compose_config("attention=sigmod")


def test_misspelt_command_line_key_is_a_hydra_error():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_config("trainer.max_stepz=3")


def test_every_attention_file_sets_every_option():
    """The backends' files start from softmax.yaml: each composes to all of AttentionConfig's
    fields, its own backend, and the sigmoid section's values exactly where a sigmoid backend reads them."""
    fields = set(AttentionConfig.__dataclass_fields__)
    for option in options("attention"):
        attention = compose_config(f"attention={option}", "sigmoid.bias=-3").attention
        assert set(attention) - {"_target_"} == fields and attention.backend == option
        assert attention.sigmoid_bias == (-3 if "sigmoid" in option else None)


def test_a_softmax_run_says_which_sigmoid_options_it_ignores():
    assert unused_sigmoid_options(compose_config("+experiment=vit_softmax")) is None  # defaults: nothing to say
    note = unused_sigmoid_options(compose_config("+experiment=vit_softmax", "sigmoid.bias=-4", "sigmoid.length_norm=n"))
    assert note == "attention.backend=softmax is softmax attention: sigmoid.bias=-4, sigmoid.length_norm=n not used."
    assert unused_sigmoid_options(compose_config("+experiment=vit_sigmoid", "sigmoid.bias=-4")) is None


def test_models_declare_only_what_differs_from_the_trunk():
    """Every model takes the trunk's options (declared once, on Trunk) besides its own, and its
    signature says so: config validation and help read it."""
    offered = {**inspect.signature(Trunk).parameters, **inspect.signature(TransformerBlock).parameters}
    trunk = set(offered) - {"block", "causal"}
    for model in (VisionTransformer, DecoderLM, SpeechRecognizer, MaskedAutoencoder, MAELinearProbe):
        parameters = inspect.signature(model).parameters
        assert trunk <= set(parameters) and not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        assert not trunk & set(inspect.signature(model.__init__).parameters)  # not declared again


@pytest.mark.parametrize(
    "override, message",
    [
        ("+model.dpeth=4", r"model\.dpeth is not an option of .*VisionTransformer\. Did you mean 'depth'\?"),
        ("+trainr.max_steps=4", r"Unknown config section 'trainr'\. Did you mean 'trainer'\?"),
        ("model.num_heads=5", r"width 64 is not divisible by num_heads=5"),
        (
            "attention.sigmoid_bias=auto",
            r"'softmax' cannot honour sigmoid_bias; backends that can: \['flash_sigmoid', 'sigmoid'\]",
        ),
        ("attention.backend=softmaks", r"'softmaks' is not a backend"),
        ("+sigmoid.bais=-2", r"sigmoid\.bais is not an option of .*SigmoidOptions\. Did you mean 'bias'"),
        ("trainer.precision=fp8", r"trainer\.precision='fp8'"),
        ("data.path=/no/such/dir", r"'/no/such/dir' does not exist"),
        ("schedule.warmup_steps=5000", r"schedule: warmup_steps=5000 is longer than total_steps=1000"),
    ],
)
def test_bad_config_raises_config_error(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, override, "trainer.max_steps=1000")
    assert not (tmp_path / "checkpoints").exists()


def test_lm_sigmoid_bias_follows_the_training_length():
    for seq_len in (128, 300):
        cfg = compose_config("+experiment=lm_sigmoid", f"data.seq_len={seq_len}")
        assert build(cfg.attention).sigmoid_bias == pytest.approx(-math.log(seq_len))

"""Which parameters the trainer's optimizer decays, on the project's own models."""

import re

import pytest

import optorch
from attention_simulator.config import build

from ..helpers import compose_config

LINEAR = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.weight"
DECAYED = {  # experiment: the parameters that must decay, written out by name
    "vit_sigmoid": [r"patch_embed\.weight", LINEAR, r"head\.weight"],
    "lm_sigmoid": [LINEAR],  # the output layer is tied to the token embedding: not decayed
    "asr_sigmoid": [
        r"subsampling\.conv\.[02]\.weight",
        r"subsampling\.out\.weight",
        LINEAR,
        r"head\.weight",
        r"convs\.\d+\.(pointwise_in|depthwise|pointwise_out)\.weight",
    ],  # fmt: skip
}


@pytest.mark.parametrize("experiment", DECAYED)
def test_weight_decay_mask_on_the_projects_models(experiment):
    overrides = [f"+experiment={experiment}"] + (["model.conv_kernel=7"] if experiment.startswith("asr") else [])
    cfg = compose_config(*overrides)
    model_args = {"vit": {}, "lm": {"vocab_size": 257}, "asr": {"n_mels": 80, "vocab_size": 29}}[
        experiment[:3].strip("_")
    ]
    model = build(cfg.model, _partial_=True)(attention=build(cfg.attention), **model_args)
    mask = optorch.default_weight_decay_mask(model)
    assert list(mask) == [name for name, _ in model.named_parameters()]
    decayed = {name for name in mask if any(re.fullmatch(p, name) for p in DECAYED[experiment])}
    assert {name for name, on in mask.items() if on} == decayed
    assert len(decayed) >= 4 * (1 + 3 * experiment.startswith("asr"))  # the patterns matched real layers
    undecayed = set(mask) - decayed  # biases, norms, LayerScale, embeddings, position tables, tokens
    assert all(re.search(r"bias|norm|gamma|embed|token|offset|temperature", name) for name in undecayed), undecayed

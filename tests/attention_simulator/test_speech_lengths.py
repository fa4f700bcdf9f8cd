"""Length generalisation in speech: the long-utterance buckets, data.eval_splits, per-bucket error
rates, absolute positions with padding, and the sigmoid + ALiBi experiment."""

import io
import itertools
from collections import Counter

import datasets
import numpy as np
import pandas as pd
import pytest
import soundfile
import torch

from attention_simulator.attention import AttentionConfig
from attention_simulator.checkpoint import list_checkpoints
from attention_simulator.config import build
from attention_simulator.data.speech import ALPHABET, BLANK, SpeechData
from attention_simulator.data.synthesis import SynthConfig, synthesize_corpus, synthesize_long
from attention_simulator.errors import ConfigError
from attention_simulator.models.asr import SpeechRecognizer
from attention_simulator.train import build_model

from ..helpers import compose_config, levenshtein, run_config, train

TINY = {"train_size": 24, "eval_size": 12}  # 12 test utterances: 6, 4 and 3 long ones
TINY_OVERRIDES = [f"data.synth.{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """datasets' cache in a temporary folder: the tiny corpus and its long buckets are built there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


def durations(split) -> np.ndarray:
    """Seconds of each utterance, from its FLAC header (not the corpus' duration column)."""
    return np.array([soundfile.info(io.BytesIO(audio["bytes"])).duration for audio in split["audio"]])


def test_long_buckets_are_two_to_four_times_the_training_lengths():
    corpus = synthesize_corpus(SynthConfig())  # the default corpus, as the experiments use it
    train_seconds = durations(corpus["train"])
    for parts in (2, 3, 4):
        seconds = durations(synthesize_long(SynthConfig(), parts))
        assert len(seconds) == 300 // parts
        assert 0.85 * parts < seconds.mean() / train_seconds.mean() < 1.05 * parts  # 1.9x, 2.8x, 3.7x
        assert 0.85 * parts < np.median(seconds) / np.median(train_seconds) < 1.05 * parts
    longer = (seconds > train_seconds.max()).mean()  # long_4x
    assert longer > 0.95  # nearly all longer than any training utterance


def split_into(text: str, pieces: set[str], parts: int) -> list[str] | None:
    """`text` as `parts` consecutive members of `pieces` joined by spaces, or None."""
    words = text.split()
    if parts == 1:
        return [text] if text in pieces else None
    for cut in range(1, len(words)):
        head = " ".join(words[:cut])
        rest = head in pieces and split_into(" ".join(words[cut:]), pieces, parts - 1)
        if rest:
            return [head, *rest]
    return None


def test_long_transcripts_are_the_test_transcripts_joined():
    corpus = synthesize_corpus(SynthConfig())
    test, train_texts = corpus["test"]["text"], set(corpus["train"]["text"])
    for parts in (2, 3, 4):
        groups = [split_into(text, set(test), parts) for text in synthesize_long(SynthConfig(), parts)["text"]]
        assert None not in groups
        used = Counter(piece for group in groups for piece in group)
        assert used == Counter(test)  # every test utterance exactly once per bucket (300 is divisible by 2, 3, 4)
        assert not set(used) & train_texts


def test_eval_splits_select_the_loaders(tiny_cache):
    data = SpeechData(synth=TINY, eval_batch_size=4, eval_splits=["long_3x"])
    loaders = data.eval_loaders()
    assert list(loaders) == ["", "@long_3x"]
    transcripts = [t for batch in loaders["@long_3x"] for t in batch["transcripts"]]
    assert sorted(transcripts) == sorted(data.splits["long_3x"]["text"]) and len(transcripts) == 4
    cfg = compose_config("+experiment=asr_sigmoid", *TINY_OVERRIDES)
    assert list(build(cfg.data).eval_loaders()) == ["", "@test"]  # the long buckets only when asked


def test_eval_max_utterances_takes_each_splits_first_ones(tiny_cache):
    data = SpeechData(synth=TINY, eval_batch_size=2, eval_splits=["test", "long_2x"], eval_max_utterances=5)
    for key, split in (("", "dev"), ("@test", "test"), ("@long_2x", "long_2x")):
        transcripts = [t for batch in data.eval_loaders()[key] for t in batch["transcripts"]]
        assert sorted(transcripts) == sorted(data.splits[split]["text"][:5])  # 12, 12 and 6 in all
    with pytest.raises(ConfigError, match=r"data.eval_max_utterances=0 must be >= 1 \(or null: all\)"):
        SpeechData(synth=TINY, eval_max_utterances=0)


@pytest.mark.parametrize(
    "eval_splits, message",
    [
        (["test", "long_1x"], r"'long_1x' is not a split; choose from test, long_<k>x \(k >= 2"),
        (["train"], r"'train' is not a split; choose from test, long_<k>x"),
        (["dev"], r"dev is always evaluated .*choose from test, long_<k>x"),
        ("test", r"data.eval_splits='test' must be a list"),
        (["long_13x"], r"long_13x joins more utterances than the test split's 12"),
    ],
)
def test_bad_eval_splits_name_the_key_and_the_choices(tiny_cache, eval_splits, message):
    with pytest.raises(ConfigError, match=message) as info:
        SpeechData(synth=TINY, eval_splits=eval_splits).prepare()
    assert "data.eval_splits" in str(info.value)


def test_long_buckets_only_for_the_synthesised_corpus(tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_splits: 'long_2x' is not a split; choose from test \(long"):
        SpeechData(name="librispeech", path=str(tmp_path), eval_splits=["test", "long_2x"])


def test_error_rates_per_bucket_are_corpus_level_edit_rates(tiny_cache, tmp_path):
    # a near-initial model (tiny learning rate) decodes garbage rather than the all-blank output
    # of the plateau a few steps later, so each bucket gets its own, non-trivial rates
    overrides = ["+experiment=asr_sigmoid", "trainer.max_steps=2", "optimizer.learning_rate=1e-6", "data.batch_size=4",
                 "data.eval_batch_size=4", "data.eval_splits=[test,long_2x,long_4x]", *TINY_OVERRIDES]  # fmt: skip
    train(tmp_path, *overrides)
    last = pd.read_parquet(tmp_path / "metrics.parquet").dropna(subset=["eval/wer"]).iloc[-1]

    cfg = run_config(*overrides)
    data = build(cfg.data)
    model = build_model(cfg, data.model_args).eval()
    model.load_state_dict(torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)["model"])
    rates = {}
    for suffix, split in [("", "dev"), ("@test", "test"), ("@long_2x", "long_2x"), ("@long_4x", "long_4x")]:
        counts = np.zeros(4, dtype=int)  # character edits, reference characters, word edits, reference words
        with torch.no_grad():
            for batch in data.eval_loaders()[suffix]:
                log_probs, lengths = model(batch["features"], batch["feature_lengths"])
                for path, n, reference in zip(log_probs.argmax(-1), lengths, batch["transcripts"]):
                    ids = [key for key, _ in itertools.groupby(path[: int(n)].tolist()) if key != BLANK]
                    hypothesis = " ".join("".join(ALPHABET[i - 1] for i in ids).split())
                    counts += [levenshtein(reference, hypothesis), len(reference),
                               levenshtein(reference.split(), hypothesis.split()), len(reference.split())]  # fmt: skip
        assert counts[1] == sum(map(len, data.splits[split]["text"]))  # the whole split, once
        rates[suffix] = counts
        assert last[f"eval/cer{suffix}"] == pytest.approx(counts[0] / counts[1], rel=1e-9)
        assert last[f"eval/wer{suffix}"] == pytest.approx(counts[2] / counts[3], rel=1e-9)
    # the buckets hold the test words; had their edits been pooled, their rates would be equal
    assert len({last[f"eval/cer{s}"] for s in rates}) == 4
    assert "eval/cer@long_3x" not in last


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_absolute_positions_ignore_padding(pos_embed):
    torch.manual_seed(0)
    attention = AttentionConfig(backend="sigmoid", position="none", sigmoid_bias="auto")
    model = SpeechRecognizer(n_mels=20, vocab_size=29, dim=32, depth=2, num_heads=4, subsampling_channels=8,
                             pos_embed=pos_embed, max_frames=16, attention=attention).eval()  # fmt: skip
    lengths = torch.tensor([61, 45])
    features = torch.randn(2, 61, 20)
    padded = torch.cat([features, 100 * torch.randn(2, 40, 20)], dim=1)  # loud junk after the end
    with torch.no_grad():
        out, _ = model(features, lengths)
        out_padded, out_lengths = model(padded[:, :65], lengths)  # 15 frames: within max_frames
        alone, _ = model(features[1:, :45], lengths[1:])
    for b, n in enumerate(out_lengths.tolist()):
        torch.testing.assert_close(out_padded[b, :n], out[b, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], out[1, :10], atol=1e-5, rtol=1e-5)
    if pos_embed == "learned":
        assert dict(model.named_parameters())["pos_embed"].shape == (1, 16, 32)
    with pytest.raises(ValueError, match="17 frames exceed model.max_frames=16"):
        model(torch.randn(1, 71, 20), torch.tensor([71]))


def test_asr_sigmoid_alibi_runs(tiny_cache, tmp_path):
    cfg = compose_config("+experiment=asr_sigmoid_alibi")
    attention = build(cfg.attention)
    assert (attention.backend, attention.position, attention.sigmoid_bias) == ("sigmoid", "alibi", "auto")
    train(tmp_path, "+experiment=asr_sigmoid_alibi", "trainer.max_steps=3", "data.batch_size=4",
          "data.eval_splits=[test,long_2x,long_3x,long_4x]", *TINY_OVERRIDES)  # fmt: skip
    last = pd.read_parquet(tmp_path / "metrics.parquet").dropna(subset=["eval/wer"]).iloc[-1]
    for bucket in ("", "@test", "@long_2x", "@long_3x", "@long_4x"):
        assert np.isfinite(last[f"eval/cer{bucket}"]) and np.isfinite(last[f"eval/loss{bucket}"])

"""data.streaming=true: documents tokenised as they are read, packed as the tokenised corpus is,
split between processes, and resumed at the same document and token."""

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from attention_simulator.checkpoint import list_checkpoints
from attention_simulator.data.streaming import PackedStream
from attention_simulator.data.text import TextData, load_pydoc
from attention_simulator.data.tokenizers import BPETokenizer, ByteTokenizer
from attention_simulator.errors import ConfigError

from ..helpers import train

DOCUMENTS = [f"Document {i}: " + "sigmoid attention " * (i % 4 + 1) for i in range(7)]


def corpus() -> datasets.IterableDataset:
    return datasets.Dataset.from_dict({"text": DOCUMENTS}).to_iterable_dataset()


def batches(tokenizer, count, position=(0, 0, 0), **options):
    """`count` batches of 3 blocks of 8 tokens, with the position after each."""
    stream = PackedStream(corpus(), tokenizer, 8, 3, position, lambda batch, _: batch, **options)
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == count:
            return out


def expected_stream(tokenizer, documents, epochs):
    """Documents in order, each followed by EOS, epoch after epoch (a loop)."""
    tokens = []
    for _ in range(epochs):
        for text in documents:
            tokens += tokenizer.encode(text) + [tokenizer.eos_id]
    return tokens


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_blocks_are_the_corpus_in_order_epoch_after_epoch(kind):
    tokenizer = ByteTokenizer() if kind == "byte" else BPETokenizer.train(DOCUMENTS, 300)
    got = batches(tokenizer, 30)
    stream = expected_stream(tokenizer, DOCUMENTS, epochs=40)
    for k, batch in enumerate(got):
        for b in range(3):
            start = (3 * k + b) * 8  # consecutive blocks share one token: the last target, the next input
            assert batch["inputs"][b].tolist() == stream[start : start + 8]
            assert batch["targets"][b].tolist() == stream[start + 1 : start + 9]
    assert got[-1]["position"][0] >= 1  # past the first epoch


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_resuming_at_any_batch_continues_with_the_same_tokens(shuffle_buffer):
    tokenizer = ByteTokenizer()
    straight = batches(tokenizer, 25, shuffle_buffer=shuffle_buffer, seed=5)
    for k in range(24):
        resumed = batches(tokenizer, 1, straight[k]["position"], shuffle_buffer=shuffle_buffer, seed=5)[0]
        assert torch.equal(resumed["inputs"], straight[k + 1]["inputs"]), k
        assert torch.equal(resumed["targets"], straight[k + 1]["targets"]), k


def test_a_shuffle_buffer_reorders_documents_by_seed_and_epoch():
    tokenizer = ByteTokenizer()
    in_order, a, b = batches(tokenizer, 12), batches(tokenizer, 12, shuffle_buffer=3, seed=1), batches(
        tokenizer, 12, shuffle_buffer=3, seed=2)  # fmt: skip
    inputs = [torch.cat([x["inputs"] for x in run]) for run in (in_order, a, b)]
    assert not torch.equal(inputs[0], inputs[1]) and not torch.equal(inputs[1], inputs[2])


def test_processes_stream_disjoint_documents():
    tokenizer = ByteTokenizer()
    for rank in (0, 1):
        got = batches(tokenizer, 4, rank=rank, world_size=2)
        stream = expected_stream(tokenizer, DOCUMENTS[rank::2], epochs=10)
        assert got[0]["inputs"][0].tolist() == stream[:8] and got[3]["inputs"][2].tolist() == stream[88:96]


def test_validation_is_the_validation_streams_first_tokens():
    data = TextData(streaming=True, seq_len=64, eval_max_tokens=1000, eval_seq_lens=[64, 128]).prepare()
    expected = expected_stream(ByteTokenizer(), load_pydoc()["validation"]["text"], 1)[: 1000 + 128 + 1]
    assert data.streams["validation"].tolist() == expected
    assert set(data.eval_loaders()) == {"", "@128"}


def test_streaming_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="data.streaming=false"):
        TextData(streaming=True, masking=0.15)
    data = TextData(streaming=True, seq_len=64)
    with pytest.raises(ConfigError, match="resume with 2 processes"):
        data.load_state_dict({"stream_positions": [(0, 1, 2), (0, 3, 4)]}, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="data.streaming=false"):
        data.load_state_dict({"tokenizer": "{}"})
    data.load_state_dict({"stream_positions": [(0, 1, 2), (0, 3, 4)]}, rank=1, world_size=2)
    assert data.position == (0, 3, 4)


def test_a_streamed_run_resumes_exactly(tmp_path):
    """The trainer keeps the stream position in its checkpoints: a run split in two equals an
    uninterrupted one, dropout and document masks included."""
    common = ["+experiment=lm_sigmoid", "model=lm_tiny", "data.streaming=true", "data.shuffle_buffer=4",
              "data.batch_size=4", "data.seq_len=64", "data.eval_max_tokens=1024", "data.eval_seq_lens=[64]",
              "data.document_masks=true", "attention.attn_drop=0.1", "trainer.max_steps=6", "trainer.eval_every=3",
              "trainer.log_every=1", "diagnostics=off", "task.sample_prompts=[]"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, *common)
    train(split, *common, "trainer.run_steps=3")
    train(split, *common, "trainer.resume=auto")
    a, b = (pd.read_parquet(d / "metrics.parquet").set_index("step") for d in (straight, split))
    pd.testing.assert_frame_equal(a[["train/loss", "eval/loss"]], b[["train/loss", "eval/loss"]], rtol=0, atol=0)
    state = torch.load(list_checkpoints(split / "checkpoints")[-1], weights_only=False)
    epoch, document, token = state["data"]["stream_positions"][0]
    assert epoch == 0 and (document > 0 or token == 6 * 4 * 64)  # 6 batches of 4 × 64 tokens read
    assert np.isfinite(a["train/loss"]).all()

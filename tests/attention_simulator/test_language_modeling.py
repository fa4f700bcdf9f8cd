"""Packing, tokenizers, bits per byte, KV-cache generation and the LM training path."""

import json
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from attention_simulator.attention import AttentionConfig
from attention_simulator.data.text import PackedBlocks, TextData, load_pydoc
from attention_simulator.data.tokenizers import BPETokenizer, ByteTokenizer, tokenizer_from_json
from attention_simulator.errors import ConfigError, DatasetUnavailableError
from attention_simulator.generation import generate_batch, generate_ids, sample_next
from attention_simulator.models.lm import DecoderLM
from attention_simulator.tasks.language_modeling import LanguageModelingTask

from ..helpers import train

TEXT = "Sigmoid attention — σ(q·k) — needs b = −log n.\nNaïve café, 東京."


def test_packing_uses_every_token_once_and_shifts_targets():
    stream = np.arange(1000, dtype=np.uint16)
    blocks = PackedBlocks(stream, 64, torch.ones(1000, dtype=torch.int64))
    batch = blocks.keyed([(epoch, i) for epoch in (0, 7) for i in range(len(blocks))][len(blocks) :])  # any epoch
    assert len(blocks) == 999 // 64
    assert torch.equal(batch["inputs"].flatten(), torch.arange(len(blocks) * 64))  # each token once, in order
    assert torch.equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert torch.equal(batch["targets"][:, -1], batch["inputs"][:, -1] + 1)  # the next block's first token


def test_shifted_windows_move_every_epoch_and_resume_exactly():
    """data.sampling=shifted: epoch e's blocks are stream[o_e + i·L ...] for one offset o_e in
    [0, L) per epoch, seeded; a loader started at batch k gives the uninterrupted one's k-th on."""
    stream = np.arange(1000, dtype=np.uint16)
    blocks = PackedBlocks(stream, 64, torch.ones(1000, dtype=torch.int64), shift_seed=3)
    assert len(blocks) == (1000 - 64) // 64  # the largest offset still fits every block
    offsets = []
    for epoch in range(6):
        batch = blocks.keyed([(epoch, i) for i in range(len(blocks))])
        offset = int(batch["inputs"][0, 0])
        assert 0 <= offset < 64 and torch.equal(batch["inputs"].flatten(), torch.arange(len(blocks) * 64) + offset)
        assert torch.equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        offsets.append(offset)
    assert len(set(offsets)) > 1  # six epochs, six draws
    data = TextData(seq_len=64, batch_size=8, sampling="shifted").prepare()
    per_epoch = (len(data.streams["train"]) - 64) // 64 // 8
    uninterrupted = iter(data.train_loader(seed=0))
    first = [next(uninterrupted) for _ in range(per_epoch + 3)]
    resumed = data.train_loader(seed=0, start=per_epoch - 1)  # across the epoch boundary
    for expected, got in zip(first[per_epoch - 1 :], resumed):
        assert torch.equal(expected["inputs"], got["inputs"])
    assert not torch.equal(first[0]["inputs"], next(iter(data.train_loader(seed=1)))["inputs"])
    with pytest.raises(ConfigError, match="data.sampling=fixed"):
        TextData(sampling="shifted", masking=0.15)


def test_pydoc_split_is_by_document_and_disjoint():
    splits = load_pydoc()
    train, validation = set(splits["train"]["title"]), set(splits["validation"]["title"])
    assert not train & validation and len(train) + len(validation) == 79 and len(validation) == 8


@pytest.mark.parametrize(
    "tokenizer", [ByteTokenizer(), BPETokenizer.train([TEXT * 20, "the cat sat on the mat"] * 5, 300)]
)
def test_tokenizers_round_trip_and_count_bytes(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert int(tokenizer.token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert tokenizer.token_bytes[tokenizer.eos_id] == 0
    restored = tokenizer_from_json(tokenizer.to_json())
    assert restored.encode(TEXT) == ids and torch.equal(restored.token_bytes, tokenizer.token_bytes)


def test_bpe_compresses():
    tokenizer = BPETokenizer.train(load_pydoc()["train"]["text"], 512)
    text = load_pydoc()["validation"]["text"][0]
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode("utf-8"))


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, inputs):
        return self.logits


def test_bits_per_byte_by_hand():
    # two targets: token 0 (3 bytes) with p = 1/2, token 1 (1 byte) with p = 1/4 -> (1 + 2) bits / 4 bytes
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]]))
    batch = {"inputs": torch.zeros(1, 2), "targets": torch.tensor([[0, 1]]), "target_bytes": torch.tensor([[3, 1]])}
    task = LanguageModelingTask()
    sums = task.eval_step(FixedLogits(logits), batch)
    assert sums["bits_per_byte"][0].shape == (1,)  # one per sequence
    assert float(sums["bits_per_byte"][0] / sums["bits_per_byte"][1]) == pytest.approx(3 / 4)
    assert float(sums["loss"][0] / sums["loss"][1]) == pytest.approx((math.log(2) + math.log(4)) / 2)
    _, metrics = task.training_step(FixedLogits(logits), batch)
    assert float(metrics["bits_per_byte"]) == pytest.approx(3 / 4)
    assert task.derived({"eval/loss@512": math.log(5.0)}) == {"eval/perplexity@512": pytest.approx(5.0)}


CACHE_CASES = [
    ("softmax", dict(position="rope", gate="headwise", sink="learned")),
    ("flash_softmax", dict(position="alibi", window=6, sink="zero")),
    ("sigmoid", dict(position="rope", sigmoid_bias="auto", bias_n="per_row", length_norm="sqrt_n")),
    ("sigmoid", dict(position="alibi", sigmoid_bias=-3.0, learnable_bias="scalar")),
    (
        "flash_sigmoid",
        dict(position="rope", sigmoid_bias=-2.0, num_kv_heads=2, learnable_bias="per_head", gate="elementwise"),
    ),
    ("flash_sigmoid", dict(position="alibi", sigmoid_bias=-2.0, window=5)),
]


def tiny_lm(backend: str, **options) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(
        vocab_size=50, dim=32, depth=2, num_heads=4, attention=AttentionConfig(backend=backend, **options)
    )
    with torch.no_grad():  # a learned offset or sink that is not 0, so the cache must carry it too
        for block in model.blocks:
            for p in (block.attn.bias_offset, block.attn.sink_logit):
                if isinstance(p, torch.nn.Parameter):
                    p.normal_()
    return model


PROMPT = [3, 17, 5, 9, 41]


@pytest.mark.parametrize("backend, options", CACHE_CASES, ids=[f"{b}-{o['position']}" for b, o in CACHE_CASES])
def test_kv_cache_generation_equals_recomputation(backend, options):
    model = tiny_lm(backend, **options)
    cached = generate_ids(model, PROMPT, 20, use_cache=True)
    assert cached == generate_ids(model, PROMPT, 20, use_cache=False)
    # and the cached logits themselves match a full forward, position by position
    cache = model.new_cache(1, 30)
    tokens = torch.tensor([PROMPT + cached[:-1]])
    step_logits = [model(tokens[:, :5], cache)[0]] + [model(tokens[:, i : i + 1], cache)[0] for i in range(5, 24)]
    torch.testing.assert_close(torch.cat(step_logits), model(tokens)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend, options", CACHE_CASES, ids=[f"{b}-{o['position']}" for b, o in CACHE_CASES])
def test_prompts_of_different_lengths_in_one_batch_equal_each_alone(backend, options):
    """Each sequence continues at its own position (flash_sigmoid: through flash_attn_with_kvcache)."""
    model = tiny_lm(backend, **options)
    prompts = [PROMPT, [7, 2], PROMPT + [11, 12, 13, 14]]
    alone = [generate_ids(model, p, 10, use_cache=False) for p in prompts]
    assert generate_batch(model, prompts, 10, use_cache=True) == alone
    assert generate_batch(model, prompts, 10, use_cache=False) == alone
    # a row that stops early is cut there; the others go on
    stopped = generate_batch(model, prompts, 10, stop=lambda ids: ids == alone[0][:3])
    assert stopped == [a[:3] if a[:3] == alone[0][:3] else a for a in alone] and len(stopped[0]) == 3


@pytest.mark.parametrize("backend", ["sigmoid", "flash_sigmoid"])
def test_length_dependent_bias_recomputes_instead_of_caching(backend):
    # b = −log(sequence length): a longer sequence changes the earlier tokens' outputs
    model = tiny_lm(backend, position="rope", sigmoid_bias="auto")
    tokens = torch.tensor([PROMPT + [1, 2, 3]])
    with torch.no_grad():
        assert not torch.allclose(model(tokens[:, :5])[0], model(tokens)[0, :5])
    assert not model.cacheable
    with pytest.raises(ConfigError, match="bias_n=per_row"):
        generate_ids(model, PROMPT, 4, use_cache=True)
    assert generate_ids(model, PROMPT, 8) == generate_ids(model, PROMPT, 8, use_cache=False)


def test_sampling_filters():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 1, None, g) for _ in range(20)} == {0}  # top-k 1 is greedy
    assert {sample_next(logits, 1.0, None, 0.9, g) for _ in range(200)} == {0, 1}  # the nucleus: 0.51 + 0.47
    assert sample_next(logits, 0.0, None, None) == 0


@pytest.mark.slow
def test_lm_learns_and_evaluates_at_several_lengths(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(tmp_path, "+experiment=lm_sigmoid", "trainer.max_steps=30", "trainer.eval_every=15", "data.batch_size=8",
          "logger.wandb=true", 'task.sample_prompts=["The ","A class "]')  # fmt: skip
    rows = pd.read_parquet(tmp_path / "metrics.parquet")
    loss = rows["train/loss"].dropna()
    assert loss.iloc[-1] < 0.8 * loss.iloc[0]
    last = rows.dropna(subset=["eval/loss"]).iloc[-1]
    for suffix in ("", "@256", "@512"):
        # byte tokens: bits per byte is the loss in bits, a little more for the byte-less EOS tokens
        loss, bits = last[f"eval/loss{suffix}"], last[f"eval/bits_per_byte{suffix}"]
        assert loss / math.log(2) <= bits < 1.02 * loss / math.log(2) and bits < 8
        assert last[f"eval/perplexity{suffix}"] == pytest.approx(math.exp(loss))
    assert isinstance(last["samples/0"], str) and last["samples/0"].startswith("The ")
    log = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    dump = subprocess.run(["wandb", "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True)
    history = [r["history"]["item"] for r in map(json.loads, dump.stdout.splitlines()) if r.get("type") == "history"]
    tables = [item["samples/table.path"] for item in history if "samples/table.path" in item]
    assert len(tables) == 2  # a table of every sample so far, at each evaluation
    table = json.loads((log.parent / "files" / tables[-1]).read_text())
    assert [row[:2] for row in table["data"]] == [[step, f"samples/{i}"] for step in (15, 30) for i in (0, 1)]
    assert table["data"][-2][2] == last["samples/0"]


@pytest.mark.slow
def test_generate_command(tmp_path):
    train(tmp_path, "+experiment=lm_flash_sigmoid", "trainer.max_steps=5", "data.batch_size=4")
    ckpt = tmp_path / "checkpoints" / "step_0000005.pt"
    command = [sys.executable, "-m", "attention_simulator.generate", f"ckpt={ckpt}", "prompt=The ", "max_new_tokens=12",
               "temperature=0", "num_samples=2", "stop=null"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    samples = result.stdout.split("--- sample 2 of 2 ---\n")  # samples are told apart
    assert len(samples) == 2 and samples[0].startswith("--- sample 1 of 2 ---\n")
    first, second = samples[0].split("\n", 1)[1], samples[1]
    assert first == second and first.startswith("The ")  # greedy twice: the same text
    bad = subprocess.run(command[:3] + [f"ckpt={tmp_path / 'nope.pt'}"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "ckpt=" in bad.stderr
    assert "trainer.resume" not in bad.stderr  # generate's advice, not training's


def test_text_dataset_errors_and_local_folders(tmp_path, no_hub):
    data = TextData(name="wikitext103")  # nothing read yet: the file work is prepare()'s, after the start-up checks
    with pytest.raises(DatasetUnavailableError, match=r"'wikitext103'.*data.path.*load_dataset"):
        data.prepare()
    with pytest.raises(DatasetUnavailableError, match=r"'someone/stories'.*load_dataset\('someone/stories', 'en'\)"):
        TextData(name="someone/stories", hub_config="en").prepare()  # any Hub id, by config (data=hub_text)
    with pytest.raises(DatasetUnavailableError, match="no .txt files"):
        TextData(name="mine", path=str(tmp_path)).prepare()
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"Document {i}. " * 40)
    data = TextData(name="mine", path=str(tmp_path), seq_len=32, eval_seq_lens=[32, 64], batch_size=4)
    batch = next(iter(data.train_loader(seed=0)))
    assert batch["inputs"].shape == (4, 32) and set(data.eval_loaders()) == {"", "@64"}


def test_the_text_column_is_chosen_by_config(tmp_path):
    stories = {"story": [f"Story {i} goes on. " * 30 for i in range(40)], "id": list(range(40))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(stories)}).save_to_disk(str(tmp_path))
    data = TextData(name="tales", path=str(tmp_path), text_column="story", seq_len=32, eval_seq_lens=[32]).prepare()
    assert sorted([*data.splits["train"]["text"], *data.splits["validation"]["text"]]) == sorted(stories["story"])
    with pytest.raises(ConfigError, match=r"data.text_column='body'.*\['story', 'id'\]"):
        TextData(name="tales", path=str(tmp_path), text_column="body").prepare()


def test_z_loss_adds_the_squared_log_partition_function():
    """loss = mean cross-entropy + z · mean (log Σ_v exp logit_v)², written out position by position."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    batch = {"inputs": torch.zeros(2, 3, dtype=torch.long), "targets": torch.tensor([[1, 4, 0], [2, 2, 3]]),
             "target_bytes": torch.ones(2, 3, dtype=torch.long)}  # fmt: skip
    cross_entropy, log_z_squared = [], []
    for b in range(2):
        for t in range(3):
            log_z = math.log(sum(math.exp(x) for x in logits[b, t].tolist()))
            cross_entropy.append(log_z - logits[b, t, batch["targets"][b, t]].item())
            log_z_squared.append(log_z**2)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for z in (0.0, 1e-2):
        loss, metrics = LanguageModelingTask(z_loss=z).training_step(lambda tokens: logits, batch)
        assert loss.item() == pytest.approx(mean(cross_entropy) + z * mean(log_z_squared), rel=1e-6)
        assert metrics["loss"].item() == pytest.approx(mean(cross_entropy), rel=1e-6)
        assert ("z_loss" in metrics) == bool(z)
    with pytest.raises(ConfigError, match="task.z_loss=-1"):
        LanguageModelingTask(z_loss=-1)

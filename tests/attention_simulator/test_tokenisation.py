"""Corpus-scale tokenisation: the batched, parallel build equals the per-document loop token for
token, is cached and keyed by corpus and tokenizer, survives being killed, trains a BPE once,
and under torchrun is done by one process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest

from attention_simulator.data import tokens
from attention_simulator.data.text import TextData, load_pydoc
from attention_simulator.data.tokenizers import BPETokenizer, ByteTokenizer
from attention_simulator.data.tokens import token_stream

# every code point up to U+2FFF and a few beyond: letters, numbers of every kind, marks, every
# whitespace (and the separators \x1c-\x1f that are not), contractions, the special token's text
UNICODE = "".join(map(chr, range(0x3000))) + "x² ½ Ⅻ ٣ _a 𝔘𝔫 😀 it's IT'S 'll ' ll\r\n \t\x1c <|endoftext|> 1,000.5"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path))
    return tmp_path / "attention_simulator"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(load_pydoc()["train"]["text"], 600)


def loop_stream(split, encode, eos):
    """The per-document loop, the dumbest way: every document's tokens, then EOS."""
    out = []
    for text in split["text"]:
        out += list(encode(text)) + [eos]
    return out


def test_bpe_encodes_as_the_hub_tokenizer_does(bpe):
    """The word-cached encoder against 🤗 tokenizers' own encode (the special token's text aside)."""
    text = UNICODE.replace("<|endoftext|>", "<|end|>")
    assert bpe.encode(text) == bpe.tokenizer.encode(text).ids
    assert bpe.encode("<|endoftext|>") != [bpe.eos_id]  # text is text


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_parallel_build_equals_the_loop_on_the_bundled_corpus(cache, bpe, kind):
    tokenizer = ByteTokenizer() if kind == "byte" else bpe
    hub_encode = (lambda t: t.encode("utf-8")) if kind == "byte" else (lambda t: bpe.tokenizer.encode(t).ids)
    for split in load_pydoc().values():
        stream = token_stream(split, tokenizer, "test", num_proc=2)
        assert stream.dtype == np.uint16
        assert stream.tolist() == loop_stream(split, hub_encode, tokenizer.eos_id)
    summary = json.loads(next(cache.glob("tokens/*/stream.json")).read_text())
    assert summary["processes"] == 2 and summary["tokens"] > 0
    assert not list(cache.glob("tokens/*/*.arrow"))  # the map's rows are gone


def test_the_cache_is_reused_and_keyed_by_corpus_and_tokenizer(cache, monkeypatch):
    builds = []
    real = tokens.write_stream
    monkeypatch.setattr(tokens, "write_stream", lambda *a, **k: builds.append(a[0]._fingerprint) or real(*a, **k))
    splits = load_pydoc()
    first = token_stream(splits["validation"], ByteTokenizer(), "test")
    folder = next(cache.glob("tokens/*"))
    mtime = (folder / "tokens.uint16").stat().st_mtime_ns
    again = token_stream(splits["validation"], ByteTokenizer(), "test")
    assert len(builds) == 1 and (folder / "tokens.uint16").stat().st_mtime_ns == mtime
    assert np.array_equal(first, again)

    token_stream(splits["validation"].select(range(3)), ByteTokenizer(), "test")  # another corpus
    assert len(builds) == 2
    small, large = (BPETokenizer.train(splits["validation"]["text"], v) for v in (300, 400))
    token_stream(splits["validation"], small, "test")  # another tokenizer
    token_stream(splits["validation"], large, "test")
    assert len(builds) == 4 and len(list(cache.glob("tokens/*"))) == 4


def test_the_bpe_is_trained_once_on_a_capped_sample(cache, monkeypatch):
    trained = []  # documents each training saw
    real = BPETokenizer.train.__func__

    def counted(cls, texts, vocab_size):
        batches = list(texts)
        trained.append(sum(len(batch) for batch in batches))
        return real(cls, iter(batches), vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(counted))
    options = dict(tokenizer="bpe", vocab_size=400, tokenizer_train_docs=20, seq_len=64)
    a = TextData(**options).prepare()
    b = TextData(**options).prepare()  # a later run: loads it
    assert trained == [20] and a.tokenizer.fingerprint == b.tokenizer.fingerprint
    assert np.array_equal(a.streams["train"], b.streams["train"])
    TextData(**options | {"vocab_size": 500}).prepare()
    TextData(**options | {"tokenizer_train_docs": 30}).prepare()
    assert trained == [20, 20, 30]


def test_the_sample_is_seeded_and_in_corpus_order():
    from attention_simulator.data.text import sample_documents

    split = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(50)]})
    sample = [t for batch in sample_documents(split, 10) for t in batch]
    assert sample == [t for batch in sample_documents(split, 10) for t in batch]
    numbers = [int(t.split()[1]) for t in sample]
    assert len(set(numbers)) == 10 and numbers == sorted(numbers) and numbers != list(range(10))
    assert [t for batch in sample_documents(split, 80) for t in batch] == split["text"]


KILLED_BUILD = """
import sys, time
import datasets
from attention_simulator.data import tokens
from attention_simulator.data.tokenizers import ByteTokenizer
datasets.config.HF_DATASETS_CACHE = sys.argv[1]
slow = tokens.EncodeDocuments.__call__
def slowly(self, batch):
    time.sleep(0.5)
    return slow(self, batch)
tokens.EncodeDocuments.__call__ = slowly
split = datasets.Dataset.from_dict({"text": [f"document {i} " * 20 for i in range(20_000)]})
tokens.token_stream(split, ByteTokenizer(), "killed", num_proc=1)
"""


def test_an_interrupted_build_is_not_picked_up(cache, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], env={**os.environ,
                             "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not list(cache.glob("tokens/*.tmp")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a few of its 20 batches tokenised (0.5 s each)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [p.name.endswith(".tmp") for p in cache.glob("tokens/*")] == [True]  # only the unfinished build

    split = datasets.Dataset.from_dict({"text": [f"document {i} " * 20 for i in range(20_000)]})
    stream = token_stream(split, ByteTokenizer(), "again")
    assert stream.tolist() == loop_stream(split, lambda t: t.encode(), 256)
    assert [p.name.endswith(".tmp") for p in cache.glob("tokens/*")] == [False]  # the leftovers are removed


RANKS = """
import json, os, sys
import datasets
from attention_simulator.data import tokenizers, tokens
from attention_simulator.data.text import TextData
datasets.config.HF_DATASETS_CACHE = sys.argv[1]
calls = {"streams": 0, "bpe": 0}
build, train = tokens.write_stream, tokenizers.BPETokenizer.train.__func__
def counted_build(*a, **k):
    calls["streams"] += 1
    return build(*a, **k)
def counted_train(cls, *a):
    calls["bpe"] += 1
    return train(cls, *a)
tokens.write_stream = counted_build
tokenizers.BPETokenizer.train = classmethod(counted_train)
data = TextData(tokenizer="bpe", vocab_size=400, seq_len=64).prepare()
calls["sum"] = int(data.streams["train"].sum()) + int(data.streams["validation"].sum())
open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w").write(json.dumps(calls))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_torchrun_only_rank_0_tokenises(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["streams"], rank0["bpe"]) == (2, 1) and (rank1["streams"], rank1["bpe"]) == (0, 0)
    assert rank0["sum"] == rank1["sum"]  # the same tokens, read from rank 0's files


def test_bad_options_name_the_key(cache):
    from attention_simulator.errors import ConfigError

    with pytest.raises(ConfigError, match="data.num_proc=0"):
        TextData(num_proc=0)
    with pytest.raises(ConfigError, match="data.tokenizer_train_docs=0"):
        TextData(tokenizer="bpe", tokenizer_train_docs=0)


def test_stale_leftovers_of_live_processes_are_kept(cache):
    """A build in progress elsewhere on this machine (its process alive) is not removed."""
    import socket

    folder = cache / "tokens"
    folder.mkdir(parents=True)
    split = load_pydoc()["validation"]
    key_of = tokens.hashlib.sha1(f"{split._fingerprint}-byte".encode()).hexdigest()[:20]
    live = folder / f"{key_of}.{socket.gethostname()}.{os.getppid()}.tmp"
    dead = folder / f"{key_of}.{socket.gethostname()}.{2**22 + 12345}.tmp"
    live.mkdir()
    dead.mkdir()
    token_stream(split, ByteTokenizer(), "test")
    assert live.exists() and not dead.exists()

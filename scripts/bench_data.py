"""Tokenisation at corpus scale: the per-document loop against the batched, parallel build, and
a second run's time to its first training step.

    python scripts/bench_data.py            # a 100 MB corpus: byte and BPE tokenisation, then two runs
    python scripts/bench_data.py --mb 20    # quicker

The corpus is the bundled text (CPython's pydoc topics) cut into sentences and re-assembled by
seeded shuffles into documents of 10-80 sentences until it holds `--mb` MB; it is built once and
kept in datasets' cache. Each tokenizer tokenises the training split twice: with the loop
(`for document: encode(document)`, 🤗 tokenizers' own `encode` for the BPE, written one document
at a time) and with `data.tokens.write_stream` (datasets' batched map over `--num-proc`
processes, `encode_batch`); the two streams must be identical. Then the training command runs
twice on the corpus with a BPE, in a fresh datasets cache: the first run trains the BPE and
tokenises, the second finds both cached. Ratios come from one process on one machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import numpy as np

from attention_simulator.data.sources import built_once, cache_root
from attention_simulator.data.text import TextData, load_text_dataset
from attention_simulator.data.tokenizers import ByteTokenizer, token_dtype, trained_bpe
from attention_simulator.data.tokens import write_stream


def build_corpus(megabytes: int, seed: int = 0) -> datasets.DatasetDict:
    text = "\n".join(topics[name] for name in sorted(topics))
    sentences = [s for s in re.split(r"(?<=[.!?:])\s+", text) if s.strip()]
    rng = np.random.default_rng(seed)

    def documents():
        size = 0
        while size < megabytes * 10**6:
            document = " ".join(sentences[i] for i in rng.integers(0, len(sentences), int(rng.integers(10, 81))))
            size += len(document.encode())
            yield {"text": document}

    return datasets.DatasetDict({"train": datasets.Dataset.from_generator(documents)})


def loop(split: datasets.Dataset, encode, eos: int, dtype, path: Path) -> float:
    """The per-document loop: tokens/s."""
    start, tokens = time.perf_counter(), 0
    with open(path, "wb") as f:
        for row in split:
            ids = np.asarray(encode(row["text"]) + [eos], dtype=dtype)
            ids.tofile(f)
            tokens += len(ids)
    return tokens / (time.perf_counter() - start)


def batched(split: datasets.Dataset, tokenizer, folder: Path, num_proc: int) -> tuple[float, np.ndarray]:
    """The batched, parallel build: tokens/s, and the stream."""
    start = time.perf_counter()
    write_stream(split, tokenizer, folder, "benchmark", num_proc)
    seconds = time.perf_counter() - start
    dtype = token_dtype(tokenizer.vocab_size)
    stream = np.fromfile(folder / f"tokens.{np.dtype(dtype).name}", dtype)
    return len(stream) / seconds, stream


def first_step(corpus: Path, cache: Path, vocab: int) -> float:
    """Seconds from starting the training command on the corpus to its first step's result (the
    evaluation line of a one-step run: start-up, data, one step, a few thousand tokens' evaluation, no samples)."""
    command = [sys.executable, "-m", "attention_simulator.train", "+experiment=lm_sigmoid", "model=lm_tiny",
               f"data.path={corpus}", "data.name=bench_corpus", "data.tokenizer=bpe", f"data.vocab_size={vocab}",
               "data.eval_max_tokens=4096", "trainer.max_steps=1", "trainer.progress=false", "logger.wandb=false",
               "data.eval_seq_lens=[128]", "task.sample_prompts=[]", "diagnostics=off",
               f"hydra.run.dir={cache / f'run{time.time_ns()}'}"]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        seconds = next((time.perf_counter() - start for line in run.stdout if line.startswith("step 1:")), None)
        error = run.stderr.read()
    if seconds is None or run.returncode:
        sys.exit(error[-3000:])
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument(
        "--num-proc",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="tokenising processes (default: one per core)",
    )
    args = parser.parse_args()

    built_once(f"bench_corpus/{args.mb}mb", lambda: build_corpus(args.mb))
    corpus = cache_root() / "bench_corpus" / f"{args.mb}mb"
    split = load_text_dataset("bench_corpus", str(corpus))["train"]
    size = sum(len(t.encode()) for batch in split.iter(batch_size=10_000) for t in batch["text"]) / 1e6
    num_proc = args.num_proc
    print(f"corpus: {corpus} ({size:.0f} MB, {len(split)} training documents); {num_proc} processes")

    start = time.perf_counter()
    bpe = trained_bpe(f"bench-{args.mb}", lambda: (b["text"] for b in split.iter(batch_size=1000)), args.vocab, 10**9)
    print(f"BPE of {args.vocab} tokens trained (or loaded) in {time.perf_counter() - start:.1f} s")
    old_encode = {"byte": lambda t: list(t.encode("utf-8")), "bpe": lambda t: bpe.tokenizer.encode(t).ids}
    print(f"{'tokenizer':10s} {'loop tokens/s':>14s} {'batched tokens/s':>17s} {'ratio':>6s}  identical")
    with tempfile.TemporaryDirectory() as tmp:
        for tokenizer in (ByteTokenizer(), bpe):
            dtype = token_dtype(tokenizer.vocab_size)
            before = loop(split, old_encode[tokenizer.kind], tokenizer.eos_id, dtype, Path(tmp) / "loop.bin")
            after, stream = batched(split, tokenizer, Path(tmp) / tokenizer.kind, num_proc)
            same = "yes" if np.array_equal(np.fromfile(Path(tmp) / "loop.bin", dtype), stream) else "NO"
            print(f"{tokenizer.kind:10s} {before:14,.0f} {after:17,.0f} {after / before:5.1f}×  {same}")

        cache = Path(tmp) / "cache"
        imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import attention_simulator.train"],
                                 capture_output=True, text=True).stderr  # fmt: skip
        import_s = int(imports.strip().splitlines()[-1].split("|")[1]) / 1e6
        cold, warm = first_step(corpus, cache, args.vocab), first_step(corpus, cache, args.vocab)
        start = time.perf_counter()
        os.environ["HF_DATASETS_CACHE"] = str(cache)
        datasets.config.HF_DATASETS_CACHE = str(cache)
        TextData(name="bench_corpus", path=str(corpus), tokenizer="bpe", vocab_size=args.vocab, seq_len=1024,
                 batch_size=32, eval_max_tokens=4096).prepare()  # fmt: skip
        data_s = time.perf_counter() - start
    print(
        f"time to first step, BPE: first run {cold:.1f} s (trains the BPE, tokenises); second run {warm:.1f} s: "
        f"{import_s:.1f} s importing the training command, {warm - import_s:.1f} s after (of which the data set-up "
        f"from the cache {data_s:.2f} s)"
    )


if __name__ == "__main__":
    main()

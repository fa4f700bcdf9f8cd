"""Speech recognition data through 🤗 datasets: audio -> log-mel features, transcripts -> characters.

`speech_synth` (default) is synthesised offline with eSpeak NG (see `synthesis.py`).
`librispeech` loads `openslr/librispeech_asr` from the Hub or its cache, or a local copy of the
original release (`data.path` holding `train-clean-100/`, `dev-clean/`, `test-clean/` with
`*.trans.txt` files). Any other corpus: `data.path` to a dataset saved with `save_to_disk`
(an `audio` column and a `text` column) or to a folder in LibriSpeech's layout.

Audio is decoded with `soundfile` (FLAC, WAV, OGG...), never with datasets' Audio decoder,
which needs torchcodec and FFmpeg.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import datasets
import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly
from torch.nn.utils.rnn import pad_sequence

from ..errors import ConfigError, DatasetUnavailableError
from .features import LogMel, SpecAugment, normalise
from .loader import KeyedDataset, LengthGroupedBatchSampler, check_batch_sizes, eval_batches, make_loader
from .sources import load_from_hub, local_root
from .synthesis import SAMPLE_RATE, SynthConfig, normalise_transcript, synthesize_corpus, synthesize_long

BLANK = 0
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # ids 1..28; 0 is CTC's blank


def encode_text(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in normalise_transcript(text)]


def decode_ids(ids) -> str:
    return "".join(ALPHABET[i - 1] for i in ids if i != BLANK)


# ---- corpora ------------------------------------------------------------------------------------

LIBRISPEECH_FOLDERS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean"}


def _librispeech_folder(root: Path) -> datasets.DatasetDict:
    """The original LibriSpeech layout: SPLIT/SPEAKER/CHAPTER/*.flac + SPEAKER-CHAPTER.trans.txt."""
    splits = {}
    for split, folder in LIBRISPEECH_FOLDERS.items():
        rows = {"audio": [], "text": []}
        for transcript in sorted((root / folder).rglob("*.trans.txt")):
            for line in transcript.read_text().splitlines():
                utterance, _, text = line.partition(" ")
                audio = transcript.parent / f"{utterance}.flac"
                if audio.exists():
                    rows["audio"].append({"bytes": None, "path": str(audio)})
                    rows["text"].append(text)
        if rows["text"]:
            splits[split] = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict(splits)


def load_speech_dataset(name: str, path: str | None, synth: SynthConfig) -> datasets.DatasetDict:
    """{"train", "dev", "test"} splits with `audio` ({"bytes", "path"}) and `text` columns."""
    if name == "speech_synth" and path is None:
        return synthesize_corpus(synth)
    how_to = (
        "Point data.path at a local copy: LibriSpeech as released (a folder with train-clean-100/, dev-clean/ and "
        "test-clean/), any folder in that layout, or a dataset saved with save_to_disk (train / dev / test splits "
        "with 'audio' and 'text' columns)"
    )
    if path is not None:
        root = local_root(name, path, how_to)
        splits = (
            datasets.load_from_disk(str(root)) if (root / "dataset_dict.json").exists() else _librispeech_folder(root)
        )
    elif name == "librispeech":
        loaded = load_from_hub(name, "openslr/librispeech_asr", "clean", how_to)
        splits = datasets.DatasetDict(
            {"train": loaded["train.100"], "dev": loaded["validation"], "test": loaded["test"]}
        )
    else:
        raise ConfigError(
            f"data.name={name!r} is not a speech dataset; use speech_synth, librispeech or set data.path."
        )
    missing = [s for s in ("train", "dev", "test") if s not in splits]
    if missing:
        raise DatasetUnavailableError(f"Dataset {name!r} has no {missing} split(s) (found {list(splits)}). {how_to}.")
    return datasets.DatasetDict({s: _undecoded(splits[s]) for s in ("train", "dev", "test")})


LONG_BUCKET = re.compile(r"long_([0-9]+)x")


def long_buckets(eval_splits: list[str], synthesised: bool) -> dict[str, int]:
    """{"long_3x": 3, ...}: the long-utterance buckets among `data.eval_splits`, checked."""
    if isinstance(eval_splits, str):
        raise ConfigError(f"data.eval_splits={eval_splits!r} must be a list, e.g. data.eval_splits=[test,long_2x].")
    choices = "test, long_<k>x (k >= 2 test utterances joined and spoken as one, e.g. long_2x, long_4x)"
    if not synthesised:
        choices = "test (long_<k>x buckets are synthesised: data.name=speech_synth without data.path)"
    buckets = {}
    for split in eval_splits:
        match = LONG_BUCKET.fullmatch(str(split))
        if split == "test":
            continue
        if not (synthesised and match and int(match[1]) >= 2):
            why = "dev is always evaluated (eval/cer, ...)" if split == "dev" else f"{split!r} is not a split"
            raise ConfigError(f"data.eval_splits: {why}; choose from {choices}.")
        buckets[split] = int(match[1])
    return buckets


def _undecoded(split: datasets.Dataset) -> datasets.Dataset:
    """Audio as {"bytes", "path"}, for soundfile below, not decoded by datasets' Audio feature."""
    if isinstance(split.features.get("audio"), datasets.Audio):
        return split.cast_column("audio", datasets.Audio(decode=False))
    return split


def decode_audio(audio: dict) -> torch.Tensor:
    """{"bytes", "path"} -> mono float32 waveform at 16 kHz."""
    source = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    samples = samples.mean(1)
    if rate != SAMPLE_RATE:
        samples = resample_poly(samples, SAMPLE_RATE, rate).astype(np.float32)
    return torch.from_numpy(samples)


def utterance_lengths(split: datasets.Dataset) -> list[float]:
    """Durations where the corpus has them; else transcript lengths (no audio is decoded)."""
    if "duration" in split.column_names:
        return split["duration"]
    return [len(text) for text in split["text"]]


# ---- batches ------------------------------------------------------------------------------------


class SpeechData:
    """Batches {"features": (B, T, n_mels), "feature_lengths": (B,), "targets": (B, S),
    "target_lengths": (B,), "transcripts": list[str]} of length-grouped utterances."""

    kind = "speech"

    def __init__(
        self,
        *,
        name: str = "speech_synth",
        path: str | None = None,
        synth: dict | None = None,
        n_mels: int = 80,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        group_batches: int = 20,
        specaugment: dict | None = None,
        eval_splits: list[str] | tuple[str, ...] = ("test",),
        eval_max_utterances: int | None = None,
        num_workers: int = 0,
    ):
        check_batch_sizes(batch_size, eval_batch_size)
        if eval_max_utterances is not None and eval_max_utterances < 1:
            raise ConfigError(f"data.eval_max_utterances={eval_max_utterances} must be >= 1 (or null: all).")
        self.eval_max_utterances = eval_max_utterances
        self.name, self.batch_size, self.eval_batch_size = name, batch_size, eval_batch_size
        self.group_batches, self.num_workers = group_batches, num_workers
        buckets = long_buckets(eval_splits, name == "speech_synth" and path is None)  # checked before any build
        self.eval_splits = list(dict.fromkeys(eval_splits))
        self.path, self.buckets, self.synth = path, buckets, SynthConfig.from_options(synth or {})
        self.log_mel = LogMel(SAMPLE_RATE, n_mels)
        self.specaugment = SpecAugment(**specaugment) if specaugment else None
        self.splits, self.lengths = None, None  # prepare()

    def prepare(self) -> SpeechData:
        """The file work, once per object: load the corpus (synthesised, and cached, on a
        machine's first run) and its long-utterance buckets, and read every utterance's length.
        The trainer calls it after its start-up checks; the loaders call it first."""
        if self.lengths is not None:
            return self
        splits = load_speech_dataset(self.name, self.path, self.synth)
        for split, parts in self.buckets.items():
            if parts > len(splits["test"]):
                raise ConfigError(
                    f"data.eval_splits: {split} joins more utterances than the test split's {len(splits['test'])}."
                )
            splits[split] = synthesize_long(self.synth, parts)
        self.splits, self.lengths = splits, {s: utterance_lengths(splits[s]) for s in splits}
        return self

    @property
    def model_args(self) -> dict:
        return {"n_mels": self.log_mel.n_mels, "vocab_size": len(ALPHABET) + 1}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1):
        """Nothing to restore: a batch is a function of its position (trainer's data_position)."""

    def _batch(self, rows, generators, train: bool) -> dict:
        features, targets, transcripts = [], [], []
        for audio, text, g in zip(rows["audio"], rows["text"], generators):
            x = normalise(self.log_mel(decode_audio(audio)))  # (T, M)
            if train and self.specaugment is not None:
                x = self.specaugment(x, g)
            features.append(x)
            transcripts.append(normalise_transcript(text))
            targets.append(torch.tensor(encode_text(text), dtype=torch.long))
        return {
            "features": pad_sequence(features, batch_first=True),  # (B, T, M)
            "feature_lengths": torch.tensor([len(x) for x in features]),
            "targets": pad_sequence(targets, batch_first=True, padding_value=BLANK),  # (B, S)
            "target_lengths": torch.tensor([len(t) for t in targets]),
            "transcripts": transcripts,
        }

    def _dataset(self, split: str, seed: int, train: bool) -> KeyedDataset:
        return KeyedDataset(self.splits[split], lambda rows, g: self._batch(rows, g, train), seed)

    def train_loader(self, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        lengths = self.prepare().lengths["train"]
        sampler = LengthGroupedBatchSampler(lengths, self.batch_size, seed, start, rank, world_size, self.group_batches)
        return make_loader(self._dataset("train", seed, train=True), sampler, self.num_workers)

    def eval_loaders(self, rank: int = 0, world_size: int = 1) -> dict:
        """{"": dev (eval/wer, ...)} and one per `eval_splits` entry ("@test": eval/wer@test,
        "@long_2x": eval/wer@long_2x, ...), each shortest first, each of the split's first
        `eval_max_utterances` utterances."""
        self.prepare()
        loaders = {}
        for key, split in [("", "dev")] + [(f"@{split}", split) for split in self.eval_splits]:
            lengths = self.lengths[split][: self.eval_max_utterances]
            order = np.argsort(lengths, kind="stable").tolist()
            batches = [[(0, order[i]) for _, i in batch] for batch in
                       eval_batches(len(order), self.eval_batch_size, rank, world_size)]  # fmt: skip
            loaders[key] = make_loader(self._dataset(split, 0, train=False), batches, self.num_workers)
        return loaders

"""Speech synthesised with eSpeak NG: the embedded `speech_synth` corpus.

eSpeak NG comes from the `espeakng-loader` wheel, which bundles libespeak-ng and its voice
data; it is driven through ctypes in synchronous mode (a callback collects the samples), so
nothing needs root or a system package. Sentences come from CPython's pydoc text, each is
spoken once with a random voice, rate and pitch, mixed with white noise at a random SNR and
resampled to 16 kHz. The corpus is built once, with a progress bar, and saved as a 🤗 datasets
`DatasetDict` in datasets' cache; later runs load it from there.

Long utterances for length generalisation (`long_<k>x`) are the test split's texts joined k at a
time and spoken again, built once each and cached apart from the corpus, whose key they leave alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import datasets
import numpy as np
import soundfile
from scipy.signal import resample_poly

from ..errors import ConfigError, DatasetUnavailableError
from .sources import built_once

SAMPLE_RATE = 16000
# speak_lib.h: synchronous output, UTF-8 text, a pause at the end, rate and pitch parameters
AUDIO_OUTPUT_SYNCHRONOUS, CHARS_UTF8, POS_CHARACTER, END_PAUSE = 2, 1, 1, 0x1000
RATE, PITCH = 1, 3
VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeak:
    """libespeak-ng in synchronous mode. The library keeps global state: use `espeak()`."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise DatasetUnavailableError(
                "The speech_synth corpus needs eSpeak NG from the espeakng-loader wheel: pip install espeakng-loader "
                "(or use data.name=librispeech / a local folder with data.path)."
            ) from e
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        self.lib = lib
        self.sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with {espeakng_loader.get_data_path()}")
        self.chunks: list[np.ndarray] = []
        self.callback = SYNTH_CALLBACK(self._collect)  # kept alive: the library holds the pointer
        lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples, count, events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: continue synthesis

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """`text` spoken by `voice` (a name, optionally `+variant`) at `rate` words per minute and
        `pitch` 0-100: float32 samples in [-1, 1] at `self.sample_rate`."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(RATE, int(rate), 0)
        self.lib.espeak_SetParameter(PITCH, int(pitch), 0)
        self.chunks = []
        data = text.encode("utf-8")
        status = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8 | END_PAUSE, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status}) on {text!r}")
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=1)
def espeak() -> ESpeak:
    return ESpeak()


# ---- the sentences ------------------------------------------------------------------------------


def normalise_transcript(text: str) -> str:
    """Lower case, letters, apostrophes and single spaces: the recogniser's alphabet."""
    text = re.sub(r"[^a-z' ]+", " ", text.lower().replace("’", "'"))
    return re.sub(r" +", " ", text).strip()


def pydoc_sentences(min_words: int = 4) -> list[str]:
    """Distinct prose sentences of CPython's pydoc text, normalised. Sentences with code,
    numbers or symbols are left out (they would be spoken as something else than written)."""
    from pydoc_data.topics import topics

    sentences = set()
    for name in sorted(topics):
        for sentence in re.split(r"(?<=[.!?:])\s+", re.sub(r"\s+", " ", topics[name])):
            if re.search(r"[0-9_=<>{}\[\]()*+/\\|@#%^&~$]", sentence):
                continue
            words = normalise_transcript(sentence).split()
            if len(words) >= min_words and all(len(w) > 1 or w in ("a", "i") for w in words):
                sentences.add(" ".join(words))
    return sorted(sentences)


# ---- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """What the corpus is a function of (its cache key)."""

    train_size: int = 3000
    eval_size: int = 300  # dev and test each
    words: tuple[int, int] = (4, 14)  # words per utterance
    rate: tuple[int, int] = (130, 210)  # words per minute
    pitch: tuple[int, int] = (25, 75)
    snr_db: tuple[float, float] = (15.0, 40.0)  # white noise
    seed: int = 0
    version: int = 1  # bump when the generation code changes what it produces

    @classmethod
    def from_options(cls, options: Mapping) -> SynthConfig:
        """From config options, where ranges are lists."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            names = [f.name for f in fields(cls)]
            raise ConfigError(f"data.synth: unknown option(s) {sorted(unknown)}; the options are {names}.")
        return cls(**{k: v if isinstance(v, (str, int, float)) else tuple(v) for k, v in options.items()})

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def utterance_texts(sentences: list[str], config: SynthConfig) -> dict[str, list[str]]:
    """Texts for train / dev / test from disjoint sets of sentences (80 / 10 / 10 %): each a
    random span of `words` words of a sentence of its split, so a few hundred sentences make
    thousands of distinct utterances."""
    rng = np.random.default_rng(config.seed)
    order = [sentences[i] for i in rng.permutation(len(sentences))]
    tenth = len(order) // 10
    pools = {"train": order[2 * tenth :], "dev": order[:tenth], "test": order[tenth : 2 * tenth]}
    if tenth < 10:
        raise ValueError(f"{len(order)} sentences are too few for disjoint train / dev / test texts.")
    sizes = {"train": config.train_size, "dev": config.eval_size, "test": config.eval_size}
    texts: dict[str, list[str]] = {}
    for split, pool in pools.items():  # train first: a dev / test span that train has is redrawn
        chosen: list[str] = []
        while len(chosen) < sizes[split]:
            words = pool[rng.integers(len(pool))].split()
            length = min(len(words), int(rng.integers(*config.words, endpoint=True)))
            start = int(rng.integers(len(words) - length, endpoint=True))
            text = " ".join(words[start : start + length])
            if split == "train" or text not in texts["train"]:
                chosen.append(text)
        texts[split] = chosen
    return texts


def flac_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def speak(text: str, rng: np.random.Generator, config: SynthConfig) -> dict:
    """One utterance of `text`: random voice, rate, pitch and noise; 16 kHz FLAC."""
    voice = str(rng.choice(VOICES))
    variant = str(rng.choice(VARIANTS))
    rate, pitch = int(rng.integers(*config.rate, endpoint=True)), int(rng.integers(*config.pitch, endpoint=True))
    engine = espeak()
    audio = engine.synthesize(text, voice + (f"+{variant}" if variant else ""), rate, pitch)
    audio = resample_poly(audio, SAMPLE_RATE, engine.sample_rate).astype(np.float32)
    snr = float(rng.uniform(*config.snr_db))
    noise = rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(np.mean(audio**2) / 10 ** (snr / 10))
    audio = np.clip(audio + noise, -1.0, 1.0)
    return {
        "audio": {"bytes": flac_bytes(audio), "path": None},
        "text": text,
        "duration": len(audio) / SAMPLE_RATE,
        "voice": voice + (f"+{variant}" if variant else ""),
        "rate": rate,
        "pitch": pitch,
        "snr_db": snr,
    }


FEATURES = datasets.Features(
    {
        # datasets' Audio feature wants torchcodec to encode: plain bytes, decoded with soundfile
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        "text": datasets.Value("string"),
        "duration": datasets.Value("float32"),
        "voice": datasets.Value("string"),
        "rate": datasets.Value("int32"),
        "pitch": datasets.Value("int32"),
        "snr_db": datasets.Value("float32"),
    }
)


def synthesize_corpus(config: SynthConfig = SynthConfig(), cache_dir: str | None = None) -> datasets.DatasetDict:
    """The corpus for `config`, built on first use and then loaded from the cache."""
    return built_once(f"speech_synth/{config.key}", lambda: _synthesize(config), cache_dir)


def _synthesize(config: SynthConfig) -> datasets.DatasetDict:
    from tqdm.auto import tqdm

    splits = utterance_texts(pydoc_sentences(), config)
    total = sum(map(len, splits.values()))
    built = {}
    with tqdm(total=total, desc="synthesising speech_synth (once)", unit="utt") as bar:
        for offset, (split, texts) in enumerate(splits.items()):
            rng = np.random.default_rng([config.seed, offset])
            rows = []
            for text in texts:
                rows.append(speak(text, rng, config))
                bar.update()
            built[split] = datasets.Dataset.from_list(rows, features=FEATURES)
    return datasets.DatasetDict(built)


# ---- long utterances: the test texts joined, for length generalisation --------------------------

LONG_VERSION = 1  # bump when the code below changes what it produces


def long_texts(test_texts: list[str], parts: int, rng: np.random.Generator) -> list[list[str]]:
    """The test texts in a random order, cut into groups of `parts`: every test text is in one
    group (a remainder of fewer than `parts` texts is left out), so each bucket holds the test
    split's words, only in longer utterances."""
    order = rng.permutation(len(test_texts)).tolist()
    return [[test_texts[i] for i in order[lo : lo + parts]] for lo in range(0, len(order) - parts + 1, parts)]


def synthesize_long(config: SynthConfig, parts: int, cache_dir: str | None = None) -> datasets.Dataset:
    """Bucket `long_{parts}x`: utterances of `parts` test texts each, built on first use."""
    key = f"speech_synth_long/{config.key}-{parts}x-v{LONG_VERSION}"
    return built_once(key, lambda: _synthesize_long(config, parts, cache_dir), cache_dir)[f"long_{parts}x"]


def _synthesize_long(config: SynthConfig, parts: int, cache_dir: str | None) -> datasets.DatasetDict:
    """Each group spoken as one utterance, one voice, rate, pitch and noise level throughout, as
    in training: only the length changes. The texts are joined with a comma, which eSpeak reads
    as a short pause (about 0.25 s); the transcript joins them with a space."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([config.seed, parts, LONG_VERSION])  # not one of the corpus' streams
    groups = long_texts(synthesize_corpus(config, cache_dir)["test"]["text"], parts, rng)
    rows = []
    for group in tqdm(groups, desc=f"synthesising speech_synth long_{parts}x (once)", unit="utt"):
        rows.append(speak(", ".join(group), rng, config) | {"text": " ".join(group)})
    return datasets.DatasetDict({f"long_{parts}x": datasets.Dataset.from_list(rows, features=FEATURES)})

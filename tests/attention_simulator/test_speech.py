"""Speech synthesis, audio decoding, log-mel features, padding masks and the ASR training path."""

import io
import itertools

import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
import torch.nn.functional as F

from attention_simulator.attention import AttentionConfig
from attention_simulator.checkpoint import list_checkpoints
from attention_simulator.config import build
from attention_simulator.data import synthesis
from attention_simulator.data.features import LogMel, SpecAugment
from attention_simulator.data.loader import LengthGroupedBatchSampler
from attention_simulator.data.speech import ALPHABET, BLANK, SpeechData, decode_audio, encode_text
from attention_simulator.data.synthesis import SynthConfig, espeak, speak, synthesize_corpus
from attention_simulator.errors import ConfigError, DatasetUnavailableError
from attention_simulator.models.asr import SpeechRecognizer
from attention_simulator.tasks.speech_recognition import (
    SpeechRecognitionTask,
    edit_counts,
    greedy_decode,
    impossible_alignments,
)
from attention_simulator.train import build_model

from ..helpers import levenshtein, run_config, train

SENTENCE = "the quick brown fox jumps over the lazy dog"


def test_synthesis_is_speech_of_plausible_duration():
    utterance = speak(SENTENCE, np.random.default_rng(0), SynthConfig())
    audio, rate = soundfile.read(io.BytesIO(utterance["audio"]["bytes"]), dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    seconds = len(audio) / rate
    words_per_minute = 9 / (seconds / 60)
    assert 0.5 * utterance["rate"] < words_per_minute < 1.5 * utterance["rate"]  # eSpeak's rate, give or take pauses
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)  # 10 ms frames
    loud = np.sqrt((frames**2).mean(1)) > 0.05
    assert loud.mean() > 0.4  # mostly speech, not silence or noise (noise is 15-40 dB below it)


def test_voices_rate_and_pitch_change_the_audio():
    engine = espeak()
    base = engine.synthesize(SENTENCE, "en-us", 175, 50)
    assert len(engine.synthesize(SENTENCE, "en-us", 120, 50)) > 1.3 * len(base)  # slower: longer
    assert not np.array_equal(engine.synthesize(SENTENCE, "en-us", 175, 80), base)
    assert not np.array_equal(engine.synthesize(SENTENCE, "en-gb-x-rp+f2", 175, 50), base)
    with pytest.raises(ValueError, match="no voice"):
        engine.synthesize(SENTENCE, "xx-nowhere")


def test_corpus_is_built_once_with_disjoint_texts(tmp_path, monkeypatch):
    config = SynthConfig(train_size=24, eval_size=6)
    corpus = synthesize_corpus(config, cache_dir=str(tmp_path))
    assert {s: len(corpus[s]) for s in corpus} == {"train": 24, "dev": 6, "test": 6}
    train_texts = set(corpus["train"]["text"])
    assert not train_texts & set(corpus["dev"]["text"]) and not train_texts & set(corpus["test"]["text"])
    assert all(set(t) <= set(" 'abcdefghijklmnopqrstuvwxyz") for t in corpus["train"]["text"])

    def no_synthesis():
        raise AssertionError("the cached corpus was synthesised again")

    monkeypatch.setattr(synthesis, "espeak", no_synthesis)
    again = synthesize_corpus(config, cache_dir=str(tmp_path))
    assert again["dev"]["text"] == corpus["dev"]["text"]
    assert again["dev"][0]["audio"]["bytes"] == corpus["dev"][0]["audio"]["bytes"]
    with pytest.raises(ConfigError, match="unknown option.*'sped'"):
        SynthConfig.from_options({"sped": 3})


def test_decode_resamples_to_16k():
    rate, seconds = 8000, 0.5
    t = np.arange(int(rate * seconds)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.5 * np.sin(2 * np.pi * 440 * t), rate, format="WAV")
    audio = decode_audio({"bytes": buffer.getvalue(), "path": None}).numpy()
    assert len(audio) == 8000
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(len(audio), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=2)


def reference_log_mel(audio: np.ndarray, sr=16000, n_fft=512, win=400, hop=160, n_mels=80) -> np.ndarray:
    """The textbook formula, in float64 numpy: framed periodic-Hann power spectra, HTK mel triangles."""
    window = np.zeros(n_fft)
    offset = (n_fft - win) // 2
    window[offset : offset + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = np.stack([audio[i : i + n_fft] for i in range(0, len(audio) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, F)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(0), mel(sr / 2), n_mels + 2) / 2595) - 1)
    bank = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        for k, f in enumerate(np.arange(n_fft // 2 + 1) * sr / n_fft):
            if edges[m] <= f <= edges[m + 1]:
                bank[k, m] = (f - edges[m]) / (edges[m + 1] - edges[m])
            elif edges[m + 1] < f <= edges[m + 2]:
                bank[k, m] = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1])
    return np.log(np.maximum(power @ bank, 1e-10))


def test_log_mel_matches_the_formula_and_librosa():
    audio = espeak().synthesize(SENTENCE)[:16000].astype(np.float64)  # 16 000 samples of speech
    ours = LogMel()(torch.from_numpy(audio)).numpy()  # float64 in, float64 math
    reference = reference_log_mel(audio)
    assert ours.shape == reference.shape == (LogMel().num_frames(16000), 80)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # float32, as in training: to 1e-4 where the power is above float32's round-off of the frame
    single = LogMel()(torch.from_numpy(audio).float()).double().numpy()
    audible = reference > reference.max() - np.log(1e5)
    assert audible.mean() > 0.3  # eSpeak leaves high bands nearly empty
    np.testing.assert_allclose(single[audible], reference[audible], atol=1e-4)
    librosa = pytest.importorskip("librosa")
    power = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=512, hop_length=160, win_length=400,
                                           center=False, power=2.0, n_mels=80, htk=True, norm=None)  # fmt: skip
    np.testing.assert_allclose(ours, np.log(np.maximum(power.T, 1e-10)), atol=1e-4)


def test_specaugment_masks_bands_and_frames():
    features = torch.randn(200, 80)
    masked = SpecAugment(freq_masks=1, freq_width=10, time_masks=1, time_width=30, max_time_fraction=0.1)(
        features, torch.Generator().manual_seed(3)
    )
    zero_bins = (masked == 0).all(0).nonzero().flatten()
    zero_frames = (masked == 0).all(1).nonzero().flatten()
    assert 0 < len(zero_bins) <= 10 and torch.equal(zero_bins, torch.arange(zero_bins[0], zero_bins[-1] + 1))
    assert 0 < len(zero_frames) <= 20  # at most 10 % of 200 frames
    untouched = torch.ones_like(masked, dtype=torch.bool)
    untouched[:, zero_bins], untouched[zero_frames] = False, False
    assert torch.equal(masked[untouched], features[untouched])


def test_length_grouped_batches_are_a_shuffled_partition_of_similar_lengths():
    lengths = torch.randint(10, 500, (400,)).tolist()
    sampler = LengthGroupedBatchSampler(lengths, 10, seed=0, group_batches=5)
    batches = [next(b) for b in [iter(sampler)] for _ in range(40)]  # one epoch
    indices = [i for batch in batches for _, i in batch]
    assert sorted(indices) == list(range(400))
    spread = np.mean([np.ptp([lengths[i] for _, i in b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)  # random batches would span most of the range
    resumed = iter(LengthGroupedBatchSampler(lengths, 10, seed=0, start=17, group_batches=5))
    assert next(resumed) == batches[17]


BACKENDS = [
    ("softmax", {}),
    ("sigmoid", dict(sigmoid_bias="auto")),
    ("flash_softmax", {}),
    ("flash_sigmoid", dict(sigmoid_bias="auto")),
]


@pytest.mark.parametrize("backend, options", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_real_frames_do_not_see_padding(backend, options, position):
    torch.manual_seed(0)
    attention = AttentionConfig(backend=backend, position=position, **options)
    model = SpeechRecognizer(n_mels=20, vocab_size=29, dim=32, depth=2, num_heads=4, conv_kernel=5,
                             subsampling_channels=8, attention=attention).eval()  # fmt: skip
    lengths = torch.tensor([61, 45])
    features = torch.randn(2, 61, 20)
    padded = torch.cat([features, 100 * torch.randn(2, 40, 20)], dim=1)  # loud junk after the end
    padded[1, 45:61] = 100 * torch.randn(16, 20)
    with torch.no_grad():
        out, out_lengths = model(features, lengths)
        out_padded, _ = model(padded, lengths)
        alone, _ = model(features[1:, :45], lengths[1:])  # the shorter utterance in a batch of its own
    assert out_lengths.tolist() == [14, 10]
    for b, n in enumerate(out_lengths.tolist()):
        torch.testing.assert_close(out_padded[b, :n], out[b, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], out[1, :10], atol=1e-5, rtol=1e-5)


def test_greedy_decoding_and_error_rates_by_hand():
    a, b, c = encode_text("abc")
    blank, space = BLANK, ALPHABET.index(" ") + 1
    path = [a, a, blank, b, b, blank, space, space, c, blank, c]  # "ab cc": repeats merge, a blank separates
    log_probs = torch.full((1, len(path), 29), -10.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert greedy_decode(log_probs, torch.tensor([len(path)])) == ["ab cc"]
    assert greedy_decode(log_probs, torch.tensor([3])) == ["a"]
    counts = edit_counts(["the cat sat", "a dog", "ox"], ["the bat", "a dog", "a fox"])
    per_utterance = {k: tuple(t.tolist() for t in pair) for k, pair in counts.items()}
    # cat -> bat, sat deleted; a perfect one; "a" inserted, ox -> fox
    assert per_utterance["wer"] == ([2, 0, 2], [3, 2, 1])
    # c -> b, " sat" deleted; none; "a f" inserted before "ox"
    assert per_utterance["cer"] == ([5, 0, 3], [11, 5, 2])


def test_librispeech_layout_and_offline_error(tmp_path, no_hub):
    with pytest.raises(DatasetUnavailableError, match=r"'librispeech'.*data.path.*load_dataset"):
        SpeechData(name="librispeech").prepare()  # the file work: after the start-up checks
    rng = np.random.default_rng(0)
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        chapter = tmp_path / split / "19" / "198"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(4):
            text = ["HELLO WORLD", "ATTENTION IS ALL", "SIGMOID OR SOFTMAX", "FOUR WORDS RIGHT HERE"][i]
            audio = speak(text.lower(), rng, SynthConfig())["audio"]["bytes"]
            (chapter / f"19-198-{i:04d}.flac").write_bytes(audio)
            lines.append(f"19-198-{i:04d} {text}")
        (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    data = SpeechData(name="librispeech", path=str(tmp_path), batch_size=2, eval_batch_size=4)
    batch = next(iter(data.eval_loaders()[""]))
    assert batch["transcripts"] == ["hello world", "attention is all", "sigmoid or softmax", "four words right here"]
    assert batch["features"].shape[0] == 4 and batch["features"].shape[2] == 80
    assert batch["feature_lengths"].max() == batch["features"].shape[1]
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        SpeechData(name="librispeech", path=str(tmp_path / "nowhere")).prepare()


@pytest.mark.slow
def test_ctc_loss_decreases_and_eval_cer_is_the_corpus_edit_rate(tmp_path):
    overrides = ["+experiment=asr_sigmoid", "trainer.max_steps=30", "trainer.eval_every=0", "data.batch_size=8",
                 "trainer.log_every=5"]  # fmt: skip
    train(tmp_path, *overrides)
    rows = pd.read_parquet(tmp_path / "metrics.parquet")
    loss = rows["train/loss"].dropna()
    assert loss.iloc[-1] < 0.85 * loss.iloc[0]  # 3.7 -> 2.9: past the initial plateau of blanks
    last = rows.dropna(subset=["eval/wer"]).iloc[-1]
    assert last["samples/0"].startswith("ref: ") and last["eval/ctc_inf"] == 0

    # the dev CER again, from the final checkpoint, decoded and edit-counted by hand
    cfg = run_config(*overrides)
    data = build(cfg.data)
    model = build_model(cfg, data.model_args).eval()
    model.load_state_dict(torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)["model"])
    edits = characters = 0
    with torch.no_grad():
        for batch in data.eval_loaders()[""]:
            log_probs, lengths = model(batch["features"], batch["feature_lengths"])
            for path, n, reference in zip(log_probs.argmax(-1), lengths, batch["transcripts"]):
                ids = [key for key, _ in itertools.groupby(path[: int(n)].tolist()) if key != BLANK]
                hypothesis = " ".join("".join(ALPHABET[i - 1] for i in ids).split())
                edits, characters = edits + levenshtein(reference, hypothesis), characters + len(reference)
    assert last["eval/cer"] == pytest.approx(edits / characters, rel=1e-9)


def test_impossible_alignments_are_counted_and_left_out_of_the_loss():
    """CTC has no path when frames < labels + repeated neighbours: its loss is infinite. The task
    counts those utterances (ctc_inf) and averages the loss over the others."""
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[3, 3, 4, 0, 0], [5, 6, 7, 8, 9], [2, 2, 2, 0, 0], [7, 0, 0, 0, 0]])
    target_lengths = torch.tensor([3, 5, 3, 1])
    for frames in itertools.product([1, 3, 4, 5, 6], repeat=2):
        frame_lengths = torch.tensor([*frames, 5, 1])
        log_probs = torch.randn(6, 4, 10, generator=g).log_softmax(-1)
        infinite = F.ctc_loss(log_probs, targets, frame_lengths, target_lengths, reduction="none").isinf()
        assert impossible_alignments(frame_lengths, targets, target_lengths).tolist() == infinite.tolist()

    torch.manual_seed(0)
    model = SpeechRecognizer(n_mels=20, vocab_size=29, dim=32, depth=1, num_heads=4, subsampling_channels=8).eval()
    features, feature_lengths = torch.randn(3, 41, 20), torch.tensor([41, 41, 13])  # 9, 9 and 2 frames
    targets = torch.tensor([[3, 4, 5], [3, 4, 0], [3, 4, 5]])
    batch = {"features": features, "feature_lengths": feature_lengths, "targets": targets,
             "target_lengths": torch.tensor([3, 2, 3]), "transcripts": ["abc", "ab", "abc"]}  # fmt: skip
    loss, metrics = SpeechRecognitionTask().training_step(model, batch)
    log_probs, frames = model(features, feature_lengths)
    possible = slice(0, 2)
    expected = F.ctc_loss(
        log_probs[possible].transpose(0, 1), targets[possible], frames[possible], torch.tensor([3, 2])
    )
    torch.testing.assert_close(loss, expected)
    assert metrics["ctc_inf"] == pytest.approx(1 / 3)

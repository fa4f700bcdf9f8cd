"""Speech features in torch: log-mel spectrograms, per-utterance normalisation, SpecAugment."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """HTK's mel scale (what Kaldi and torchaudio use by default)."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """(n_fft // 2 + 1, n_mels): triangles on the mel scale, each peaking at 1 at its centre."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min)), hz_to_mel(torch.tensor(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # fmt: skip
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (F, M)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMel:
    """waveform (N,) at `sample_rate` -> log-mel features (frames, n_mels).

    25 ms Hann windows every 10 ms, zero-padded to `n_fft`, no centring (frame t starts at
    sample t·hop); power spectrum, mel filterbank, natural log with a floor."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, n_fft: int = 512, win_ms: float = 25.0,
                 hop_ms: float = 10.0, floor: float = 1e-10):  # fmt: skip
        self.sample_rate, self.n_mels, self.n_fft = sample_rate, n_mels, n_fft
        self.win_length = round(sample_rate * win_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        if self.win_length > n_fft:
            raise ValueError(f"a {win_ms} ms window is {self.win_length} samples: more than n_fft={n_fft}.")
        self.window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float64)
        self.filterbank = mel_filterbank(n_fft, n_mels, sample_rate)  # float64
        self.floor = floor

    def num_frames(self, num_samples: int) -> int:
        return max(0, (num_samples - self.n_fft) // self.hop_length + 1)

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.shape[-1] < self.n_fft:  # shorter than one frame: pad to one
            waveform = torch.nn.functional.pad(waveform, (0, self.n_fft - waveform.shape[-1]))
        waveform = waveform if waveform.dtype == torch.float64 else waveform.float()  # float64 kept, for tests
        window, filterbank = self.window.to(waveform.dtype), self.filterbank.to(waveform.dtype)
        spec = torch.stft(waveform, self.n_fft, self.hop_length, self.win_length, window, center=False,
                          return_complex=True)  # (F, frames)  # fmt: skip
        power = spec.real**2 + spec.imag**2
        return torch.log(torch.clamp(power.T @ filterbank, min=self.floor))  # (frames, M)


def normalise(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per feature over the utterance's frames (CMVN)."""
    return (features - features.mean(0)) / (features.std(0, unbiased=False) + eps)


@dataclass(frozen=True)
class SpecAugment:
    """Frequency and time masks (Park et al. 2019) on normalised features: masked values are
    set to 0, the utterance's mean. A time mask is at most `max_time_fraction` of the utterance."""

    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width: int = 40
    max_time_fraction: float = 0.1

    def __call__(self, features: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        features = features.clone()  # (T, M)
        frames, bins = features.shape
        for _ in range(self.freq_masks):
            self._mask(features, 1, bins, self.freq_width, g)
        width = min(self.time_width, math.floor(self.max_time_fraction * frames))
        for _ in range(self.time_masks):
            self._mask(features, 0, frames, width, g)
        return features

    @staticmethod
    def _mask(features: torch.Tensor, dim: int, size: int, max_width: int, g: torch.Generator):
        width = int(torch.randint(0, max_width + 1, (1,), generator=g)) if max_width > 0 else 0
        if width == 0 or width >= size:
            return
        start = int(torch.randint(0, size - width + 1, (1,), generator=g))
        features.narrow(dim, start, width).zero_()

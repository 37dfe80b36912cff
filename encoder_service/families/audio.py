"""Audio preprocessing for Whisper-style towers: decode, 16 kHz mono, log-mel, lengths.

Decoding and resampling use PyAV (FFmpeg's decoders and libswresample), the same path as
the reference's `ffmpeg -ac 1 -ar 16000 -f s16le` loading, samples scaled by 1/32768.
Items longer than `max_audio_seconds` are refused. What is accepted is encoded as Megrez
does: the first 30 s only (longer audio is truncated, not chunked), lengths per Qwen-Audio:

    mel frames = min(samples, 480000) // 160
    after_cnn  = 1 + (mel_frames - 1) // 2          (conv1 k3 p1, conv2 k3 s2 p1)
    tokens     = (after_cnn - 2) // 2 + 1           (AvgPool1d(2))
    span       = tokens + 2                          (+ audio bos / eos rows)

so 1 s -> 27 rows, 10 s -> 252, 30 s and longer -> 752.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from encoder_service.errors import InvalidMedia
from encoder_service.families import Preprocessed
from encoder_service.families.imaging import content_hash

SAMPLE_RATE = 16000
HOP_LENGTH = 160
MAX_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window; the encoder sees at most this much
# Containers and codecs worth the attack surface for speech input.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


@dataclass(frozen=True, slots=True)
class AudioLengths:
    after_cnn: int  # encoder frames after the two convolutions
    tokens: int  # audio rows after pooling
    span: int  # rows sent to the LLM: bos + tokens + eos


def audio_lengths(num_samples: int) -> AudioLengths:
    mel_frames = min(num_samples, MAX_SAMPLES) // HOP_LENGTH
    after_cnn = 1 + (mel_frames - 1) // 2 if mel_frames > 0 else 0
    tokens = (after_cnn - 2) // 2 + 1 if after_cnn >= 2 else 0
    return AudioLengths(after_cnn, tokens, tokens + 2)


@dataclass(frozen=True, slots=True)
class AudioFeatures(Preprocessed):
    """One (at most 30 s) window: num_tiles 1, num_tokens lengths.span."""

    mel: torch.Tensor  # [n_mels, 2 * after_cnn] float32 log-mel, truncated as the encoder reads it
    lengths: AudioLengths


def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    """wav/mp3/flac/ogg bytes -> float32 mono samples at 16 kHz in [-1, 1).

    Refuses audio longer than `max_seconds` as soon as decoding passes that point.
    """
    limit = int(max_seconds * SAMPLE_RATE)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if container.format.name.split(",")[0] not in AUDIO_FORMATS:
                raise InvalidMedia(f"audio container {container.format.name!r} is not supported; "
                                   f"send one of {', '.join(AUDIO_FORMATS)}")
            if not container.streams.audio:
                raise InvalidMedia("the media has no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            chunks, total = [], 0
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].shape[0]
                if total > limit:
                    raise InvalidMedia(f"audio is longer than this encoder's limit of "
                                       f"{max_seconds:g} s; send a shorter clip")
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.error.FFmpegError as exc:
        raise InvalidMedia(f"media is not decodable audio ({exc}); send wav, mp3, flac "
                           f"or ogg bytes") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    if samples.shape[0] > limit:
        raise InvalidMedia(f"audio is {samples.shape[0] / SAMPLE_RATE:.1f} s; this encoder's limit "
                           f"is {max_seconds:g} s; send a shorter clip")
    return samples.astype(np.float32) / 32768.0


class AudioPreprocessor:
    """Samples -> Whisper log-mel features and lengths, and the content hash naming the result."""

    def __init__(self, n_mels: int = 128, max_seconds: float = 30.0) -> None:
        self.n_mels = n_mels
        self.max_seconds = max_seconds
        self._extractor = WhisperFeatureExtractor(feature_size=n_mels)

    def decode(self, data: bytes) -> np.ndarray:
        samples = decode_audio(data, self.max_seconds)
        if audio_lengths(samples.shape[0]).tokens < 1:
            raise InvalidMedia(f"audio is {samples.shape[0]} samples at 16 kHz, too short to "
                               f"encode; send at least 0.03 s")
        return samples

    def features(self, samples: np.ndarray) -> AudioFeatures:
        """The first 30 s, padded to 30 s as Whisper does, then cut to the frames encoded."""
        lengths = audio_lengths(samples.shape[0])
        mel = self._extractor(samples[:MAX_SAMPLES], sampling_rate=SAMPLE_RATE,
                              return_tensors="np")["input_features"][0]
        return AudioFeatures(num_tiles=1, num_tokens=lengths.span,
                             mel=torch.from_numpy(mel[:, :2 * lengths.after_cnn]).float(),
                             lengths=lengths)

    def content_hash(self, samples: np.ndarray) -> str:
        """sha256 (hex) of the 16 kHz samples and every parameter that shapes the output."""
        return content_hash(f"modality=audio;rate={SAMPLE_RATE};n_mels={self.n_mels};"
                            f"max_samples={MAX_SAMPLES};",
                            np.ascontiguousarray(samples, dtype=np.float32).tobytes())

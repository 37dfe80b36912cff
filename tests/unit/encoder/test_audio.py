"""Audio decoding, resampling, limits, lengths and features."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from encoder_service.families.audio import AudioPreprocessor, audio_lengths, decode_audio
from encoder_service.errors import InvalidMedia


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([left, -left][:channels], axis=1) if channels > 1 else left[:, None]


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """[frames, channels] float -> 16-bit PCM wav, with the standard library."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def encoded_bytes(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples.T * 32767).astype(np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(("seconds", "tokens", "span"), [
    (1, 25, 27), (2.5, 62, 64), (10, 250, 252), (30, 750, 752), (45, 750, 752)])
def test_span_lengths(seconds, tokens, span):
    lengths = audio_lengths(int(seconds * 16000))
    assert (lengths.tokens, lengths.span) == (tokens, span)


def test_wav_at_16k_decodes_to_the_same_samples():
    source = tone(0.5, 16000)
    samples = decode_audio(wav_bytes(source, 16000), max_seconds=30)
    assert samples.dtype == np.float32 and samples.shape == (8000,)
    np.testing.assert_allclose(samples, source[:, 0], atol=1e-4)


def test_44k_stereo_resamples_to_16k_mono():
    samples = decode_audio(wav_bytes(tone(1.0, 44100, channels=2, freq=200), 44100), 30)
    assert abs(samples.shape[0] - 16000) <= 16
    # Opposite-phase channels cancel in the downmix.
    assert np.abs(samples).max() < 1e-3


def test_44k_mono_resample_keeps_the_tone():
    samples = decode_audio(wav_bytes(tone(1.0, 44100, freq=200), 44100), 30)
    assert abs(samples.shape[0] - 16000) <= 16
    expected = 0.5 * np.sin(2 * np.pi * 200 * np.arange(samples.shape[0]) / 16000)
    np.testing.assert_allclose(samples[2000:14000], expected[2000:14000], atol=2e-2)


@pytest.mark.parametrize(("container", "codec"), [("flac", "flac"), ("mp3", "libmp3lame")])
def test_compressed_formats_decode(container, codec):
    data = encoded_bytes(tone(1.0, 16000), 16000, container, codec)
    samples = decode_audio(data, max_seconds=30)
    assert abs(samples.shape[0] - 16000) <= 1200  # mp3 adds encoder delay/padding
    assert 0.3 < np.abs(samples).max() < 0.6


def test_over_the_limit_is_refused():
    with pytest.raises(InvalidMedia, match="limit of 2 s"):
        decode_audio(wav_bytes(tone(3.0, 16000), 16000), max_seconds=2)


def test_not_audio_is_refused():
    with pytest.raises(InvalidMedia, match="not decodable audio|not supported"):
        decode_audio(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, max_seconds=30)


def test_too_short_is_refused():
    with pytest.raises(InvalidMedia, match="too short"):
        AudioPreprocessor(n_mels=16).decode(wav_bytes(tone(0.01, 16000), 16000))


def test_features_are_cut_to_the_encoded_frames():
    preprocessor = AudioPreprocessor(n_mels=128)
    features = preprocessor.features(tone(1.0, 16000)[:, 0].astype(np.float32))
    assert features.mel.shape == (128, 100) and features.lengths.span == 27
    long = preprocessor.features(np.zeros(45 * 16000, dtype=np.float32))
    assert long.mel.shape == (128, 3000) and long.lengths.span == 752


def test_content_hash_depends_on_samples_and_mels():
    a = tone(1.0, 16000)[:, 0].astype(np.float32)
    b = a.copy()
    b[100] += 0.01
    p128, p80 = AudioPreprocessor(128), AudioPreprocessor(80)
    assert p128.content_hash(a) == p128.content_hash(a.copy())
    assert len({p128.content_hash(a), p128.content_hash(b), p80.content_hash(a)}) == 3

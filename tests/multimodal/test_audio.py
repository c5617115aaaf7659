"""Tests for jaxmm.multimodal.audio: splitting, channel folding, item checks, decoding."""

import io

import numpy as np
import pytest
import soundfile as sf
from hypothesis import event, given, settings
from hypothesis import strategies as st

from jaxmm.multimodal.audio import (
    AudioTooLongError,
    decode_audio_bytes,
    load_audio_item,
    normalize_channels,
    split_audio,
)

SAMPLE_RATES = [8000, 11025, 16000, 22050, 44100, 48000]
PROPERTY = settings(max_examples=40, deadline=None)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Noise with no quiet sample: |x| in [0.2, 1]."""
    return (rng.choice([-1.0, 1.0], n) * rng.uniform(0.2, 1.0, n)).astype(np.float32)


def _search_regions(clips, max_samples, search_len):
    """(lo, limit, cut) for every cut, recomputed from the clip lengths."""
    start = 0
    for clip in clips[:-1]:
        limit = start + max_samples
        yield limit - search_len, limit, start + len(clip)
        start += len(clip)


@st.composite
def split_cases(draw):
    """Audio (noise with random digital silences) plus split parameters whole in samples."""
    sr = draw(st.sampled_from(SAMPLE_RATES))
    max_samples = draw(st.integers(50, 2000))
    search_len = draw(st.integers(0, max_samples - 1))
    window = draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Length from the seeded rng (hypothesis favours small draws): mostly audio that needs
    # several cuts, now and then a single clip.
    n = int(rng.integers(max_samples // 2, 6 * max_samples))
    audio = _noise(rng, n)
    for _ in range(draw(st.integers(0, 5))):
        at, length = rng.integers(0, n), rng.integers(1, 3 * window + 2)
        audio[at : at + length] = 0.0
    return audio, sr, max_samples, search_len, window


@PROPERTY
@given(split_cases())
def test_split_tiles_input_and_respects_max(case):
    audio, sr, max_samples, search_len, window = case
    clips = split_audio(audio, sr, max_samples / sr, search_len / sr, window)
    np.testing.assert_array_equal(np.concatenate(clips), audio)
    assert all(0 < len(c) <= max_samples for c in clips)
    if len(audio) <= max_samples:
        assert len(clips) == 1 and clips[0] is audio


@PROPERTY
@given(split_cases())
def test_split_cuts_at_quietest_window(case):
    audio, sr, max_samples, search_len, window = case
    clips = split_audio(audio, sr, max_samples / sr, search_len / sr, window)
    power = audio.astype(np.float64) ** 2
    event(f"cuts: {min(len(clips) - 1, 3)}")
    for lo, limit, cut in _search_regions(clips, max_samples, search_len):
        if search_len == 0:
            assert cut == limit
            continue
        w = min(window, search_len)
        # Brute-force energy of every window that fits in the search region.
        energies = [power[j : j + w].sum() for j in range(lo, limit - w + 1)]
        cut_start = cut - w // 2  # the cut sits at the centre of its window
        assert lo <= cut_start <= limit - w
        assert power[cut_start : cut_start + w].sum() <= min(energies) + 1e-9


@pytest.mark.parametrize("sr", SAMPLE_RATES)
def test_split_lands_in_known_silence(sr):
    """A half-second gap inside each overlap window of 1 s: every cut falls in its gap."""
    rng = np.random.default_rng(sr)
    max_s, overlap_s, window = 3.0, 1.0, sr // 10
    audio = _noise(rng, int(10.5 * sr))
    gaps = []
    # Cuts then land near 2.6 s, 5.2 s, 7.8 s: each gap sits in the next overlap window.
    for k in range(1, 4):
        lo = int((2.6 * k - 0.25) * sr)
        hi = lo + sr // 2
        audio[lo:hi] = 0.0
        gaps.append((lo, hi))
    clips = split_audio(audio, sr, max_s, overlap_s, window)
    cuts = np.cumsum([len(c) for c in clips])[:-1]
    assert len(cuts) == 3
    for cut, (lo, hi) in zip(cuts, gaps, strict=True):
        assert lo + window // 2 <= cut <= hi - window // 2
        # The middle of the silent run: the cut splits the gap about evenly.
        assert abs((cut - lo) - (hi - cut)) <= 2
    np.testing.assert_array_equal(np.concatenate(clips), audio)


def test_split_short_input_and_defaults():
    audio = np.zeros(16000 * 30, np.float32)
    assert split_audio(audio, 16000)[0] is audio
    long = _noise(np.random.default_rng(0), 16000 * 65)
    clips = split_audio(long, 16000)
    assert len(clips) == 3 and all(len(c) <= 16000 * 30 for c in clips)
    assert all(len(c) >= 16000 * 29 for c in clips[:-1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(audio_data=np.zeros((2, 100))),
        dict(sample_rate=0),
        dict(sample_rate=16000.0),
        dict(max_clip_duration_s=0.0),
        dict(overlap_duration_s=-1.0),
        dict(overlap_duration_s=30.0),
        dict(min_energy_window_size=0),
        dict(max_clip_duration_s=1e-6, overlap_duration_s=0.0),
        dict(audio_data=np.array([0.0, np.nan] * 50)),
        dict(audio_data=np.array(["a"] * 100)),
    ],
)
def test_split_rejects_bad_args(kwargs):
    args = dict(audio_data=np.zeros(100, np.float32), sample_rate=16000)
    with pytest.raises(ValueError):
        split_audio(**{**args, **kwargs})


def test_stereo_layouts_fold_to_same_mono():
    rng = np.random.default_rng(1)
    stereo = rng.standard_normal((2, 1000)).astype(np.float32)
    expected = stereo.mean(axis=0)
    np.testing.assert_allclose(normalize_channels(stereo, True), expected, rtol=1e-6)
    np.testing.assert_allclose(normalize_channels(stereo.T, True), expected, rtol=1e-6)
    np.testing.assert_array_equal(normalize_channels(stereo.T, False), stereo)
    mono = stereo[0]
    assert normalize_channels(mono, True) is mono
    with pytest.raises(ValueError):
        normalize_channels(np.zeros((10, 10)), True)  # 10 "channels"? ambiguous
    with pytest.raises(ValueError):
        normalize_channels(np.zeros((2, 3, 4)), True)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_load_audio_item_resamples_and_folds(sr):
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo_ct = np.stack([tone, tone])
    out_ct = load_audio_item((stereo_ct, sr), 16000)
    out_tc = load_audio_item((stereo_ct.T.copy(), sr), 16000)
    assert out_ct.dtype == np.float32 and out_ct.shape == (16000,)
    np.testing.assert_allclose(out_ct, out_tc, atol=1e-6)
    # Still a 440 Hz tone at the new rate.
    spectrum = np.abs(np.fft.rfft(out_ct))
    assert abs(np.argmax(spectrum) * 16000 / len(out_ct) - 440) <= 2
    kept = load_audio_item((stereo_ct, sr), 16000, mono=False)
    assert kept.shape == (2, 16000)


def test_load_audio_item_int_pcm_and_passthrough():
    pcm = np.array([0, 16384, -32768], np.int16)
    np.testing.assert_allclose(load_audio_item((pcm, 16000), 16000), [0.0, 0.5, -1.0])
    x = np.linspace(-1, 1, 100, dtype=np.float64)
    out = load_audio_item([x, 16000], 16000)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize(
    "item, kwargs",
    [
        (np.zeros(10), {}),  # not a pair
        ((np.zeros(10), 16000, 1), {}),
        (([0.0] * 10, 16000), {}),  # not an ndarray
        ((np.zeros(10), 0), {}),
        ((np.zeros(10), "16000"), {}),
        ((np.zeros(0), 16000), {}),
        ((np.zeros((2, 0)), 16000), {}),
        ((np.zeros((1, 2, 3)), 16000), {}),
        ((np.array([0.0, np.nan]), 16000), {}),
        ((np.array([0.0, np.inf]), 16000), {}),
        ((np.zeros(10, bool), 16000), {}),
        ((np.zeros(10, complex), 16000), {}),
        ((np.zeros((16, 16)), 16000), {}),
        ((np.zeros(16001), 16000), {"max_duration_s": 1.0}),
        ((np.zeros(10), 16000), {"max_duration_s": 0.0}),
    ],
)
def test_load_audio_item_rejects(item, kwargs):
    with pytest.raises(ValueError):
        load_audio_item(item, 16000, **kwargs)


def _encode(audio: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, subtype, atol", [("WAV", "FLOAT", 0), ("WAV", "PCM_16", 1e-4), ("FLAC", "PCM_16", 1e-4)]
)
def test_decode_wav_flac_bytes(fmt, subtype, atol):
    rng = np.random.default_rng(2)
    mono = rng.uniform(-0.9, 0.9, 8000).astype(np.float32)
    audio, sr = decode_audio_bytes(_encode(mono, 8000, fmt, subtype))
    assert sr == 8000 and audio.shape == (8000,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, mono, atol=atol)
    stereo = rng.uniform(-0.9, 0.9, (4000, 2)).astype(np.float32)  # soundfile: (time, ch)
    audio, sr = decode_audio_bytes(bytearray(_encode(stereo, 22050, fmt, subtype)))
    assert sr == 22050 and audio.shape == (2, 4000)
    np.testing.assert_allclose(audio, stereo.T, atol=atol)


def test_decode_enforces_duration_cap():
    data = _encode(np.zeros(16000 * 3, np.float32), 16000, "WAV", "PCM_16")
    assert decode_audio_bytes(data, max_duration_s=3.0)[0].shape == (48000,)
    with pytest.raises(AudioTooLongError, match="allowed"):
        decode_audio_bytes(data, max_duration_s=2.5)


@pytest.mark.parametrize(
    "data", [b"", b"not audio at all" * 100, bytes(range(256)) * 8, b"RIFF\x00\x00", "text"]
)
def test_decode_garbage_raises(data):
    with pytest.raises(ValueError):
        decode_audio_bytes(data)


@pytest.mark.parametrize("fmt, subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS")])
def test_decode_lossy_bytes(fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    audio, sr = decode_audio_bytes(_encode(tone, 16000, fmt, subtype))
    assert sr == 16000 and audio.ndim == 1 and abs(len(audio) - 16000) < 2000
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * sr / len(audio) - 440) <= 2
    with pytest.raises(AudioTooLongError):
        decode_audio_bytes(_encode(tone, 16000, fmt, subtype), max_duration_s=0.5)

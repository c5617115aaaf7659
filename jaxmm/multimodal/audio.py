"""Audio loading for multimodal requests: decode, check, resample, split.

Plain Python + numpy/librosa/soundfile (no JAX), so the front end and the server can use
it without touching a device. The path of one audio item:

1. `decode_audio_bytes` turns an uploaded file (wav/flac/ogg/mp3 through libsndfile, other
   containers through librosa's audioread fallback) into `(samples, sample_rate)`, refusing
   files longer than a cap from the header before the whole payload is decoded.
2. `load_audio_item` validates a `(samples, sample_rate)` pair (shape, dtype, finiteness,
   length), folds channels with `normalize_channels`, and resamples to the rate the model's
   feature extractor expects.
3. `split_audio` cuts long audio into clips a fixed-window encoder (Whisper: 30 s) accepts,
   placing every cut at the quietest spot just before the length limit, so words are rarely
   cut in half; the clips concatenate back to the input exactly.

Array layout: mono audio is 1-D `(time,)`; multi-channel audio is `(channels, time)`
(librosa's convention) after `normalize_channels`.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import tempfile
import warnings

import numpy as np

# More channels than this on the smaller axis means the array is probably not audio
# (or is a (time, channels) clip so short that the layout cannot be told apart).
MAX_CHANNELS = 8


class AudioTooLongError(ValueError):
    """The audio runs past the allowed duration."""


def _check_sample_rate(sample_rate: object, name: str = "sample_rate") -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(sample_rate).__name__}")
    if sample_rate <= 0:
        raise ValueError(f"{name} must be positive, got {sample_rate}")
    return int(sample_rate)


def _check_max_duration(max_duration_s: float | None) -> None:
    if max_duration_s is not None and not max_duration_s > 0:
        raise ValueError(f"max_duration_s must be positive or None, got {max_duration_s}")


def _check_duration(frames: int, sample_rate: int, max_duration_s: float | None) -> None:
    if max_duration_s is not None and frames > max_duration_s * sample_rate:
        raise AudioTooLongError(
            f"audio is {frames / sample_rate:.2f} s long, more than the {max_duration_s} s allowed"
        )


# ---------------------------------------------------------------------------------------
# Splitting long audio
# ---------------------------------------------------------------------------------------


def _whole_samples(seconds: float, sample_rate: int) -> int:
    # Floor, forgiving float noise: 0.3 s at 10 Hz is 3 samples although 0.3 * 10 < 3.
    return math.floor(seconds * sample_rate + 1e-6)


def _quietest_cut(segment: np.ndarray, window: int) -> int:
    """Offset in `segment` of the centre of its lowest-RMS window of `window` samples.

    Every window start is tried (stride 1) through a running sum of squares. Among equally
    quiet windows (a stretch of digital silence) the middle of the first quiet run wins, so
    the cut lands inside the silence rather than on its edge.
    """
    window = max(1, min(window, len(segment)))
    power = np.square(segment, dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(power)))
    # energy[j] = sum of squares of segment[j : j + window]
    energy = np.maximum(csum[window:] - csum[:-window], 0.0)
    # Windows within float rounding (relative to the total energy summed) of the minimum
    # tie; windows of exact zeros give exactly 0.
    quiet = energy <= energy.min() + 1e-12 * csum[-1]
    first = int(np.argmax(quiet))
    not_quiet_after = np.flatnonzero(~quiet[first:])
    run_len = int(not_quiet_after[0]) if len(not_quiet_after) else len(quiet) - first
    start = first + (run_len - 1) // 2
    return start + window // 2


def split_audio(
    audio_data: np.ndarray,
    sample_rate: int,
    max_clip_duration_s: float = 30.0,
    overlap_duration_s: float = 1.0,
    min_energy_window_size: int = 1600,
) -> list[np.ndarray]:
    """Split 1-D audio into clips of at most `max_clip_duration_s` seconds.

    Walking from the start, a clip that would run past the limit is cut inside the last
    `overlap_duration_s` seconds before the limit, at the centre of the window of
    `min_energy_window_size` samples with the lowest RMS energy there (the window shrinks to
    the search span when that is shorter). The clips are views of the input that tile it
    exactly: `np.concatenate(clips)` equals `audio_data`, no sample lost or repeated. Audio
    no longer than the limit comes back as `[audio_data]`.

    `max_clip_duration_s * sample_rate` is floored to whole samples, so every clip holds at
    most that many samples.
    """
    audio = np.asarray(audio_data)
    if audio.ndim != 1:
        raise ValueError(f"split_audio expects 1-D audio, got shape {audio.shape}")
    sample_rate = _check_sample_rate(sample_rate)
    if not max_clip_duration_s > 0:
        raise ValueError(f"max_clip_duration_s must be positive, got {max_clip_duration_s}")
    if not 0 <= overlap_duration_s < max_clip_duration_s:
        raise ValueError(
            f"overlap_duration_s must be in [0, max_clip_duration_s={max_clip_duration_s}), "
            f"got {overlap_duration_s}"
        )
    if isinstance(min_energy_window_size, bool) or not isinstance(
        min_energy_window_size, numbers.Integral
    ):
        raise ValueError("min_energy_window_size must be an int")
    if min_energy_window_size < 1:
        raise ValueError(f"min_energy_window_size must be >= 1, got {min_energy_window_size}")

    if not np.issubdtype(audio.dtype, np.number) or np.iscomplexobj(audio):
        raise ValueError(f"audio samples must be real numbers, got dtype {audio.dtype}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    max_samples = _whole_samples(max_clip_duration_s, sample_rate)
    if max_samples < 1:
        raise ValueError(
            f"max_clip_duration_s={max_clip_duration_s} is shorter than one sample "
            f"at {sample_rate} Hz"
        )
    # Keep at least one sample of progress per clip.
    search_len = min(_whole_samples(overlap_duration_s, sample_rate), max_samples - 1)

    total = len(audio)
    if total <= max_samples:
        return [audio]
    clips: list[np.ndarray] = []
    start = 0
    while total - start > max_samples:
        limit = start + max_samples  # the cut may sit at most here (exclusive end)
        if search_len == 0:
            cut = limit
        else:
            lo = limit - search_len
            cut = lo + _quietest_cut(audio[lo:limit], int(min_energy_window_size))
        clips.append(audio[start:cut])
        start = cut
    clips.append(audio[start:])
    return clips


# ---------------------------------------------------------------------------------------
# Channels and items
# ---------------------------------------------------------------------------------------


def normalize_channels(audio: np.ndarray, want_mono: bool) -> np.ndarray:
    """Fold multi-channel audio to mono, or bring it to `(channels, time)` layout.

    Layout rule for 2-D input: the channel axis is the smaller axis, provided it has at most
    `MAX_CHANNELS` (8) entries; a square array is read as `(channels, time)`. Anything else
    (a smaller axis above 8, or more than 2 dimensions) raises ValueError. With `want_mono`
    the channels are averaged into a 1-D `(time,)` array; otherwise the `(channels, time)`
    array is returned. 1-D input is returned unchanged.
    """
    audio = np.asarray(audio)
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise ValueError(f"audio must be 1-D or 2-D (channels x time), got shape {audio.shape}")
    channel_axis = 0 if audio.shape[0] <= audio.shape[1] else 1
    if audio.shape[channel_axis] > MAX_CHANNELS:
        raise ValueError(
            f"cannot tell channels from time in audio of shape {audio.shape}: the smaller "
            f"axis has more than {MAX_CHANNELS} entries"
        )
    if channel_axis == 1:
        audio = audio.T
    if want_mono:
        return audio.mean(axis=0, dtype=np.float64).astype(
            audio.dtype if np.issubdtype(audio.dtype, np.floating) else np.float32
        )
    return audio


def _to_float32(samples: np.ndarray) -> np.ndarray:
    """Float audio is kept as is; integer PCM is scaled to [-1, 1)."""
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if np.issubdtype(samples.dtype, np.signedinteger):
        scale = float(-np.iinfo(samples.dtype).min)
        return (samples.astype(np.float64) / scale).astype(np.float32)
    if np.issubdtype(samples.dtype, np.unsignedinteger):
        # Unsigned PCM (e.g. 8-bit wav) is centred on half the range.
        half = float(np.iinfo(samples.dtype).max + 1) / 2
        return ((samples.astype(np.float64) - half) / half).astype(np.float32)
    raise ValueError(f"audio samples must be real numbers, got dtype {samples.dtype}")


def load_audio_item(
    item: tuple[np.ndarray, int],
    target_sr: int,
    mono: bool = True,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Check one `(samples, sample_rate)` item and return float32 audio at `target_sr`.

    `samples` is 1-D or 2-D (see `normalize_channels` for how the channel axis is found);
    integer PCM is scaled to [-1, 1). The result is `(time,)` when `mono`, else
    `(channels, time)`. Raises ValueError for a malformed item, a non-numeric, empty or
    non-finite array, or audio longer than `max_duration_s` (checked before resampling).
    """
    target_sr = _check_sample_rate(target_sr, "target_sr")
    _check_max_duration(max_duration_s)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"audio item must be a (samples: np.ndarray, sample_rate: int) pair, "
            f"got {type(item).__name__}"
        )
    samples, sample_rate = item
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"audio samples must be a numpy array, got {type(samples).__name__}")
    sample_rate = _check_sample_rate(sample_rate)
    if samples.dtype == np.bool_ or not (
        np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)
    ):
        raise ValueError(f"audio samples must be real numbers, got dtype {samples.dtype}")
    if samples.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or 2-D (channels x time), got shape {samples.shape}")
    if samples.size == 0:
        raise ValueError(f"audio is empty (shape {samples.shape})")

    # Time is the longer axis (see normalize_channels): refuse long audio before any work.
    _check_duration(max(samples.shape), sample_rate, max_duration_s)
    audio = normalize_channels(_to_float32(samples), want_mono=mono)
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")

    if sample_rate != target_sr:
        import librosa  # slow import: only when resampling

        audio = librosa.resample(audio, orig_sr=sample_rate, target_sr=target_sr, axis=-1)
    return np.ascontiguousarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Decoding uploaded files
# ---------------------------------------------------------------------------------------


def _decode_with_soundfile(data: bytes, max_duration_s: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    info = sf.info(io.BytesIO(data))  # header only
    # Some containers (e.g. streamed ogg) report no frame count; check after decoding then.
    if info.frames > 0:
        _check_duration(info.frames, info.samplerate, max_duration_s)
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    _check_duration(len(samples), sample_rate, max_duration_s)
    return samples, int(sample_rate)  # (time, channels)


def _decode_with_librosa(data: bytes, max_duration_s: float | None) -> tuple[np.ndarray, int]:
    import librosa

    # audioread wants a path. Reading a little past the cap is enough to tell "too long"
    # without decoding all of a long file.
    duration = None if max_duration_s is None else max_duration_s + 1.0
    fd, path = tempfile.mkstemp(suffix=".audio")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with warnings.catch_warnings():  # librosa warns when it falls back to audioread
            warnings.simplefilter("ignore")
            samples, sample_rate = librosa.load(path, sr=None, mono=False, duration=duration)
    finally:
        os.unlink(path)
    samples = np.atleast_2d(samples).T  # librosa: (channels, time) -> (time, channels)
    _check_duration(len(samples), int(sample_rate), max_duration_s)
    return samples.astype(np.float32, copy=False), int(sample_rate)


def decode_audio_bytes(data: bytes, max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file held in memory into `(samples, sample_rate)`.

    libsndfile (through soundfile) reads wav/flac/ogg/mp3 and checks the duration from the
    header before decoding; other formats go to librosa (audioread, which needs ffmpeg or
    gstreamer) and are decoded only up to just past the cap. `samples` is float32, `(time,)`
    for mono and `(channels, time)` otherwise. Raises ValueError for empty or undecodable
    data and for audio longer than `max_duration_s`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"audio data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError("audio data is empty")
    _check_max_duration(max_duration_s)

    errors = []
    samples = None
    for decode in (_decode_with_soundfile, _decode_with_librosa):
        try:
            samples, sample_rate = decode(data, max_duration_s)
            break
        except AudioTooLongError:
            raise  # a verdict on a file that did decode, not a decode failure
        except Exception as e:  # decoders raise assorted types (LibsndfileError, NoBackend)
            errors.append(f"{decode.__name__}: {type(e).__name__}: {e}")
    if samples is None:
        raise ValueError("could not decode audio data: " + "; ".join(errors))
    if samples.size == 0:
        raise ValueError("decoded audio has no samples")
    if not np.all(np.isfinite(samples)):
        raise ValueError("decoded audio contains NaN or infinite samples")
    samples = samples[:, 0] if samples.shape[1] == 1 else samples.T
    return np.ascontiguousarray(samples), sample_rate

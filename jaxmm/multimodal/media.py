"""Decoding media for a request: images (Pillow), videos (OpenCV), audio (`audio.py`).

Plain Python + numpy; no JAX. Each `load_*` takes a URL (through `fetch.fetch_bytes`, under
a `MediaPolicy`), raw bytes, or an already-decoded object, and returns what the HF
processors take: an RGB `PIL.Image`, a `(T, H, W, 3)` uint8 RGB array, `(samples, rate)`.

Decoding untrusted bytes is where the caps bite:
- images: the format is read from the header and must be in `policy.image_formats` (Pillow
  is only allowed to try those plugins), and width x height is checked against
  `max_image_pixels` before any pixel is decoded;
- videos: the container is recognised by its magic bytes before FFmpeg sees the file, frame
  size and frames x pixels are checked from the header, and no more than
  `max_video_frames` frames are ever decoded;
- audio: the duration cap is passed to the decoder, which checks the header.
Every failure is a `MediaError` (see `fetch.py`).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .fetch import (
    MediaError,
    MediaPolicy,
    decode_base64_payload,
    fetch_bytes,
    parse_data_url,
)

__all__ = [
    "MediaError",
    "MediaPolicy",
    "VideoMetadata",
    "decode_base64_payload",
    "fetch_bytes",
    "load_audio",
    "load_image",
    "load_video",
    "load_video_with_metadata",
    "parse_data_url",
]

# ---------------------------------------------------------------------------------------
# Images

# Magic bytes of formats Pillow (or a client) might send, only to name a refused format.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
)


def _sniff_image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "HEIF"
    if len(data) >= 2 and data[:1] == b"P" and data[1:2] in b"1234567":
        return "PPM"
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "SVG"
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    return None


def _check_rgb_color(color: Sequence[int]) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ValueError(f"rgba_background_color must be 3 ints in 0..255, got {color!r}")
    return rgb  # type: ignore[return-value]


def _check_image_size(size: tuple[int, int], policy: MediaPolicy) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"image has an empty size {width}x{height}")
    if width * height > policy.max_image_pixels:
        raise MediaError(
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"{policy.max_image_pixels} allowed",
            status=413,
        )


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB, with any transparency composited over `background`."""
    if image.mode == "RGB":
        return image
    try:
        if _has_transparency(image):
            rgba = image.convert("RGBA")
            out = Image.new("RGB", rgba.size, background)
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise MediaError(f"could not convert a {image.mode} image to RGB ({exc})") from None


def _decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    try:
        # `formats` keeps Pillow from even parsing a header of a format not allowed.
        image = Image.open(io.BytesIO(data), formats=list(policy.image_formats))
    except Image.DecompressionBombError:
        raise MediaError("image is too large (decompression bomb check)", status=413) from None
    except UnidentifiedImageError:
        name = _sniff_image_format(data)
        if name is not None and name not in policy.image_formats:
            allowed = ", ".join(policy.image_formats)
            raise MediaError(f"image format {name} is not allowed (allowed: {allowed})") from None
        raise MediaError("could not identify the image (unsupported or corrupt data)") from None
    except Exception:  # Pillow's header parsers raise many types on hostile input
        raise MediaError("could not read the image header (corrupt data)") from None
    # A plugin can report a sub-format: phone JPEGs often open as MPO (multi-picture JPEG).
    name = "JPEG" if image.format == "MPO" else image.format
    if name not in policy.image_formats:
        raise MediaError(f"image format {image.format} is not allowed")
    _check_image_size(image.size, policy)
    try:
        image.load()  # first frame only for animated images
    except Image.DecompressionBombError:
        raise MediaError("image is too large (decompression bomb check)", status=413) from None
    except Exception:
        raise MediaError("image data is truncated or corrupt") from None
    return image


def load_image(
    src: str | bytes | Image.Image,
    policy: MediaPolicy | None = None,
    rgba_background_color: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """An RGB image from a URL (http(s), data:, file://), encoded bytes, or a PIL image.

    Transparent pixels (RGBA, LA, P or L/RGB with a transparency key) are composited over
    `rgba_background_color`. An RGB `PIL.Image` input is returned as is.
    """
    policy = policy if policy is not None else MediaPolicy()
    background = _check_rgb_color(rgba_background_color)
    if isinstance(src, Image.Image):
        _check_image_size(src.size, policy)
        return _to_rgb(src, background)
    if isinstance(src, str):
        src, _ = fetch_bytes(src, "image", policy)
    if not isinstance(src, (bytes, bytearray, memoryview)):
        raise MediaError(f"an image must be a URL, bytes or PIL image, got {type(src).__name__}")
    if len(src) == 0:
        raise MediaError("the image is empty (0 bytes)")
    data = bytes(src)
    if len(data) > policy.max_download_bytes:
        raise MediaError(
            f"image is larger than the {policy.max_download_bytes} bytes allowed", status=413
        )
    return _to_rgb(_decode_image(data, policy), background)


# ---------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoMetadata:
    total_num_frames: int  # frames in the source (as counted or declared)
    fps: float | None  # None for in-memory frames or when the container does not say
    frame_indices: tuple[int, ...]  # source index of each returned frame

    @property
    def duration_s(self) -> float | None:
        return self.total_num_frames / self.fps if self.fps else None


_VIDEO_SUFFIX = {
    "MP4": ".mp4",
    "AVI": ".avi",
    "MATROSKA": ".mkv",
    "MPEG-TS": ".ts",
    "MPEG-PS": ".mpg",
    "FLV": ".flv",
    "OGG": ".ogv",
    "GIF": ".gif",
}
# A failed grab/decode this many times in a row ends the stream (EOF, or a header that
# declares more frames than there are).
_MAX_CONSECUTIVE_FAILURES = 16
# Frames counted by reading, when the container does not declare a count.
_MAX_COUNTED_FRAMES = 1_000_000


def _sniff_video_container(data: bytes) -> str | None:
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "MP4"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "AVI"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "MATROSKA"
    if data[:4] == b"\x00\x00\x01\xba":
        return "MPEG-PS"
    if data[:3] == b"FLV":
        return "FLV"
    if data[:4] == b"OggS":
        return "OGG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:  # two TS sync bytes
        return "MPEG-TS"
    return None


def sample_frame_indices(total: int, num_frames: int | None, max_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread uniformly over `total` (all when None or -1),
    never more than `max_frames`; asking for more than `max_frames` is refused."""
    if total <= 0:
        raise MediaError("video has no frames")
    if num_frames is None or num_frames == -1:
        want = min(total, max_frames)
    else:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise MediaError(f"num_frames must be a positive int or None, got {num_frames!r}")
        if num_frames > max_frames:
            raise MediaError(
                f"num_frames={num_frames} is more than the {max_frames} frames allowed",
                status=413,
            )
        want = min(num_frames, total)
    if want == total:
        return list(range(total))
    return np.linspace(0, total - 1, want).round().astype(int).tolist()


def read_frames(capture, indices: Sequence[int], frame_recovery: bool = False) -> dict:
    """Decode the frames at sorted `indices` from an OpenCV-like capture (grab/retrieve).

    Frames are read in order with `grab()`, and only wanted ones are decoded with
    `retrieve()`. A wanted frame that fails is dropped, or with `frame_recovery` replaced by
    the next frame that decodes (which may lie past the last wanted index). Returns
    {index: BGR frame}.
    """
    wanted = set(indices)
    last = max(indices)
    frames: dict[int, np.ndarray] = {}
    pending: list[int] = []  # failed wanted indices waiting for the next good frame
    failures = 0
    index = 0
    while index <= last or (frame_recovery and pending):
        need = index in wanted or (frame_recovery and bool(pending))
        ok = bool(capture.grab())
        frame = None
        if ok and need:
            ok, frame = capture.retrieve()
            ok = bool(ok) and frame is not None and frame.size > 0
        if not ok:
            failures += 1
            if index in wanted:
                pending.append(index)
            if failures >= _MAX_CONSECUTIVE_FAILURES:
                break
        else:
            failures = 0
            if need:
                if frame_recovery:
                    for p in pending:
                        frames[p] = frame
                    pending.clear()
                if index in wanted:
                    frames[index] = frame
        index += 1
    return frames


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    return frame[:, :, 2::-1]  # BGR or BGRA -> RGB


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError(f"video frames differ in size: {sorted(shapes)}")
    return np.ascontiguousarray(np.stack(frames))


def _decode_video(
    data: bytes, policy: MediaPolicy, num_frames: int | None, frame_recovery: bool
) -> tuple[np.ndarray, VideoMetadata]:
    container = _sniff_video_container(data)
    if container is None:
        raise MediaError("could not identify the video container (unsupported or corrupt data)")
    if container not in policy.video_containers:
        allowed = ", ".join(policy.video_containers)
        raise MediaError(f"video container {container} is not allowed (allowed: {allowed})")
    import cv2  # imported here: OpenCV is only needed for video

    # OpenCV reads from a path; the file lives only while decoding.
    fd, path = tempfile.mkstemp(prefix="jaxmm-video-", suffix=_VIDEO_SUFFIX[container])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # CAP_FFMPEG explicitly: other backends read image sequences from path patterns.
        capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        try:
            if not capture.isOpened():
                raise MediaError("could not open the video (corrupt or unsupported codec)")
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width > 0 and height > 0 and width * height > policy.max_image_pixels:
                raise MediaError(
                    f"video frames are {width}x{height}, more than the "
                    f"{policy.max_image_pixels} pixels allowed per frame",
                    status=413,
                )
            fps = float(capture.get(cv2.CAP_PROP_FPS)) or None
            declared = capture.get(cv2.CAP_PROP_FRAME_COUNT)
            total = int(declared) if 0 < declared < 2**31 else 0
            if total == 0:  # not declared: count by reading, then start over
                while total < _MAX_COUNTED_FRAMES and capture.grab():
                    total += 1
                capture.release()
                capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
            indices = sample_frame_indices(total, num_frames, policy.max_video_frames)
            if width * height * len(indices) > policy.max_video_pixels:
                raise MediaError(
                    f"{len(indices)} frames of {width}x{height} are more than the "
                    f"{policy.max_video_pixels} video pixels allowed; ask for fewer frames",
                    status=413,
                )
            frames = read_frames(capture, indices, frame_recovery)
        finally:
            capture.release()
    finally:
        os.unlink(path)
    if not frames:
        raise MediaError("no frame of the video could be decoded")
    kept = sorted(frames)
    for frame in frames.values():
        if frame.shape[0] * frame.shape[1] > policy.max_image_pixels:
            raise MediaError("video frames are larger than allowed", status=413)
    video = _stack([_bgr_to_rgb(frames[i]) for i in kept])
    return video, VideoMetadata(total_num_frames=total, fps=fps, frame_indices=tuple(kept))


def _normalize_frame(frame: object, index: int) -> np.ndarray:
    """One in-memory frame -> (H, W, 3) uint8 RGB."""
    if isinstance(frame, Image.Image):
        frame = np.asarray(_to_rgb(frame, (255, 255, 255)))
    if not isinstance(frame, np.ndarray):
        raise MediaError(f"video frame {index} must be a PIL image or array")
    if frame.dtype != np.uint8:
        raise MediaError(f"video frame {index} must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise MediaError(f"video frame {index} must be (H, W, 3), got {frame.shape}")
    if frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    return frame[:, :, :3]  # RGBA: alpha dropped


def _frames_in_memory(
    src: np.ndarray | list, policy: MediaPolicy, num_frames: int | None
) -> tuple[np.ndarray, VideoMetadata]:
    if isinstance(src, np.ndarray):
        if src.ndim != 4:
            raise MediaError(f"a video array must be (T, H, W, 3), got shape {src.shape}")
        total = src.shape[0]
    else:
        total = len(src)
    indices = sample_frame_indices(total, num_frames, policy.max_video_frames)
    if isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.shape[3] == 3:
        video = np.ascontiguousarray(src if len(indices) == total else src[indices])
    else:
        video = _stack([_normalize_frame(src[i], i) for i in indices])
    return video, VideoMetadata(total_num_frames=total, fps=None, frame_indices=tuple(indices))


def load_video_with_metadata(
    src: str | bytes | np.ndarray | list,
    policy: MediaPolicy | None = None,
    num_frames: int | None = None,
    frame_recovery: bool = False,
) -> tuple[np.ndarray, VideoMetadata]:
    """`load_video`, plus which source frames were kept and the frame rate (for models that
    place frames in time, e.g. Qwen2.5-VL's seconds per temporal patch)."""
    policy = policy if policy is not None else MediaPolicy()
    if isinstance(src, (np.ndarray, list, tuple)):
        return _frames_in_memory(src, policy, num_frames)
    if isinstance(src, str):
        src, _ = fetch_bytes(src, "video", policy)
    if not isinstance(src, (bytes, bytearray, memoryview)):
        raise MediaError(f"a video must be a URL, bytes or frames, got {type(src).__name__}")
    data = bytes(src)
    if len(data) > policy.max_download_bytes:
        raise MediaError(
            f"video is larger than the {policy.max_download_bytes} bytes allowed", status=413
        )
    return _decode_video(data, policy, num_frames, frame_recovery)


def load_video(
    src: str | bytes | np.ndarray | list,
    policy: MediaPolicy | None = None,
    num_frames: int | None = None,
    frame_recovery: bool = False,
) -> np.ndarray:
    """A `(T, H, W, 3)` uint8 RGB video from a URL, encoded bytes, an array or a frame list.

    `num_frames` frames are sampled uniformly over the video (all when None, at most
    `policy.max_video_frames`). A frame that fails to decode is dropped, or with
    `frame_recovery` replaced by the next frame that decodes.
    """
    return load_video_with_metadata(src, policy, num_frames, frame_recovery)[0]


# ---------------------------------------------------------------------------------------
# Audio


def load_audio(src: str | bytes, policy: MediaPolicy | None = None) -> tuple[np.ndarray, int]:
    """(samples, sample_rate) at the file's own rate, from a URL or encoded bytes, through
    `audio.decode_audio_bytes` with the policy's duration cap. Resampling to a model's rate
    is `audio.load_audio_item`'s job."""
    policy = policy if policy is not None else MediaPolicy()
    if isinstance(src, str):
        src, _ = fetch_bytes(src, "audio", policy)
    if not isinstance(src, (bytes, bytearray, memoryview)):
        raise MediaError(f"audio must be a URL or bytes, got {type(src).__name__}")
    data = bytes(src)
    if len(data) > policy.max_download_bytes:
        raise MediaError(
            f"audio is larger than the {policy.max_download_bytes} bytes allowed", status=413
        )
    from . import audio  # imported here: librosa/soundfile load slowly

    try:
        return audio.decode_audio_bytes(data, max_duration_s=policy.max_audio_duration_s)
    except MediaError:
        raise
    except audio.AudioTooLongError as exc:
        raise MediaError(str(exc), status=413) from None
    except ValueError as exc:  # the decoder's own checks: messages meant for the client
        raise MediaError(f"could not decode the audio: {str(exc)[:200]}") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise MediaError(f"could not decode the audio ({type(exc).__name__})") from None

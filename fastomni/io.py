"""Video input and output: read a video or frame folder, write the original's ``color/`` layout
and browser-playable mp4s.

Every file is written to a temporary name in its destination folder and renamed into place, so a
crash never leaves a half-written frame, flow or video behind.

Example::

    >>> import numpy as np, tempfile, os
    >>> frames = np.zeros((3, 16, 24, 3), np.uint8)
    >>> d = tempfile.mkdtemp()
    >>> _ = write_frames(frames, d)
    >>> sorted(os.listdir(os.path.join(d, "color")))
    ['00000.jpg', '00001.jpg', '00002.jpg']
    >>> load_video(d).shape
    (3, 16, 24, 3)
"""
from __future__ import annotations

import os
import re
from fractions import Fraction

import cv2
import numpy as np
from tqdm import tqdm

from fastomni._atomic import atomic_output
from fastomni.config import FRAME_FORMATS
from fastomni.inputs import InputError, InputTypeError

__all__ = ["load_video", "write_frames", "write_video", "check_frames", "atomic_output", "frame_name",
           "frame_files", "VIDEO_EXTS", "IMAGE_EXTS", "FRAME_FORMATS"]

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Quality 95 without chroma subsampling: colour is a training signal, and saturated colour edges
# lose ~1 level more on average under the default 4:2:0.
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


# How a sequence folder stores its frames (FRAME_FORMATS): JPEG as the original, or lossless PNG
# (flow is computed on them; JPEG's rounding cost chained DIS flow 0.01-0.03 AJ on the benchmark).
_WRITE_PARAMS = {"jpg": JPEG_PARAMS, "png": [cv2.IMWRITE_PNG_COMPRESSION, 3]}


def frame_name(i: int, frame_format: str = "jpg") -> str:
    """File name of frame ``i`` in a sequence folder's ``color/`` (``00000.jpg``); the original
    names flows, masks and flow stats after these file names, extension included."""
    return f"{i:05d}.{frame_format}"


def check_frames(frames, name: str = "frames", min_frames: int = 1) -> np.ndarray:
    """Validate a video array: ``[T, H, W, 3]`` uint8 RGB with ``T >= min_frames``.

    Returns it as a C-contiguous array; raises ``TypeError`` / ``ValueError`` naming the problem.
    """
    if not isinstance(frames, np.ndarray):
        raise InputTypeError(f"{name} must be a numpy array [T, H, W, 3] uint8, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise InputTypeError(f"{name} must have dtype uint8 (RGB 0..255), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"{name} must have shape [T, H, W, 3], got {frames.shape}")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise InputError(f"{name} frames must be at least 2x2 pixels, got {frames.shape[1]}x{frames.shape[2]}")
    if frames.shape[0] < min_frames:
        raise InputError(f"{name} has {frames.shape[0]} frames, need at least {min_frames}")
    return np.ascontiguousarray(frames)


def _natural_key(name: str):
    # frame_2.png sorts before frame_10.png; zero-padded names sort the same either way.
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _resolve_size(h: int, w: int, resize) -> tuple[int, int] | None:
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        if resize < 2:
            raise InputError(f"resize as a max side must be >= 2, got {resize}")
        scale = min(1.0, resize / max(h, w))  # a max side only ever shrinks
        return max(2, round(h * scale)), max(2, round(w * scale))
    if (isinstance(resize, (tuple, list)) and len(resize) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in resize)):
        rh, rw = int(resize[0]), int(resize[1])
        if rh < 2 or rw < 2:
            raise InputError(f"resize (h, w) must be at least (2, 2), got {tuple(resize)}")
        return rh, rw
    raise InputTypeError(f"resize must be None, an int max side or an (h, w) tuple of ints, got {resize!r}")


def _to_rgb(bgr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is not None and size != bgr.shape[:2]:
        shrink = size[0] * size[1] < bgr.shape[0] * bgr.shape[1]
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def frame_files(folder) -> list[str]:
    """Paths of the image frames in ``folder``, in natural order (``f2.png`` before ``f10.png``;
    zero-padded names such as the original's ``00000.jpg`` sort the same either way)."""
    folder = os.fspath(folder)
    names = [n for n in os.listdir(folder)
             if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _read_folder(folder: str, max_frames, resize) -> list[np.ndarray]:
    files = frame_files(folder)
    if not files:
        raise InputError(f"no image frames ({', '.join(IMAGE_EXTS)}) in folder {folder}")
    files = files[:max_frames]
    frames, size, first_shape = [], None, None
    for f in files:
        bgr = cv2.imread(f, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"cannot read image frame {f} (corrupt or unsupported format)")
        if first_shape is None:
            first_shape = bgr.shape[:2]
            size = _resolve_size(*first_shape, resize)
        elif bgr.shape[:2] != first_shape:
            raise InputError(f"frame {f} is {bgr.shape[1]}x{bgr.shape[0]} but {files[0]} is "
                             f"{first_shape[1]}x{first_shape[0]}: all frames must have the same size")
        frames.append(_to_rgb(bgr, size))
    return frames


def _read_file(path: str, max_frames, resize) -> list[np.ndarray]:
    if not path.lower().endswith(VIDEO_EXTS):
        raise InputError(f"{path} is not a video file (expected one of {', '.join(VIDEO_EXTS)}) "
                         "nor a folder of frames")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise InputError(f"cannot open video {path} (corrupt or unsupported codec)")
        frames, size = [], None
        while max_frames is None or len(frames) < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            if size is None:
                size = _resolve_size(*bgr.shape[:2], resize)
            frames.append(_to_rgb(bgr, size))
    finally:
        cap.release()
    if not frames:
        raise InputError(f"video {path} has no decodable frames")
    return frames


def load_video(path, max_frames: int | None = None, resize=None, min_frames: int = 2) -> np.ndarray:
    """Read a video as ``[T, H, W, 3]`` uint8 RGB.

    ``path``: a video file (mp4, avi, mov, mkv, m4v, webm), a folder of image frames (natural sort
    order: ``f2.png`` before ``f10.png``), or a sequence folder in the original's layout (its
    ``color/`` is read). ``max_frames``: keep the first ones. ``resize``: ``(h, w)``, or an int max
    side (aspect kept, never enlarges). Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` for unreadable, empty or too short (``< min_frames``) input.
    """
    path = os.fspath(path)
    if max_frames is not None and (not isinstance(max_frames, (int, np.integer)) or max_frames < 1):
        raise InputError(f"max_frames must be a positive int or None, got {max_frames!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"video path {path} does not exist")
    if os.path.isdir(path):
        color = os.path.join(path, "color")
        frames = _read_folder(color if os.path.isdir(color) else path, max_frames, resize)
    else:
        frames = _read_file(path, max_frames, resize)
    if len(frames) < min_frames:
        raise InputError(f"{path} has {len(frames)} frame(s), need at least {min_frames}")
    return np.stack(frames)


def write_frames(frames: np.ndarray, folder, progress: bool = False, frame_format: str = "jpg") -> str:
    """Write ``frames [T, H, W, 3]`` uint8 RGB as ``folder/color/00000.jpg ...`` (JPEG quality 95,
    4:4:4; ``frame_format="png"``: lossless ``00000.png ...``), each file atomically. Refuses (writing
    nothing) when ``color/`` holds frames other than ``00000.jpg .. {T-1}.jpg`` (or ``.png``).
    Returns the ``color`` folder's path."""
    if frame_format not in FRAME_FORMATS:
        raise InputError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    frames = check_frames(frames)
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    color = os.path.join(folder, "color")
    if os.path.isdir(color):
        ours = {frame_name(i, frame_format) for i in range(len(frames))}
        stale = [os.path.basename(p) for p in frame_files(color) if os.path.basename(p) not in ours]
        if stale:
            listed = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            raise InputError(f"{color} already holds other frames ({listed}); they would mix with this video: "
                             "use an empty folder")
    os.makedirs(color, exist_ok=True)
    for i, rgb in enumerate(tqdm(frames, desc="write frames", disable=not progress)):
        with atomic_output(os.path.join(color, frame_name(i, frame_format))) as tmp:
            if not cv2.imwrite(tmp, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _WRITE_PARAMS[frame_format]):
                raise OSError(f"OpenCV failed to write {tmp}")
    return color


def _write_pyav(frames: np.ndarray, tmp: str, fps: float) -> None:
    import av  # optional dependency (extra "video")

    with av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_opencv(frames: np.ndarray, tmp: str, fps: float) -> None:
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    try:
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot open an mp4v writer for {tmp}")
        for rgb in frames:
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _have_pyav() -> bool:
    try:
        import av
    except ImportError:
        return False
    return "libx264" in av.codecs_available


def write_video(frames: np.ndarray, path, fps: float = 10) -> str:
    """Write ``frames [T, H, W, 3]`` uint8 RGB as an mp4: H.264 (yuv420p, browser-playable) through
    PyAV when it is installed, else OpenCV's mp4v. Both need even sizes (OpenCV would silently crop),
    so an odd height or width is padded by repeating the last row or column. Written to a temporary
    file, then renamed. Returns ``path``."""
    frames = check_frames(frames)
    path = os.fspath(path)
    if not path.lower().endswith(".mp4"):
        raise InputError(f"write_video writes mp4 files; {path} does not end in .mp4")
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and np.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_output(path) as tmp:
        (_write_pyav if _have_pyav() else _write_opencv)(frames, tmp, fps)
    return path

"""User input, checked: the one error type for bad input, and the readers of the files users pass.

fastomni raises :class:`InputError` (a ``ValueError``; :class:`InputTypeError` is also a
``TypeError``) when the input itself is wrong: a malformed file, an impossible option, query points
outside the video. The command line prints those, and missing files (``FileNotFoundError``), as one
line; any other exception is a bug in fastomni and shows its traceback.

Example::

    >>> import numpy as np
    >>> check_query_points([[0, 2.0, 3.0]], num_frames=4, h=8, w=8).tolist()
    [[0.0, 2.0, 3.0]]
    >>> check_query_points(np.zeros((0, 3)), num_frames=4, h=8, w=8)
    Traceback (most recent call last):
    ...
    fastomni.inputs.InputError: no query points: need an [N, 3] array with N >= 1, got shape (0, 3)
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile

import numpy as np

__all__ = ["InputError", "InputTypeError", "USER_ERRORS", "as_input_errors", "check_query_points", "load_array",
           "read_json", "require_keys"]


class InputError(ValueError):
    """Bad input (a file, an option, an array): a one-line message naming the problem."""


class InputTypeError(InputError, TypeError):
    """Bad input of the wrong type or dtype."""


# What the command line reports as one line: bad input, and paths that are missing or of the wrong kind.
USER_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)

@contextlib.contextmanager
def as_input_errors():
    """Report the ``ValueError``/``TypeError``/``KeyError`` of the code inside as :class:`InputError`:
    only around calls whose such errors are all checks of their arguments (the config parser, the
    synthetic clip's and TAP-Vid's options), never around computation."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)) from None


_MAGIC = {b"\x93NUMPY": ".npy", b"PK\x03\x04": ".npz"}


def load_array(path: str, what: str, kind: str = ".npy"):
    """Read the NumPy file ``path`` (``kind`` ``".npy"``: one array; ``".npz"``: an archive, returned
    open as ``np.lib.npyio.NpzFile``), without unpickling. ``what`` names the file in errors
    ("query file", "track file", ...). Raises ``FileNotFoundError`` or :class:`InputError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        head = f.read(6)
    found = next((ext for magic, ext in _MAGIC.items() if head.startswith(magic)), None)
    if found != kind:
        is_ = f"a NumPy {found} file" if found else "not a NumPy file"
        raise InputError(f"{what} {path} is {is_}; expected a NumPy {kind} file")
    try:
        data = np.load(path, allow_pickle=False)
        if kind == ".npz":
            data.files  # noqa: B018 - reads the archive's directory: a truncated zip fails here
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{what} {path} is not a readable {kind} file: {exc}") from None
    return data


def read_json(path: str, what: str, keys=()) -> dict:
    """The JSON object in ``path``, which must hold ``keys``; raises ``FileNotFoundError`` or
    :class:`InputError` naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from None
    return require_keys(data, keys, f"{what} {path}")


def require_keys(data, keys, where: str) -> dict:
    """``data`` if it is a dict holding every key of ``keys``; else :class:`InputError` saying that
    ``where`` holds something else or lacks some keys."""
    if not isinstance(data, dict):
        raise InputError(f"{where} holds a {type(data).__name__}, not a mapping")
    missing = [str(k) for k in keys if k not in data]
    if missing:
        raise InputError(f"{where} is missing {', '.join(missing)}")
    return data


def check_query_points(query_points, num_frames: int, h: int, w: int) -> np.ndarray:
    """Validate query points ``[N, 3]`` rows (t, y, x), ``N >= 1``: t an integer frame index, (x, y)
    inside the ``h x w`` image (half a pixel of slack at the borders: the image covers
    ``[-0.5, w - 0.5] x [-0.5, h - 0.5]``, pixel centres at integers). Returns them as float64
    ``[N, 3]``; raises :class:`InputError` naming the first bad point."""
    q = np.asarray(query_points)
    if q.dtype.kind not in "iuf":
        raise InputTypeError(f"query points must be numbers, got dtype {q.dtype}")
    if q.ndim != 2 or q.shape[1] != 3:
        raise InputError(f"query points must have shape [N, 3] with rows (t, y, x), got {q.shape}")
    if len(q) == 0:
        raise InputError(f"no query points: need an [N, 3] array with N >= 1, got shape {q.shape}")
    q = q.astype(np.float64)
    if not np.isfinite(q).all():
        raise InputError(f"query points contain NaN or infinity ({int((~np.isfinite(q)).any(1).sum())} rows)")
    t, y, x = q[:, 0], q[:, 1], q[:, 2]
    bad_t = (t != np.round(t)) | (t < 0) | (t >= num_frames)
    if bad_t.any():
        bad = q[bad_t][0]
        raise InputError(f"query point (t={bad[0]}, y={bad[1]}, x={bad[2]}): t must be a frame index in "
                         f"0..{num_frames - 1}")
    outside = (x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)
    if outside.any():
        bad = q[outside][0]
        raise InputError(f"query point (t={int(bad[0])}, y={bad[1]}, x={bad[2]}) lies outside the {w}x{h} "
                         f"image ({int(outside.sum())} such points)")
    return q

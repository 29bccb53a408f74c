"""fastomni.io: reading videos and frame folders, writing the color/ layout and mp4s."""
from __future__ import annotations

import os

import av
import cv2
import numpy as np
import pytest

from fastomni import io as fio
from fastomni.inputs import InputError
from fastomni.io import atomic_output, frame_files, load_video, write_frames, write_video


def smooth_video(t=4, h=32, w=48, seed=0):
    """Smooth colour content (compresses well, so lossy round trips stay close)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(40, 215, size=(t, 3, 4, 3)).astype(np.float32)
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in small]).clip(0, 255).astype(np.uint8)


def mean_abs_diff(a, b):
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()


def listing(folder):
    return sorted(os.listdir(folder))


def test_write_frames_layout_and_round_trip(tmp_path):
    frames = smooth_video()
    color = write_frames(frames, tmp_path / "seq")
    assert color == os.path.join(tmp_path / "seq", "color")
    assert listing(color) == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]  # no temp files left
    back = load_video(tmp_path / "seq")
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert mean_abs_diff(back, frames) < 1.0  # JPEG quality 95, 4:4:4
    np.testing.assert_array_equal(back, load_video(color))


def test_write_frames_png_is_lossless(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 9, 13, 3), dtype=np.uint8)
    color = write_frames(frames, tmp_path / "seq", frame_format="png")
    assert listing(color) == ["00000.png", "00001.png", "00002.png"]
    np.testing.assert_array_equal(load_video(tmp_path / "seq"), frames)
    with pytest.raises(InputError, match="other frames"):  # PNGs and JPEGs of two videos never mix
        write_frames(frames, tmp_path / "seq")
    with pytest.raises(InputError, match="frame_format must be one of"):
        write_frames(frames, tmp_path / "other", frame_format="gif")
    assert not (tmp_path / "other").exists()


def test_folder_of_frames_natural_order_and_rgb(tmp_path):
    # f10 must come after f2; lossless PNGs so values are exact. Distinct R, G, B per frame checks
    # the BGR -> RGB conversion.
    for i in (1, 2, 10):
        img = np.zeros((8, 12, 3), np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = i, 100 + i, 200 + i  # BGR on disk
        cv2.imwrite(str(tmp_path / f"f{i}.png"), img)
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [os.path.basename(p) for p in frame_files(tmp_path)] == ["f1.png", "f2.png", "f10.png"]
    video = load_video(tmp_path)
    assert video.shape == (3, 8, 12, 3)
    assert video[:, 0, 0].tolist() == [[201, 101, 1], [202, 102, 2], [210, 110, 10]]


def test_max_frames_and_resize(tmp_path):
    write_frames(smooth_video(t=5, h=48, w=64), tmp_path)
    assert load_video(tmp_path, max_frames=3).shape == (3, 48, 64, 3)
    assert load_video(tmp_path, resize=32).shape == (5, 24, 32, 3)  # longer side 64 -> 32
    assert load_video(tmp_path, resize=1000).shape == (5, 48, 64, 3)  # a max side never enlarges
    assert load_video(tmp_path, resize=(10, 20)).shape == (5, 10, 20, 3)


@pytest.mark.parametrize("resize", [1, (1, 20), (10,), 2.5, "32", True])
def test_bad_resize(tmp_path, resize):
    write_frames(smooth_video(t=2), tmp_path)
    with pytest.raises((ValueError, TypeError), match="resize"):
        load_video(tmp_path, resize=resize)


def test_pyav_h264_round_trip_and_odd_size(tmp_path):
    frames = smooth_video(t=6, h=32, w=48)
    path = write_video(frames, tmp_path / "v.mp4", fps=12.5)
    assert listing(tmp_path) == ["v.mp4"]
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].average_rate == 12.5
    back = load_video(path)
    assert back.shape == frames.shape
    assert mean_abs_diff(back, frames) < 4.0
    odd = smooth_video(t=3, h=33, w=47)
    back = load_video(write_video(odd, tmp_path / "odd.mp4"))
    assert back.shape == (3, 34, 48, 3)  # padded by one edge pixel for yuv420p
    assert mean_abs_diff(back[:, :33, :47], odd) < 4.0


def test_opencv_mp4v_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_have_pyav", lambda: False)
    frames = smooth_video(t=5, h=33, w=47)
    path = write_video(frames, tmp_path / "v.mp4")
    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    back = load_video(path)
    assert back.shape == (5, 34, 48, 3)  # padded, not cropped
    assert mean_abs_diff(back[:, :33, :47], frames) < 6.0  # mp4v is a weaker codec than H.264


def test_reads_avi(tmp_path):
    frames = smooth_video(t=4)
    writer = cv2.VideoWriter(str(tmp_path / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 32))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    back = load_video(tmp_path / "v.avi", max_frames=3)
    assert back.shape == (3, 32, 48, 3) and mean_abs_diff(back, frames[:3]) < 4.0


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")


def test_unreadable_video(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="bad.mp4"):
        load_video(tmp_path / "bad.mp4")


def test_not_a_video_file(tmp_path):
    (tmp_path / "clip.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a video file"):
        load_video(tmp_path / "clip.txt")


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no image frames"):
        load_video(tmp_path)


def test_too_short(tmp_path):
    write_frames(smooth_video(t=1), tmp_path)
    with pytest.raises(ValueError, match="1 frame.*at least 2"):
        load_video(tmp_path)
    assert load_video(tmp_path, min_frames=1).shape[0] == 1


def test_corrupt_frame_named(tmp_path):
    write_frames(smooth_video(t=3), tmp_path)
    (tmp_path / "color" / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="00001.jpg"):
        load_video(tmp_path)


def test_frames_of_different_sizes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="same size"):
        load_video(tmp_path)


def test_bad_max_frames(tmp_path):
    write_frames(smooth_video(t=2), tmp_path)
    with pytest.raises(ValueError, match="max_frames"):
        load_video(tmp_path, max_frames=0)


@pytest.mark.parametrize("frames, error", [
    (np.zeros((2, 8, 8, 3), np.float32), TypeError),
    (np.zeros((2, 8, 8), np.uint8), ValueError),
    (np.zeros((2, 8, 8, 4), np.uint8), ValueError),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError),
    ([[0]], TypeError),
])
def test_write_bad_frames_writes_nothing(tmp_path, frames, error):
    with pytest.raises(error):
        write_frames(frames, tmp_path / "seq")
    with pytest.raises(error):
        write_video(frames, tmp_path / "v.mp4")
    assert listing(tmp_path) == []


def test_write_video_bad_arguments(tmp_path):
    frames = smooth_video(t=2)
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_video(frames, tmp_path / "v.avi")
    for fps in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="fps"):
            write_video(frames, tmp_path / "v.mp4", fps=fps)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_video(frames, tmp_path / "missing" / "v.mp4")
    assert listing(tmp_path) == []


def test_write_frames_into_a_file_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_frames(smooth_video(t=2), tmp_path / "f")


def test_write_frames_refuses_to_mix_videos(tmp_path):
    write_frames(smooth_video(t=4), tmp_path)
    with pytest.raises(ValueError, match="00003.jpg"):
        write_frames(smooth_video(t=3, seed=1), tmp_path)
    assert mean_abs_diff(load_video(tmp_path), smooth_video(t=4)) < 1.0  # untouched
    write_frames(smooth_video(t=4, seed=1), tmp_path)  # same names: overwritten in place
    assert mean_abs_diff(load_video(tmp_path), smooth_video(t=4, seed=1)) < 1.0


def test_atomic_output_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as tmp:
            np.save(tmp, np.zeros(3))
            raise RuntimeError("boom")
    assert listing(tmp_path) == []
    with atomic_output(str(target)) as tmp:
        assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)
        np.save(tmp, np.arange(3))
    assert listing(tmp_path) == ["out.npy"]
    np.testing.assert_array_equal(np.load(target), np.arange(3))

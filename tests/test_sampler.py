"""The training-pair sampler against the original's loaders/raft.py rules, on a hand-made sequence
whose flows, masks and counts are known exactly."""
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

from fastomni.nn import OmniMotion
from fastomni.sampler import INTERVAL_GROWTH_STEPS, PairSampler, error_cache_path
from fastomni.train import check_batch

T, H, W = 6, 10, 12


def flow_of(i, j):
    """The constant flow of pair (i, j) in the hand-made sequence."""
    return np.array([0.37 * (j - i) + 0.113, -0.21 * (j - i) + 0.057], np.float32)


def make_sequence(root, t=T, h=H, w=W, counts=None, empty_pairs=(), count_map=None):
    """A sequence folder in the original's layout: frames ``color/0000k.jpg``; constant flows
    ``flow_of(i, j)``; masks with R (cycle-consistent) on the left half, G (occluded-recoverable)
    on the top-right quadrant, nothing elsewhere (pairs in ``empty_pairs``: no mask at all);
    count maps ``count_map`` (default zeros); flow_stats ``counts[i][j]`` (default ``10 + i + j``)."""
    rng = np.random.default_rng(1)
    names = [f"{k:05d}.jpg" for k in range(t)]
    for d in ("color", "raft_exhaustive", "raft_masks", "count_maps"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for k, n in enumerate(names):
        cv2.imwrite(os.path.join(root, "color", n), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        cm = np.zeros((h, w), np.uint16) if count_map is None else count_map.astype(np.uint16)
        cv2.imwrite(os.path.join(root, "count_maps", n.replace(".jpg", ".png")), cm)
    stats = {}
    for i in range(t):
        stats[names[i]] = {}
        for j in range(t):
            if i == j:
                continue
            np.save(os.path.join(root, "raft_exhaustive", f"{names[i]}_{names[j]}.npy"),
                    np.broadcast_to(flow_of(i, j), (h, w, 2)).copy())
            mask = np.zeros((h, w, 3), np.uint8)  # RGB
            if (i, j) not in empty_pairs:
                mask[:, : w // 2, 0] = 255
                mask[: h // 2, w // 2:, 1] = 255
            cv2.imwrite(os.path.join(root, "raft_masks", f"{names[i]}_{names[j]}.png"), mask[..., ::-1])
            stats[names[i]][names[j]] = (10 + i + j) if counts is None else counts[i][j]
    with open(os.path.join(root, "flow_stats.json"), "w") as f:
        json.dump(stats, f)
    return str(root)


@pytest.fixture
def seq(tmp_path):
    return make_sequence(tmp_path / "seq")


def test_batches_are_deterministic_and_well_formed(seq):
    a = PairSampler(seq, num_pairs=3, num_pts=7, seed=5).sample(step=1)
    b = PairSampler(seq, num_pairs=3, num_pts=7, seed=5).sample(step=1)
    c = PairSampler(seq, num_pairs=3, num_pts=7, seed=6).sample(step=1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert a["ids1"].dtype == torch.long and a["pts1"].shape == (3, 7, 2) and a["gt_rgb1"].shape == (3, 7, 3)
    assert a["weights"].shape == (3, 7, 1) and a["pts2"].dtype == torch.float32
    check_batch(OmniMotion(num_imgs=T, h=H, w=W, num_samples_ray=2), a)


def test_pairs_follow_flow_masks_weights_and_swaps(seq):
    s = PairSampler(seq, num_pairs=1, num_pts=40, start_interval=3, seed=0, use_count_map=False)
    frames = s.images.astype(np.float32) / 255
    swapped = unswapped = 0
    for _ in range(60):
        p = s.sample_pair(step=0)
        i, j, pts1, pts2, w = p["ids1"], p["ids2"], p["pts1"], p["pts2"], p["weights"][:, 0]
        assert 1 <= abs(i - j) <= 3
        d = pts2 - pts1
        weight = math.cos((abs(i - j) - 1) / 3 * math.pi / 2)
        if (pts1 == np.round(pts1)).all():  # drawn as (i, j): pixels of frame i
            unswapped += 1
            src = pts1
            np.testing.assert_allclose(d, np.broadcast_to(flow_of(i, j), d.shape), atol=1e-6)
            np.testing.assert_allclose(w, weight, rtol=1e-6)
        else:  # drawn as (j, i) and swapped: pts1 came from the flow
            swapped += 1
            np.testing.assert_allclose(d, np.broadcast_to(-flow_of(j, i), d.shape), atol=1e-6)
            src = pts2
            cycle = src[:, 0] < W // 2
            np.testing.assert_allclose(w[cycle], weight, rtol=1e-6)
            assert (w[~cycle] == 0).all()  # not cycle-consistent: weight 0 after swapping
        assert (src == np.round(src)).all()  # source pixels are on the grid
        if abs(i - j) > 1:  # only cycle-consistent or occluded-recoverable pixels
            assert ((src[:, 0] < W // 2) | (src[:, 1] < H // 2)).all()
        # gt_rgb1 is frame ids1's colour at pts1 (bilinear where pts1 is off-grid)
        x, y = pts1[0]
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0

        def px(yy, xx, img=frames[i]):
            return img[yy, xx] if 0 <= yy < H and 0 <= xx < W else np.zeros(3, np.float32)

        want = ((1 - fx) * (1 - fy) * px(y0, x0) + fx * (1 - fy) * px(y0, x0 + 1)
                + (1 - fx) * fy * px(y0 + 1, x0) + fx * fy * px(y0 + 1, x0 + 1))
        np.testing.assert_allclose(p["gt_rgb1"][0], want, atol=1e-5)
    assert swapped > 10 and unswapped > 10


def test_target_frame_distribution(seq):
    s = PairSampler(seq, seed=0)
    i, m = 2, 3
    cands = [j for j in range(T) if j != i and abs(j - i) <= m]
    counts = np.array([10 + i + j for j in range(T) if j != i], float)
    share = dict(zip([j for j in range(T) if j != i], counts / counts.sum()))
    p = np.array([share[j] for j in cands])
    p /= p.sum()
    p[np.abs(np.array(cands) - i) <= 1] = 0.5
    p /= p.sum()
    draws = np.array([s._draw_target(i, m) for _ in range(6000)])
    freq = np.array([(draws == j).mean() for j in cands])
    np.testing.assert_allclose(freq, p, atol=0.025)


def test_uniform_pair_sampling(seq):
    """``pair_sampling="uniform"``: targets uniform among the frame's pairs within the interval, and
    every valid pair weighted 1 (0 only where the original also gives 0)."""
    s = PairSampler(seq, seed=0, pair_sampling="uniform")
    i, m = 2, 3
    cands = [j for j in range(T) if j != i and abs(j - i) <= m]
    draws = np.array([s._draw_target(i, m) for _ in range(6000)])
    np.testing.assert_allclose([(draws == j).mean() for j in cands], 1 / len(cands), atol=0.025)
    original = PairSampler(seq, seed=0)
    for step in range(20):
        a, b = s.sample(step), original.sample(step)
        assert set(np.unique(a["weights"])) <= {0.0, 1.0}
        assert (b["weights"] < 1).any()
    with pytest.raises(ValueError, match="pair_sampling"):
        PairSampler(seq, pair_sampling="cosine")


def test_max_interval_grows_and_is_capped(seq):
    s = PairSampler(seq, start_interval=2)
    assert s.max_interval(0) == 2
    assert s.max_interval(2 * INTERVAL_GROWTH_STEPS) == 4
    assert s.max_interval(100 * INTERVAL_GROWTH_STEPS) == T - 1


def test_empty_mask_gives_zero_weight_and_any_pixel(tmp_path):
    empty = {(i, j) for i in range(T) for j in range(T) if abs(i - j) > 1}
    seq = make_sequence(tmp_path / "seq", empty_pairs=empty)
    s = PairSampler(seq, num_pts=30, start_interval=5, seed=0)
    seen = 0
    for _ in range(40):
        p = s.sample_pair(step=0)
        if abs(p["ids1"] - p["ids2"]) > 1:
            seen += 1
            assert (p["weights"] == 0).all()
    assert seen > 5


def test_count_map_weighting(tmp_path):
    cm = np.zeros((H, W))
    cm[:, : W // 2] = 255 ** 2 - 1  # weight 1/255 against 1 on the right half
    seq = make_sequence(tmp_path / "seq", count_map=cm)
    s = PairSampler(seq, num_pts=H * W // 4, start_interval=1, seed=0)  # adjacent pairs: every pixel valid
    left = []
    for _ in range(30):
        p = s.sample_pair(step=0)
        src = p["pts1"] if (p["pts1"] == np.round(p["pts1"])).all() else p["pts2"]
        left.append((src[:, 0] < W // 2).mean())
    assert np.mean(left) < 0.05


def test_hard_mining_cache_drives_frames_and_pixels(seq, tmp_path):
    s = PairSampler(seq, num_pts=20, start_interval=1, seed=0)
    ids1, ids2 = s.cache_pairs()
    np.testing.assert_array_equal(ids1, np.arange(T))
    np.testing.assert_array_equal(ids2, [1, 2, 3, 4, 5, 4])
    pred = np.stack([np.broadcast_to(flow_of(i, j), (H, W, 2)) for i, j in zip(ids1, ids2)]).copy()
    pred[3, 6:, 8:] += 4.0  # frame 3's prediction is wrong in its bottom-right corner only
    s.set_error_cache(pred, step=7, folder=str(tmp_path / "run"))
    assert os.path.isfile(error_cache_path(str(tmp_path / "run"), 7))
    assert s.frame_errors[3] > 0 and (np.delete(s.frame_errors, 3) == 0).all()
    corner = []
    for _ in range(20):
        p = s.sample_pair(step=0)
        assert 3 in (p["ids1"], p["ids2"])  # frame i is drawn by error: only frame 3 has any
        src = p["pts1"] if p["ids1"] == 3 else p["pts2"]
        corner.append(((src[:, 0] >= 7) & (src[:, 1] >= 5)).mean())  # the blurred error region
    # 20 of 40 candidates drawn by error (all in the region), 20 uniform: about 55% kept there
    assert 0.4 < np.mean(corner) < 0.75


def test_state_dict_resumes_the_same_stream(seq, tmp_path):
    run = str(tmp_path / "run")
    a = PairSampler(seq, num_pts=9, seed=3)
    pred = np.zeros((T, H, W, 2), np.float32)
    a.set_error_cache(pred + 1, step=4, folder=run)
    a.sample(step=5)
    state = a.state_dict()
    want = [a.sample(step=6 + k) for k in range(3)]
    b = PairSampler(seq, num_pts=9, seed=99)
    b.load_state_dict(state, run)
    got = [b.sample(step=6 + k) for k in range(3)]
    for x, y in zip(want, got):
        for k in x:
            assert torch.equal(x[k], y[k])
    os.remove(error_cache_path(run, 4))
    with pytest.raises(FileNotFoundError, match="hard-mining cache"):
        PairSampler(seq).load_state_dict(state, run)


def test_bad_sequences(tmp_path):
    with pytest.raises(FileNotFoundError, match="no color/"):
        PairSampler(str(tmp_path))
    seq = make_sequence(tmp_path / "seq")
    os.remove(os.path.join(seq, "count_maps", "00002.png"))
    with pytest.raises(ValueError, match="00002.png"):
        PairSampler(seq)
    s = PairSampler(seq, use_count_map=False, num_pairs=1, seed=0)
    np.save(os.path.join(seq, "raft_exhaustive", "00000.jpg_00001.jpg.npy"), np.zeros((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="must have shape"):
        s._flow(0, 1)
    os.remove(os.path.join(seq, "raft_exhaustive", "00000.jpg_00001.jpg.npy"))
    with pytest.raises(FileNotFoundError, match="00000.jpg_00001.jpg.npy"):
        s._flow(0, 1)
    with open(os.path.join(seq, "flow_stats.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PairSampler(seq)
    with pytest.raises(ValueError, match="num_pairs"):
        PairSampler(seq, num_pairs=0)
    with pytest.raises(ValueError, match="pred_flows"):
        s.set_error_cache(np.zeros((2, 2)), step=1)

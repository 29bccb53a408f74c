"""fastomni.refine: the banded solver against a dense one, and the track refinement against the
energy of its docstring, solved directly, on a hand-made sequence with known flow."""
import os

import cv2
import numpy as np
import pytest

from conftest import TOLERANCES
from fastomni.inputs import InputError
from fastomni.io import frame_name, load_video, write_frames
from fastomni.config import preset
from fastomni.refind import PATCH, FrameFeatures, refind_lost
from fastomni.refine import (banded_cholesky_solve, flow_noise, flow_spread, refine_tracks, run_refiner,
                             select_flow, surface_support)
from fastomni.subpixel import align_to_query

F64 = TOLERANCES[__import__("torch").float64]
PIXELS = TOLERANCES["float32_pixels"]


def _dense(band):
    """[T, k + 1, N] lower band -> [N, T, T] matrices."""
    t, k1, n = band.shape
    a = np.zeros((n, t, t))
    for i in range(t):
        for d in range(min(i, k1 - 1) + 1):
            a[:, i, i - d] = a[:, i - d, i] = band[i, d]
    return a


@pytest.mark.parametrize("t,k", [(1, 1), (2, 1), (7, 3), (13, 4), (5, 9)])
def test_banded_cholesky_solve_matches_dense(t, k):
    rng = np.random.default_rng(t * 10 + k)
    band = rng.normal(size=(t, k + 1, 3))
    band[:, 0] = np.abs(band[:, 0]) + 2 * (k + 1)  # diagonally dominant: positive definite
    rhs = rng.normal(size=(t, 3, 2))
    expected = np.linalg.solve(_dense(band), rhs.transpose(1, 0, 2))
    np.testing.assert_allclose(banded_cholesky_solve(band, rhs), expected.transpose(1, 0, 2), **F64)


def _sequence(folder, num, h, w, step=(1.0, 0.0), cycle=True, bad_frame=None, frames=None):
    """A sequence whose flow a -> b is ``(b - a) * step`` everywhere (cycle-consistent unless
    ``cycle`` is False); pairs into and out of ``bad_frame`` are off by 4 px. Black frames unless
    ``frames [num, h, w, 3]`` uint8 are given."""
    write_frames(np.zeros((num, h, w, 3), np.uint8) if frames is None else frames, folder)
    os.makedirs(os.path.join(folder, "raft_exhaustive"))
    os.makedirs(os.path.join(folder, "raft_masks"))
    for a in range(num):
        for b in range(num):
            if a == b:
                continue
            flow = np.broadcast_to(np.float32((b - a) * np.array(step)), (h, w, 2)).copy()
            if bad_frame is not None and bad_frame in (a, b) and abs(a - b) > 1:
                flow[..., 1] += 4.0
            np.save(os.path.join(folder, "raft_exhaustive", f"{frame_name(a)}_{frame_name(b)}.npy"), flow)
            rgb = np.zeros((h, w, 3), np.uint8)
            rgb[..., 0] = 255 * cycle
            cv2.imwrite(os.path.join(folder, "raft_masks", f"{frame_name(a)}_{frame_name(b)}.png"), rgb[..., ::-1])
    return folder


def _energy_minimum(model, q, num, step, max_interval, prior, smooth):
    """The refinement's quadratic (module docstring), every flow valid and every frame visible,
    solved densely with the query frame eliminated."""
    out = np.empty_like(model)
    second = np.zeros((num - 2, num))  # rows: x_{c-1} - 2 x_c + x_{c+1}
    for c in range(1, num - 1):
        second[c - 1, c - 1:c + 2] = (1.0, -2.0, 1.0)
    for p in range(len(model)):
        a_mat, rhs = prior * np.eye(num) + smooth * second.T @ second, prior * model[p].copy()
        for a in range(num):
            for b in range(num):
                d = abs(a - b)
                if 0 < d <= max_interval:
                    w, f = 1.0 / d, (b - a) * np.asarray(step)
                    a_mat[[a, b], [a, b]] += w
                    a_mat[a, b] -= w
                    a_mat[b, a] -= w
                    rhs[b] += w * f
                    rhs[a] -= w * f
        qt = int(q[p, 0])
        free = [i for i in range(num) if i != qt]
        fixed = q[p, [2, 1]]
        sol = np.linalg.solve(a_mat[np.ix_(free, free)], rhs[free] - a_mat[free, qt][:, None] * fixed)
        out[p, free], out[p, qt] = sol, fixed
    return out


@pytest.mark.parametrize("max_interval", [1, 3])
def test_refine_solves_its_energy(tmp_path, max_interval):
    num, h, w, step = 7, 20, 24, (1.0, 0.5)
    seq = _sequence(str(tmp_path / "seq"), num, h, w, step)
    rng = np.random.default_rng(0)
    q = np.array([[0, 5.0, 3.0], [3, 10.0, 9.0], [6, 14.0, 16.0]])
    truth = q[:, None, [2, 1]] + (np.arange(num)[None, :, None] - q[:, None, :1]) * np.array(step)
    model = truth + rng.normal(scale=0.7, size=truth.shape)
    occluded = np.zeros((3, num), bool)
    tracks, occ = refine_tracks(model, occluded, q, seq, max_interval=max_interval, prior=0.005)
    assert tracks.dtype == np.float32 and occ.dtype == bool and tracks.shape == model.shape
    expected = _energy_minimum(model, q, num, step, max_interval, 0.005, 0.5)
    np.testing.assert_allclose(tracks, expected, **PIXELS)
    # The flow pulls the noisy model onto the true motion, and the query frame is the query.
    assert np.abs(tracks - truth).max() < 0.1 * np.abs(model - truth).max()
    np.testing.assert_array_equal(tracks[np.arange(3), q[:, 0].astype(int)], q[:, [2, 1]].astype(np.float32))
    assert not occ.any()


def _sheared_pair(h=32, w=32, seed=0):
    """Two frames of two textured surfaces either side of column 15.5: the left one moves 2 px
    down, the right one 1 px up. Returns the frames ``[H, W, 3]`` float32 and the flow as DIS
    blurs it (the vertical motion ramps from 2 to -1 over columns 13-19)."""
    rng = np.random.default_rng(seed)
    left, right = rng.uniform(0, 255, (2, h + 4, w, 3)).astype(np.float32)  # rows -2 .. h + 1
    a, b = np.empty((2, h, w, 3), np.float32)
    a[:, :16], a[:, 16:] = left[2:h + 2, :16], right[2:h + 2, 16:]
    b[:, :16], b[:, 16:] = left[0:h, :16], right[3:h + 3, 16:]  # b(x, y + 2) = a(x, y) on the left
    blurred = np.zeros((h, w, 2), np.float32)
    blurred[:, :16, 1], blurred[:, 16:, 1] = 2.0, -1.0
    blurred[:, 13:20, 1] = np.linspace(2.0, -1.0, 7, dtype=np.float32)
    return a, b, blurred


def test_flow_spread_is_the_largest_channel_range_over_the_square():
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(9, 11, 2)).astype(np.float32)
    want = np.empty((9, 11), np.float32)
    for y in range(9):
        for x in range(11):
            box = flow[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3].reshape(-1, 2)
            want[y, x] = (box.max(0) - box.min(0)).max()
    np.testing.assert_array_equal(flow_spread(flow, 2), want)


def test_select_flow_takes_the_motion_of_the_surface_the_point_is_on():
    a, b, blurred = _sheared_pair()
    cycle_ok = np.full(a.shape[:2], 255, np.float32)
    cycle_ok[:, 14:19] = 0  # the blended columns fail the cycle check
    near = np.array([[13.5, 10.25], [14.0, 7.5], [15.0, 20.75], [16.0, 10.25], [16.5, 12.0], [17.5, 5.5]], np.float32)
    far = np.array([[5.0, 10.25], [26.5, 12.75]], np.float32)
    xa = np.concatenate([near, far])
    expected = np.where(xa[:, :1] < 15.5, [0.0, 2.0], [0.0, -1.0])

    bilinear, bilinear_ok = select_flow(blurred, cycle_ok, a, b, xa, noise=0.0, radius=0)
    assert (np.abs(bilinear[:len(near), 1] - expected[:len(near), 1]) >= 0.25).all()  # the blend is off
    assert (bilinear_ok[:len(near)] < 255).all()

    chosen, chosen_ok = select_flow(blurred, cycle_ok, a, b, xa, noise=0.0, radius=3)
    np.testing.assert_allclose(chosen, expected, atol=1e-6)
    np.testing.assert_array_equal(chosen_ok, 255)  # the flag of the pixel the vector came from
    np.testing.assert_array_equal(chosen[len(near):], bilinear[len(near):])  # uniform flow: untouched

    # A neighbour must beat the bilinear vector by more than the noise.
    np.testing.assert_array_equal(select_flow(blurred, cycle_ok, a, b, xa, noise=1e9, radius=3)[0], bilinear)
    # Within 1 px, some points have only blended neighbours.
    narrow, _ = select_flow(blurred, cycle_ok, a, b, xa, noise=0.0, radius=1)
    assert (np.abs(narrow[:len(near), 1] - expected[:len(near), 1]) > 1e-3).any()


def test_refine_follows_the_surface_the_point_is_on(tmp_path):
    """A point 1.5 px left of an edge whose flow DIS blurs: refined with the flow's candidates it
    moves with its own surface (2 px down); with the bilinear flow only, with the blend (1.5 px)."""
    a, b, blurred = _sheared_pair()
    frames = np.rint(np.stack([a, b])).astype(np.uint8)
    seq = _sequence(str(tmp_path / "seq"), 2, 32, 32, frames=frames)
    np.save(os.path.join(seq, "raft_exhaustive", f"{frame_name(0)}_{frame_name(1)}.npy"), blurred)
    np.save(os.path.join(seq, "raft_exhaustive", f"{frame_name(1)}_{frame_name(0)}.npy"), -blurred)  # reversed
    q = np.array([[0, 10.25, 14.0]])
    model = np.array([[[14.0, 10.25], [14.0, 11.0]]])
    refined, _ = refine_tracks(model, np.zeros((1, 2), bool), q, seq, max_interval=1, smooth=0.0)
    np.testing.assert_allclose(refined[0, 1], [14.0, 12.25], atol=0.01)
    bilinear, _ = refine_tracks(model, np.zeros((1, 2), bool), q, seq, max_interval=1, smooth=0.0, candidate_radius=0)
    assert abs(bilinear[0, 1, 1] - 12.25) > 0.3


def test_flow_noise_is_the_median_colour_difference_of_consistent_pixels():
    rng = np.random.default_rng(1)
    texture = rng.uniform(0, 255, (70, 64, 3)).astype(np.float32)
    a, b = texture[3:67].copy(), texture[0:64].copy()  # b(x, y + 3) = a(x, y)
    flow = np.zeros((64, 64, 2), np.float32)
    flow[..., 1] = 3.0
    inside = np.ones((64, 64), bool)
    inside[-3:] = False  # rows whose flow ends outside b
    assert flow_noise(flow, inside, a, b) == 0.0
    sigma = 5.0
    noisy_a, noisy_b = (x + rng.normal(0, sigma, x.shape).astype(np.float32) for x in (a, b))
    # The mean over 3 channels of (2 sigma^2) chi^2_1 draws: median (2 sigma^2 / 3) * 2.366 = 39.4.
    noise = flow_noise(flow, inside, noisy_a, noisy_b)
    assert 39.4 * 0.9 < noise < 39.4 * 1.1
    wrong = flow.copy()
    wrong[:, 32:] = 7.0  # wrong flow where the cycle check fails: not counted
    inside[:, 32:] = False
    assert 39.4 * 0.85 < flow_noise(wrong, inside, noisy_a, noisy_b) < 39.4 * 1.15
    assert flow_noise(wrong, np.zeros_like(inside), noisy_a, noisy_b) > 2 * noise  # none consistent: all


def test_refine_without_valid_flow_smooths_the_model(tmp_path):
    """No cycle-consistent flow: only the prior and the acceleration term are left (a straight
    model track through the query stays as it is; a bent one is smoothed as the energy says)."""
    num = 5
    seq = _sequence(str(tmp_path / "seq"), num, 16, 16, cycle=False)
    q = np.array([[2, 8.6, 8.6]])
    model = np.full((1, num, 2), 8.0) + np.arange(num)[None, :, None] * 0.3
    tracks, _ = refine_tracks(model, np.zeros((1, num), bool), q, seq)
    np.testing.assert_allclose(tracks, model, **PIXELS)
    model[0, 4] += 2.0
    tracks, _ = refine_tracks(model, np.zeros((1, num), bool), q, seq, smooth=0.5)
    np.testing.assert_allclose(tracks, _energy_minimum(model, q, num, (0.0, 0.0), 0, 0.005, 0.5), **PIXELS)
    tracks, _ = refine_tracks(model, np.zeros((1, num), bool), q, seq, smooth=0.0)
    np.testing.assert_allclose(tracks, model, **PIXELS)


def test_refine_flags_frames_the_flows_disagree_on(tmp_path):
    num = 7
    seq = _sequence(str(tmp_path / "seq"), num, 24, 24, bad_frame=4)
    q = np.array([[0, 12.0, 4.0]])
    model = q[:, None, [2, 1]] + np.stack([np.arange(num), np.zeros(num)], -1)[None]
    tracks, occ = refine_tracks(model, np.zeros((1, num), bool), q, seq, max_interval=3, residual_th=1.0)
    assert occ[0, 4] and not occ[0, [0, 1, 2, 6]].any()


def test_refine_pulls_a_lost_model_frame_onto_the_flow(tmp_path):
    num = 6
    seq = _sequence(str(tmp_path / "seq"), num, 32, 32)
    q = np.array([[0, 16.0, 4.0]])
    truth = q[:, None, [2, 1]] + np.stack([np.arange(num), np.zeros(num)], -1)[None]
    model = truth.copy()
    model[0, 3, 1] += 6.0  # the model lost the point at frame 3; the flow has not
    tracks, occ = refine_tracks(model, np.zeros((1, num), bool), q, seq)
    assert np.abs(tracks[0, 3] - truth[0, 3]).max() < 0.1
    assert not occ.any()


def test_refine_flags_frames_where_the_track_changes_colour(tmp_path):
    """A grey scene with a red block over the track's position at frame 3 (an occluder the flow
    does not see): only that frame is flagged, and only while the block's colour change exceeds
    ``max_color_change``."""
    num, h, w = 6, 32, 32
    frames = np.full((num, h, w, 3), 128, np.uint8)
    frames[3, 10:22, 5:15] = (200, 30, 30)  # around the track's (x, y) = (10, 16) at frame 3
    seq = _sequence(str(tmp_path / "seq"), num, h, w, frames=frames)
    q = np.array([[0, 16.0, 7.0]])
    truth = q[:, None, [2, 1]] + np.stack([np.arange(num), np.zeros(num)], -1)[None]
    tracks, occ = refine_tracks(truth, np.zeros((1, num), bool), q, seq, max_color_change=40.0)
    np.testing.assert_allclose(tracks, truth, **PIXELS)
    assert occ[0, 3] and not occ[0, [0, 1, 2, 4, 5]].any()
    _, occ = refine_tracks(truth, np.zeros((1, num), bool), q, seq, max_color_change=200.0)
    assert not occ.any()


def test_refine_keeps_a_point_next_to_a_moving_edge_visible(tmp_path, monkeypatch):
    """A red block moves 3 px a frame over black and white stripes; a point one pixel inside its
    top edge, tracked exactly, keeps its colour. Read through a 1.5 px blur (the colour test's
    before round 11) the stripes above the edge leak in and frames are flagged; through
    COLOR_SIGMA's lighter blur none is."""
    import fastomni.refine as refine

    num, h, w = 6, 48, 64
    frames = np.zeros((num, h, w, 3), np.uint8)
    frames[:, :, (np.arange(w) // 8) % 2 == 1] = 255
    for t in range(num):
        frames[t, 24:44, 10 + 3 * t:30 + 3 * t] = (200, 40, 40)
    seq = _sequence(str(tmp_path / "seq"), num, h, w, step=(3.0, 0.0), frames=frames)
    q = np.array([[0, 25.0, 20.0]])  # row 24 is the block's top row
    truth = q[:, None, [2, 1]] + np.stack([3.0 * np.arange(num), np.zeros(num)], -1)[None]
    tracks, occ = refine_tracks(truth, np.zeros((1, num), bool), q, seq)
    np.testing.assert_allclose(tracks, truth, **PIXELS)
    assert refine.COLOR_SIGMA <= 0.5 and not occ.any()
    monkeypatch.setattr(refine, "COLOR_SIGMA", 1.5)
    assert refine_tracks(truth, np.zeros((1, num), bool), q, seq)[1].any()


def test_refine_keeps_missing_frames_and_model_occlusion(tmp_path):
    num = 6
    seq = _sequence(str(tmp_path / "seq"), num, 16, 16)
    q = np.array([[1, 8.0, 4.0]])
    model = q[:, None, [2, 1]] + np.stack([np.arange(num) - 1.0, np.zeros(num)], -1)[None]
    model[0, 4:] = np.nan  # another shot
    occluded = np.zeros((1, num), bool)
    occluded[0, 3] = True
    tracks, occ = refine_tracks(model, occluded, q, seq)
    assert np.isnan(tracks[0, 4:]).all() and np.isfinite(tracks[0, :4]).all()
    # nothing (flow, acceleration) ties the shot's frames to the missing ones
    np.testing.assert_allclose(tracks[0, :4], model[0, :4], **PIXELS)
    assert occ[0, 3] and not occ[0, 1]
    # a position refined outside the image is occluded (TAP-Vid's convention, as track_points)
    far = model.copy()
    far[0, 0] = (-3.0, 8.0)
    _, occ = refine_tracks(far, occluded, q, seq, prior=1e3)
    assert occ[0, 0]


def test_refine_rejects_bad_input(tmp_path):
    seq = _sequence(str(tmp_path / "seq"), 4, 8, 8)
    q = np.array([[0, 1.0, 1.0]])
    with pytest.raises(InputError, match="expected"):
        refine_tracks(np.zeros((1, 4, 3)), np.zeros((1, 4), bool), q, seq)
    with pytest.raises(InputError, match="holds 4 frames but the tracks have 5"):
        refine_tracks(np.zeros((1, 5, 2)), np.zeros((1, 5), bool), q, seq)
    with pytest.raises(InputError, match="max_interval >= 1"):
        refine_tracks(np.zeros((1, 4, 2)), np.zeros((1, 4), bool), q, seq, max_interval=0)
    with pytest.raises(InputError, match="max_color_change"):
        refine_tracks(np.zeros((1, 4, 2)), np.zeros((1, 4), bool), q, seq, max_color_change=0.0)
    with pytest.raises(InputError, match="candidate_radius >= 0"):
        refine_tracks(np.zeros((1, 4, 2)), np.zeros((1, 4), bool), q, seq, candidate_radius=-1)
    with pytest.raises(InputError, match=r"frames \[4, 8, 8, 3\] expected, got \(4, 8, 9, 3\)"):
        refine_tracks(np.zeros((1, 4, 2)), np.zeros((1, 4), bool), q, seq, frames=np.zeros((4, 8, 9, 3), np.uint8))


def _refound(tracks, occluded, q, seq):
    """The fast preset's stages after the refinement (fastomni.refind, then fastomni.subpixel, both
    weighted by the refined tracks' surface support) on ``seq``'s frames."""
    cfg, features = preset("fast"), FrameFeatures(load_video(os.path.join(seq, "color")))
    support = surface_support(tracks, q, seq, PATCH)
    tracks, occluded = refind_lost(tracks, occluded, q, features, cfg.refind_radius, support=support)
    return align_to_query(tracks, occluded, q, features, cfg.align_radius, support=support), occluded


def test_surface_support_keeps_the_pixels_that_move_with_the_query(tmp_path):
    """Frame 2 of a sequence moving 1 px right, except from column 10 on, where the flows out of
    frame 2 are 0 (into frame 1) and 0.6 px off (into frame 3): a query at column 8 keeps the
    columns left of 10, and all of them at a threshold of 1 px or without flows to compare."""
    num, size = 5, 20
    seq = _sequence(str(tmp_path / "seq"), num, size, size)
    for b, shift in ((1, (1.0, 0.0)), (3, (0.0, 0.6))):  # flow 2 -> b from column 10 on: step + shift
        path = os.path.join(seq, "raft_exhaustive", f"{frame_name(2)}_{frame_name(b)}.npy")
        flow = np.load(path)
        flow[:, 10:] += np.float32(shift)
        np.save(path, flow)
    q = np.array([[2, 9.0, 8.0], [0, 9.0, 8.0]])  # (t, y, x); the second query's frame has no flow change
    tracks = np.stack([np.stack([[8.0 + t - q_t, 9.0] for t in range(num)]) for q_t in (2, 0)])
    support = surface_support(tracks, q, seq, radius=3)
    assert support.shape == (2, 7, 7) and support.dtype == np.float32
    want = np.zeros((7, 7), np.float32)
    want[:, :5] = 1  # columns 5 .. 9 of the frame
    np.testing.assert_array_equal(support[0], want)
    np.testing.assert_array_equal(support[1], np.ones((7, 7)))
    np.testing.assert_array_equal(surface_support(tracks, q, seq, radius=3, threshold=1.0), np.ones((2, 7, 7)))
    lost = tracks.copy()
    lost[0, 1:4] = np.nan  # no step to compare with: nothing to judge, all pixels kept
    np.testing.assert_array_equal(surface_support(lost, q, seq, radius=3)[0], np.ones((7, 7)))
    one = tracks.copy()
    one[0, 3] = np.nan  # only the pair 2 -> 1 judges: the columns whose flow is 1 px off drop
    np.testing.assert_array_equal(surface_support(one, q, seq, radius=3)[0], want)
    for path in os.listdir(os.path.join(seq, "raft_exhaustive")):
        os.remove(os.path.join(seq, "raft_exhaustive", path))
    np.testing.assert_array_equal(surface_support(tracks, q, seq, radius=3), np.ones((2, 7, 7)))
    with pytest.raises(InputError, match="radius"):
        surface_support(tracks, q, seq, radius=1.5)
    with pytest.raises(InputError, match="query_points"):
        surface_support(tracks, q[:1], seq, radius=3)


def test_run_refiner_finds_the_sequence_or_says_why(tmp_path):
    assert run_refiner(str(tmp_path), preset("original")) is None
    cfg = preset("fast")
    with pytest.raises(InputError, match="--no_refine"):
        run_refiner(str(tmp_path), cfg)
    num = 5
    _sequence(str(tmp_path / "seq"), num, 16, 16)
    q = np.array([[0, 8.0, 4.0]])
    model = q[:, None, [2, 1]] + np.stack([np.arange(num), np.zeros(num)], -1)[None] + 0.3
    seq = str(tmp_path / "seq")
    refined = refine_tracks(model, np.zeros((1, num), bool), q, seq, cfg.refine_interval)
    for got, want in ((run_refiner(str(tmp_path), cfg)(model, np.zeros((1, num), bool), q), _refound(*refined, q, seq)),
                      (run_refiner(str(tmp_path), cfg.replace(refind_radius=0.0, align_radius=0))(model, np.zeros((1, num), bool), q),
                       refined)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_fast_track_video_stores_png_and_refines(tmp_path):
    """``track_video`` with the fast preset: lossless frames, and tracks that are the model's
    refined on the stored flow (:func:`fastomni.pipeline.model_tracks`)."""
    from fastomni.optimize import load_run
    from fastomni.pipeline import model_tracks, track_video
    from fastomni.synthetic import make_video

    video = make_video(num_frames=5, h=24, w=24, num_points=6, seed=3)
    cfg = preset("fast").replace(num_iters=2, num_pairs=2, num_pts=8, num_samples_ray=4, i_weight=2, chunk_size=64)
    out = track_video(video.frames, video.query_points, str(tmp_path / "run"), cfg, progress=False)
    seq = str(tmp_path / "run" / "seq")
    assert sorted(os.listdir(os.path.join(seq, "color"))) == [f"{i:05d}.png" for i in range(5)]
    model, run_cfg, _ = load_run(str(tmp_path / "run"), device="cpu")
    assert run_cfg.refine_interval == cfg.refine_interval == 4
    q = video.query_points.astype(np.float64)
    raw, raw_occluded, _ = model_tracks(model, q, run_cfg.replace(refine_interval=0), seq)
    want, want_occluded = _refound(*refine_tracks(raw, raw_occluded, q, seq, 4), q, seq)
    np.testing.assert_allclose(out["tracks"], want, **PIXELS)
    np.testing.assert_array_equal(out["occluded"], want_occluded)

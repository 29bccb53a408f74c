"""fastomni.subpixel: drifted visible positions are pulled back onto the query's point to a fraction
of a pixel; occluded, non-finite, flat-patch, border and wrong-surface positions are left alone; each
fit is weighed against the track by their expected errors.

The tests of the fits take them whole (``whole_fits``: the tracks' assumed drift so large that the
fits' weight is 1): their tracks drift 0.2 px per frame, far more than TRACK_DRIFT assumes."""
import cv2
import numpy as np
import pytest

from fastomni.inputs import InputError
from fastomni.refind import PATCH, FrameFeatures
from fastomni import subpixel
from fastomni.subpixel import align_to_query

SIZE, NUM = 96, 8
WHOLE = 1e3  # a TRACK_DRIFT (px) that makes every kept fit's weight 1


def _motion(t: int) -> np.ndarray:
    """Frame 0 -> frame t: a rotation by 0.05 t rad and a zoom by 1 + 0.02 t about the image centre,
    then a shift of 1.7 t px right."""
    m = cv2.getRotationMatrix2D((47.5, 47.5), np.degrees(0.05 * t), 1.0 + 0.02 * t)
    m[0, 2] += 1.7 * t
    return m


def _texture(rng) -> np.ndarray:
    noise = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.5) * 3 - 256, 0, 255).astype(np.uint8)


def _frames(tex: np.ndarray) -> np.ndarray:
    return np.stack([cv2.warpAffine(tex, _motion(t), (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT) for t in range(NUM)])


def _truth(query_xy: np.ndarray) -> np.ndarray:
    """``[N, T, 2]``: where the points ``query_xy [N, 2]`` of frame 0 are in every frame."""
    return np.stack([query_xy @ _motion(t)[:, :2].T + _motion(t)[:, 2] for t in range(NUM)], 1)


def _drifted(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """The truth plus a drift that grows to about 1.4 px at the last frame (none at the query)."""
    direction = np.random.default_rng(seed).normal(size=(len(truth), 1, 2))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    return truth + 0.2 * np.arange(NUM)[None, :, None] * direction


@pytest.fixture
def whole_fits(monkeypatch):
    monkeypatch.setattr(subpixel, "TRACK_DRIFT", WHOLE)


def test_align_pulls_drifted_tracks_onto_the_point(whole_fits):
    rng = np.random.default_rng(0)
    features = FrameFeatures(_frames(_texture(rng)))
    query_xy = rng.uniform(30, 66, (40, 2))
    q = np.concatenate([np.zeros((40, 1)), query_xy[:, ::-1]], 1)
    truth = _truth(query_xy)
    drifted = _drifted(truth)
    aligned = align_to_query(drifted, np.zeros((40, NUM), bool), q, features)
    before, error = np.linalg.norm(drifted - truth, axis=-1)[:, 1:], np.linalg.norm(aligned - truth, axis=-1)[:, 1:]
    assert before.mean() > 0.7  # measured: 0.8 px before, median 0.03 px and 90th percentile 0.07 px after
    assert np.median(error) < 0.05 and np.quantile(error, 0.9) < 0.1, np.quantile(error, [0.5, 0.9, 1])
    assert error.mean() < 0.25 * before.mean()
    np.testing.assert_array_equal(aligned[:, 0], drifted[:, 0].astype(np.float32))  # the query frame is kept


def test_align_moves_unaligned_frames_with_their_neighbours_and_leaves_the_rest(whole_fits):
    rng = np.random.default_rng(2)
    tex = _texture(rng)
    tex[:, :40] = 128  # a flat left part: no texture to align on
    frames = _frames(tex)
    frames[5:] = _texture(rng)[None]  # from frame 5 on, another surface: the point is gone
    features = FrameFeatures(frames)
    query_xy = np.array([[55.0, 50.0], [20.0, 48.0], [58.0, 3.0], [60.0, 45.0]])  # textured, flat, border, textured
    q = np.concatenate([np.zeros((4, 1)), query_xy[:, ::-1]], 1)
    truth = _truth(query_xy)
    drifted = _drifted(truth, seed=3)
    occluded = np.zeros((4, NUM), bool)
    occluded[0, 2] = True
    drifted[3, 3] = np.nan
    aligned = align_to_query(drifted, occluded, q, features)
    shift = aligned - drifted
    np.testing.assert_allclose(shift[1:3], 0.0, atol=1e-5)  # flat, at the border: nothing to align on
    assert np.isnan(aligned[3, 3]).all()
    for n in (0, 3):  # the textured points: the frames before the surface changes are on the point
        seen = [f for f in range(1, 5) if np.isfinite(drifted[n, f]).all()]
        error = np.linalg.norm(aligned[n, seen] - truth[n, seen], axis=-1)
        assert error.max() < 0.25, error
        # frames 5-7 (another surface: nothing correlates) carry the last aligned frame's shift
        np.testing.assert_allclose(shift[n, 6:], np.broadcast_to(shift[n, 5], (2, 2)), atol=1e-5)
    # the occluded frame 2 of point 0 was not aligned but moved with its neighbours (0.4 px off before)
    assert np.linalg.norm(aligned[0, 2] - truth[0, 2]) < 0.25 < np.linalg.norm(drifted[0, 2] - truth[0, 2])


def test_align_weighs_a_noisy_fit_against_the_track():
    """Frame 1: the texture shifted 2 px right, with noise (sigma 8 grey levels); the tracks are at
    the truth. Taken whole, the fits move them 0.064 px off on average (measured); weighed against
    the tracks (TRACK_DRIFT px one frame from the query), 0.030 px, each between the track and its fit."""
    rng = np.random.default_rng(5)
    tex = _texture(rng)
    shifted = cv2.warpAffine(tex, np.float32([[1, 0, 2.0], [0, 1, 0]]), (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
    noisy = np.clip(shifted + rng.normal(0, 8, shifted.shape), 0, 255).astype(np.uint8)
    features = FrameFeatures(np.stack([tex, noisy]))
    query_xy = rng.uniform(20, 70, (30, 2))
    q = np.concatenate([np.zeros((30, 1)), query_xy[:, ::-1]], 1)
    truth = np.stack([query_xy, query_xy + [2.0, 0.0]], 1)
    weighed = align_to_query(truth, np.zeros((30, 2), bool), q, features)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subpixel, "TRACK_DRIFT", WHOLE)
        whole = align_to_query(truth, np.zeros((30, 2), bool), q, features)
    moved, fitted = np.linalg.norm(weighed[:, 1] - truth[:, 1], axis=1), np.linalg.norm(whole[:, 1] - truth[:, 1], axis=1)
    assert fitted.mean() > 0.04 and (fitted > 0).all()  # every fit was kept, and the noise moved it
    assert moved.mean() < 0.6 * fitted.mean(), (moved.mean(), fitted.mean())
    assert (moved <= fitted + 1e-5).all()
    # on the line from the track to the fit
    a, b = weighed[:, 1] - truth[:, 1], whole[:, 1] - truth[:, 1]
    np.testing.assert_allclose(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0], 0.0, atol=1e-4)


def test_align_rejects_bad_input():
    features = FrameFeatures(np.zeros((3, 16, 16, 3), np.uint8))
    tracks, occluded, q = np.zeros((1, 3, 2)), np.zeros((1, 3), bool), np.array([[0, 8.0, 8.0]])
    with pytest.raises(InputError, match="T = 3 frames"):
        align_to_query(np.zeros((1, 4, 2)), np.zeros((1, 4), bool), q, features)
    with pytest.raises(InputError, match="integer radius"):
        align_to_query(tracks, occluded, q, features, radius=0)
    with pytest.raises(InputError, match="max_shift"):
        align_to_query(tracks, occluded, q, features, max_shift=0.0)
    with pytest.raises(InputError, match="at most PATCH"):
        align_to_query(tracks, occluded, q, features, radius=PATCH + 1,
                       support=np.ones((1, 2 * PATCH + 3, 2 * PATCH + 3)))
    with pytest.raises(InputError, match="support"):
        align_to_query(tracks, occluded, q, features, support=np.ones((2, 2 * PATCH + 1, 2 * PATCH + 1)))
    rim = np.ones((1, 2 * PATCH + 1, 2 * PATCH + 1))
    rim[:, 1:-1, 1:-1] = 0  # weights only outside the fitted 9x9 square
    with pytest.raises(InputError, match="centre 9x9"):
        align_to_query(tracks, occluded, q, features, support=rim)


def test_align_with_the_surface_support_aligns_points_next_to_their_surface_edge(whole_fits):
    """Points 3 px inside the left edge of a textured square that moves 1.5 px right per frame over
    a still background: the fitted patch holds background that does not move with them. Weighted
    by the square's pixels they are aligned within 0.4 px; unweighted, one stays 0.5 px or more off."""
    rng = np.random.default_rng(2)
    background, square = _texture(rng), _texture(rng)[:32, :32].copy()
    shifts = [np.float64([[1, 0, 32.5 + 1.5 * t], [0, 1, 32.5]]) for t in range(NUM)]  # square -> frame t
    inside = [cv2.warpAffine(np.ones((32, 32), np.uint8), m, (SIZE, SIZE), flags=cv2.INTER_NEAREST) > 0
              for m in shifts]
    frames = np.stack([np.where(inside[t][..., None], cv2.warpAffine(square, shifts[t], (SIZE, SIZE)), background)
                       for t in range(NUM)])
    points = np.array([[2.5, 15.5], [2.5, 10.5], [2.5, 20.5]])  # square pixels
    truth = np.stack([points + shifts[t][:, 2] for t in range(NUM)], 1)
    q = np.stack([np.zeros(3), truth[:, 0, 1], truth[:, 0, 0]], 1)
    corner = np.rint(truth[:, 0]).astype(int) - PATCH
    support = np.stack([inside[0][y:y + 2 * PATCH + 1, x:x + 2 * PATCH + 1] for x, y in corner]).astype(np.float32)
    assert 0.2 < support.mean() < 0.8
    occluded = np.zeros((3, NUM), bool)
    aligned = align_to_query(_drifted(truth), occluded, q, FrameFeatures(frames), support=support)
    assert np.linalg.norm(aligned - truth, axis=-1).max() < 0.4
    plain = align_to_query(_drifted(truth), occluded, q, FrameFeatures(frames))
    assert np.linalg.norm(plain - truth, axis=-1).max() >= 0.5
    np.testing.assert_allclose(align_to_query(_drifted(truth), occluded, q, FrameFeatures(frames),
                                              support=np.ones_like(support)), plain, atol=1e-4)


def test_align_survives_a_fit_on_a_few_collinear_pixels():
    """A track of the benchmark's rotation clip (seed 104) whose support keeps a thin line of the
    patch: its fit at radius 3 diverges onto clamped pixels without contrast, and the Hessian was
    once exactly singular there (numpy's LinAlgError). The fit is now damped by its own scale; the
    track's positions must stay finite, and its query frame (10) at the query."""
    from fastomni.synthetic import make_video

    video = make_video(num_frames=32, h=128, w=128, num_points=256, seed=104, motion="rotation")
    track = np.array([[47.987713, 57.229027]] * 3 + [
        [47.102215, 55.28951], [46.3474, 53.24862], [45.578915, 51.138767], [46.67282, 46.062412],
        [46.28847, 44.402157], [46.137306, 42.85494], [45.999393, 41.535843], [45.961086, 40.34972],
        [46.315636, 39.317123], [45.815098, 38.87585], [45.314564, 38.434578], [46.095634, 37.631107],
        [53.54182, 36.53599], [55.244217, 36.965828], [56.753838, 37.603733], [58.08066, 38.326866],
        [59.371056, 39.261715], [60.467335, 40.04927], [61.35498, 40.775467], [62.355034, 41.385963],
        [63.517193, 42.03516], [64.79105, 42.671547], [66.12875, 43.353317], [67.457245, 43.943634],
        [68.848755, 44.68825], [70.267914, 45.782455], [71.66437, 47.2583], [72.82895, 49.0143],
        [73.70408, 50.80477]], np.float32)[None]
    occluded = np.zeros((1, 32), bool)
    occluded[0, [0, 1, 12]] = True
    support = np.zeros((1, 2 * PATCH + 1, 2 * PATCH + 1), np.float32)
    for dy, dx in [(-2, 2), (-1, -1), (-1, 0), (-1, 1), (0, -4), (0, -3), (0, -2), (0, 0), (1, -5), (1, -4)]:
        support[0, PATCH + dy, PATCH + dx] = 1.0
    query = video.query_points[21:22]
    out = align_to_query(track, occluded, query, FrameFeatures(video.frames), 3, support=support)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 10], query[0, [2, 1]], atol=1e-4)

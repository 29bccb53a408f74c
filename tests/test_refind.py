"""fastomni.refind: a point hidden by an occluder is found again, with the exact position, once its
surface is back, also when that surface moves apart from its surroundings; it is not found when its
surface is gone; hidden frames are interpolated."""
import cv2
import numpy as np
import pytest

from fastomni.inputs import InputError
from fastomni.refind import PATCH, FrameFeatures, patch_ncc, refind_lost

SIZE, NUM, HIDDEN = 96, 8, (2, 3, 4)
QUERY = np.array([48.0, 48.0])  # (x, y) at frame 0


def _motion(t: int) -> np.ndarray:
    """Frame 0 -> frame t: a rotation by 0.06 t rad about the image centre, then a shift of 2 t px right."""
    m = cv2.getRotationMatrix2D((47.5, 47.5), np.degrees(0.06 * t), 1.0)
    m[0, 2] += 2.0 * t
    return m


def _truth(t: int) -> np.ndarray:
    m = _motion(t)
    return m[:, :2] @ QUERY + m[:, 2]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``[size, size, 3]`` uint8 texture of blurred noise with sharp, sparse features."""
    noise = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.2) * 3 - 256, 0, 255).astype(np.uint8)


def _frames(seed: int = 0, new_surface_from: int | None = None) -> np.ndarray:
    """A textured scene moved by :func:`_motion`; a red disc covers the query point in the HIDDEN
    frames; from frame ``new_surface_from`` on, the scene is another texture."""
    rng = np.random.default_rng(seed)
    first, second = _texture(rng, SIZE), _texture(rng, SIZE)
    out = []
    for t in range(NUM):
        tex = second if new_surface_from is not None and t >= new_surface_from else first
        frame = cv2.warpAffine(tex, _motion(t), (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if t in HIDDEN:
            x, y = _truth(t)
            cv2.circle(frame, (int(round(x)), int(round(y))), 14, (255, 0, 0), -1)
        out.append(frame)
    return np.stack(out)


def _lost_track():
    """The query's track as a flow tracker leaves it: right up to frame 1, then on the occluder
    (12 px off) and reported occluded from frame 2 on."""
    tracks = np.stack([_truth(t) for t in range(NUM)])[None].copy()
    tracks[0, 2:] += 12.0
    occluded = np.zeros((1, NUM), bool)
    occluded[0, 2:] = True
    return tracks, occluded, np.array([[0, QUERY[1], QUERY[0]]])


def test_refind_finds_the_point_when_the_occluder_has_passed():
    tracks, occluded, q = _lost_track()
    x, occ = refind_lost(tracks, occluded, q, FrameFeatures(_frames()))
    back = [t for t in range(2, NUM) if t not in HIDDEN]
    assert not occ[0, back].any() and occ[0, list(HIDDEN)].all()
    truth = np.stack([_truth(t) for t in range(NUM)])
    np.testing.assert_allclose(x[0, back], truth[back], atol=0.5)  # found by a similarity fit to SIFT matches
    np.testing.assert_array_equal(x[0, :2], tracks[0, :2].astype(np.float32))  # visible frames untouched
    # the hidden frames: linear in time between frame 1 and the first frame found again
    weights = (np.array(HIDDEN) - 1.0) / (back[0] - 1.0)
    interpolated = x[0, 1] + weights[:, None] * (x[0, back[0]] - x[0, 1])
    np.testing.assert_allclose(x[0, list(HIDDEN)], interpolated, atol=1e-4)


def test_refind_leaves_the_point_lost_when_its_surface_is_gone():
    tracks, occluded, q = _lost_track()
    x, occ = refind_lost(tracks, occluded, q, FrameFeatures(_frames(new_surface_from=2)))
    assert occ[0, 2:].all()
    np.testing.assert_allclose(x[0, 2:], np.repeat(x[0, 1:2], NUM - 2, 0))  # held at the last visible frame


def test_refind_keeps_frames_of_another_shot_and_tracks_with_nothing_lost():
    tracks, occluded, q = _lost_track()
    tracks[0, 6:] = np.nan  # another shot
    seen = np.stack([_truth(t) for t in range(NUM)])[None]
    x, occ = refind_lost(np.concatenate([tracks, seen]), np.concatenate([occluded, np.zeros((1, NUM), bool)]),
                         np.concatenate([q, q]), FrameFeatures(_frames()))
    assert np.isnan(x[0, 6:]).all() and occ[0, 6:].all()
    assert not occ[0, 5]
    np.testing.assert_array_equal(x[1], seen[0].astype(np.float32))
    assert not occ[1].any()


def test_refind_gives_every_query_of_a_cell_the_same_answer_at_any_count():
    """3,000 copies of the lost track (more patches than one cv2.remap call takes): each is found
    as the single track is."""
    tracks, occluded, q = _lost_track()
    features = FrameFeatures(_frames())
    one = refind_lost(tracks, occluded, q, features)
    many = refind_lost(np.repeat(tracks, 3000, 0), np.repeat(occluded, 3000, 0), np.repeat(q, 3000, 0), features)
    np.testing.assert_array_equal(many[0], np.repeat(one[0], 3000, 0))
    np.testing.assert_array_equal(many[1], np.repeat(one[1], 3000, 0))


def test_refind_refuses_bad_input():
    tracks, occluded, q = _lost_track()
    features = FrameFeatures(_frames())
    with pytest.raises(InputError, match=r"tracks \[N, T, 2\]"):
        refind_lost(tracks[:, :4], occluded[:, :4], q, features)
    with pytest.raises(InputError, match="radius > 0"):
        refind_lost(tracks, occluded, q, features, radius=0.0)
    with pytest.raises(InputError, match="uint8"):
        FrameFeatures(np.zeros((2, 8, 8, 3), np.float32))
    side = 2 * PATCH + 1
    for support in (np.ones((1, side - 2, side - 2)), -np.ones((1, side, side)), np.zeros((1, side, side)),
                    np.full((1, side, side), np.nan)):
        with pytest.raises(InputError, match="support"):
            refind_lost(tracks, occluded, q, features, support=support)


def test_patch_ncc_weights_pixels():
    """Weights 0 leave pixels out of the correlation; all-equal weights change nothing."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5, 5))
    b = 3.0 * a + 1.0
    b[:, :, 3:] = rng.normal(size=(2, 5, 2))  # two columns from elsewhere
    weights = np.ones_like(a)
    weights[:, :, 3:] = 0.0
    np.testing.assert_allclose(patch_ncc(a, b, weights), 1.0, atol=1e-5)  # the denominator's 1e-6 guard
    assert (patch_ncc(a, b) < 0.95).all()
    np.testing.assert_allclose(patch_ncc(a, b, np.full_like(a, 0.3)), patch_ncc(a, b), atol=1e-12)


def _square_motion(t: int) -> np.ndarray:
    """The 32 px square's pixels -> frame t: 2 px right and 0.05 rad per frame, centred on QUERY at frame 0."""
    m = cv2.getRotationMatrix2D((15.5, 15.5), np.degrees(0.05 * t), 1.0)
    m[:, 2] += QUERY - 15.5 + [2.0 * t, 0.0]
    return m


def _square_inside(t: int) -> np.ndarray:
    """``[SIZE, SIZE]`` bool: the square's pixels in frame t."""
    return cv2.warpAffine(np.ones((32, 32), np.uint8), _square_motion(t), (SIZE, SIZE), flags=cv2.INTER_NEAREST) > 0


def _two_surface_frames(seed: int = 1, point=(15.5, 15.5)):
    """A still textured background and a textured 32 px square that moves by :func:`_square_motion`;
    the query is the square's pixel ``point`` (x, y; default its centre, at QUERY); a red disc hides
    it in the HIDDEN frames. The background holds most of the matches near the query. Returns
    (frames, truth [NUM, 2])."""
    rng = np.random.default_rng(seed)
    background, square = _texture(rng, SIZE), _texture(rng, 32)
    frames, truth = [], []
    for t in range(NUM):
        m = _square_motion(t)
        frame = np.where(_square_inside(t)[..., None], cv2.warpAffine(square, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR),
                         background)
        truth.append(m[:, :2] @ point + m[:, 2])
        if t in HIDDEN:
            cv2.circle(frame, tuple(int(round(c)) for c in truth[-1]), 10, (255, 0, 0), -1)
        frames.append(frame)
    return np.stack(frames), np.stack(truth)


def test_refind_finds_a_point_on_a_surface_that_moves_apart_from_its_surroundings(monkeypatch):
    """The first similarity fit follows the background; the point is found by the second."""
    import fastomni.refind as refind

    frames, truth = _two_surface_frames()
    tracks = truth[None].copy()
    tracks[0, 2:] = truth[1]  # the flow tracker held the point where the disc came
    occluded = np.zeros((1, NUM), bool)
    occluded[0, 2:] = True
    q = np.array([[0, QUERY[1], QUERY[0]]])
    back = [t for t in range(2, NUM) if t not in HIDDEN]
    x, occ = refind_lost(tracks, occluded, q, FrameFeatures(frames))
    assert not occ[0, back].any() and occ[0, list(HIDDEN)].all()
    np.testing.assert_allclose(x[0, back], truth[back], atol=0.5)
    monkeypatch.setattr(refind, "MOTIONS", 1)
    x, occ = refind_lost(tracks, occluded, q, FrameFeatures(frames))
    assert occ[0, back].all()  # one fit per cell: the background's, so the point stays lost


def test_refind_with_the_surface_support_finds_a_point_next_to_its_surface_edge():
    """The query 2 px inside the moving square's edge: the verification patch holds background
    that does not move with it. Weighted by the square's pixels (the surface support) every frame
    after the disc is found within 0.5 px; unweighted, the last one is not."""
    frames, truth = _two_surface_frames(point=(1.5, 15.5))
    tracks = truth[None].copy()
    tracks[0, 2:] = truth[1]
    occluded = np.zeros((1, NUM), bool)
    occluded[0, 2:] = True
    q = np.array([[0, truth[0, 1], truth[0, 0]]])
    x0, y0 = np.rint(truth[0]).astype(int)
    support = _square_inside(0)[y0 - PATCH:y0 + PATCH + 1, x0 - PATCH:x0 + PATCH + 1].astype(np.float32)[None]
    assert 0.2 < support.mean() < 0.8
    back = [t for t in range(2, NUM) if t not in HIDDEN]
    x, occ = refind_lost(tracks, occluded, q, FrameFeatures(frames), support=support)
    assert not occ[0, back].any() and occ[0, list(HIDDEN)].all()
    np.testing.assert_allclose(x[0, back], truth[back], atol=0.5)
    _, occ = refind_lost(tracks, occluded, q, FrameFeatures(frames))
    assert occ[0, NUM - 1]
    ones = np.ones_like(support)
    np.testing.assert_array_equal(refind_lost(tracks, occluded, q, FrameFeatures(frames), support=ones)[1], occ)

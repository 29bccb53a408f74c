"""fastomni.refind: a point hidden by an occluder is found again, with the exact position, once its
surface is back, also when that surface moves apart from its surroundings; it is not found when its
surface is gone; hidden frames are interpolated."""
import cv2
import numpy as np
import pytest

from fastomni.inputs import InputError
from fastomni.refind import FrameFeatures, refind_lost

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


def _two_surface_frames(seed: int = 1):
    """A still textured background and, over the query, a textured 32 px square that moves 2 px
    right per frame and turns 0.05 rad per frame; a red disc hides the query in the HIDDEN frames.
    The background holds most of the matches near the query. Returns (frames, truth [NUM, 2])."""
    rng = np.random.default_rng(seed)
    background, square = _texture(rng, SIZE), _texture(rng, 32)
    frames, truth = [], []
    for t in range(NUM):
        m = cv2.getRotationMatrix2D((15.5, 15.5), np.degrees(0.05 * t), 1.0)  # square pixels -> frame
        m[:, 2] += QUERY - 15.5 + [2.0 * t, 0.0]
        inside = cv2.warpAffine(np.ones((32, 32), np.uint8), m, (SIZE, SIZE), flags=cv2.INTER_NEAREST) > 0
        frame = np.where(inside[..., None], cv2.warpAffine(square, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR), background)
        truth.append(m[:, :2] @ [15.5, 15.5] + m[:, 2])
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

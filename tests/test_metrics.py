"""fastomni.metrics against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from fastomni.metrics import error_budget, evaluate_tracks, no_estimate, tapvid_metrics, temporal_coherence

# A 64 x 128 (h x w) video: at 256 x 256, x errors are doubled and y errors quadrupled.
H, W = 64, 128


def hand_case():
    """Two points over four frames; errors quoted at 256 x 256.

    A (query frame 0): visible throughout; errors 0.5 (frame 1), 3 (frame 2), 20 (frame 3) along x;
    predicted occluded at frame 3 only.
    B (query frame 1): occluded at frame 2, visible elsewhere; error 1.5 along y at frame 0, 0 at
    frames 2 and 3; predicted visible everywhere (so frame 2 is a false positive).
    """
    gt = np.array([[[0.2, 0.5]] * 4, [[0.6, 0.3]] * 4], np.float64)
    gt_occ = np.array([[False] * 4, [False, False, True, False]])
    pred = gt * [W, H]
    pred[0, 1, 0] += 0.5 / 2
    pred[0, 2, 0] += 3 / 2
    pred[0, 3, 0] += 20 / 2
    pred[1, 0, 1] += 1.5 / 4
    pred_occ = np.array([[False, False, False, True], [False] * 4])
    query = np.array([[0, 0.5 * H, 0.2 * W], [1, 0.3 * H, 0.6 * W]])
    return pred, pred_occ, gt.astype(np.float32), gt_occ, query


def test_first_mode_by_hand():
    m = tapvid_metrics(*hand_case(), image_size=(H, W), query_mode="first")
    # Evaluated: A1 A2 A3 (after query 0), B2 B3 (after query 1); visible among them: A1 A2 A3 B3.
    # Occlusion right at A1 A2 B3, wrong at A3 (predicted occluded) and B2 (predicted visible).
    assert m["occlusion_accuracy"] == pytest.approx(3 / 5)
    # Strictly within d: A1 (0.5) for d >= 1, A2 (3) for d >= 4, B3 (0) always, A3 (20) never.
    expected_within = {1: 2 / 4, 2: 2 / 4, 4: 3 / 4, 8: 3 / 4, 16: 3 / 4}
    # TP = within & visible & predicted visible; FP = predicted visible & (occluded or not within):
    # d=1,2: TP A1 B3, FP A2 B2 -> 2 / (4 + 2); d>=4: TP A1 A2 B3, FP B2 -> 3 / (4 + 1).
    expected_jaccard = {1: 2 / 6, 2: 2 / 6, 4: 3 / 5, 8: 3 / 5, 16: 3 / 5}
    for d in (1, 2, 4, 8, 16):
        assert m[f"pts_within_{d}"] == pytest.approx(expected_within[d])
        assert m[f"jaccard_{d}"] == pytest.approx(expected_jaccard[d])
    assert m["average_pts_within_thresh"] == pytest.approx(0.65)
    assert m["average_jaccard"] == pytest.approx((2 / 6 * 2 + 3 / 5 * 3) / 5)


def test_strided_mode_by_hand():
    m = tapvid_metrics(*hand_case(), image_size=(H, W), query_mode="strided")
    # Strided adds B0 (visible, error 1.5, predicted visible, occlusion right): 5 visible entries.
    assert m["occlusion_accuracy"] == pytest.approx(4 / 6)
    expected_within = {1: 2 / 5, 2: 3 / 5, 4: 4 / 5, 8: 4 / 5, 16: 4 / 5}
    # d=1: TP A1 B3, FP A2 B0 B2; d=2: TP A1 B0 B3, FP A2 B2; d>=4: TP A1 A2 B0 B3, FP B2.
    expected_jaccard = {1: 2 / 8, 2: 3 / 7, 4: 4 / 6, 8: 4 / 6, 16: 4 / 6}
    for d in (1, 2, 4, 8, 16):
        assert m[f"pts_within_{d}"] == pytest.approx(expected_within[d])
        assert m[f"jaccard_{d}"] == pytest.approx(expected_jaccard[d])


def test_perfect_prediction_and_frames_before_the_query():
    _, _, gt, gt_occ, query = hand_case()
    perfect = gt.astype(np.float64) * [W, H]
    m = tapvid_metrics(perfect, gt_occ, gt, gt_occ, query, (H, W))
    assert all(v == pytest.approx(1.0) for v in m.values())
    # In "first" mode frames up to the query frame do not count: spoil B at frames 0 and 1.
    spoiled, spoiled_occ = perfect.copy(), gt_occ.copy()
    spoiled[1, :2] += 50
    spoiled_occ[1, 0] = True
    assert tapvid_metrics(spoiled, spoiled_occ, gt, gt_occ, query, (H, W)) == m
    assert tapvid_metrics(spoiled, spoiled_occ, gt, gt_occ, query, (H, W), "strided")["average_jaccard"] < 1


def test_temporal_coherence_by_hand():
    # One point moving linearly (zero acceleration); the prediction bumps +1 px (at 256) in x at
    # frame 1: predicted accelerations -2 (t=1) and +1 (t=2) -> mean 1.5.
    gt = np.stack([np.linspace(0.1, 0.4, 4), np.full(4, 0.5)], axis=-1)[None]
    pred = gt * [W, H]
    pred[0, 1, 0] += 1 / 2
    occ = np.zeros((1, 4), bool)
    assert temporal_coherence(pred, gt, occ, (H, W)) == pytest.approx(1.5)
    occ[0, 3] = True  # only the triplet (0, 1, 2) is fully visible
    assert temporal_coherence(pred, gt, occ, (H, W)) == pytest.approx(2.0)
    assert temporal_coherence(gt * [W, H], gt, occ, (H, W)) == pytest.approx(0.0)


@pytest.mark.parametrize("field, value, error, match", [
    ("pred", np.zeros((2, 3, 2)), ValueError, "pred_tracks"),
    ("pred_occ", np.zeros((2, 4), np.int64), TypeError, "bool"),
    ("gt_occ", np.zeros((2, 5), bool), ValueError, "gt_occluded"),
    ("gt", np.full((2, 4, 2), np.inf), ValueError, "NaN or inf"),
    ("query", np.array([[0.5, 1, 1], [1, 1, 1]]), ValueError, "integer frame"),
    ("query", np.array([[4, 1, 1], [1, 1, 1]]), ValueError, "integer frame"),
    ("query", np.zeros((2, 2)), ValueError, "query_points"),
])
def test_tapvid_bad_input(field, value, error, match):
    args = dict(zip(("pred", "pred_occ", "gt", "gt_occ", "query"), hand_case()))
    args[field] = value
    with pytest.raises(error, match=match):
        tapvid_metrics(args["pred"], args["pred_occ"], args["gt"], args["gt_occ"], args["query"], (H, W))


def test_tapvid_bad_mode_size_and_nothing_to_evaluate():
    pred, pred_occ, gt, gt_occ, query = hand_case()
    with pytest.raises(ValueError, match="query_mode"):
        tapvid_metrics(pred, pred_occ, gt, gt_occ, query, (H, W), query_mode="all")
    for size in ((H,), (0, W), (H, 1.5), "64x128"):
        with pytest.raises(ValueError, match="image_size"):
            tapvid_metrics(pred, pred_occ, gt, gt_occ, query, size)
    last = query.copy()
    last[:, 0] = 3
    with pytest.raises(ValueError, match="no frames to evaluate"):
        tapvid_metrics(pred, pred_occ, gt, gt_occ, last, (H, W))
    with pytest.raises(ValueError, match="no ground-truth-visible"):
        tapvid_metrics(pred, pred_occ, gt, np.ones_like(gt_occ), query, (H, W))


def test_temporal_coherence_bad_input():
    gt = np.full((1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="at least 3 frames"):
        temporal_coherence(gt * 10, gt, np.zeros((1, 2), bool), (10, 10))
    gt = np.full((1, 4, 2), 0.5)
    with pytest.raises(ValueError, match="three consecutive"):
        temporal_coherence(gt * 10, gt, np.array([[False, True, False, False]]), (10, 10))
    with pytest.raises(ValueError, match="estimated"):
        temporal_coherence(np.full((1, 4, 2), np.nan), gt, np.zeros((1, 4), bool), (10, 10))
    with pytest.raises(ValueError, match="pred_tracks"):
        temporal_coherence(np.zeros((2, 4, 2)), gt, np.zeros((1, 4), bool), (10, 10))


def test_no_estimate_counts_as_occluded():
    pred, pred_occ, gt, gt_occ, query = hand_case()
    diverged = pred.copy()
    diverged[0, 3] = np.nan  # point A at frame 3: no estimate
    diverged[1, 0, 0] = np.inf
    missing = no_estimate(diverged)
    assert missing.sum() == 2
    occ = pred_occ.copy()
    occ[0, 3] = occ[1, 0] = True
    for mode in ("first", "strided"):
        # a non-finite position is exactly a predicted occlusion (wherever it is drawn)
        want = tapvid_metrics(np.where(missing[..., None], 0.0, pred), occ, gt, gt_occ, query, (H, W), mode)
        assert tapvid_metrics(diverged, pred_occ, gt, gt_occ, query, (H, W), mode) == want
    both = evaluate_tracks(diverged, pred_occ, gt, gt_occ, query, (H, W))
    assert set(both) == {"first", "strided", "temporal_coherence"}
    # temporal coherence leaves out the triplets holding a missing estimate
    gt5 = np.linspace([0.1, 0.2], [0.5, 0.3], 5)[None] ** 2
    pred5 = gt5 * [W, H] + [[[0, 0], [1, 0], [0, 0], [2, 0], [0, 0]]]
    cut = pred5.copy()
    cut[0, 4] = np.nan
    assert temporal_coherence(cut, gt5, np.zeros((1, 5), bool), (H, W)) == temporal_coherence(
        pred5[:, :4], gt5[:, :4], np.zeros((1, 4), bool), (H, W))


def test_error_budget_by_hand():
    pred, pred_occ, gt, gt_occ, query = hand_case()
    pred[0, 2, 0] += 1.0  # A2 now 5 px off at 256 x 256: farther than FAR (4)
    b = error_budget(pred, pred_occ, gt, gt_occ, query, (H, W))  # strided
    # Evaluated: A1 A2 A3 B0 B2 B3; visible: all but B2. Predicted occluded: A3; predicted visible: B2.
    assert b["average_jaccard"] == pytest.approx(tapvid_metrics(pred, pred_occ, gt, gt_occ, query, (H, W),
                                                                "strided")["average_jaccard"])
    assert b["occluded_when_visible"] == pytest.approx(1 / 5)  # A3
    assert b["visible_when_hidden"] == pytest.approx(1.0)  # B2
    assert b["far_when_visible"] == pytest.approx(1 / 4)  # A2 of A1 A2 B0 B3 (errors 0.5, 5, 1.5, 0)
    # found: A3 exact and visible; errors A1 0.5, A2 5, A3 0, B0 1.5, B3 0; B2 a false positive.
    # d=1: TP A1 A3 B3, FP A2 B0 B2 -> 3/8; d=2: TP + B0 -> 4/7; d=4: 4/7; d=8, 16: 5/6.
    assert b["found"] == pytest.approx((3 / 8 + 4 / 7 + 4 / 7 + 5 / 6 + 5 / 6) / 5)
    # exact: A1 A2 B0 B3 exact; A3 still occluded (a false negative), B2 a false positive: 4/6 at every d.
    assert b["exact"] == pytest.approx(4 / 6)
    assert b["both"] == pytest.approx(5 / 6)  # only B2 wrong
    nothing_hidden = error_budget(pred, pred_occ, gt, np.zeros_like(gt_occ), query, (H, W))
    assert nothing_hidden["visible_when_hidden"] is None


def test_error_budget_of_a_perfect_prediction():
    pred, pred_occ, gt, gt_occ, query = hand_case()
    perfect = error_budget(gt * [W, H], gt_occ, gt, gt_occ, query, (H, W), "first")
    assert perfect == {"average_jaccard": 1.0, "found": 1.0, "exact": 1.0, "both": 1.0,
                       "occluded_when_visible": 0.0, "visible_when_hidden": 0.0, "far_when_visible": 0.0}

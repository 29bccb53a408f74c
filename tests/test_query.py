"""Tracks from a model: the fast query path equals the original's per-pair computation, files
round-trip, bad input raises clear errors."""
import numpy as np
import pytest
import torch
from conftest import TOLERANCES

from fastomni.nn import OmniMotion
from fastomni.query import (
    HALF_MAX_ERROR,
    NoEstimateWarning,
    PrecisionWarning,
    check_query_points,
    dense_tracks,
    export_dense,
    load_tracks,
    pair_flows,
    rescale_points,
    save_tracks,
    track_points,
)
from fastomni.reference.composite import composite_alpha


class ParallaxModel(OmniMotion):
    """An OmniMotion (its real networks) with a two-layer canonical scene, a near slab in front of a
    far plane, seen through an extra per-frame shear ``x += c_t z`` so that frames see the slab
    move against the plane: max-weight samples sit on either layer and points are occluded in
    some frames and visible in others."""

    def _shear(self, ids):
        return 0.5 * (torch.as_tensor(ids, dtype=self.time_steps.dtype) - 1.5)

    def map_to_canonical(self, x, ids):
        c = self._shear(ids).reshape(-1, *([1] * (x.dim() - 2)))
        return super().map_to_canonical(torch.cat([x[..., :1] + c * x[..., 2:], x[..., 1:]], -1), ids)

    def map_from_canonical(self, u, ids):
        x = super().map_from_canonical(u, ids)
        c = self._shear(ids).reshape(-1, *([1] * (x.dim() - 2)))
        return torch.cat([x[..., :1] - c * x[..., 2:], x[..., 1:]], -1)

    def color_density(self, u, apply_contraction=True):
        rgb, _ = super().color_density(u, apply_contraction)
        x, z = u[..., 0], u[..., 2]
        slab = torch.sigmoid(30 * (z - 0.2)) * torch.sigmoid(30 * (0.6 - z)) * torch.sigmoid(20 * (0.3 - x.abs()))
        return rgb, 8 * (slab + torch.sigmoid(30 * (z - 1.4))) + 0.02


def _model(use_affine=True, k=6, t=4, h=5, w=7):
    torch.manual_seed(0)
    return ParallaxModel(num_imgs=t, h=h, w=w, num_samples_ray=k, use_affine=use_affine).double().eval()


def _original_pair(model, q, px, j, use_max_loc):
    """The original's get_correspondences_and_occlusion_masks_for_pixels([q], px[None], [j]),
    written out step by step: every sample of the query ray mapped to frame j, then the target
    ray's full K samples for the occlusion score."""
    x1, _ = model.sample_rays(px[None])
    u = model.map_to_canonical(x1, [q])
    x2 = model.map_from_canonical(u, [j])
    w, _ = composite_alpha(model.color_density(u)[1])
    if use_max_loc:
        idx = w.argmax(-1, keepdim=True)
        x2p = torch.gather(x2, 2, idx[..., None].expand(-1, -1, 1, 3))[:, :, 0]
    else:
        x2p = (w[..., None] * x2).sum(-2)
    px2, depth = model.project(x2p)
    xs, ds = model.sample_rays(px2)
    w2, _ = composite_alpha(model.color_density(model.map_to_canonical(xs, [j]))[1])
    eps = 1.1 * (model.max_depth - model.min_depth) / model.num_samples_ray  # the original's, written out
    w2 = torch.where(ds[..., 0] >= depth - eps, torch.zeros_like(w2), w2)
    return px2[0], w2.sum(-1)[0]


@pytest.mark.parametrize("use_max_loc", [True, False])
@pytest.mark.parametrize("use_affine", [True, False])
def test_dense_tracks_equal_the_per_pair_path(use_max_loc, use_affine):
    m = _model(use_affine)
    qf = 1
    tracks, occluded, scores = dense_tracks(m, qf, use_max_loc=use_max_loc, occlusion_th=0.5, chunk_size=8)
    ys, xs = np.mgrid[0:m.h, 0:m.w]
    px = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], -1)).double()
    assert tracks.shape == (m.h * m.w, m.num_imgs, 2) and occluded.shape == scores.shape == (m.h * m.w, m.num_imgs)
    spread = []
    with torch.no_grad():
        for j in range(m.num_imgs):
            if j == qf:  # the query frame itself: the query pixel, visible (as the original's viz)
                np.testing.assert_array_equal(tracks[:, j], px.numpy())
                assert not occluded[:, j].any() and (scores[:, j] == 0).all()
                continue
            px2, score = _original_pair(m, qf, px, j, use_max_loc)
            np.testing.assert_allclose(tracks[:, j], px2.numpy(), **TOLERANCES["float32_pixels"])
            np.testing.assert_allclose(scores[:, j], score.numpy(), **TOLERANCES["float32_scores"])
            xy = px2.numpy()
            outside = (xy[:, 0] < 0) | (xy[:, 0] > m.w - 1) | (xy[:, 1] < 0) | (xy[:, 1] > m.h - 1)
            np.testing.assert_array_equal(occluded[:, j], (score.numpy() > 0.5) | outside)
            spread.append(score.numpy())
    spread = np.concatenate(spread)
    assert (spread < 0.1).mean() > 0.1 and (spread > 0.9).mean() > 0.1  # both outcomes occur


def test_sparse_tracks_mixed_query_frames_match_dense():
    m = _model()
    rng = np.random.default_rng(0)
    q = np.stack([rng.integers(0, m.num_imgs, 40), rng.integers(0, m.h, 40), rng.integers(0, m.w, 40)], 1)
    tracks, occluded, scores = track_points(m, q, chunk_size=7)
    for f in range(m.num_imgs):
        rows = np.flatnonzero(q[:, 0] == f)
        if not len(rows):
            continue
        dt, do, ds = dense_tracks(m, f)
        idx = q[rows, 1] * m.w + q[rows, 2]
        np.testing.assert_allclose(tracks[rows], dt[idx], **TOLERANCES["float32_pixels_same_path"])
        np.testing.assert_array_equal(occluded[rows], do[idx])
        np.testing.assert_allclose(scores[rows], ds[idx], **TOLERANCES["float32_scores"])
        np.testing.assert_array_equal(tracks[rows, f], q[rows][:, [2, 1]])


def test_pair_flows_equal_tracks():
    m = _model()
    flows = pair_flows(m, [0, 3], [1, 1], chunk_size=50)
    assert flows.shape == (2, m.h, m.w, 2)
    ys, xs = np.mgrid[0:m.h, 0:m.w]
    grid = np.stack([xs, ys], -1).reshape(-1, 2)
    for n, (i, j) in enumerate([(0, 1), (3, 1)]):
        tracks, _, _ = dense_tracks(m, i)
        np.testing.assert_allclose(flows[n].reshape(-1, 2), tracks[:, j] - grid, **TOLERANCES["float32_pixels"])


def test_model_mode_restored_and_float32_runs():
    m = _model().float().train()
    tracks, occluded, _ = track_points(m, [[0, 1.5, 2.25]])
    assert m.training and tracks.dtype == np.float32 and occluded.dtype == bool
    np.testing.assert_array_equal(tracks[0, 0], [2.25, 1.5])


@pytest.mark.parametrize("half", [False, True])
def test_save_and_load_sparse(tmp_path, half):
    m = _model()
    q = np.array([[0, 2, 3], [3, 4, 6], [1, 0.5, 5.25]])
    tracks, occluded, scores = track_points(m, q)
    path = save_tracks(str(tmp_path / "t.npz"), tracks, occluded, q, scores, (m.h, m.w), half=half)
    got = load_tracks(path)
    exact = dict(atol=0, rtol=0)
    np.testing.assert_allclose(got["tracks"], tracks, **TOLERANCES["float16_pixels"] if half else exact)
    np.testing.assert_array_equal(got["occluded"], occluded)
    np.testing.assert_allclose(got["scores"], scores, **TOLERANCES["float16_scores"] if half else exact)
    np.testing.assert_array_equal(got["query_points"], q.astype(np.float32))
    assert tuple(got["image_size"]) == (m.h, m.w) and got["tracks"].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left behind


@pytest.mark.parametrize("half", [False, True])
def test_export_dense_streams_frames_and_rescales(tmp_path, half):
    m = _model()
    path = export_dense(m, 1, str(tmp_path / "d.npz"), half=half, scale_to=(2 * m.h, 2 * m.w), progress=False)
    tracks, occluded, _ = dense_tracks(m, 1)
    got = load_tracks(path)
    want = rescale_points(tracks, (m.h, m.w), (2 * m.h, 2 * m.w))
    np.testing.assert_allclose(got["tracks"], want, **TOLERANCES["float16_pixels" if half else "float32_pixels"])
    np.testing.assert_array_equal(got["occluded"], occluded)
    assert tuple(got["image_size"]) == (2 * m.h, 2 * m.w)
    np.testing.assert_array_equal(got["query_points"][:, 0], 1)
    part = load_tracks(path, frames=[3, 0])
    np.testing.assert_array_equal(part["occluded"], occluded[:, [3, 0]])
    np.testing.assert_allclose(part["tracks"], got["tracks"][:, [3, 0]])
    with pytest.raises(ValueError, match="outside"):
        load_tracks(path, frames=[4])


def test_export_dense_refine_sees_every_frame_before_writing(tmp_path):
    m = _model()
    tracks, occluded, scores = dense_tracks(m, 2)
    seen = {}

    def refine(t, o, q):
        seen.update(tracks=t.copy(), occluded=o.copy(), queries=q.copy())
        return t + 1.0, ~o

    got = load_tracks(export_dense(m, 2, str(tmp_path / "d.npz"), progress=False, refine=refine))
    np.testing.assert_allclose(seen["tracks"], tracks, **TOLERANCES["float32_pixels_same_path"])
    np.testing.assert_array_equal(seen["occluded"], occluded)
    np.testing.assert_array_equal(seen["queries"][:, 0], 2)
    np.testing.assert_allclose(got["tracks"], tracks + 1.0, **TOLERANCES["float32_pixels_same_path"])
    np.testing.assert_array_equal(got["occluded"], ~occluded)
    np.testing.assert_allclose(got["scores"], scores, **TOLERANCES["float32_pixels_same_path"])


def test_rescale_points_pixel_centres():
    # pixel centres: x = -0.5 (left edge) and x = w - 0.5 (right edge) map to the new edges
    out = rescale_points(np.array([[-0.5, -0.5], [9.5, 4.5], [4.5, 2.0]]), (5, 10), (10, 40))
    np.testing.assert_allclose(out, [[-0.5, -0.5], [39.5, 9.5], [19.5, 4.5]])


@pytest.mark.parametrize("q, msg", [
    (np.zeros((3, 2)), "shape"),
    (np.array([[0.5, 1, 1]]), "frame index"),
    (np.array([[5, 1, 1]]), "frame index"),
    (np.array([[0, 1, 20]]), "outside"),
    (np.array([[0, np.nan, 1]]), "NaN"),
    (np.array([["a", "b", "c"]]), "numbers"),
    (np.zeros((0, 3)), "no query points"),
])
def test_bad_query_points(q, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        check_query_points(q, 5, 11, 13)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tracks(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a NumPy file"):
        load_tracks(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "cut.npz", tracks=np.zeros((40, 3, 2)), occluded=np.zeros((40, 3), bool))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_tracks(str(tmp_path / "cut.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastomni track file"):
        load_tracks(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="shape"):
        save_tracks(str(tmp_path / "a.npz"), np.zeros((2, 3, 2)), np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match=".npz"):
        save_tracks(str(tmp_path / "a.txt"), np.zeros((2, 3, 2)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="query_points"):
        save_tracks(str(tmp_path / "a.npz"), np.zeros((2, 3, 2)), np.zeros((2, 3), bool), half=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.npz", "junk.npz", "other.npz"]


def _far_tracks(motion: float, n: int = 3, t: int = 4):
    """Tracks from query points at frame 0 moving by up to ``motion`` pixels, at offsets that
    float16 cannot represent exactly."""
    q = np.array([[0, 5.0, 7.0]] * n)
    steps = np.linspace(0, motion, t) + 0.3137
    tracks = np.stack([q[:, [2, 1]] + s for s in steps], 1)
    tracks[:, 0] = q[:, [2, 1]]
    return tracks, np.zeros((n, t), bool), q


@pytest.mark.parametrize("motion, why", [(700.0, "round"), (1e5, "range")])
def test_half_falls_back_to_float32_when_float16_would_lose_precision(tmp_path, motion, why):
    tracks, occluded, q = _far_tracks(motion)
    with pytest.warns(PrecisionWarning, match=why):
        path = save_tracks(str(tmp_path / "t.npz"), tracks, occluded, q, half=True)
    got = load_tracks(path)
    assert np.isfinite(got["tracks"]).all()
    np.testing.assert_allclose(got["tracks"], tracks, atol=HALF_MAX_ERROR * motion / 700)  # float32 of the sum
    with np.load(path) as z:
        assert z["tracks"].dtype == np.float32


def test_half_stays_float16_when_precise_enough(tmp_path, recwarn):
    tracks, occluded, q = _far_tracks(20.0)
    path = save_tracks(str(tmp_path / "t.npz"), tracks, occluded, q, half=True)
    assert not [w for w in recwarn if issubclass(w.category, PrecisionWarning)]
    with np.load(path) as z:
        assert z["tracks"].dtype == np.float16
    assert np.abs(load_tracks(path)["tracks"] - tracks).max() <= HALF_MAX_ERROR


def test_dense_half_export_rescaled_to_a_large_video_stores_float32(tmp_path):
    m = _model()
    with pytest.warns(PrecisionWarning, match="target frames stored float32"):
        path = export_dense(m, 1, str(tmp_path / "d.npz"), half=True, scale_to=(400 * m.h, 400 * m.w),
                            progress=False)
    tracks, _, _ = dense_tracks(m, 1)
    want = rescale_points(tracks, (m.h, m.w), (400 * m.h, 400 * m.w))
    assert np.abs(load_tracks(path)["tracks"] - want).max() <= HALF_MAX_ERROR


class DivergedModel(ParallaxModel):
    """Maps the points right of about x = 0.7 px in frame 2 to NaN, as a diverged model does."""

    def map_from_canonical(self, u, ids):
        x = super().map_from_canonical(u, ids)
        if list(ids) == [2]:
            x = torch.where(x[..., :1] > -0.8, torch.full_like(x, float("nan")), x)
        return x


def test_diverged_points_have_no_estimate_and_are_occluded(tmp_path):
    torch.manual_seed(0)
    m = DivergedModel(num_imgs=4, h=5, w=7, num_samples_ray=6).double().eval()
    q = np.array([[0, 2, 1], [0, 2, 6], [2, 2, 6]])
    tracks, occluded, scores = track_points(m, q)
    missing = ~np.isfinite(tracks).all(-1)
    assert missing.any() and not missing[2, 2]  # the query frame is the query itself
    assert occluded[missing].all() and np.isnan(scores[missing]).all()
    for half in (False, True):
        with pytest.warns(NoEstimateWarning, match=f"{missing.sum()} of 12 track positions have no estimate"):
            path = save_tracks(str(tmp_path / f"t{half}.npz"), tracks, occluded, q, scores, half=half)
        np.testing.assert_array_equal(~np.isfinite(load_tracks(path)["tracks"]).all(-1), missing)
    with pytest.warns(NoEstimateWarning, match="have no estimate"):
        export_dense(m, 0, str(tmp_path / "d.npz"), progress=False)


class ShiftedModel(OmniMotion):
    """Frame 3's local points are frame 0's shifted right by one image width: a track from frame 0
    leaves the image there."""

    def map_from_canonical(self, u, ids):
        x = super().map_from_canonical(u, ids)
        if list(ids) == [3]:
            x = x + torch.tensor([2.0, 0.0, 0.0], dtype=x.dtype)
        return x


def test_tracks_outside_the_image_are_occluded():
    torch.manual_seed(0)
    m = ShiftedModel(num_imgs=4, h=5, w=7, num_samples_ray=6).double().eval()
    q = np.array([[0, 2, 1], [0, 1, 3]])
    tracks, occluded, scores = track_points(m, q)
    assert (tracks[:, 3, 0] > m.w - 1).all()  # pushed out of the image
    assert occluded[:, 3].all()
    inside = (tracks[..., 0] >= 0) & (tracks[..., 0] <= m.w - 1) & (tracks[..., 1] >= 0) & (tracks[..., 1] <= m.h - 1)
    np.testing.assert_array_equal(occluded[inside], scores[inside] > 0.99)

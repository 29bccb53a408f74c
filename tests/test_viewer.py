"""``fastomni view``: the static viewer's files, and the page in headless Chromium (a scripted
click draws the trail; missing data files give a readable error)."""
import base64
import json
import os
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from fastomni.cli import main
from fastomni.field import OcclusionTables, export_field
from fastomni.inputs import InputError
from fastomni.nn import OmniMotion
from fastomni.query import load_tracks
from fastomni.viewer import grid_stride

T, H, W = 5, 10, 12
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it in .ci/run: "
                                                              "apt-get install -y chromium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 5-frame 10x12 model's field export, its video as a frame folder, and the viewer."""
    root = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    m = OmniMotion(num_imgs=T, h=H, w=W, num_samples_ray=8).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_field(m, str(root / "field"), OcclusionTables(m), progress=False)
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for t in range(T):
        cv2.imwrite(str(frames / f"{t:03d}.png"), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    assert main(["view", str(root / "field"), "--video", str(frames), "--out", str(root / "site"), "--quiet",
                 "--max_points", "30"]) == 0
    return root


def _decode(path):
    text = open(path).read()
    i, tracks, occluded = re.fullmatch(r'fastomniQuery\((\d+), "([^"]*)", "([^"]*)"\);\n', text).groups()
    return int(i), np.frombuffer(base64.b64decode(tracks), "<i2"), np.frombuffer(base64.b64decode(occluded), np.uint8)


def _manifest(site):
    text = (site / "site" / "data" / "manifest.js").read_text()
    return json.loads(text.removeprefix("window.FASTOMNI_MANIFEST = ").removesuffix(";\n"))


def test_grid_stride():
    assert grid_stride(10, 12, 120) == 1 and grid_stride(10, 12, 30) == 2 and grid_stride(10, 12, 29) == 3
    assert grid_stride(480, 854, 16384) == 6  # 96 x 171 = 16416 points at stride 5
    with pytest.raises(InputError):
        grid_stride(4, 4, 0)


def test_viewer_files(site):
    out = site / "site"
    assert {"index.html", "viewer.js", "viewer.css", "data", "frames", "depth"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "frames")) == [f"{t:05d}.jpg" for t in range(T)]
    assert sorted(os.listdir(out / "depth")) == [f"{t:05d}.png" for t in range(T)]
    man = _manifest(site)
    assert (man["numFrames"], man["height"], man["width"], man["stride"]) == (T, H, W, 2)
    rows = (np.arange(0, H, 2)[:, None] * W + np.arange(0, W, 2)[None]).ravel()
    assert man["gridRows"] * man["gridCols"] == len(rows)
    i, tracks, occluded = _decode(out / "data" / "q_00002.js")
    ref = load_tracks(str(site / "field" / "dense_00002.npz"))
    assert i == 2
    got = tracks.reshape(len(rows), T, 2).astype(np.float64) / man["trackScale"]
    np.testing.assert_allclose(got, ref["tracks"][rows], atol=0.5 / man["trackScale"] + 1e-6)
    np.testing.assert_array_equal(occluded.reshape(len(rows), T), ref["occluded"][rows])
    assert "http" not in (out / "index.html").read_text() + (out / "viewer.js").read_text()  # no network


def test_view_refuses_incomplete_export(site, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(site / "field", partial)
    os.remove(partial / "dense_00003.npz")
    assert main(["view", str(partial), "--video", str(site / "frames"), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "lacks query frames [3]" in capsys.readouterr().err
    assert main(["view", str(tmp_path), "--video", str(site / "frames"), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "neither a field export" in capsys.readouterr().err


def _browse(folder, fragment="", screenshot=None):
    url = "file://" + os.path.abspath(folder / "index.html") + fragment
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,760",
           "--virtual-time-budget=5000"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if screenshot:
        return None
    state = re.search(r'<pre id="state">(.*?)</pre>', out.stdout, re.S).group(1)
    return json.loads(state.replace("&quot;", '"').replace("&amp;", "&")), out.stdout


@needs_chromium
def test_page_click_draws_trail(site, tmp_path):
    state, dom = _browse(site / "site", "#query=2&click=6.2,3.1&frame=4&grid=1")
    assert state["status"] == "ready" and state["error"] is None, state
    assert state["frame"] == 4 and state["queryFrame"] == 2 and state["grid"] is True
    man = _manifest(site)
    # the nearest grid pixel to (6.2, 3.1) is (6, 4): row 2, column 3 of the stride-2 grid
    assert state["click"]["point"] == 2 * man["gridCols"] + 3 and state["click"]["pixel"] == [6, 4]
    ref = load_tracks(str(site / "field" / "dense_00002.npz"))
    occluded = ref["occluded"][4 * W + 6]
    assert state["trail"]["occluded"] == occluded.astype(int).tolist()
    assert state["trail"]["drawn"] == T and state["trail"]["occludedFrames"] == int(occluded.sum())
    assert 'data-status="ready"' in dom and 'data-trail-points="5"' in dom
    shot = tmp_path / "shot.png"
    _browse(site / "site", "#query=2&click=6.2,3.1&frame=4&grid=1", screenshot=shot)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (760, 1100)
    canvas = image[41:41 + 530, 12:12 + 636].astype(np.float64)  # the video canvas (53x scale of 12x10)
    assert canvas.std() > 20  # not blank: frames, grid and trail drawn


@needs_chromium
def test_page_missing_data_shows_error(site, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(site / "site", broken)
    os.remove(broken / "data" / "q_00001.js")
    state, dom = _browse(broken, "#query=1&click=3,3")
    assert state["status"] == "error" and "q_00001.js" in state["error"] and "missing" in state["error"]
    assert '<div id="error">' in dom  # shown (no hidden attribute), with the message
    os.remove(broken / "data" / "manifest.js")
    state, dom = _browse(broken)
    assert state["status"] == "error" and "data/manifest.js" in state["error"]
    assert "Cannot load data/manifest.js" in dom

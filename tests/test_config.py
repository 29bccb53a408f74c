"""Config: the original's option names and .txt format, YAML/JSON, presets, CLI overrides, errors."""
import argparse
import dataclasses
import json

import pytest

from fastomni.config import (
    Config,
    add_config_arguments,
    config_from_args,
    config_to_text,
    load_config,
    parse_config_text,
    preset,
)

# The original's configs/default.txt, as shipped (a machine path in data_dir included).
ORIGINAL_DEFAULT_TXT = """expname = default
data_dir = data/davis/lab-coat  # specify the sequence directory

# training
num_pairs = 8
num_pts = 256
use_affine = True
use_error_map = True
use_count_map = True

# inference
use_max_loc = True
vis_occlusion = True
"""


def test_original_default_txt_gives_the_original_preset():
    cfg = parse_config_text(ORIGINAL_DEFAULT_TXT)
    assert cfg.data_dir == "data/davis/lab-coat" and cfg.expname == "default"
    assert dataclasses.replace(cfg, data_dir="", expname="") == preset("original")


def test_original_preset_values():
    cfg = preset("original")
    assert (cfg.num_iters, cfg.num_pairs, cfg.num_pts, cfg.num_samples_ray) == (100000, 8, 256, 32)
    assert (cfg.lr_feature, cfg.lr_deform, cfg.lr_color) == (1e-3, 1e-4, 3e-4)
    assert (cfg.lrate_decay_steps, cfg.lrate_decay_factor, cfg.i_weight, cfg.occlusion_th) == (20000, 0.5, 20000, 0.99)
    assert cfg.use_affine and cfg.use_error_map and cfg.use_count_map and cfg.use_max_loc and not cfg.mask_near


def test_cpu_preset_is_smaller():
    cpu, orig = preset("cpu"), preset("original")
    assert cpu.num_iters < orig.num_iters and cpu.num_pts < orig.num_pts
    assert cpu.num_samples_ray < orig.num_samples_ray and 0 < cpu.max_side <= 128 and cpu.device == "cpu"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpu")


def test_text_format_details():
    cfg = parse_config_text("num_iters: 50\nuse_affine = no\nmask_near\n; a comment\n[section]\n"
                            "save_dir = 'my out/'  # quoted\nmax_depth = 3.5\n")
    assert cfg.num_iters == 50 and not cfg.use_affine and cfg.mask_near
    assert cfg.save_dir == "my out/" and cfg.max_depth == 3.5
    # options of the original without effect in fastomni are accepted
    assert parse_config_text("distributed = 0\nnum_workers = 4\ndataset_weights = [1.]\n") == Config()


@pytest.mark.parametrize("text, msg", [
    ("num_iter = 5", "unknown option 'num_iter' \\(did you mean 'num_iters'\\?\\)"),
    ("num_iters = many", "num_iters = 'many' is not an integer"),
    ("num_iters = 2.5", "not an integer"),
    ("use_affine = maybe", "not a switch"),
    ("lr_color = fast", "not a number"),
    ("num_iters = 0", "num_iters must be >= 1"),
    ("min_depth = 2\nmax_depth = 1", "max_depth \\(1.0\\) must exceed min_depth"),
    ("occlusion_th = 1.5", "occlusion_th must be in"),
    ("num_pts = 3\nnum_pts = 4", "set twice"),
    ("= 4", "expected 'key = value'"),
])
def test_bad_text(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_config_text(text, where="cfg.txt")


def test_yaml_json_and_txt_files(tmp_path):
    (tmp_path / "a.yaml").write_text("num_iters: 7\nuse_affine: false\nlr_deform: 2.0e-4\n")
    (tmp_path / "a.json").write_text(json.dumps({"num_iters": 8, "mask_near": True}))
    (tmp_path / "a.txt").write_text("num_iters = 9\n")
    y, j, t = (load_config(str(tmp_path / f"a.{e}")) for e in ("yaml", "json", "txt"))
    assert (y.num_iters, y.use_affine, y.lr_deform) == (7, False, 2e-4)
    assert (j.num_iters, j.mask_near, t.num_iters) == (8, True, 9)
    assert load_config(str(tmp_path / "a.txt"), base=preset("cpu")).num_pts == preset("cpu").num_pts


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "none.txt"))
    (tmp_path / "bad.yaml").write_text("num_iters: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(str(tmp_path / "list.json"))
    (tmp_path / "typo.yaml").write_text("use_afine: true\n")
    with pytest.raises(ValueError, match="typo.yaml: unknown option 'use_afine'"):
        load_config(str(tmp_path / "typo.yaml"))
    (tmp_path / "bool.json").write_text(json.dumps({"num_iters": True}))
    with pytest.raises(ValueError, match="not an integer"):
        load_config(str(tmp_path / "bool.json"))


def test_text_round_trip():
    cfg = preset("cpu").replace(expname="x y", lr_color=1.25e-5, use_affine=False)
    assert parse_config_text(config_to_text(cfg)) == cfg


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_layers_preset_file_flags(tmp_path):
    (tmp_path / "c.txt").write_text("num_iters = 123\nnum_pts = 77\nuse_affine = False\n")
    cfg = _parse(["--preset", "cpu", "--config", str(tmp_path / "c.txt"), "--num_pts", "11", "--use_affine"])
    assert cfg.num_iters == 123 and cfg.num_pts == 11 and cfg.use_affine  # flags beat the file
    assert cfg.num_samples_ray == preset("cpu").num_samples_ray  # the preset fills the rest
    assert not _parse(["--use_error_map", "false"]).use_error_map
    assert _parse([]) == preset("original")
    with pytest.raises(ValueError, match="command line: num_pts = 'x' is not an integer"):
        _parse(["--num_pts", "x"])


def test_replace_validates():
    with pytest.raises(ValueError, match="num_pairs must be >= 1"):
        preset("cpu").replace(num_pairs=0)
    with pytest.raises(ValueError, match="unknown option"):
        preset("cpu").replace(bogus=1)

"""Checkpoints load without running code from the file: original checkpoints still load, a crafted
pickle is refused and nothing in it runs, a truncated file is a clear error, and load_run reads a
checkpoint once."""
import os

import pytest
import torch

import fastomni.checkpoint as ckpt_mod
from fastomni.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fastomni.nn import OmniMotion
from fastomni.train import make_optimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return OmniMotion(num_imgs=3, h=8, w=10, num_samples_ray=4)


class Payload:
    """Unpickling this calls ``os.system`` (a file appears if it ever runs)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_original_checkpoint_loads(tmp_path, zipfile_format):
    """The original's layout: the three networks' state dicts, optimizer and scheduler, nothing else."""
    src = _model(1)
    opt, sched = make_optimizer(src)
    src.deform_mlp.layers1[0].mask  # noqa: B018 - the masks are buffers, saved with the state dict
    state = {"deform_mlp": src.deform_mlp.state_dict(), "feature_mlp": src.feature_mlp.state_dict(),
             "color_mlp": src.color_mlp.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    path = str(tmp_path / "model_100000.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zipfile_format)
    dst = _model(2)
    opt2, sched2 = make_optimizer(dst)
    load_checkpoint(path, dst, opt2, sched2)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert sched2.state_dict() == sched.state_dict()


def test_original_modules_state_dicts_load(golden, tmp_path):
    """The golden file's state dicts, written by the original modules, in the original's checkpoint
    layout with Adam and StepLR states: they load with weights_only=True."""
    meta = golden["meta"]
    m = OmniMotion(meta["num_imgs"], meta["h"], meta["w"], meta["num_samples_ray"], meta["min_depth"],
                   meta["max_depth"], meta["pe_freq"], meta["use_affine"])
    opt, sched = make_optimizer(m)
    state = {k: golden[f"state_dict.{k}"] for k in ("deform_mlp", "feature_mlp", "color_mlp")}
    torch.save({**state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "model.pth")
    load_checkpoint(str(tmp_path / "model.pth"), m, opt, sched)
    for name, sd in state.items():
        for k, v in sd.items():
            assert torch.equal(getattr(m, name).state_dict()[k], v), (name, k)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "model_000001.pth")
    m = _model()
    torch.save({"deform_mlp": m.deform_mlp.state_dict(), "feature_mlp": m.feature_mlp.state_dict(),
                "color_mlp": m.color_mlp.state_dict(), "step": Payload(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load .*objects other than tensors and plain data"):
        load_checkpoint(path, _model())
    assert not marker.exists()


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "not a readable torch checkpoint"),
    (lambda b: b"not a checkpoint", "not a readable torch checkpoint"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, match):
    path = save_checkpoint(str(tmp_path), 3, _model())
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(ValueError, match=match):
        read_checkpoint(path)


def test_foreign_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "model_000001.pth")
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="OmniMotion checkpoint .* is missing feature_mlp, deform_mlp, color_mlp"):
        read_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="holds a list"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(tmp_path / "none.pth"))


def test_load_run_reads_the_checkpoint_once(tmp_path, monkeypatch):
    from fastomni.config import config_to_text, preset
    from fastomni.optimize import build_model, load_run

    cfg = preset("cpu").replace(num_samples_ray=4)
    (tmp_path / "config.txt").write_text(config_to_text(cfg))
    m = build_model(cfg, 3, 8, 10)
    save_checkpoint(str(tmp_path), 7, m, num_imgs=3, image_size=(8, 10))
    calls = []
    real = torch.load

    def counting_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "load", counting_load)
    model, _, step = load_run(str(tmp_path), device="cpu")
    assert calls == [True] and step == 7
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

"""Run configuration: the original's option names, its file formats, presets and CLI overrides.

A :class:`Config` holds every option of the original ``config.py`` that fastomni acts on, under the
same name, plus a few of fastomni's own (``seed``, ``max_side``, ``device``). It is built in three
layers, each overriding the one before::

    preset ('original' or 'cpu')  <  config file (.txt / .yaml / .json)  <  command-line flags

The ``.txt`` format is the original's configargparse one (``key = value`` per line, ``#``
comments, ``True``/``False`` for switches)::

    >>> cfg = parse_config_text("num_iters = 500\\nuse_affine = False  # no 2D affine\\n")
    >>> cfg.num_iters, cfg.use_affine, cfg.num_pts
    (500, False, 256)

Presets: ``original`` is what ``train.py --config configs/default.txt`` runs in the original (its
argparse defaults with default.txt's switches on: affine layers, hard mining, count maps, max-weight
correspondences, occlusion marks). ``cpu`` is a budget for a 2-core CPU, a few minutes for a short
clip: frames downscaled to 64 px, 4 pairs x 64 points x 8 samples per step (1/32 of the original's
samples), 200 steps at 10x (deformation, colour) and 3x (codes) the learning rates, and no hard
mining (one refresh of its cache, a dense pass over every frame, costs about as much as 100 of these
steps). It runs the whole method in minutes but is far from converged: on the demo clip the
background's motion is fit, independently moving objects only after thousands of steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "IGNORED_KEYS",
    "MODEL_KEYS",
    "PRESETS",
    "Config",
    "add_config_arguments",
    "config_from_args",
    "config_to_text",
    "load_config",
    "parse_config_text",
    "preset",
]


@dataclass
class Config:
    """Options of one per-video optimization (names and meanings as in the original)."""

    # general
    data_dir: str = ""  # the sequence folder (color/, raft_exhaustive/, ...)
    expname: str = ""  # the output folder is save_dir/{expname}_{sequence name} unless given
    save_dir: str = "out/"
    ckpt_path: str = ""  # start from this checkpoint when the output folder has none yet
    no_reload: bool = False  # refuse to continue from the output folder's checkpoints
    load_opt: bool = True  # restore the optimizer state when continuing
    load_scheduler: bool = True
    num_iters: int = 100000
    loader_seed: int = 12  # seed of the pair/pixel sampler
    seed: int = 1234  # fastomni: seed of the network initialization and ray jitter
    device: str = "auto"  # fastomni: 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...
    family: str = "original"  # fastomni: model family, 'original' (the paper's networks) or 'fast' (grids)
    # data
    num_imgs: int = 250  # use at most this many frames
    num_pairs: int = 8  # frame pairs per batch
    num_pts: int = 256  # pixels per pair
    max_side: int = 0  # fastomni: downscale frames so the longer side is at most this (0: keep)
    pair_near: int = 0  # fastomni: 0: flow for every frame pair (the original); k: pairs within k frames, then 2k, 4k, ...
    pair_sampling: str = "original"  # fastomni: 'original' or 'uniform' (targets uniform, every pair weighted 1)
    frame_format: str = "jpg"  # fastomni: the sequence's stored frames, 'jpg' (the original's) or lossless 'png'
    # learning rates
    lr_feature: float = 1e-3
    lr_deform: float = 1e-4
    lr_color: float = 3e-4
    lrate_decay_steps: int = 20000
    lrate_decay_factor: float = 0.5
    grad_clip: float = 0.0
    # network and training
    use_error_map: bool = True
    use_count_map: bool = True
    use_affine: bool = True
    mask_near: bool = False
    num_samples_ray: int = 32
    pe_freq: int = 4
    min_depth: float = 0.0
    max_depth: float = 2.0
    start_interval: int = 20  # largest frame interval of a pair at step 0; grows by 1 every 2000 steps
    max_padding: float = 0.0
    # inference
    chunk_size: int = 10000  # query points per network call
    use_max_loc: bool = True
    query_frame_id: int = 0
    vis_occlusion: bool = True
    occlusion_th: float = 0.99
    refine_interval: int = 0  # fastomni: 0: the model's tracks; k: refined on the flow within k frames (refine.py)
    refind_radius: float = 0.0  # fastomni: 0: off; r: lost points re-found by matches within r px (refind.py)
    align_radius: int = 0  # fastomni: 0: off; r: visible positions aligned to the query's r-px patch (subpixel.py)
    # logging
    i_print: int = 100  # steps between loss log lines
    i_img: int = 500  # steps between trajectory snapshots (vis/); 0: none
    i_weight: int = 20000  # steps between checkpoints
    i_cache: int = 20000  # steps between refreshes of the hard-mining flow-error cache

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first option with an impossible value."""
        positive = ("num_iters", "num_imgs", "num_pairs", "num_pts", "num_samples_ray", "lrate_decay_steps",
                    "chunk_size", "pe_freq", "start_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("i_print", "i_img", "i_weight", "i_cache", "max_side", "grad_clip", "max_padding", "pair_near",
                     "refine_interval", "refind_radius", "align_radius"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_feature", "lr_deform", "lr_color", "lrate_decay_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.max_depth > self.min_depth:
            raise ValueError(f"max_depth ({self.max_depth}) must exceed min_depth ({self.min_depth})")
        if not 0.0 <= self.occlusion_th <= 1.0:
            raise ValueError(f"occlusion_th must be in [0, 1], got {self.occlusion_th}")
        if self.num_imgs < 2:
            raise ValueError(f"num_imgs must be >= 2 (a video of at least 2 frames), got {self.num_imgs}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.pair_sampling not in PAIR_SAMPLING:
            raise ValueError(f"pair_sampling must be one of {PAIR_SAMPLING}, got {self.pair_sampling!r}")
        if self.frame_format not in FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {self.frame_format!r}")

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (checked like a fresh config)."""
        return _build(dataclasses.asdict(self), changes, "overrides")


# Options of the original with no effect in fastomni (distributed training, data loader workers,
# the tensorboard-era dataset mixer, the foreground mask of viz.py): accepted in files, ignored.
IGNORED_KEYS = frozenset({"config", "local_rank", "distributed", "num_workers", "dataset_types",
                          "dataset_weights", "foreground_mask_path", "fff"})

FAMILIES = ("original", "fast")
PAIR_SAMPLING = ("original", "uniform")  # see fastomni.sampler.PairSampler
FRAME_FORMATS = ("jpg", "png")  # see fastomni.io.write_frames
FLOW_PRESETS = ("fine", "full", "medium", "fast")  # see fastomni.preprocess.flow_estimator

# Options that fix the shape of the networks or the sampling: a run must keep them to resume.
MODEL_KEYS = ("family", "num_samples_ray", "pe_freq", "use_affine", "min_depth", "max_depth")

PRESETS: dict[str, dict[str, Any]] = {
    "original": {},
    "cpu": {
        "max_side": 64, "num_pairs": 4, "num_pts": 64, "num_samples_ray": 8, "num_iters": 200,
        "lr_feature": 3e-3, "lr_deform": 1e-3, "lr_color": 1e-3, "lrate_decay_steps": 200,
        "use_error_map": False, "i_print": 25, "i_img": 0, "i_weight": 100, "i_cache": 100, "chunk_size": 4096,
        "device": "cpu",
    },
    # The fast model family (grids, fastomni.nn.fast) on a CPU budget; its schedule was chosen by
    # measurement (docs/fast-preset.md).
    "fast": {
        "family": "fast", "max_side": 128, "pair_near": 8, "pair_sampling": "uniform", "num_pairs": 4, "num_pts": 128,
        "num_samples_ray": 8, "num_iters": 2400,
        "lr_feature": 1e-2, "lr_deform": 1e-2, "lr_color": 1e-2, "lrate_decay_steps": 600,
        "use_error_map": False, "use_affine": False, "i_print": 100, "i_img": 0, "i_weight": 600, "i_cache": 600,
        "chunk_size": 4096, "device": "cpu", "frame_format": "png", "refine_interval": 4,
        "refind_radius": 32.0, "align_radius": 4,
    },
}

_FIELDS = {f.name: f for f in fields(Config)}
_DEFAULTS = Config()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(name: str, value: Any, where: str) -> Any:
    """``value`` (from a file or a flag) converted to the type of option ``name``."""
    kind = type(getattr(_DEFAULTS, name))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{where}: {name} = {value!r} is not a switch (use true or false)")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: {name} = {value!r} is not an integer")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} = {value!r} is not an integer") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: {name} = {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} = {value!r} is not a number") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. YAML's `expname: 2023`
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} = {value!r} must be a string")
    return value


def _unknown(name: str, where: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown option {name!r}{hint}")


def _build(base: dict[str, Any], changes: dict[str, Any], where: str) -> Config:
    values = dict(base)
    for name, value in changes.items():
        if name in IGNORED_KEYS:
            continue
        if name not in _FIELDS:
            raise _unknown(name, where)
        values[name] = _convert(name, value, where)
    try:
        return Config(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def preset(name: str) -> Config:
    """The configuration of preset ``name`` ('original' or 'cpu')."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return _build(dataclasses.asdict(Config()), PRESETS[name], f"preset {name!r}")


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if ch in "\"'":
            quote = None if quote == ch else (ch if quote is None else quote)
        elif ch == "#" and quote is None:
            return line[:i]
    return line


def _parse_text(text: str, where: str) -> dict[str, Any]:
    """configargparse ``key = value`` lines -> {key: raw string}."""
    values: dict[str, Any] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line or line.startswith((";", "[", "---")):  # configargparse's comment/section lines
            continue
        if "=" in line:
            key, value = line.split("=", 1)
        elif ":" in line:
            key, value = line.split(":", 1)
        else:
            key, value = line, "true"  # a bare switch name turns it on, as in configargparse
        key, value = key.strip().lstrip("-"), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not key:
            raise ValueError(f"{where} line {lineno}: expected 'key = value', got {raw.strip()!r}")
        if key in values:
            raise ValueError(f"{where} line {lineno}: option {key!r} is set twice")
        values[key] = value
    return values


def parse_config_text(text: str, base: Config | None = None, where: str = "config") -> Config:
    """A config from the original's ``key = value`` text over ``base`` (default: preset original)."""
    return _build(dataclasses.asdict(base or Config()), _parse_text(text, where), where)


def load_config(path: str, base: Config | None = None) -> Config:
    """Read a config file over ``base`` (default: preset original).

    ``.yaml``/``.yml`` and ``.json`` files hold a mapping of option names; any other extension is
    read as the original's configargparse text. Unknown options, wrong types and impossible
    values raise ``ValueError`` naming the file and the option.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml", ".json"):
        try:
            if ext == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - any parser error is a bad file to the user
            raise ValueError(f"{path} is not valid {ext[1:].upper()}: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values, got {type(data).__name__}")
        return _build(dataclasses.asdict(base or Config()), data, path)
    return parse_config_text(text, base, path)


def config_to_text(cfg: Config) -> str:
    """The config as ``key = value`` lines (sorted, like the original's args.txt); loadable again."""
    return "".join(f"{k} = {v}\n" for k, v in sorted(dataclasses.asdict(cfg).items()))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset``, ``--config`` and one ``--<option>`` flag per config option.

    Flags default to "not given", so only those on the command line override the file. A switch
    given bare turns on (``--use_affine``); ``--use_affine false`` turns it off.
    """
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting values: original, fast or cpu (default: original with a GPU, fast without)")
    parser.add_argument("--config", default=None, help="config file: the original's key = value .txt, .yaml or .json")
    group = parser.add_argument_group("options (override the preset and the config file)")
    for name in _FIELDS:
        default = getattr(_DEFAULTS, name)
        if isinstance(default, bool):
            group.add_argument(f"--{name}", nargs="?", const="true", default=argparse.SUPPRESS, metavar="BOOL",
                               help=f"switch (original preset: {default})")
        else:
            group.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=type(default).__name__.upper(),
                               help=f"(original preset: {default!r})")


def config_from_args(args: argparse.Namespace, default_preset: str = "original",
                     defaults: dict[str, Any] | None = None) -> Config:
    """The config of parsed ``args``: preset, then ``defaults`` (a command's own values for some
    options), then ``--config`` file, then the given flags."""
    cfg = preset(args.preset or default_preset)
    if defaults:
        cfg = cfg.replace(**defaults)
    if getattr(args, "config", None):
        cfg = load_config(args.config, cfg)
    flags = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    return _build(dataclasses.asdict(cfg), flags, "command line")

"""Starting a run from a pretrained model (train.py --init-from): a resdiff run or model folder, a diffusers
pipeline folder or a saved UNet2DModel, converted exactly.

The source's architecture becomes the config's model section (model keys that disagree with it are a usage
error; only settings that leave the weights as they are may differ); its image channels, size and classes must be
the data's. The run's identity records the source's path and weights digest (``resdiff.rundir.run_identity``), so
a resume with another source is refused. Nothing here writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .errors import UsageError
from .files import file_digest
from .hints import plain
from .shapes import image_shape
from .unet import PRESETS

__all__ = ["InitSource", "load_init_source"]

# UNet settings that leave its weights as they are: a fine-tuning config may change them.
_TRAINING_ONLY = ("dropout", "zero_init_last")
_DATA_DECIDES = ("sample_size", "in_channels", "num_classes")  # build_unet takes them from the data section


@dataclass
class InitSource:
    """The model a run starts from (--init-from): where it is, its weights, their digest (the run's identity)."""

    path: Path  # the folder given, resolved
    weights: dict[str, torch.Tensor]  # a resdiff UNet's state dict
    sha256: str  # of the weights file read
    config: Path  # its U-Net config, named in errors
    num_classes: int | None

    def check_classes(self, classes: list[str]) -> None:
        """The data has as many classes as the source was trained on (``classes``: empty when unconditional)."""
        if len(classes) != (self.num_classes or 0):
            has = f"{self.num_classes} classes" if self.num_classes else "no classes (unconditional)"
            data = f"{len(classes)} class folders" if classes else "no classes (data.class_cond is false)"
            raise UsageError(f"--init-from {self.path}: {self.config} has {has}, but the data has {data}; start from "
                             f"a model of the data's classes, or use data whose classes match it")


def load_init_source(cfg: Config, path: str | Path) -> InitSource:
    """The model at ``path`` (a resdiff run or model folder, a diffusers pipeline folder, a saved UNet2DModel),
    checked against the config, whose model section becomes its architecture. Model keys the config sets that
    disagree with the source are an error (``_TRAINING_ONLY`` ones apply), so are image channels and size that
    differ from the data's. Nothing is written."""
    from .model_folder import load_unet

    try:
        unet, weights = load_unet(path)
    except UsageError as err:
        raise UsageError(f"--init-from {path}: {err}") from None
    config = weights.parent / "config.json"
    arch = {k: plain(v) for k, v in unet.config.items() if not k.startswith("_")}
    d = cfg.data
    if arch["in_channels"] != d.image_channels:
        raise UsageError(f"--init-from {path}: {config} has in_channels={arch['in_channels']}, but the data is read "
                         f"with data.image_channels={d.image_channels}; set data.image_channels={arch['in_channels']}, "
                         f"or start from a {d.image_channels}-channel model")
    if image_shape(arch["sample_size"]) != image_shape(d.image_size):
        raise UsageError(f"--init-from {path}: {config} has sample_size={arch['sample_size']}, but data.image_size is "
                         f"{plain(d.image_size)}; set data.image_size={arch['sample_size']}")
    conflicts = _model_conflicts(cfg.model, arch)
    if conflicts:
        raise UsageError(f"--init-from {path}: the model comes from {config}, but the config sets {'; '.join(conflicts)}; "
                         f"remove those model keys (only {', '.join(_TRAINING_ONLY)} may differ)")
    own = {k: v for k, v in cfg.model.items() if k in _TRAINING_ONLY}
    # Every UNet setting is given, so the preset decides nothing; it stays "auto", as load_config reads config.yaml
    # back (a resume compares the two).
    cfg.model = {"preset": "auto", **{k: v for k, v in arch.items() if k not in _DATA_DECIDES}, **own}
    return InitSource(path=Path(path).resolve(), weights=unet.state_dict(), sha256=file_digest(weights),
                      config=config, num_classes=arch.get("num_classes"))


def _model_conflicts(model: dict, arch: dict) -> list[str]:
    """The config's model keys (a named preset's included) that give the source's architecture other values, as
    ``model.channels=32 (the source has 16)``. The default preset, auto, sizes a model only when none is given."""
    given = {k: v for k, v in model.items() if k != "preset"}
    preset = model.get("preset", "auto")
    if preset != "auto":
        if preset not in PRESETS:
            return [f"model.preset={preset}"]
        given = {**{k: v for k, v in PRESETS[preset].items() if k not in _DATA_DECIDES}, **given}
    return [f"model.{k}={plain(v)!r} (the source has {arch[k]!r})" for k, v in given.items()
            if k not in _TRAINING_ONLY and k in arch and plain(v) != arch[k]]

"""Starting a run from a pretrained model (train.py --init-from): a resdiff run or model folder, a diffusers
pipeline folder or a saved UNet2DModel, converted exactly.

The source's architecture becomes the config's model section (model keys that disagree with it are a usage
error; only settings that leave the weights as they are may differ); its input channels, size and classes must be
the data's. A latent model (its folder's latent.json) brings its latent space: the run trains in the latents of the
same autoencoder files (its SPEC unless model.autoencoder names where they are now), normalised as the source's
were, so the weights see the inputs they were trained on. The run's identity records the source's path and weights
digest (``resdiff.rundir.run_identity``), so a resume with another source is refused. Nothing here writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import Config
from .errors import UsageError, one_line
from .files import file_digest
from .hints import plain
from .layout import LATENT
from .shapes import image_shape, shape_name
from .unet import PRESETS

if TYPE_CHECKING:
    from .autoencoder import Autoencoder, LatentSpace

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
    input: tuple[int, int, int]  # the (C, H, W) it takes: images', or a latent model's latents'
    latent: dict | None = None  # a latent model's latent.json (``LatentSpace.record``): its autoencoder and norm

    def check_input(self, model_input: tuple[int, int, int], autoencoder: "Autoencoder | None") -> None:
        """The data gives the source the (C, H, W) it takes (``model_input``: the data's images, or the latents of
        ``autoencoder``), and a latent model the latents of its own autoencoder's files; checked before any image is
        read or encoded."""
        if self.latent is None and autoencoder is not None:
            raise UsageError(f"--init-from {self.path}: it is a model of images, but the run trains on an "
                             f"autoencoder's latents; drop --autoencoder (model.autoencoder)")
        if self.latent is not None and autoencoder is not None:
            differs = autoencoder.differs_from(self.latent["autoencoder"])
            if differs:
                raise UsageError(f"--init-from {self.path}: the model was trained in the latents of "
                                 f"{self.latent['autoencoder']['spec']}, but {differs}; train with the autoencoder it "
                                 f"was trained with (--autoencoder SPEC)")
        (channels, *size), (data_channels, *data_size) = self.input, model_input
        if self.latent is None:
            if data_channels != channels:
                raise UsageError(f"--init-from {self.path}: {self.config} has in_channels={channels}, but the data is "
                                 f"read with data.image_channels={data_channels}; set data.image_channels={channels}, "
                                 f"or start from a {data_channels}-channel model")
            if data_size != size:
                raise UsageError(f"--init-from {self.path}: {self.config} has sample_size={shape_name(size)}, but "
                                 f"data.image_size is {shape_name(data_size)}; set data.image_size={shape_name(size)}")
            return
        factor = autoencoder.downsample if autoencoder is not None else 1
        if (data_channels, *data_size) != (channels, *size):
            raise UsageError(f"--init-from {self.path}: {self.config} takes {channels}x{shape_name(size)} latents "
                             f"(images of {shape_name([n * factor for n in size])}), but the data gives "
                             f"{data_channels}x{shape_name(data_size)}; set data.image_size="
                             f"{shape_name([n * factor for n in size])}")

    def latent_space(self, latent: "LatentSpace") -> "LatentSpace":
        """The run's latent space (``latent``: the data's, of the autoencoder ``check_input`` accepted) as the
        source knew it: the source's normalisation, so its weights see the inputs they were trained on."""
        from .autoencoder import LatentNorm, LatentSpace

        return LatentSpace(latent.autoencoder, LatentNorm.from_dict(self.latent["norm"]))

    def check_classes(self, classes: list[str]) -> None:
        """The data has as many classes as the source was trained on (``classes``: empty when unconditional)."""
        if len(classes) != (self.num_classes or 0):
            has = f"{self.num_classes} classes" if self.num_classes else "no classes (unconditional)"
            data = f"{len(classes)} class folders" if classes else "no classes (data.class_cond is false)"
            raise UsageError(f"--init-from {self.path}: {self.config} has {has}, but the data has {data}; start from "
                             f"a model of the data's classes, or use data whose classes match it")


def load_init_source(cfg: Config, path: str | Path) -> InitSource:
    """The model at ``path`` (a resdiff run or model folder, a diffusers pipeline folder, a saved UNet2DModel),
    checked against the config, whose model section becomes its architecture (and a latent model's autoencoder
    SPEC, unless the config names one). Model keys the config sets that disagree with the source are an error
    (``_TRAINING_ONLY`` ones apply); ``InitSource.check_input`` then checks it against the data. Nothing is
    written."""
    from .model_folder import load_unet

    try:
        unet, weights = load_unet(path)
    except UsageError as err:
        raise UsageError(f"--init-from {path}: {err}") from None
    config = weights.parent / "config.json"
    arch = {k: plain(v) for k, v in unet.config.items() if not k.startswith("_")}
    latent = _latent_record(weights.parent.parent)
    conflicts = _model_conflicts(cfg.model, arch)
    if conflicts:
        raise UsageError(f"--init-from {path}: the model comes from {config}, but the config sets {'; '.join(conflicts)}; "
                         f"remove those model keys (only {', '.join(_TRAINING_ONLY)} may differ)")
    own = {k: v for k, v in cfg.model.items() if k in _TRAINING_ONLY}
    autoencoder = cfg.model.get("autoencoder") or (latent["autoencoder"]["spec"] if latent is not None else None)
    # Every UNet setting is given, so the preset decides nothing; it stays "auto", as load_config reads config.yaml
    # back (a resume compares the two).
    cfg.model = {"preset": "auto", **{k: v for k, v in arch.items() if k not in _DATA_DECIDES}, **own,
                 **({"autoencoder": autoencoder} if autoencoder is not None else {})}
    return InitSource(path=Path(path).resolve(), weights=unet.state_dict(), sha256=file_digest(weights),
                      config=config, num_classes=arch.get("num_classes"),
                      input=(arch["in_channels"], *image_shape(arch["sample_size"])), latent=latent)


def _latent_record(folder: Path) -> dict | None:
    """A resdiff model folder's latent.json (the latent space its model was trained in), or None."""
    record = folder / LATENT
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        data["autoencoder"]["spec"], data["norm"]  # noqa: B018 (the keys a latent space needs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--init-from {folder}: {record} is unreadable ({one_line(err)}); re-export the model") from None
    return data


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

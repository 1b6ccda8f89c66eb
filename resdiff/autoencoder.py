"""The autoencoder a latent diffusion model lives in: load it from a SPEC, encode images, decode latents, and the
latents' per-channel shift and scale.

A SPEC is one of
- a folder holding one TAESD-family pair ``NAME_encoder.pth`` / ``NAME_decoder.pth`` (plain state dicts, read with
  ``torch.load(weights_only=True)``; ``DIR/NAME``, or either file of the pair, picks one pair where the folder holds
  several): the classic 4-channel TAESD and the "flux_2" variant (TAEF2, 32 channels) are both built from the keys
  and shapes of the files, by ``TinyEncoder`` / ``TinyDecoder`` below;
- a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` folder (config.json + safetensors weights; a pipeline folder
  with a ``vae/`` subfolder works too);
- a Hugging Face Hub model id (``madebyollin/taesd``), fetched into huggingface_hub's cache (only its config and
  safetensors weights) and then loaded as a folder, so that offline it is read from the cache.

``Autoencoder`` is the one interface over them: ``encode`` takes images in [-1, 1] (the range resdiff's models use;
each network's own range is its business) and returns its raw latents, ``decode`` returns images in [-1, 1]. It
knows its SPEC and a fingerprint of its files (the SHA-256 of each), so a model folder can record the autoencoder
it was trained in and refuse another.

A latent model sees ``(z - shift) / scale`` per channel (``LatentNorm``): measured on the training data
(``ChannelStats``, float64) or taken from the autoencoder's own config (``scaling_factor``, ``shift_factor``,
``latents_mean``/``latents_std``). diffusers is imported only by the functions that load its models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UsageError, one_line
from .files import file_digest

__all__ = [
    "Autoencoder", "TinyAutoencoder", "DiffusersAutoencoder", "TinyBlock", "TinyEncoder", "TinyDecoder", "LatentNorm",
    "ChannelStats", "load_autoencoder", "LatentSpace", "AUTOENCODER_KINDS",
]

AUTOENCODER_KINDS = ("taesd", "AutoencoderTiny", "AutoencoderKL")  # Autoencoder.kind: a pair folder, then diffusers'
ENCODER_SUFFIX, DECODER_SUFFIX = "_encoder.pth", "_decoder.pth"
_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes (one file, no variant)
_SHARDS = "diffusion_pytorch_model-*-of-*.safetensors"  # ... or in shards, with _WEIGHTS.index.json
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


# ----------------------------------------------------------------------------- the TAESD family, from its files


class SoftClamp(nn.Module):
    """3 tanh(x / 3): the identity near 0, bounded by +-3; the decoder's first layer, keeping wild latents in range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TinyBlock(nn.Module):
    """The TAESD residual block: three 3x3 convolutions (ReLU between), plus the skip, then ReLU.

    With ``branch_channels`` (the "flux_2" variant's lowest-resolution blocks) a second path, 1x1 conv -> GroupNorm
    -> ReLU -> 1x1 conv, is first added to the block's input. Attribute names follow the files' keys (``conv.0``,
    ``skip``, ``pool.0``), so a state dict loads with strict=True."""

    GROUPS = 4  # the flux_2 branch's GroupNorm groups (a fact of the variant; the files give no group count)

    def __init__(self, c_in: int, c_out: int, branch_channels: int = 0) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.pool = None
        if branch_channels:
            self.pool = nn.Sequential(
                nn.Conv2d(c_in, branch_channels, 1, bias=False), nn.GroupNorm(self.GROUPS, branch_channels), nn.ReLU(),
                nn.Conv2d(branch_channels, c_in, 1, bias=False),
            )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)  # (N, c_in, h, w)
        return self.fuse(self.conv(x) + self.skip(x))  # (N, c_out, h, w)


# The layer order of the family, index by index as the files number their keys. "down": stride-2 3x3 conv;
# "up": nearest-neighbour x2 (no weights; the conv after it has them). Widths, the latent channels, biases, skips
# and which blocks carry the flux_2 branch come from the state dict.
ENCODER_LAYERS = ("conv", "block") + ("down", "block", "block", "block") * 3 + ("conv",)
DECODER_LAYERS = ("clamp", "conv", "relu") + ("block", "block", "block", "up", "conv") * 3 + ("block", "conv")


def _layer(kind: str, state: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """One layer of ``kind`` shaped by the tensors under ``prefix`` in ``state`` (KeyError: the files lack one)."""
    if kind in ("conv", "down"):
        c_out, c_in, k, _ = state[f"{prefix}weight"].shape
        return nn.Conv2d(c_in, c_out, k, stride=2 if kind == "down" else 1, padding=k // 2,
                         bias=f"{prefix}bias" in state)
    if kind == "block":
        c_out, c_in = state[f"{prefix}conv.0.weight"].shape[:2]
        branch = state.get(f"{prefix}pool.0.weight")
        return TinyBlock(c_in, c_out, 0 if branch is None else branch.shape[0])
    return {"clamp": SoftClamp, "relu": nn.ReLU, "up": lambda: nn.Upsample(scale_factor=2, mode="nearest")}[kind]()


def _tiny_network(cls: type[nn.Sequential], layers: Sequence[str], state: dict[str, torch.Tensor], file: Path):
    """The ``cls`` Sequential ``layers`` describe, shaped by ``state`` and loaded from it with strict=True."""
    net = None
    try:
        net = cls(*(_layer(kind, state, f"{i}.") for i, kind in enumerate(layers)))
        net.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise UsageError(f"{file} does not fit a TAESD-family {'decoder' if layers is DECODER_LAYERS else 'encoder'} "
                         f"({_misfit(err, net, state)}); pass the NAME{ENCODER_SUFFIX}/NAME{DECODER_SUFFIX} files of "
                         f"one TAESD-family autoencoder") from None
    return net


def _misfit(err: BaseException, net: nn.Module | None, state: dict[str, torch.Tensor]) -> str:
    """Which tensors the files lack or have too many of, or what else did not fit, in a few words."""
    if isinstance(err, KeyError):
        return f"no tensor {err.args[0]}"
    if net is not None:
        missing, unexpected = sorted(set(net.state_dict()) - set(state)), sorted(set(state) - set(net.state_dict()))
        said = [f"{what} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("no tensor", missing), ("unexpected", unexpected)) if keys]
        if said:
            return "; ".join(said)
    return re.sub(r"^Error\(s\) in loading state_dict for \w+:", "", one_line(err, 400)).strip()[:200]


class TinyEncoder(nn.Sequential):
    """A TAESD-family encoder: images in [0, 1] (N, 3, H, W) -> latents (N, C, H/8, W/8)."""


class TinyDecoder(nn.Sequential):
    """A TAESD-family decoder: latents (N, C, h, w) -> images in about [0, 1] (N, 3, 8h, 8w)."""


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from ``file`` with torch.load(weights_only=True): tensors only, never pickled code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{file} is missing; pass a folder holding NAME{ENCODER_SUFFIX} and "
                         f"NAME{DECODER_SUFFIX}") from None
    except Exception as err:  # pickle, zip and format errors all mean: not a weights-only state dict
        raise UsageError(f"{file} is not a state dict torch.load reads with weights_only=True ({one_line(err, 160)}); "
                         f"save the weights as a plain state dict (torch.save(module.state_dict(), ...))") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UsageError(f"{file} holds a {type(state).__name__}, not a state dict of tensors; save the weights as "
                         f"torch.save(module.state_dict(), ...)")
    return state


# ----------------------------------------------------------------------------- the latent normalisation


@dataclass(frozen=True)
class LatentNorm:
    """What a latent model sees: ``(z - shift) / scale``, per latent channel. ``source`` says where the numbers
    came from (measured on which data, or the autoencoder's config)."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.shift) != len(self.scale) or not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise ValueError(f"a latent normalisation needs one positive scale per shift, got {self.shift}, "
                             f"{self.scale}")

    @classmethod
    def uniform(cls, channels: int, shift: float, scale: float, source: str) -> "LatentNorm":
        """One shift and one scale for all ``channels``."""
        return cls((float(shift),) * channels, (float(scale),) * channels, source)

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)  # (C, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (..., C, h, w) -> what the diffusion model learns."""
        return (z - self._view(self.shift, z)) / self._view(self.scale, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """What the diffusion model generates -> raw latents for the decoder."""
        return z * self._view(self.scale, z) + self._view(self.shift, z)

    def to_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNorm":
        return cls(tuple(float(v) for v in d["shift"]), tuple(float(v) for v in d["scale"]), str(d["source"]))


class ChannelStats:
    """Per-channel mean and standard deviation of latents, accumulated in float64 batch by batch (Chan et al.'s
    pairwise update of count, mean and sum of squared deviations: exact to float64 rounding for any count)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, z: np.ndarray | torch.Tensor) -> None:
        """A batch of latents (N, C, h, w), any float dtype."""
        z = z.detach().cpu().numpy() if torch.is_tensor(z) else np.asarray(z)
        x = z.astype(np.float64).transpose(1, 0, 2, 3).reshape(z.shape[1], -1)  # (C, N*h*w)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def norm(self, source: str) -> LatentNorm:
        """The normalisation that gives these latents mean 0 and standard deviation 1 per channel. A channel that
        never varies keeps a tiny floor as its scale (its normalised value is 0 either way)."""
        if self.count == 0:
            raise ValueError("no latents were added")
        std = np.sqrt(self.m2 / self.count)
        return LatentNorm(tuple(self.mean.tolist()), tuple(np.maximum(std, 1e-6).tolist()), source)


# ----------------------------------------------------------------------------- one interface over the kinds


class Autoencoder(nn.Module):
    """An image autoencoder behind one interface: images in [-1, 1] <-> raw latents.

    ``spec`` is what it was loaded from (a local one as an absolute path), ``files`` {name: SHA-256} the files that
    made it (``fingerprint`` digests them), ``downsample`` the side ratio of image to latent, ``latent_channels``
    the latent's channels, ``own_norm`` the normalisation its config gives (identity where it has none)."""

    kind: str = ""

    def __init__(self, spec: str, files: dict[str, str], downsample: int, latent_channels: int, own_norm: LatentNorm,
                 variant: str = "") -> None:
        super().__init__()
        self.spec, self.files, self.variant = spec, dict(files), variant
        self.downsample, self.latent_channels, self.own_norm = downsample, latent_channels, own_norm
        self.image_channels = 3

    def _encode(self, x: torch.Tensor) -> torch.Tensor:  # each kind: its network on images in [-1, 1]
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # each kind: its network, giving images in about [-1, 1]
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W), H and W multiples of ``downsample`` -> raw latents (N, C, H/f, W/f), in
        the autoencoder's device and dtype."""
        return self._encode(x.to(self.device, self.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> images (N, 3, h*f, w*f) clamped to [-1, 1]."""
        return self._decode(z.to(self.device, self.dtype)).clamp(-1, 1)

    @torch.no_grad()
    def encode_many(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """``encode`` over a big set, ``batch_size`` images at a time, without autograd: float32 latents on the CPU."""
        steps = range(0, len(images), batch_size)
        return torch.cat([self.encode(images[i:i + batch_size]).float().cpu() for i in steps])

    @torch.no_grad()
    def decode_many(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """``decode`` over a big set, ``batch_size`` latents at a time, without autograd: float32 images on the CPU."""
        steps = range(0, len(latents), batch_size)
        return torch.cat([self.decode(latents[i:i + batch_size]).float().cpu() for i in steps])

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an (H, W) image; a side that is no multiple of ``downsample`` is a UsageError."""
        h, w = image_size
        if h % self.downsample or w % self.downsample:
            raise UsageError(f"image size {h}x{w} is not a multiple of the autoencoder's downsampling factor "
                             f"{self.downsample} ({self.spec}); choose a size divisible by {self.downsample}")
        return self.latent_channels, h // self.downsample, w // self.downsample

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of the sorted {file: SHA-256} listing: equal exactly when the files are."""
        return hashlib.sha256(json.dumps(sorted(self.files.items())).encode()).hexdigest()

    def record(self) -> dict:
        """What a prepared dataset or a model folder keeps of this autoencoder (JSON)."""
        return {"spec": self.spec, "kind": self.kind, "variant": self.variant, "files": dict(self.files),
                "fingerprint": self.fingerprint, "downsample": self.downsample, "latent_channels": self.latent_channels,
                "own_norm": self.own_norm.to_dict()}

    def differs_from(self, record: dict) -> str | None:
        """Why this autoencoder is not the one ``record`` (``record()`` of another) describes, or None if it is."""
        theirs = dict(record.get("files", {}))
        if theirs == self.files:
            return None
        for name in sorted(set(theirs) | set(self.files)):
            if theirs.get(name) != self.files.get(name):
                if name not in self.files:
                    return f"{self.spec} has no {name}, which {record.get('spec')} had"
                if name not in theirs:
                    return f"{self.spec} has {name}, which {record.get('spec')} did not"
                return f"{name} of {self.spec} is not the file {record.get('spec')} had (its SHA-256 differs)"
        return None


class TinyAutoencoder(Autoencoder):
    """A TAESD-family pair (NAME_encoder.pth / NAME_decoder.pth), built from its files. Its networks work on images
    in [0, 1]; its latents are meant to be used as they are (diffusers' AutoencoderTiny has scaling factor 1)."""

    kind = "taesd"

    def __init__(self, encoder: TinyEncoder, decoder: TinyDecoder, spec: str, files: dict[str, str]) -> None:
        channels = encoder[-1].out_channels
        flux2 = any(isinstance(m, TinyBlock) and m.pool is not None for m in [*encoder, *decoder])
        super().__init__(spec, files, 2 ** ENCODER_LAYERS.count("down"), channels,
                         LatentNorm.uniform(channels, 0.0, 1.0, "TAESD-family latents are used as they are"),
                         variant="flux_2" if flux2 else "classic")
        self.encoder, self.decoder = encoder, decoder

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.add(1).div(2))  # [-1, 1] -> [0, 1]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).mul(2).sub(1)  # about [0, 1] -> about [-1, 1]

    @classmethod
    def from_files(cls, encoder_file: Path, decoder_file: Path, spec: str) -> "TinyAutoencoder":
        encoder = _tiny_network(TinyEncoder, ENCODER_LAYERS, _read_state(encoder_file), encoder_file)
        decoder = _tiny_network(TinyDecoder, DECODER_LAYERS, _read_state(decoder_file), decoder_file)
        made, taken = encoder[-1].out_channels, decoder[1].in_channels
        if made != taken or encoder[0].in_channels != 3 or decoder[-1].out_channels != 3:
            raise UsageError(f"{encoder_file} and {decoder_file} do not make a pair: the encoder maps "
                             f"{encoder[0].in_channels} image channels to {made} latent channels, the decoder "
                             f"{taken} to {decoder[-1].out_channels}; pass the two files of one RGB autoencoder")
        return cls(encoder, decoder, spec, {f.name: file_digest(f) for f in (encoder_file, decoder_file)})


class DiffusersAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL or AutoencoderTiny; both take and give images in [-1, 1] themselves."""

    def __init__(self, vae: nn.Module, spec: str, files: dict[str, str]) -> None:
        c, kind = vae.config, type(vae).__name__
        levels = len(c.block_out_channels if kind == "AutoencoderKL" else c.encoder_block_out_channels)
        super().__init__(spec, files, 2 ** (levels - 1), int(c.latent_channels), _config_norm(c, kind))
        self.kind, self.vae = kind, vae

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "AutoencoderKL":
            # The posterior's mean, not a sample from it: a prepared dataset must be the same bytes every time it
            # is made (and resumed), and the mean is the image's latent without the encoder's noise.
            return self.vae.encode(x).latent_dist.mode()
        return self.vae.encode(x).latents

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def _config_norm(config, kind: str) -> LatentNorm:
    """The normalisation a diffusers config gives, in diffusers' own convention: ``(z - shift_factor) *
    scaling_factor``, or ``(z - latents_mean) * scaling_factor / latents_std`` where the config has those."""
    channels, factor = int(config.latent_channels), float(config.scaling_factor)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        return LatentNorm(tuple(float(m) for m in mean), tuple(float(s) / factor for s in std),
                          f"{kind} config: latents_mean, latents_std and scaling_factor {factor:g}")
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return LatentNorm.uniform(channels, shift, 1 / factor,
                              f"{kind} config: scaling_factor {factor:g}, shift_factor {shift:g}")


# ----------------------------------------------------------------------------- from a SPEC


def _pairs(folder: Path) -> list[str]:
    """NAMEs of the NAME_encoder.pth files in ``folder``, sorted."""
    return sorted(p.name[: -len(ENCODER_SUFFIX)] for p in folder.glob(f"*{ENCODER_SUFFIX}") if p.is_file())


def _pair_files(stem: Path) -> tuple[Path, Path]:
    """The pair DIR/NAME names, both present (or a UsageError naming the one that is missing)."""
    encoder, decoder = (stem.with_name(stem.name + s) for s in (ENCODER_SUFFIX, DECODER_SUFFIX))
    for have, lack in ((encoder, decoder), (decoder, encoder)):
        if have.is_file() and not lack.is_file():
            raise UsageError(f"{have} has no partner: {lack.name} is missing in {stem.parent}; put both files of the "
                             f"pair there")
    return encoder, decoder


def _diffusers_folder(folder: Path) -> Path | None:
    """The model folder of a diffusers autoencoder in ``folder`` (itself, or a pipeline's vae/), or None."""
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _load_diffusers(folder: Path, spec: str, shown: str) -> DiffusersAutoencoder:
    """A diffusers autoencoder from a local model folder (config.json + safetensors). ``shown``: the folder as the
    user should see it in messages."""
    config_file = folder / "config.json"
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise UsageError(f"{shown}/config.json is not a readable JSON config ({one_line(err, 120)}); pass a diffusers "
                         f"autoencoder folder (save_pretrained writes one)") from None
    if name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise UsageError(f"{shown}/config.json describes a {name or 'model without _class_name'}, not an autoencoder "
                         f"resdiff can use; pass an AutoencoderKL or AutoencoderTiny folder, or a TAESD-family pair")
    index = folder / f"{_WEIGHTS}.index.json"  # weights saved in several shards
    weights = [folder / _WEIGHTS] if (folder / _WEIGHTS).is_file() else []
    if not weights and index.is_file():
        weights = sorted(folder.glob(_SHARDS))
    if not weights:
        raise UsageError(f"{shown} has no {_WEIGHTS} (resdiff loads safetensors weights only, never pickles); save the "
                         f"model with save_pretrained(..., safe_serialization=True)")
    import diffusers

    try:
        vae = getattr(diffusers, name).from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UsageError(f"cannot load the {name} in {shown} ({one_line(err, 200)}); check its config.json and "
                         f"weights") from None
    files = [config_file, *([index] if index.is_file() and len(weights) > 1 else []), *weights]
    return DiffusersAutoencoder(vae, spec, {f.name: file_digest(f) for f in files})


def _from_hub(spec: str) -> DiffusersAutoencoder:
    """A diffusers autoencoder by Hub model id: its config and safetensors fetched into huggingface_hub's cache (or
    found there offline), a pipeline repository's vae/ included, then loaded from that folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    names = ("config.json", _WEIGHTS, f"{_WEIGHTS}.index.json", _SHARDS)
    patterns = [f"{sub}{name}" for sub in ("", "vae/") for name in names]
    try:
        folder = Path(snapshot_download(spec, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UsageError(f"autoencoder {spec} is not in huggingface_hub's cache and cannot be downloaded now (offline, "
                         f"HF_HUB_OFFLINE=1, or no network); fetch it once online (hf download {spec}), or pass a "
                         f"local folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UsageError(f"autoencoder {spec}: no such local folder, and no such model on the Hugging Face Hub (or it "
                         f"is private: log in with hf auth login); pass a folder or a model id") from None
    except (OSError, ValueError) as err:  # network and HTTP errors
        raise UsageError(f"cannot fetch autoencoder {spec} from the Hugging Face Hub ({one_line(err, 160)}); try "
                         f"again, or pass a local folder") from None
    model = _diffusers_folder(folder)
    if model is None:
        raise UsageError(f"the Hub model {spec} has no config.json (nor vae/config.json) of a diffusers autoencoder; "
                         f"pass an AutoencoderKL or AutoencoderTiny model id")
    return _load_diffusers(model, spec, f"{spec}{'/vae' if model.name == 'vae' else ''}")


def _load(spec: str) -> Autoencoder:
    path = Path(spec).expanduser()
    here = os.path.abspath(path)  # what a local autoencoder records as its SPEC: valid from any working folder
    if path.is_dir():
        model = _diffusers_folder(path)
        if model is not None:
            return _load_diffusers(model, here, str(model))
        names = _pairs(path)
        if len(names) == 1:
            return TinyAutoencoder.from_files(*_pair_files(path / names[0]), here)
        if names:
            raise UsageError(f"{path} holds {len(names)} autoencoder pairs ({', '.join(names)}); pass one as "
                             f"{path / names[0]} (DIR/NAME)")
        stray = sorted(path.glob(f"*{DECODER_SUFFIX}"))
        if stray:
            _pair_files(stray[0].with_name(stray[0].name[: -len(DECODER_SUFFIX)]))  # names the missing encoder
        raise UsageError(f"{path} holds no autoencoder: neither a NAME{ENCODER_SUFFIX}/NAME{DECODER_SUFFIX} pair nor "
                         f"a diffusers config.json (or vae/config.json); pass a folder that does")
    for suffix in (ENCODER_SUFFIX, DECODER_SUFFIX):  # either file of a pair names the pair
        if path.name.endswith(suffix) and path.is_file():
            return TinyAutoencoder.from_files(*_pair_files(path.with_name(path.name[: -len(suffix)])), here)
    encoder, decoder = _pair_files(path)
    if encoder.is_file():
        return TinyAutoencoder.from_files(encoder, decoder, here)
    if path.exists():
        raise UsageError(f"{path} is not an autoencoder folder nor a file of a NAME{ENCODER_SUFFIX}/"
                         f"NAME{DECODER_SUFFIX} pair; pass the folder that holds the pair, or a diffusers autoencoder "
                         f"folder")
    if path.parent.is_dir() and path.parent != Path("."):  # a local folder was meant: say what is there
        names = _pairs(path.parent)
        raise UsageError(f"autoencoder {spec} does not exist: {path.parent} holds "
                         f"{'the pairs ' + ', '.join(names) if names else 'no NAME' + ENCODER_SUFFIX + ' file'}; pass "
                         f"a folder holding a pair (DIR/NAME picks one), or a diffusers autoencoder folder")
    if _HUB_ID.match(spec):
        return _from_hub(spec)
    raise UsageError(f"autoencoder {spec} does not exist: pass a folder holding a NAME{ENCODER_SUFFIX}/"
                     f"NAME{DECODER_SUFFIX} pair, a diffusers autoencoder folder, or a Hub model id (owner/name)")


def load_autoencoder(spec: str | Path, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> Autoencoder:
    """The autoencoder ``spec`` names (see the module docstring), in eval mode with no gradients, on ``device``
    (default: the CPU) in ``dtype`` (default: float32). Anything unusable is one UsageError line naming the file."""
    ae = _load(str(spec))
    ae.eval().requires_grad_(False)
    return ae.to(device=device or "cpu", dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- the space a latent model lives in


class LatentSpace:
    """An autoencoder and the normalisation of its latents: where a latent diffusion model's samples live.

    ``to_model`` turns images in [-1, 1] into what the model learns (``norm.normalize(encode(x))``), ``to_images``
    its samples back into images in [-1, 1]. ``record()`` is what a model folder keeps (``resdiff.layout.LATENT``),
    ``from_record`` loads it again and refuses an autoencoder whose files differ from the recorded ones."""

    def __init__(self, autoencoder: Autoencoder, norm: LatentNorm):
        self.autoencoder, self.norm = autoencoder, norm

    @property
    def factor(self) -> int:
        return self.autoencoder.downsample

    def to(self, device: torch.device | str) -> "LatentSpace":
        self.autoencoder.to(device)
        return self

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (a latent dataset's items, any float dtype) -> what the model learns, float32."""
        return self.norm.normalize(latents.float())

    @torch.no_grad()
    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> normalised latents (N, C, H/f, W/f), float32 on the images' device."""
        return self.norm.normalize(self.autoencoder.encode(images).float()).to(images.device)

    @torch.no_grad()
    def to_images(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (N, 3, h*f, w*f), float32 on the latents' device."""
        return self.autoencoder.decode(self.norm.denormalize(z.float())).float().to(z.device)

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) of the images latents of ``latent_shape`` (C, h, w) decode to."""
        _, h, w = latent_shape
        return self.autoencoder.image_channels, h * self.factor, w * self.factor

    def record(self) -> dict:
        """The autoencoder (its SPEC and its files' SHA-256) and the normalisation, as JSON."""
        return {"autoencoder": self.autoencoder.record(), "norm": self.norm.to_dict()}

    @classmethod
    def from_record(cls, record: dict, where: str | Path, spec: str | Path | None = None,
                    device: torch.device | str | None = None) -> "LatentSpace":
        """The latent space ``record`` describes (``where``: the file it was read from, for messages), with the
        autoencoder loaded from ``spec`` (default: the recorded SPEC). One whose files differ from the recorded
        ones is refused: the model was trained on another autoencoder's latents."""
        recorded = record["autoencoder"]
        autoencoder = load_autoencoder(spec or recorded["spec"], device)
        differs = autoencoder.differs_from(recorded)
        if differs:
            raise UsageError(f"{where}: the model was trained in the latent space of {recorded['spec']}, but {differs}; "
                             f"pass the autoencoder it was trained with (--autoencoder SPEC)")
        return cls(autoencoder, LatentNorm.from_dict(record["norm"]))

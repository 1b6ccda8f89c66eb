"""The autoencoder of latent diffusion: SPECs, the TAESD-family network built from its files, diffusers' autoencoders
behind one interface, fingerprints, the latent normalisation; the real TAEF2 weights where they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from resdiff.autoencoder import ChannelStats, LatentNorm, TinyAutoencoder, load_autoencoder
from resdiff.errors import UsageError
from tiny_models import tiny_autoencoder
from tiny_runs import ROOT

# The pretrained TAEF2 pair lies beside the project, never in it (see ../shared/weights/README.md).
WEIGHTS = Path(os.environ.get("RESDIFF_AUTOENCODER_WEIGHTS", ROOT.parent / "shared" / "weights"))
TAEF2 = [WEIGHTS / "taef2_encoder.pth", WEIGHTS / "taef2_decoder.pth"]
needs_taef2 = pytest.mark.skipif(
    not all(f.is_file() for f in TAEF2),
    reason=f"the TAEF2 weights are not in {WEIGHTS} (set RESDIFF_AUTOENCODER_WEIGHTS to the folder holding "
           f"taef2_encoder.pth and taef2_decoder.pth)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Random diffusers AutoencoderTiny and AutoencoderKL folders, and the AutoencoderTiny as a TAESD pair."""
    root = tmp_path_factory.mktemp("autoencoders")
    found = {kind: tiny_autoencoder(kind, root / kind) for kind in ("tiny", "kl")}
    found["pair"] = _as_pair(found["tiny"], root / "pair", "tiny")
    return found


def _as_pair(diffusers_folder: Path, folder: Path, name: str) -> Path:
    """An AutoencoderTiny's weights as a TAESD pair: its encoder's and decoder's Sequential keys, the decoder's one
    index up (the TAESD files hold the soft clamp as layer 0; diffusers applies it in forward)."""
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(diffusers_folder)
    folder.mkdir(parents=True)
    encoder = {k.removeprefix("layers."): v.half() for k, v in vae.encoder.state_dict().items()}
    decoder = {}
    for k, v in vae.decoder.state_dict().items():
        index, rest = k.removeprefix("layers.").split(".", 1)
        decoder[f"{int(index) + 1}.{rest}"] = v.half()
    torch.save(encoder, folder / f"{name}_encoder.pth")
    torch.save(decoder, folder / f"{name}_decoder.pth")
    return folder


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n smooth random images in [-1, 1] (N, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 2 - 1


def test_a_taesd_pair_built_from_its_files_computes_what_diffusers_autoencoder_tiny_does(folders):
    """The network written from the TAESD facts, fed an AutoencoderTiny's weights as a pair of float16 state dicts,
    loads them strictly and encodes and decodes as diffusers' own implementation of the family does."""
    from diffusers import AutoencoderTiny

    ae = load_autoencoder(folders["pair"])
    assert (ae.kind, ae.variant, ae.latent_channels, ae.downsample) == ("taesd", "classic", 4, 8)
    assert ae.dtype == torch.float32 and not any(p.requires_grad for p in ae.parameters())
    reference = AutoencoderTiny.from_pretrained(folders["tiny"]).eval()
    reference.to(torch.float16).to(torch.float32)  # the same float16-rounded weights the pair holds
    x = _images(2)
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 4, 4, 4)
        torch.testing.assert_close(z, reference.encode(x).latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ae.decode(z), reference.decode(z).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["tiny", "kl"])
def test_diffusers_folders_encode_and_decode_as_diffusers_does(folders, kind, tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    ae = load_autoencoder(folders[kind])
    vae = (AutoencoderTiny if kind == "tiny" else AutoencoderKL).from_pretrained(folders[kind]).eval()
    assert ae.kind == type(vae).__name__ and ae.latent_channels == 4 and ae.downsample == (8 if kind == "tiny" else 2)
    x = _images(3)
    z = ae.encode_many(x, batch_size=2)
    assert z.shape == (3, 4, 32 // ae.downsample, 32 // ae.downsample) and z.dtype == torch.float32
    images = ae.decode_many(z, batch_size=2)
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        # AutoencoderKL: the posterior's mean (deterministic), which is what a prepared dataset holds
        theirs = vae.encode(x).latent_dist.mode() if kind == "kl" else vae.encode(x).latents
        torch.testing.assert_close(z, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(images, vae.decode(z).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ae.encode_many(x), z)  # the same again: no sampling
    if kind == "kl":  # the config's scaling_factor 0.5 and shift_factor 0.25, as (z - shift) / scale
        assert ae.own_norm.shift == (0.25,) * 4 and ae.own_norm.scale == (2.0,) * 4
    else:
        assert ae.own_norm.shift == (0.0,) * 4 and ae.own_norm.scale == (1.0,) * 4
    assert set(ae.files) == {"config.json", "diffusion_pytorch_model.safetensors"}
    # A pipeline folder: its vae/ subfolder is the autoencoder, with the same files.
    shutil.copytree(folders[kind], tmp_path / "pipeline" / "vae")
    assert load_autoencoder(tmp_path / "pipeline").fingerprint == ae.fingerprint


def test_the_fingerprint_follows_the_files_and_says_which_one_differs(folders, tmp_path):
    first = load_autoencoder(folders["pair"])
    copy = shutil.copytree(folders["pair"], tmp_path / "copy")
    assert load_autoencoder(copy).fingerprint == first.fingerprint  # the content, not the place
    assert first.differs_from(load_autoencoder(copy).record()) is None
    state = torch.load(copy / "tiny_decoder.pth", weights_only=True)
    state["1.bias"][0] += 1
    torch.save(state, copy / "tiny_decoder.pth")
    changed = load_autoencoder(copy)
    assert changed.fingerprint != first.fingerprint
    assert changed.files["tiny_encoder.pth"] == first.files["tiny_encoder.pth"]
    assert changed.differs_from(first.record()) == (
        f"tiny_decoder.pth of {copy} is not the file {folders['pair']} had (its SHA-256 differs)")
    assert "has no config.json" in changed.differs_from(load_autoencoder(folders["tiny"]).record())
    assert json.loads(json.dumps(first.record())) == first.record()  # a record is plain JSON


class NotATensor:
    """A pickled object that a weights-only load refuses."""


def _bad_spec(how: str, folders: dict[str, Path], tmp: Path) -> tuple[str, str]:
    """A SPEC that cannot be used, and what its one-line message must say (the file or folder it names first)."""
    if how == "missing":
        return str(tmp / "nowhere"), f"autoencoder {tmp / 'nowhere'} does not exist"
    folder = tmp / "ae"
    folder.mkdir()
    if how == "empty folder":
        return str(folder), f"{folder} holds no autoencoder"
    if how == "no decoder":
        shutil.copy(folders["pair"] / "tiny_encoder.pth", folder)
        return str(folder), f"{folder / 'tiny_encoder.pth'} has no partner: tiny_decoder.pth is missing"
    if how == "unknown name":
        for part in ("encoder", "decoder"):
            shutil.copy(folders["pair"] / f"tiny_{part}.pth", folder)
        return str(folder / "taesd"), f"autoencoder {folder / 'taesd'} does not exist: {folder} holds the pairs tiny;"
    if how == "two pairs":
        for name in ("a", "b"):
            for part in ("encoder", "decoder"):
                shutil.copy(folders["pair"] / f"tiny_{part}.pth", folder / f"{name}_{part}.pth")
        return str(folder), f"{folder} holds 2 autoencoder pairs (a, b); pass one as {folder / 'a'} (DIR/NAME)"
    shutil.copy(folders["pair"] / "tiny_decoder.pth", folder)
    encoder = folder / "tiny_encoder.pth"
    if how == "pickled object":
        torch.save({"0.weight": NotATensor()}, encoder)
        return str(folder), f"{encoder} is not a state dict torch.load reads with weights_only=True"
    if how == "not torch":
        encoder.write_bytes(b"certainly not a zip file")
        return str(folder), f"{encoder} is not a state dict torch.load reads with weights_only=True"
    if how == "keys that do not fit":
        state = torch.load(folders["pair"] / "tiny_encoder.pth", weights_only=True)
        state["3.conv.9.weight"] = state.pop("3.conv.4.weight")
        torch.save(state, encoder)
        return str(folder), (f"{encoder} does not fit a TAESD-family encoder (no tensor 3.conv.4.weight; "
                             f"unexpected 3.conv.9.weight)")
    if how == "pickled weights":  # a diffusers folder saved without safetensors
        from diffusers import AutoencoderTiny

        shutil.rmtree(folder)
        AutoencoderTiny.from_pretrained(folders["tiny"]).save_pretrained(folder, safe_serialization=False)
        return str(folder), f"{folder} has no diffusion_pytorch_model.safetensors (resdiff loads safetensors"
    if how == "another model":
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
        return str(folder), f"{folder}/config.json describes a UNet2DModel, not an autoencoder"
    assert how == "hub id offline"
    return "resdiff-tests/no-such-autoencoder", (
        "autoencoder resdiff-tests/no-such-autoencoder is not in huggingface_hub's cache and cannot be downloaded now "
        "(offline, HF_HUB_OFFLINE=1, or no network); fetch it once online "
        "(hf download resdiff-tests/no-such-autoencoder)")


@pytest.mark.parametrize("how", ["missing", "empty folder", "no decoder", "unknown name", "two pairs", "pickled object",
                                 "not torch", "keys that do not fit", "pickled weights", "another model",
                                 "hub id offline"])
def test_an_unusable_spec_is_one_line_naming_the_file(folders, tmp_path, how):
    spec, says = _bad_spec(how, folders, tmp_path)
    with pytest.raises(UsageError) as caught:
        load_autoencoder(spec)
    message = str(caught.value)
    assert message.startswith(says) and "\n" not in message, message


def test_one_pair_of_several_is_named_as_dir_slash_name_or_by_either_file(folders, tmp_path, monkeypatch):
    for name in ("a", "b"):
        for part in ("encoder", "decoder"):
            shutil.copy(folders["pair"] / f"tiny_{part}.pth", tmp_path / f"{name}_{part}.pth")
    monkeypatch.chdir(tmp_path.parent)
    by_name = load_autoencoder(Path(tmp_path.name) / "b")  # a relative SPEC is kept as an absolute path
    assert set(by_name.files) == {"b_encoder.pth", "b_decoder.pth"} and by_name.spec == str(tmp_path / "b")
    assert load_autoencoder(tmp_path / "b_decoder.pth").files == by_name.files


def test_the_latent_normalisation_inverts_and_serialises():
    norm = LatentNorm((0.5, -1.0), (2.0, 0.25), "test")
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    n = norm.normalize(z)
    torch.testing.assert_close(n[:, 1], (z[:, 1] + 1.0) / 0.25)
    torch.testing.assert_close(norm.denormalize(n), z)
    assert LatentNorm.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    with pytest.raises(ValueError, match="positive scale"):
        LatentNorm((0.0,), (0.0,), "a channel that never varies needs a floor")


def test_channel_stats_in_uneven_batches_equal_the_statistics_of_all_at_once():
    z = np.random.default_rng(0).normal(3.0, [[[0.5]], [[2.0]], [[1e-3]]], (37, 3, 4, 5)).astype(np.float16)
    stats = ChannelStats(3)
    for a, b in ((0, 1), (1, 20), (20, 20), (20, 37)):
        stats.add(z[a:b])
    norm = stats.norm("test")
    all_at_once = z.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(norm.shift, all_at_once.mean(1), rtol=1e-12)
    np.testing.assert_allclose(norm.scale, all_at_once.std(1), rtol=1e-9)
    constant = ChannelStats(1)
    constant.add(np.ones((2, 1, 2, 2)))
    assert constant.norm("flat").scale == (1e-6,)


# ----------------------------------------------------------------------------- the real TAEF2 pair


def renders(size: int = 256) -> list[Image.Image]:
    """Two pictures drawn here: smooth shapes on a colour gradient, and text."""
    y = np.linspace(0, 1, size)[:, None, None]
    sky = (np.array([40, 90, 200]) * (1 - y) + np.array([250, 200, 120]) * y).repeat(size, 1)
    shapes = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((30, 40, 150, 160), fill=(220, 40, 60))
    draw.polygon([(140, 200), (230, 120), (240, 230)], fill=(30, 160, 70))
    draw.rectangle((160, 20, 230, 90), fill=(250, 240, 40))
    text = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(text)
    font = ImageFont.load_default(size=28)
    for i, line in enumerate(["resdiff", "latent 8x", "TAEF2 test", "0123456789"]):
        draw.text((12, 16 + 58 * i), line, fill=(10 + 60 * i, 20, 120 - 25 * i), font=font)
    return [shapes.filter(ImageFilter.GaussianBlur(1.5)), text]


@pytest.fixture(scope="module")
def taef2_codes():
    """The TAEF2 pair, the renders in [-1, 1], their latents and the decoded images."""
    ae = load_autoencoder(WEIGHTS / "taef2")
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in renders()]).float() / 127.5 - 1
    z = ae.encode_many(x, batch_size=2)
    return ae, x, z, ae.decode_many(z, batch_size=2)


@needs_taef2
def test_the_taef2_pair_loads_strictly_as_the_flux_2_variant(taef2_codes):
    ae = taef2_codes[0]
    assert (ae.kind, ae.variant, ae.latent_channels, ae.downsample) == ("taesd", "flux_2", 32, 8)
    for net, file in ((ae.encoder, TAEF2[0]), (ae.decoder, TAEF2[1])):
        state = torch.load(file, weights_only=True)
        assert set(net.state_dict()) == set(state)  # strict: every tensor of the file has its place, and no more
        assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in state.items())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in ae.modules()) == 6  # the encoder's last 3, decoder's first 3
    assert load_autoencoder(WEIGHTS).fingerprint == ae.fingerprint  # the folder holds only this pair


@needs_taef2
def test_taef2_reconstructs_rendered_images(taef2_codes):
    """PSNR of encode + decode on the renders: measured 34.8 dB on the shapes and 31.0 dB on the text."""
    _, x, z, decoded = taef2_codes
    assert z.shape == (2, 32, 32, 32)
    mse = ((decoded - x) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units
    psnr = 10 * torch.log10(1 / mse)
    assert psnr.min() > 29.5, psnr


@needs_taef2
def test_taef2_latents_of_mirror_images_are_not_mirrored_latents(taef2_codes):
    """Why a latent dataset stores the latents of the mirrored images: on the text render, mirroring its latent
    instead is off by 0.57 of the latent's standard deviation (RMS; 0.55 on the shapes), and decoding the mirrored
    latent gives 16.7 dB where the image's own latent gives 31.0 dB."""
    ae, x, z, _ = taef2_codes
    mirrored = x[1:].flip(3)  # the text
    gap = (z[1:].flip(3) - ae.encode_many(mirrored)).pow(2).mean().sqrt() / z[1:].std()
    assert gap > 0.4, gap
    decoded = ae.decode_many(z[1:].flip(3))
    assert 10 * torch.log10(1 / ((decoded - mirrored) / 2).pow(2).mean()) < 20

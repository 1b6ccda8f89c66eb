"""ImageFolder and the demo data, on real image files written with pillow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resdiff.batches import loader_workers
from resdiff.data import (
    IMAGE_EXTENSIONS, ImageFolder, demo_shapes, find_images, is_image_size, to_model_range, to_uint8,
    why_unusable, write_demo_folder,
)
from resdiff.errors import UsageError


def solid(path: Path, color: tuple[int, ...] | int, size: tuple[int, int] = (8, 8), mode: str = "RGB", **save) -> Path:
    """Write a one-colour image and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def load_one(path: Path, image_size: int = 8, channels: int = 3, **kw) -> torch.Tensor:
    """The single image of a folder holding only `path`."""
    ds = ImageFolder(path.parent, image_size, channels, random_flip=False, **kw)
    assert len(ds) == 1
    x, label = ds[0]
    assert x.dtype == torch.uint8 and x.shape == (channels, image_size, image_size) and x.is_contiguous()
    assert label == 0
    return x


def pixel(x: torch.Tensor, yx: tuple[int, int] = (0, 0)) -> list[int]:
    """Channel values of one pixel of a (C, H, W) tensor."""
    return x[:, yx[0], yx[1]].tolist()


# ----------------------------------------------------------------------------- scanning


def test_recursive_case_insensitive_sorted_and_hidden_ignored(tmp_path: Path) -> None:
    solid(tmp_path / "b" / "deep" / "x.PNG", (255, 0, 0))
    solid(tmp_path / "a" / "y.JpG", (0, 255, 0), format="JPEG")
    solid(tmp_path / "z.bmp", (0, 0, 255))
    solid(tmp_path / ".hidden" / "h.png", (1, 1, 1))
    solid(tmp_path / ".dot.png", (1, 1, 1))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, 8, cache=False)
    assert [f.relative_to(tmp_path).as_posix() for f in ds.files] == ["a/y.JpG", "b/deep/x.PNG", "z.bmp"]
    assert ds.skipped == [] and ds.labels == [0, 0, 0] and ds.classes == []
    assert {"png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"} == IMAGE_EXTENSIONS


def test_symlink_loop_terminates_and_linked_folders_are_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    solid(root / "a" / "img.png", (9, 9, 9))
    solid(outside / "o.png", (7, 7, 7))
    os.symlink(root, root / "a" / "loop")  # a/loop -> root -> a -> loop ...
    os.symlink(outside, root / "linked")
    ds = ImageFolder(root, 8, cache=False)
    assert [f.relative_to(root).as_posix() for f in ds.files] == ["a/img.png", "linked/o.png"]
    assert find_images(root, warn=print) == ds.files  # the one scan, shared with python -m resdiff.prepare


def test_image_sizes_and_reasons_a_file_is_unusable(tmp_path: Path) -> None:
    assert is_image_size(32) and is_image_size((64, 128)) and is_image_size([8, 8])
    assert not any(is_image_size(v) for v in (0, -1, True, 32.0, "32", (8,) * 3, (8, 0), ()))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name, reason in (("empty.png", "empty file (0 bytes)"), ("text.png", "not an image file pillow can read")):
        try:
            Image.open(tmp_path / name)
        except Exception as err:  # noqa: BLE001 - what pillow raises is the input here
            assert why_unusable(tmp_path / name, err) == reason
        else:
            raise AssertionError(f"pillow opened {name}")


# ----------------------------------------------------------------------------- modes


def p_image(transparent: bool) -> Image.Image:
    """A 4x4 palette image: left half index 0 (red), right half index 1 (blue)."""
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (2, 0, 4, 4))
    if transparent:
        im.info["transparency"] = 0
    return im


MODE_CASES = {
    # name: (image factory, file name, expected RGB of pixel (0, 0), expected L of pixel (0, 0))
    "L": (lambda: Image.new("L", (4, 4), 100), "l.png", [100, 100, 100], [100]),
    "1": (lambda: Image.new("1", (4, 4), 1), "one.png", [255, 255, 255], [255]),
    "P": (lambda: p_image(False), "p.png", [255, 0, 0], [76]),
    "P+transparency": (lambda: p_image(True), "pt.png", [255, 255, 255], [255]),
    "LA": (lambda: Image.new("LA", (4, 4), (0, 0)), "la.png", [255, 255, 255], [255]),
    "RGBA transparent red": (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "rgba.png", [255, 255, 255], [255]),
    "RGBA half black": (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "half.png", [127, 127, 127], [127]),
    "CMYK": (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "cmyk.tif", [255, 0, 0], [76]),
    "RGB": (lambda: Image.new("RGB", (4, 4), (10, 20, 30)), "rgb.png", [10, 20, 30], [18]),
    "I;16 max": (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), "w16.png", [255] * 3, [255]),
    "I;16 half": (lambda: Image.fromarray(np.full((4, 4), 32768, np.uint16)), "h16.png", [128] * 3, [128]),
    "I;16 tiff": (lambda: Image.fromarray(np.full((4, 4), 32768, np.uint16)), "h16.tif", [128] * 3, [128]),
    "I 32-bit": (lambda: Image.fromarray(np.full((4, 4), 65535, np.int32)), "i32.tif", [255] * 3, [255]),
    "F in [0, 1]": (lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), "f.tif", [128] * 3, [128]),
}


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_modes_convert_to_one_and_three_channels(tmp_path: Path, name: str) -> None:
    make, fname, rgb, gray = MODE_CASES[name]
    path = tmp_path / fname
    make().save(path)
    for channels, expected in ((3, rgb), (1, gray)):
        x = load_one(path, 4, channels, cache=False)
        assert np.allclose(pixel(x), expected, atol=1), (channels, pixel(x), expected)


def test_palette_transparency_keeps_opaque_colours(tmp_path: Path) -> None:
    path = tmp_path / "pt.png"
    p_image(True).save(path)
    x = load_one(path, 4, 3)
    assert pixel(x, (0, 0)) == [255, 255, 255] and pixel(x, (0, 3)) == [0, 0, 255]


def test_alpha_is_composited_onto_the_configured_background(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((3, 0), (0, 255, 0, 255))
    im.save(tmp_path / "a.png")
    x = load_one(tmp_path / "a.png", 4, 3, background=(0, 0, 64))
    assert pixel(x, (0, 0)) == [0, 0, 64] and pixel(x, (0, 3)) == [0, 255, 0]


def test_16_bit_gradient_keeps_its_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = load_one(tmp_path / "ramp.png", 16, 1)
    assert x[0, 0, 0] == 0 and x[0, 0, -1] == 255 and 100 < int(x[0, 0, 8]) < 160  # scaled, not clipped


# ----------------------------------------------------------------------------- geometry


def test_wide_image_is_center_cropped(tmp_path: Path) -> None:
    a = np.zeros((64, 192, 3), np.uint8)
    a[:, :64] = (255, 0, 0)
    a[:, 64:128] = (0, 0, 255)
    a[:, 128:] = (0, 255, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_one(tmp_path / "wide.png", 32)  # 192x64 -> 96x32 -> middle 32 columns
    inner = x[:, :, 2:-2].reshape(3, -1)
    assert (inner[2] > 240).all() and (inner[0] < 15).all() and (inner[1] < 15).all()


def test_tall_image_is_center_cropped(tmp_path: Path) -> None:
    a = np.zeros((30, 10), np.uint8)
    a[10:20] = 200
    Image.fromarray(a).save(tmp_path / "tall.png")
    x = load_one(tmp_path / "tall.png", 10, 1)
    assert (x == 200).all()


def test_tiny_image_is_upscaled(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 3), np.uint8)
    a[:, 1] = 255
    Image.fromarray(a).save(tmp_path / "tiny.png")
    x = load_one(tmp_path / "tiny.png", 16)
    assert x[:, :, :4].max() < 40 and x[:, :, -4:].min() > 215  # left dark, right bright


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((64, 128, 3), np.uint8)  # 128 wide, 64 tall: left half red, right half blue
    a[:, :64] = (255, 0, 0)
    a[:, 64:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    x = load_one(tmp_path / "rot.jpg", 32)  # displayed 64 wide, 128 tall -> 32x64 -> middle rows
    top, bottom = x[:, 2].float().mean(-1), x[:, -3].float().mean(-1)
    assert top[0] > 200 and top[2] < 50  # what was the left (red) is now the top
    assert bottom[2] > 200 and bottom[0] < 50


def test_random_crop_windows_vary_and_cache_matches_lazy(tmp_path: Path) -> None:
    a = np.arange(48, dtype=np.uint8).reshape(1, 48).repeat(16, 0) * 5  # 48 wide, 16 tall ramp
    Image.fromarray(a).save(tmp_path / "r.png")
    Image.fromarray(a.T.copy()).save(tmp_path / "s.png")  # 16 wide, 48 tall
    kw = dict(random_flip=False, random_crop=True)
    cached = ImageFolder(tmp_path, 16, 1, cache=True, **kw)
    lazy = ImageFolder(tmp_path, 16, 1, cache=False, **kw)
    torch.manual_seed(0)
    got = [cached[i % 2][0] for i in range(20)]
    torch.manual_seed(0)
    assert all(torch.equal(g, lazy[i % 2][0]) for i, g in enumerate(got))
    assert all(g.shape == (1, 16, 16) for g in got)
    assert len({int(g[0, 0, 0]) for g in got[0::2]}) > 1  # different windows of the wide image


# ----------------------------------------------------------------------------- bad files


def test_bad_files_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a picture")
    solid(tmp_path / "good1.png", (1, 2, 3))
    solid(tmp_path / "sub" / "good2.jpeg", (200, 200, 200), format="JPEG")
    lines: list[str] = []
    ds = ImageFolder(tmp_path, 8, warn=lines.append)
    assert [f.name for f in ds.files] == ["good1.png", "good2.jpeg"]
    assert sorted(p.name for p, _ in ds.skipped) == ["empty.png", "text.png", "trunc.png"]
    assert len(lines) == 4
    for name in ("trunc.png", "empty.png", "text.png"):
        assert sum(name in line for line in lines[:3]) == 1
    assert "\n" not in "".join(lines)
    assert lines[-1] == f"skipped 3 of 5 files in {tmp_path}"
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))


def test_default_warn_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    solid(tmp_path / "ok.png", (0, 0, 0))
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    ImageFolder(tmp_path, 8)
    out = capsys.readouterr()
    assert out.out == "" and "bad.gif" in out.err and "skipped 1 of 2 files" in out.err


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    solid(tmp_path / "ok.png", (0, 0, 0), (16, 16))  # 256 pixels
    solid(tmp_path / "warn.png", (0, 0, 0), (40, 40))  # 1600: above the limit (pillow warns)
    solid(tmp_path / "error.png", (0, 0, 0), (64, 64))  # 4096: above twice the limit (pillow raises)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    lines: list[str] = []
    ds = ImageFolder(tmp_path, 8, warn=lines.append)
    assert [f.name for f in ds.files] == ["ok.png"]
    assert sorted(p.name for p, _ in ds.skipped) == ["error.png", "warn.png"]
    assert all("decompression bomb" in reason for _, reason in ds.skipped)


def test_missing_empty_and_all_bad_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope"):
        ImageFolder(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(UsageError, match="empty"):
        ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "bad").mkdir()
    for k in range(3):
        (tmp_path / "bad" / f"{k}.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"bad.*all 3 image files were skipped") as info:
        ImageFolder(tmp_path / "bad", 8, warn=lambda _: None)
    assert "\n" not in str(info.value)
    solid(tmp_path / "file.png", (0, 0, 0))
    with pytest.raises(UsageError, match="not a folder"):
        ImageFolder(tmp_path / "file.png", 8)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    solid(tmp_path / "ok.png", (0, 0, 0))
    for kw in (dict(channels=2), dict(image_size=0), dict(cache="yes"), dict(background=(1, 2))):
        with pytest.raises(UsageError):
            ImageFolder(tmp_path, **{"image_size": 8, **kw})


def test_a_file_broken_after_construction_is_replaced_not_fatal(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (10, 10, 10))
    solid(tmp_path / "b.png", (20, 20, 20))
    lines: list[str] = []
    lazy = ImageFolder(tmp_path, 8, random_flip=False, cache=False, warn=lines.append)
    cached = ImageFolder(tmp_path, 8, random_flip=False, cache=True)
    (tmp_path / "a.png").write_bytes(b"")
    assert int(lazy[0][0][0, 0, 0]) == 20 and "a.png" in lines[-1]
    assert int(cached[0][0][0, 0, 0]) == 10  # the cache never rereads the file


# ----------------------------------------------------------------------------- labels, cache, flip


def test_class_labels_come_from_subfolders(tmp_path: Path) -> None:
    solid(tmp_path / "dog" / "d1.png", (0, 0, 0))
    solid(tmp_path / "cat" / "c1.png", (0, 0, 0))
    solid(tmp_path / "cat" / "deep" / "c2.png", (0, 0, 0))
    ds = ImageFolder(tmp_path, 8, class_cond=True)
    assert ds.classes == ["cat", "dog"]
    assert [(f.name, y) for f, y in zip(ds.files, ds.labels)] == [("c1.png", 0), ("c2.png", 0), ("d1.png", 1)]
    assert [ds[i][1] for i in range(3)] == [0, 0, 1]
    solid(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(UsageError, match="one subfolder per class"):
        ImageFolder(tmp_path, 8, class_cond=True)


@pytest.mark.parametrize("random_crop", [False, True])
def test_cache_on_and_off_give_identical_items(tmp_path: Path, random_crop: bool) -> None:
    rng = np.random.default_rng(1)
    for k, size in enumerate([(20, 12), (12, 12), (9, 30), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    kw = dict(random_flip=False, random_crop=random_crop)
    on, off, auto = (ImageFolder(tmp_path, 12, cache=c, **kw) for c in (True, False, "auto"))
    assert on._cache is not None and off._cache is None and auto._cache is not None
    for i in range(len(on)):
        torch.manual_seed(i)
        a = on[i][0]
        torch.manual_seed(i)
        assert torch.equal(a, off[i][0])
        a[:] = 0  # items are copies: the cache must not change
        torch.manual_seed(i)
        b = auto[i][0]
        torch.manual_seed(i)
        assert torch.equal(b, off[i][0])


def test_flip_mirrors_some_items(tmp_path: Path) -> None:
    a = np.zeros((8, 8), np.uint8)
    a[:, :4] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    ds = ImageFolder(tmp_path, 8, 1, random_flip=True)
    torch.manual_seed(0)
    lefts = {int(ds[0][0][0, 0, 0]) for _ in range(40)}
    assert lefts == {0, 255}
    assert all(ds[0][0].is_contiguous() for _ in range(10))


# ----------------------------------------------------------------------------- ranges and demo data


def test_model_range_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]


def test_demo_shapes_are_seeded() -> None:
    a = demo_shapes(2000, 32, 3, seed=0)
    assert a.shape == (2000, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(demo_shapes(8, seed=3), demo_shapes(8, seed=3))
    assert not torch.equal(demo_shapes(8, seed=3), demo_shapes(8, seed=4))
    assert demo_shapes(4, 16, 1).shape == (4, 1, 16, 16)
    assert (a.amin(dim=(2, 3)) <= 40).all()  # a dark background ...
    assert (a.amax(dim=(1, 2, 3)) >= 250).all()  # ... behind a bright shape


def test_write_demo_folder_is_idempotent_and_readable(tmp_path: Path) -> None:
    root = write_demo_folder(tmp_path / "demo", n=12, image_size=16, seed=5)
    names = sorted(p.name for p in root.iterdir())
    assert names == [f"{k:05d}.png" for k in range(12)]
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    write_demo_folder(root, n=12, image_size=16, seed=5)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps
    ds = ImageFolder(root, 16, random_flip=False)
    assert ds.skipped == [] and len(ds) == 12
    stacked = torch.stack([ds[i][0] for i in range(12)])
    assert torch.equal(stacked, demo_shapes(12, 16, 3, seed=5))
    (root / "00003.png").unlink()
    write_demo_folder(root, n=12, image_size=16, seed=5)  # an incomplete folder is completed
    assert len(list(root.glob("*.png"))) == 12
    with pytest.raises(UsageError, match="other PNG"):
        write_demo_folder(root, n=5, image_size=16, seed=5)


# ----------------------------------------------------------------------------- loader workers


def test_loader_workers_explicit_setting_wins():
    assert loader_workers(3, cached=True, device="cpu") == (3, "data.num_workers")
    assert loader_workers(0, cached=False, device="cuda", cpus=64) == (0, "data.num_workers")


def test_loader_workers_auto_takes_no_cores_from_a_cpu_model_or_for_cached_images():
    n, why = loader_workers("auto", cached=True, device="cuda", cpus=32)
    assert n == 0 and "cached in memory" in why
    n, why = loader_workers("auto", cached=False, device="cpu", cpus=32)
    assert n == 0 and "computes on the CPU" in why


@pytest.mark.parametrize("cpus, local, expected", [(16, 2, 7), (64, 1, 8), (4, 4, 1), (1, 1, 1)])
def test_loader_workers_auto_on_a_gpu_leaves_the_main_thread_a_core(cpus, local, expected):
    n, why = loader_workers("auto", cached=False, device="cuda", local_processes=local, cpus=cpus)
    assert n == expected and f"{max(cpus // local, 1)} core(s) per process" in why


def test_cached_reports_whether_images_are_in_memory(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert ImageFolder(folder, 8, cache=True).cached
    assert not ImageFolder(folder, 8, cache=False).cached


# ----------------------------------------------------------------------------- non-square shapes


def test_non_square_images_are_resized_to_cover_and_centre_cropped(tmp_path: Path) -> None:
    """A 40x10 (width x height) file with a distinct left, middle and right, at image_size (8, 16): scaled by 1.6
    to 64x16 (covers 16 wide), then the central 16 columns of the middle 8 rows."""
    a = np.zeros((10, 40, 3), np.uint8)
    a[:, :12], a[:, 12:28], a[:, 28:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    ds = ImageFolder(tmp_path, (8, 16), random_flip=False)
    x, _ = ds[0]
    assert x.shape == (3, 8, 16) and ds.shape == (8, 16)
    assert pixel(x, (4, 8)) == [0, 255, 0]  # the green middle; red and blue lie outside the crop
    tall = ImageFolder(tmp_path, (32, 8), random_flip=False)[0][0]  # 40x10 -> cover 8 wide, 32 high: 128x32
    assert tall.shape == (3, 32, 8) and pixel(tall, (16, 4)) == [0, 255, 0]


def test_random_crop_of_a_non_square_shape(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (9, 9, 9), size=(30, 30))
    ds = ImageFolder(tmp_path, (8, 16), random_flip=False, random_crop=True)
    assert all(ds[0][0].shape == (3, 8, 16) for _ in range(5))


def test_square_pairs_decode_like_one_number(tmp_path: Path) -> None:
    for k, size in enumerate([(20, 13), (7, 30), (16, 16)]):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    one, pair = ImageFolder(tmp_path, 12, random_flip=False), ImageFolder(tmp_path, (12, 12), random_flip=False)
    assert all(torch.equal(one[i][0], pair[i][0]) for i in range(3))


def test_demo_shapes_non_square_and_square_unchanged() -> None:
    wide = demo_shapes(6, (16, 40), seed=2)
    assert wide.shape == (6, 3, 16, 40)
    assert torch.equal(demo_shapes(6, (24, 24), seed=2), demo_shapes(6, 24, seed=2))
    # Shapes land across the whole width: the bright pixels' columns are not all in the left 16.
    cols = (wide.float().amax(1) > 100).nonzero()[:, 2]
    assert cols.max() >= 16


def test_a_folder_over_the_cache_limit_is_read_per_batch_and_says_why(tmp_path: Path) -> None:
    for k in range(4):
        solid(tmp_path / f"{k}.png", (k, k, k), size=(16, 8))
    ds = ImageFolder(tmp_path, (8, 16), random_flip=False, cache_limit=3 * 8 * 16 * 3)  # room for 3 of 4
    assert not ds.cached and "read from disk per batch" in ds.mode and "cache limit" in ds.mode
    assert pixel(ds[3][0]) == [3, 3, 3]
    assert ImageFolder(tmp_path, (8, 16), cache_limit=3 * 8 * 16 * 4).cached

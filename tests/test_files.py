"""resdiff.files and resdiff.images: files are written whole, under temporary names that leftovers() finds."""

import numpy as np
import pytest
import torch
from PIL import Image

from resdiff.files import leftovers, replace_folder, temporary, write_atomic
from resdiff.images import load_npz, make_grid, read_images, save_images, save_npz


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "config.yaml"
    write_atomic(target, lambda tmp: tmp.write_text("one"))

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_temporary_names_are_what_leftovers_finds(tmp_path):
    names = [temporary(tmp_path / "model"), temporary(tmp_path / "a.png", per_process=True)]
    for path in names:
        path.write_text("x")
    (tmp_path / "a.png").write_text("whole")
    assert leftovers(tmp_path) == sorted(names)
    assert leftovers(tmp_path, "model") == [names[0]]


def test_replace_folder_swaps_whole_folders(tmp_path):
    target = tmp_path / "model"
    for version in ("one", "two"):
        new = tmp_path / f"new-{version}"
        new.mkdir()
        (new / "weights").write_text(version)
        replace_folder(target, new)
        assert (target / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_images_round_trip_through_pngs_and_npz(tmp_path):
    images = torch.randint(0, 256, (3, 3, 8, 6), dtype=torch.uint8)
    paths = save_images(images, tmp_path, [4, 5, 6])
    assert [p.name for p in paths] == ["00004.png", "00005.png", "00006.png"]
    assert torch.equal(read_images(tmp_path, [4, 5, 6]), images)
    save_npz(images, tmp_path / "samples.npz")
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 6, 3)  # the (N, H, W, C) layout FID tools read
    assert torch.equal(load_npz(tmp_path / "samples.npz"), images)
    assert not leftovers(tmp_path)


def test_make_grid_lays_images_out_in_rows():
    images = torch.full((5, 1, 4, 4), 255, dtype=torch.uint8)
    grid = make_grid(images, padding=1, cols=2)
    assert isinstance(grid, Image.Image) and grid.size == (2 * 5 + 1, 3 * 5 + 1) and grid.mode == "L"

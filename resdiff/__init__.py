"""resdiff: diffusion models built around a ResNet U-Net."""

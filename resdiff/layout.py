"""Every name in a run directory, a checkpoint folder and a model folder: here and nowhere else (imports nothing).

    RUN/config.yaml          the resolved config              RUN/log.jsonl    one JSON line per logged step
    RUN/identity.json        what the run learns from (checked on resume)
    RUN/samples/step-NNNNNNN.png   preview grids             RUN/quality.png  FID and loss against step
    RUN/checkpoints/step-NNNNNNN/  resumable state:
        state.json  model.safetensors  optimizer.pt  rng-<rank>.pt  ema/ (a model folder)  SHA256SUMS
    RUN/model/               the EMA model: a model folder     RUN/eval/        evaluate.py's results
    RUN/.lock                names the process that owns the run

    a model folder (a diffusers DDPMPipeline folder):
        model_index.json  unet/config.json  unet/diffusion_pytorch_model.safetensors
        scheduler/scheduler_config.json  SHA256SUMS  README.md (its card)  samples.png (the card's grid)
        latent.json (a latent model: its autoencoder's SPEC and files' SHA-256, and the latents' normalisation)
"""

from __future__ import annotations

__all__ = [
    "CONFIG", "LOG", "IDENTITY", "SAMPLES", "QUALITY_PICTURE", "CHECKPOINTS", "MODEL", "EVAL", "LOCK", "CHECKSUMS",
    "STATE", "WEIGHTS", "OPTIMIZER", "EMA", "MODEL_INDEX", "UNET_CONFIG", "SCHEDULER_CONFIG", "PIPELINE_WEIGHTS",
    "PIPELINE_CONFIGS", "PIPELINE_FILES", "EMA_FILES", "CHECKPOINT_FILES", "CARD", "CARD_GRID", "CARD_FILES",
    "STEP_NAME", "LATENT", "rng_file", "step_name", "preview_name",
]

# The run directory.
CONFIG, LOG, IDENTITY = "config.yaml", "log.jsonl", "identity.json"
SAMPLES, QUALITY_PICTURE = "samples", "quality.png"
CHECKPOINTS, MODEL, EVAL = "checkpoints", "model", "eval"
LOCK = ".lock"
CHECKSUMS = "SHA256SUMS"  # the name coreutils' sha256sum -c expects by habit

# A checkpoint folder, checkpoints/step-NNNNNNN/.
STEP_NAME = r"^step-(\d+)$"  # a checkpoint folder's name (a preview's is the same with .png)
STATE, WEIGHTS, OPTIMIZER, EMA = "state.json", "model.safetensors", "optimizer.pt", "ema"

# A model folder as DDPMPipeline.save_pretrained writes it: what sampling needs (its configs, and the weights,
# which a diffusers folder may hold under another name: model_folder checks those itself), and its card.
MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG = "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"
PIPELINE_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PIPELINE_CONFIGS = (MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG)
PIPELINE_FILES = (MODEL_INDEX, UNET_CONFIG, PIPELINE_WEIGHTS, SCHEDULER_CONFIG)
LATENT = "latent.json"  # a latent model's LatentSpace record (resdiff.autoencoder)
CARD, CARD_GRID = "README.md", "samples.png"
CARD_FILES = (CARD, CARD_GRID)  # described by the card, not covered by SHA256SUMS: a user edits them before sharing
EMA_FILES = tuple(f"{EMA}/{name}" for name in PIPELINE_FILES)
# Everything resuming needs (rng-<rank>.pt files are optional: without them a resume reseeds).
CHECKPOINT_FILES = (STATE, WEIGHTS, OPTIMIZER, *EMA_FILES)


def step_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:07d}"


def preview_name(step: int) -> str:
    """The file name of the preview grid drawn at ``step``."""
    return f"{step_name(step)}.png"


def rng_file(rank: int) -> str:
    """The file of process ``rank``'s random state in a checkpoint folder."""
    return f"rng-{rank}.pt"

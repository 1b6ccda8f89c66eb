"""A model folder's card: the README.md a model is shared with, in huggingface_hub's conventions.

    FOLDER/README.md     YAML metadata (library_name, pipeline_tag, tags), then what the model is, how to load
                         it, how it was trained (steps, images seen, data, the recipe) and its last evaluation
    FOLDER/samples.png   the newest preview grid of the model's step or before, shown by the card

The card says what ``ModelFacts`` holds and what the folder itself says (its model_index.json and unet config:
which U-Net class, image shape, classes); whoever exports gathers the facts (``resdiff.rundir`` from a run
directory). Neither file is part of the model: SHA256SUMS leaves them out (``CARD_FILES``), so a card can be
rewritten when the model's own preview and evaluation arrive, and a damaged card never stops a model loading.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .layout import CARD, CARD_GRID, MODEL_INDEX, UNET_CONFIG
from .config import sections_yaml
from .files import write_atomic

__all__ = ["ModelFacts", "model_card", "write_card"]


# The training settings a reader needs to repeat the run; the rest (logging, checkpoints, previews) are bookkeeping.
_TRAIN_ESSENTIALS = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "adam_betas", "grad_clip",
                     "grad_accum", "ema_decay", "ema_warmup", "ema_sigma_rel", "mixed_precision", "seed")
_DATA_ESSENTIALS = ("image_size", "image_channels", "class_cond", "random_flip", "random_crop")


@dataclass
class ModelFacts:
    """What is known of how a model was trained; None where it is not known (a folder from outside a run)."""

    name: str  # the folder's name, also the repository name the card suggests
    step: int | None = None  # optimizer steps behind the weights
    batch_size: int | None = None  # global images per step
    data_name: str | None = None  # the data folder's name (never its path, which may be private)
    data_images: int | None = None
    recipe: dict = field(default_factory=dict)  # the resolved config's sections: model, data, diffusion, train
    evaluation: dict | None = None  # the last evaluation record at or before ``step``: {"step": s, "fid@64": ...}
    grid: Path | None = None  # the preview grid the card shows
    grid_caption: str = ""
    init_from: str | None = None  # the model fine-tuned from: its name and weights digest


def _model_shape(folder: Path) -> tuple[bool, int, tuple[int, int], int | None]:
    """From the folder itself: whether its U-Net is diffusers' own, its channels, (height, width) and classes."""
    entry = json.loads((folder / MODEL_INDEX).read_text()).get("unet", [])
    config = json.loads((folder / UNET_CONFIG).read_text())
    diffusers_own = list(entry)[:1] == ["diffusers"]
    size = config["sample_size"]
    shape = (size, size) if isinstance(size, int) else tuple(size)
    classes = (config.get("num_class_embeds") or 1) - 1 if diffusers_own else config.get("num_classes")
    return diffusers_own, config["in_channels"], shape, classes or None


def _how_to_load(facts: ModelFacts, diffusers_own: bool, channels: int, shape: tuple[int, int], classes: int | None) -> str:
    """Python that loads the folder and samples four images (the test suite runs it)."""
    by_hand = classes is not None and diffusers_own  # DDPMPipeline passes no labels, which a UNet2DModel needs
    lines = [] if diffusers_own else ["import resdiff  # registers resdiff's UNet, the class model_index.json names"]
    lines += [
        *(["import torch"] if by_hand else []),
        "from diffusers import DDPMPipeline",
        "",
        f'folder = "USER/{facts.name}"  # the Hub repository after upload, or this folder\'s path',
        "pipe = DDPMPipeline.from_pretrained(folder)",
    ]
    if not by_hand:
        if classes:  # resdiff's UNet reads no labels as its null class
            lines.append(f"# unconditional samples; pipe.unet(x, t, class_labels) takes labels 0..{classes - 1}")
        lines += ["images = pipe(batch_size=4, num_inference_steps=50).images  # PIL images",
                  'images[0].save("sample.png")']
        return "\n".join(lines)
    h, w = shape
    return "\n".join(lines + [
        f"labels = torch.tensor([0, 1, 2, 3]) % {classes}  # class indices; {classes} is the null class (no label)",
        "unet, scheduler = pipe.unet, pipe.scheduler",
        f"x = torch.randn(4, {channels}, {h}, {w}, generator=torch.Generator().manual_seed(0))",
        "scheduler.set_timesteps(50)",
        "for t in scheduler.timesteps:",
        "    with torch.no_grad():",
        "        out = unet(x, t, class_labels=labels).sample",
        f"    x = scheduler.step(out[:, :{channels}], t, x).prev_sample",
        "images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (4, C, H, W)",
    ])


def _training(facts: ModelFacts) -> list[str]:
    rows = []
    if facts.step is not None:
        rows.append(("steps", f"{facts.step:,}"))
        if facts.batch_size:
            rows.append(("images seen", f"{facts.step * facts.batch_size:,} ({facts.step:,} step{'' if facts.step == 1 else 's'} of {facts.batch_size})"))
    if facts.data_name is not None:
        count = f", {facts.data_images:,} images" if facts.data_images is not None else ""
        rows.append(("data", f"`{facts.data_name}`{count}"))
    if facts.init_from:
        rows.append(("fine-tuned from", facts.init_from))
    if not rows:
        return ["Not known: this folder was exported from outside a resdiff run directory."]
    return ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def _evaluation(record: dict | None) -> list[str]:
    if not record:
        return ["No evaluation was recorded up to this model's step (train.eval_every)."]
    figures = [(k.partition("@")[0], int(k.partition("@")[2]), v) for k, v in record.items() if "@" in k]
    return [
        f"Measured during training at step {record['step']:,}: EMA samples against training images, n images each "
        f"(FID falls as n grows: compare figures of the same n only).",
        "",
        "| figure | value | n |", "| --- | --- | --- |",
        *(f"| {name.replace('_', ' ').upper()} | {value:.4g} | {n:,} |" for name, n, value in figures),
    ]


def _recipe(recipe: dict) -> str:
    """The sections that define the model and its training, in the config's own YAML (train.py --config reads it)."""
    shown = {}
    if "model" in recipe:
        shown["model"] = recipe["model"]
    if "data" in recipe:
        shown["data"] = {k: v for k, v in recipe["data"].items() if k in _DATA_ESSENTIALS}
    if "diffusion" in recipe:
        shown["diffusion"] = recipe["diffusion"]
    if "train" in recipe:
        shown["train"] = {k: v for k, v in recipe["train"].items() if k in _TRAIN_ESSENTIALS}
    return sections_yaml(shown).strip()


def model_card(folder: Path, facts: ModelFacts):
    """The card (a ``huggingface_hub.ModelCard``) of the model folder ``folder``, which holds its pipeline files."""
    from huggingface_hub import ModelCard, ModelCardData

    diffusers_own, channels, shape, classes = _model_shape(folder)
    tags = ["unconditional-image-generation", "diffusion", "ddpm", "resdiff"]
    if classes:
        tags.append("class-conditional")
    # library_name is diffusers for both formats: the folder is a diffusers DDPMPipeline folder, loaded by diffusers'
    # own from_pretrained (resdiff's format after `import resdiff`, which the card's code shows).
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", tags=tags)
    h, w = shape
    kind = f"class-conditional ({classes} classes)" if classes else "unconditional"
    needs = ("diffusers' own classes (UNet2DModel, DDPMScheduler): it loads with diffusers alone" if diffusers_own else
             "resdiff's U-Net in a diffusers pipeline: `import resdiff` before loading it")
    body = [
        f"# {facts.name}", "",
        f"A DDPM (denoising diffusion probabilistic model) trained with resdiff: {kind} generation of {h}x{w} "
        f"images with {channels} channel(s). The folder holds {needs}.", "",
    ]
    if facts.grid is not None:
        body += [f"![samples]({CARD_GRID})", "", facts.grid_caption, ""]
    body += ["## How to load", "", "```python", _how_to_load(facts, diffusers_own, channels, shape, classes), "```", "",
             "## Training", "", *_training(facts), "", "## Evaluation", "", *_evaluation(facts.evaluation), ""]
    if facts.recipe:
        body += ["## Recipe", "", "The resolved config (`config.yaml` of the run) that defines the model and its training:",
                 "", "```yaml", _recipe(facts.recipe), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_card(folder: Path, facts: ModelFacts) -> Path:
    """Write ``folder``'s README.md and samples.png (each under a temporary name, then renamed); returns the card."""
    card = model_card(folder, facts)
    if facts.grid is not None:
        write_atomic(folder / CARD_GRID, lambda tmp: shutil.copyfile(facts.grid, tmp))
    elif (folder / CARD_GRID).exists():  # no grid of this step or before: an older copy would misdescribe the model
        (folder / CARD_GRID).unlink()
    write_atomic(folder / CARD, lambda tmp: card.save(tmp))
    return folder / CARD

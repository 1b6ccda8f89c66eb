"""The model card (resdiff/card.py): written with every export of a run's model/, parsed by huggingface_hub, outside
the model's checksums, and never worth a lost checkpoint."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from resdiff.checkpoint import checkpoint_dir
from resdiff.export import export_folder
from resdiff.files import checksum_problem, read_checksums
from resdiff.model_folder import load_model
from resdiff.rundir import RunDir, export_model, model_facts, model_origin
from tiny_models import diffusers_unet, save_pipeline, small_unet
from tiny_runs import fit, write_pngs


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """2 steps on 16 images, a checkpoint, an export and a preview at each."""
    root = tmp_path_factory.mktemp("card")
    pngs = write_pngs(root / "my-pets", 16)
    fit(root / "pets", f"data.path={pngs}", "train.steps=2", "train.checkpoint_every=1", "train.preview_every=1")
    return root / "pets"


def code_block(card: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", card, re.S).group(1)


def test_the_card_of_a_run_parses_and_says_how_the_model_was_trained(run):
    card = ModelCard.load(run / "model" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert {"resdiff", "diffusion", "unconditional-image-generation"} <= set(card.data.tags)
    text = card.text
    assert "| steps | 2 |" in text and "| images seen | 16 (2 steps of 8) |" in text  # TINY's batch of 8
    assert "| data | `my-pets`, 16 images |" in text
    assert str(run.parent) not in str(card)  # the data's folder by name only: a local path may be private
    assert "import resdiff" in code_block(text, "python")  # resdiff's format: its UNet class needs the import
    recipe = code_block(text, "yaml")
    assert "lr: 0.001" in recipe and "channels: 16" in recipe and "path" not in recipe
    # The grid of the model's own step: the card is rewritten once the step's preview is in.
    assert "EMA samples at step 2" in text
    assert (run / "model" / "samples.png").read_bytes() == (run / "samples" / "step-0000002.png").read_bytes()


def test_the_card_shows_the_last_evaluation_up_to_the_models_step(run, tmp_path):
    copy = Path(shutil.copytree(run, tmp_path / "pets"))
    with open(copy / "log.jsonl", "a") as f:  # what TrainingEvaluator logs, then figures of a later step
        f.write(json.dumps({"step": 1, "fid@64": 301.5, "kid@64": 0.25, "time": 0}) + "\n")
        f.write(json.dumps({"step": 2, "fid@64": 250.25, "kid@64": 0.125, "kid_std@64": 0.01, "time": 0}) + "\n")
        f.write(json.dumps({"step": 3, "fid@64": 1.5, "time": 0}) + "\n")
    RunDir(copy).describe_model(2)
    text = ModelCard.load(copy / "model" / "README.md").text
    assert "at step 2:" in text and "| FID | 250.2 | 64 |" in text and "| KID | 0.125 | 64 |" in text
    assert "| KID STD | 0.01 | 64 |" in text and "301.5" not in text and "1.5 |" not in text


def test_the_card_is_outside_the_checksums_so_editing_it_keeps_the_model_loadable(run, tmp_path):
    model = Path(shutil.copytree(run / "model", tmp_path / "model"))
    sums, problem = read_checksums(model)
    assert problem is None and "unet/diffusion_pytorch_model.safetensors" in sums
    assert "README.md" not in sums and "samples.png" not in sums
    (model / "README.md").write_text((model / "README.md").read_text() + "\nlicense: edited before the upload\n")
    (model / "samples.png").unlink()
    assert checksum_problem(model) is None
    load_model(model, device="cpu")  # loads as before
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "does not match its SHA-256" in checksum_problem(model)  # the model's own files are still covered


def test_a_card_that_cannot_be_written_is_a_warning_and_the_export_completes(run, tmp_path):
    copy = Path(shutil.copytree(run, tmp_path / "pets"))
    shutil.rmtree(copy / "model")
    (copy / "config.yaml").write_text("train: {lr: [not a number\n")  # the card's recipe cannot be read
    warnings = []
    export_model(copy, checkpoint_dir(copy, 2) / "ema", warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("warning: cannot write the model card") and "config.yaml" in warnings[0]
    assert not (copy / "model" / "README.md").exists()
    load_model(copy, device="cpu")  # the model itself is whole
    assert checksum_problem(copy / "model") is None


def test_the_step_of_a_runs_model_is_found_from_its_checkpoint(run, tmp_path):
    assert model_origin(run / "model") == (run.resolve(), 2)
    assert model_origin(checkpoint_dir(run, 1) / "ema") == (run.resolve(), 1)
    copy = Path(shutil.copytree(run, tmp_path / "pets"))
    shutil.rmtree(copy / "checkpoints")  # deleted to save space: the step is no longer known
    assert model_origin(copy / "model") == (copy.resolve(), None)
    facts = model_facts(copy, None, "pets")
    assert facts.step is None and facts.data_images == 16 and facts.grid.name == "step-0000002.png"
    text = export_folder(copy, tmp_path / "out").joinpath("README.md").read_text()
    assert "| steps |" not in text and "| data | `my-pets`, 16 images |" in text
    assert model_origin(save_pipeline(small_unet(0), tmp_path / "plain")) == (None, None)


def test_a_folder_from_outside_a_run_gets_a_card_that_says_so(tmp_path):
    out = export_folder(save_pipeline(small_unet(0), tmp_path / "plain"), tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "Not known" in card.text and not (out / "samples.png").exists()


def test_the_card_of_a_class_conditional_diffusers_model_samples_with_labels(tmp_path):
    """DDPMPipeline passes no class labels, which a class-conditional UNet2DModel needs: its card's code samples by
    hand, and that code runs."""
    folder = save_pipeline(diffusers_unet(0, num_class_embeds=4), tmp_path / "source")
    out = export_folder(folder, tmp_path / "labelled", diffusers=True)
    card = ModelCard.load(out / "README.md")
    assert "class-conditional" in card.data.tags and "3 classes" in card.text
    code = code_block(card.text, "python").replace('"USER/labelled"', repr(str(out)))
    assert "class_labels=labels" in code and "import resdiff" not in code
    scope = {}
    exec(code, scope)
    assert scope["images"].shape == (4, 3, 16, 16) and scope["images"].dtype == torch.uint8

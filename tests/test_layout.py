"""The module map's rules, read from the source (tools/import_graph.py): no import circles in resdiff/, lazy
imports included, and a U-Net that depends on its layers and nothing else of resdiff."""

import sys

import pytest

from tiny_runs import ROOT

sys.path.insert(0, str(ROOT))
from tools.import_graph import cycles, draw, import_graph, imports_of, layers  # noqa: E402


def test_resdiff_has_no_import_circles():
    graph = import_graph()
    assert {"unet", "nn", "config", "trainer", "model_folder"} <= set(graph)  # it read the package
    assert cycles(graph) == []


def test_unet_imports_only_its_layers():
    """Other pipelines import the U-Net: it must not bring conversion, loading, config or training code along."""
    assert import_graph()["unet"] == {"nn", "shapes"}  # shapes: the image-size facts, importing nothing


def test_the_graph_sees_lazy_imports_and_finds_circles(tmp_path):
    tmp_path = tmp_path / "pkg"  # the package's name, as absolute imports spell it
    tmp_path.mkdir()
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import x\n    import pkg.a\n")  # lazy, absolute
    (tmp_path / "c.py").write_text("import os\n")
    assert imports_of(tmp_path / "b.py", "pkg") == {"a", "c"}
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


def test_layers_put_each_module_above_what_it_imports_and_the_picture_is_drawn(tmp_path):
    from PIL import Image

    graph = {"cli": {"build", "errors"}, "build": {"unet", "errors"}, "unet": {"nn"}, "nn": set(), "errors": set()}
    assert layers(graph) == {"nn": 0, "errors": 0, "unet": 1, "build": 2, "cli": 3}
    real = import_graph()
    level = layers(real)
    assert all(level[m] > level[d] for m, deps in real.items() for d in deps)
    draw(graph, tmp_path / "graph.png", "test")
    assert Image.open(tmp_path / "graph.png").size[0] > 400


@pytest.mark.parametrize("script, shown", [
    ("train.py", "--mixed-precision {no,fp16,bf16}"),
    ("sample.py", "--sampler {ddpm,ddim,dpm++,euler,heun,unipc,dpm++3m,dpm++sde}"),
    ("evaluate.py", "--kid-subsets KID_SUBSETS"),
    ("export.py", "--diffusers"),
])
def test_cli_help_imports_no_torch(script, shown):
    """The CLIs' parsers take their choices and defaults from light modules (resdiff.choices, resdiff.settings), not
    from the modules that build the things (which import torch), so `--help` answers at once."""
    import os
    import subprocess

    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shown in done.stdout


# Today's allowed graph, written down: which modules of resdiff each module may import (lazy imports included).
# Dependencies point one way (shapes, layout, errors -> blocks and data -> model -> diffusion -> loop -> CLIs); a new
# import must be added here, deliberately, and may not close a circle.
ALLOWED = {
    "__init__": set(), "choices": set(), "errors": set(), "layout": set(), "shapes": set(), "nn": set(),
    "testing": set(),
    "hints": {"errors"},
    "files": {"errors", "layout"},
    "runlock": {"errors", "layout"},
    "batches": {"errors"},
    "resnet": {"errors"},
    "hardware": {"choices", "errors"},
    "ema": {"choices"},
    "config": {"choices", "errors", "hints", "shapes"},
    "unet": {"nn", "shapes"},
    "convert": {"nn", "unet"},
    "diffusion": {"choices", "config"},
    "charts": {"files"},
    "checkpoint": {"files", "layout"},
    "images": {"choices", "errors", "files"},
    "data": {"choices", "errors", "images", "shapes"},
    "processes": {"errors", "hardware"},
    "settings": {"choices", "errors", "hardware", "hints"},
    "autoencoder": {"errors", "files"},
    "inception_weights": {"errors", "files"},
    "inception": {"errors", "inception_weights"},
    "features": {"choices", "errors", "files", "hardware", "processes"},
    "metrics": {"errors", "features", "images", "processes"},
    "reference": {"data", "errors", "features", "files", "images", "processes", "shapes"},
    "card": {"config", "files", "layout"},
    "prepare": {"autoencoder", "choices", "config", "data", "errors", "files", "hardware", "shapes"},
    "datasets": {"autoencoder", "config", "data", "errors", "files", "prepare", "processes", "shapes"},
    "model_folder": {"autoencoder", "checkpoint", "convert", "errors", "files", "hardware", "hints", "layout", "unet"},
    "rundir": {"card", "checkpoint", "config", "errors", "files", "layout", "processes", "runlock", "shapes"},
    "pretrained": {"autoencoder", "config", "errors", "files", "hints", "layout", "model_folder", "shapes", "unet"},
    "sampling": {"autoencoder", "choices", "data", "diffusion", "errors", "hardware", "hints", "images", "model_folder",
                 "processes", "settings", "shapes"},
    "editing": {"choices", "data", "diffusion", "errors", "files", "hints", "images", "sampling", "settings"},
    "previews": {"autoencoder", "images", "processes", "rundir", "sampling", "settings"},
    "quality": {"autoencoder", "charts", "diffusion", "features", "layout", "metrics", "processes", "reference", "rundir",
                "sampling", "settings"},
    "evaluation": {"errors", "features", "files", "hardware", "hints", "inception", "layout", "metrics", "model_folder",
                   "processes", "reference", "sampling", "settings", "shapes"},
    "export": {"autoencoder", "convert", "errors", "files", "layout", "model_folder", "rundir"},
    "trainer": {"autoencoder", "batches", "checkpoint", "data", "diffusion", "ema", "errors", "features", "hardware",
                "layout", "processes", "rundir"},
    "summary": {"config", "data", "hardware", "prepare", "pretrained", "trainer"},
    "build": {"autoencoder", "batches", "config", "datasets", "diffusion", "ema", "errors", "inception",
              "inception_weights", "layout", "prepare", "pretrained", "previews", "processes", "quality", "rundir",
              "settings", "shapes", "summary", "trainer", "unet"},
}


def test_every_module_imports_only_what_the_layering_allows():
    graph = import_graph()
    unknown = sorted(set(graph) - set(ALLOWED))
    assert not unknown, f"new modules {unknown}: write down what they may import in ALLOWED"
    extra = {m: sorted(graph[m] - ALLOWED[m]) for m in graph if graph[m] - ALLOWED[m]}
    assert not extra, f"imports the layering does not allow (add them to ALLOWED deliberately, or move the code): {extra}"


def test_the_loop_and_the_model_stay_light():
    """The trainer imports no config class (it receives its parts); the U-Net imports only its layers and the
    image-size facts; the config and the names of files import nothing heavy."""
    assert "config" not in ALLOWED["trainer"] and ALLOWED["unet"] == {"nn", "shapes"}
    assert ALLOWED["layout"] == ALLOWED["shapes"] == set() and ALLOWED["config"] <= {"choices", "errors", "hints", "shapes"}

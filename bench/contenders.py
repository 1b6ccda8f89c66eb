"""Real images against diffusers and the strongest peers (issues #25, #37): FID against training wall clock, one
image folder (docs/benchmarks.md, "Sample quality against diffusers on real images", says it all at length).

Contenders, each trained on DIR (32x32 RGB, transparency composited on white as resdiff's training does):
    diffusers   diffusers' unconditional example (bench/loops.py's ExampleLoop) at tiny's size, batch 16, random flips
    ddpm        resdiff's Trainer at the DDPM paper's recipe (epsilon, linear betas, plain MSE, lr 2e-4, EMA 0.999)
    defaults    exactly what `python train.py --data DIR` runs, continued past its 1,200 steps
    lucidrains  denoising-diffusion-pytorch's GaussianDiffusion, sampled by its DDIM at 50 evaluations
    edm         the same package's ElucidatedDiffusion, sampled by its Heun sampler at 49 evaluations
The peers (bench/peers.py) train and sample in their own environment (.venv-peers, `make bench-peers`), a process
per budget, on the same pixels (OUT/images.npy); their samples are scored by the same FID code as everyone's.
Each trains until its clock (the training steps, data included) reaches each budget, then checkpoints and is scored:
FID of --fid-images samples (DDIM-50 unless told; the peers with their own samplers) against the whole folder. Then
the sampler sweep: FID of the last model of --sweep at --nfe model evaluations for each resdiff sampler.
Resumable: every result goes into OUT/results.json as soon as it exists and is skipped when present, and a
contender killed mid-way continues from its checkpoint at the last budget it reached.

    python -m bench.contenders --data data/openmoji --out bench/results/contenders-openmoji   # 5/10/20/40 min
    python -m bench.contenders --data /tmp/small --budgets 0.3 0.6 --fid-images 64 --threads 1 --out /tmp/c
    python -m bench.contenders --report-only docs/bench/contenders-openmoji.json   # the docs' charts, from the figures
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from bench.common import machine, table, write_json
from bench.loops import CLIP, EMA, OPTIMIZER, ExampleLoop
# The peers' side of the exchange (bench/peers.py runs in their environment; this part of it needs only numpy), the
# clock every contender keeps (Progress: the peers' process writes it too) and their checkpoints' writer.
from bench.peers import PEERS, Progress, read_images, save_whole, write_images
from bench.runner import ROOT, run_child, wait_while_held

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONTENDERS = ("diffusers", "ddpm", "defaults", *PEERS)
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
# resdiff at the DDPM paper's recipe: its objective, schedule and lr, with an EMA short runs can use.
DDPM_RECIPE = ["diffusion.prediction_type=epsilon", "diffusion.beta_schedule=linear", "diffusion.min_snr_gamma=null",
               "train.lr=2e-4", "train.ema_decay=0.999"]
# Both resdiff contenders run as train.py would, minus what the benchmark does itself: in-training FID,
# and the 1,200-step stop (budgets end the runs). Checkpoints are the benchmark's, one kept.
RESDIFF_COMMON = ["train.eval_every=0", "train.steps=1000000000", "train.keep_checkpoints=1"]
# diffusers' contender: the example's UNet2DModel (diffusers' blocks and default norm groups, self-attention in one
# low-resolution block) at the size of resdiff's tiny preset: its widths, levels and one ResNet layer per block
# (1,113,955 parameters against the tiny preset's 1,192,387; the example's two layers per block would be 1,624,323).
DIFFUSERS_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
# The example's data and LR schedule (its optimizer, EMA and clipping: bench/loops.py).
EXAMPLE = dict(warmup=500, epochs=100, batch=16)
NFES = (10, 20, 50)
GRID_IMAGES = 64


def budget_key(contender: str, minutes: float) -> str:
    return f"{contender}@{minutes:g}min"


def pending(results: dict, contender: str, budgets: list[float]) -> list[float]:
    """The budgets of ``contender`` without a result yet, in increasing order."""
    return [b for b in sorted(budgets) if budget_key(contender, b) not in results.get("budgets", {})]


def steps_for_nfe(sampler: str, nfe: int, train_config: dict) -> tuple[int, int]:
    """(steps, model evaluations): the most steps of ``sampler`` whose model evaluations stay within ``nfe``.

    The sampling loop calls the model once per scheduler timestep, so a second-order sampler (Heun:
    2 * steps - 1 timesteps) gets about half the steps of a first-order one at the same NFE."""
    from resdiff.diffusion import make_sampler

    best = (0, 0)
    for steps in range(1, nfe + 1):
        scheduler, _ = make_sampler(sampler, train_config)
        scheduler.set_timesteps(steps)
        evaluations = len(scheduler.timesteps)
        if evaluations <= nfe:
            best = (steps, evaluations)
    return best


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------- the contenders


class ResdiffContender:
    """resdiff's own Trainer (built by build_trainer from the defaults plus ``overrides``), stepped by the
    benchmark's clock: each step is Trainer.train_step, the step train.py runs."""

    def __init__(self, name: str, data: Path, run_dir: Path, overrides: list[str], seed: int, image_size: int = 32):
        from resdiff.build import build_trainer, model_keys
        from resdiff.config import load_config

        self.name, self.run_dir, self.clock_file = name, run_dir, run_dir / "bench-clock.json"
        self.overrides = [f"data.path={data}", f"out={run_dir}", f"train.seed={seed}", f"data.image_size={image_size}",
                          *RESDIFF_COMMON, *overrides]
        cfg = load_config(None, self.overrides, model_keys=model_keys())
        self.trainer = build_trainer(cfg, resume="auto", echo=print)
        if self.trainer.step and self._clock().get(str(self.trainer.step)) is None:  # no clock for its checkpoint
            self.trainer.close()
            self.clock_file.unlink(missing_ok=True)
            self.trainer = build_trainer(cfg, resume="auto", start_over=True, echo=print)
        self.batch = cfg.train.batch_size

    def _clock(self) -> dict:
        """{step: Progress fields} of every checkpoint the benchmark saved in this run."""
        return json.loads(self.clock_file.read_text()) if self.clock_file.is_file() else {}

    def restore(self) -> Progress:
        return Progress(**self._clock()[str(self.trainer.step)]) if self.trainer.step else Progress()

    def step(self) -> int:
        self.trainer.run_steps(1)
        return self.batch

    def save(self, progress: Progress) -> None:
        """The clock at this step first, then the checkpoint (a checkpoint without its clock is never left)."""
        self.clock_file.write_text(json.dumps({**self._clock(), str(progress.steps): asdict(progress)}))
        self.trainer.save_checkpoint()

    def ema_model(self) -> torch.nn.Module:
        return self.trainer.ema.model

    def latent(self):
        """A latent contender's LatentSpace (its samples are decoded before they are scored); None on pixels."""
        return self.trainer.latent

    def scheduler_config(self) -> dict:
        return dict(self.trainer.diffusion.scheduler.config)

    def describe(self) -> dict:
        return {"parameters": parameters(self.trainer.ema.model), "batch": self.batch, "recipe": self.overrides[3:],
                "config": "defaults (resdiff.config.Config())"}

    def close(self) -> None:
        self.trainer.close()


class DiffusersContender:
    """diffusers' unconditional training example (ExampleLoop, its defaults, batch 16), on images prepared as resdiff
    prepares them. Shuffled epochs and random flips as its DataLoader and transforms give them."""

    def __init__(self, name: str, data: Path, run_dir: Path, seed: int):
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler

        from resdiff.reference import load_images

        self.name, self.file = name, run_dir / "checkpoint.pt"
        self.images = load_images(data, 32, 3)  # uint8 (N, 3, 32, 32), composited on white
        self.cosine_steps = math.ceil(len(self.images) / EXAMPLE["batch"]) * EXAMPLE["epochs"]
        torch.manual_seed(seed)
        model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **DIFFUSERS_UNET)
        self.loop = ExampleLoop(model, lr_schedule=lambda opt: get_scheduler(
            "cosine", optimizer=opt, num_warmup_steps=EXAMPLE["warmup"], num_training_steps=self.cosine_steps))
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.epoch, self.position, self.order = 0, 0, torch.randperm(len(self.images), generator=self.generator)

    def _batch(self) -> torch.Tensor:
        """The next batch of the shuffled epoch (the last one of an epoch may be smaller), flipped at random."""
        if self.position >= len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = torch.randperm(len(self.images), generator=self.generator)
        idx = self.order[self.position:self.position + EXAMPLE["batch"]]
        self.position += len(idx)
        x = self.images[idx]
        flip = torch.rand(len(x), generator=self.generator) < 0.5
        x[flip] = x[flip].flip(-1)
        return x.float() / 127.5 - 1  # the example's Normalize([0.5], [0.5]) of ToTensor's [0, 1]

    def step(self) -> int:
        clean = self._batch().to(self.loop.acc.device)
        self.loop.step(clean)
        return len(clean)

    def save(self, progress: Progress) -> None:
        """Everything a restart needs, in one file."""
        save_whole({**self.loop.state_dict(), "epoch": self.epoch, "position": self.position, "order": self.order,
                    "generator": self.generator.get_state(), "rng": torch.get_rng_state(), "progress": asdict(progress)},
                   self.file)

    def restore(self) -> Progress:
        if not self.file.is_file():
            return Progress()
        state = torch.load(self.file, weights_only=True)
        self.loop.load_state_dict(state)
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        return Progress(**state["progress"])

    def ema_model(self) -> torch.nn.Module:
        return self.loop.ema_model()

    def scheduler_config(self) -> dict:
        return dict(self.loop.noise_scheduler.config)

    def describe(self) -> dict:
        listed = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
        return {"parameters": parameters(self.loop.model), "batch": EXAMPLE["batch"], "unet": listed(DIFFUSERS_UNET),
                "recipe": listed({**OPTIMIZER, **EXAMPLE, "clip": CLIP, "ema": EMA}), "cosine_steps": self.cosine_steps}

    def close(self) -> None:
        pass


def recipes(variants: list[list[str]] | None) -> dict[str, list[str]]:
    """{resdiff contender: its overrides of the defaults}: ddpm, defaults, and each ``--variant NAME KEY=VALUE...``."""
    out = {"ddpm": DDPM_RECIPE, "defaults": []}
    for name, *overrides in variants or []:
        if name in CONTENDERS or name in out:
            raise SystemExit(f"--variant {name}: the name is taken; choose another")
        out[name] = overrides
    return out


def make_contender(name: str, data: Path, out: Path, seed: int, overrides: list[str] | None, image_size: int = 32):
    run_dir = out / "runs" / name
    if name == "diffusers":
        return DiffusersContender(name, data, run_dir, seed)
    return ResdiffContender(name, data, run_dir, overrides or [], seed, image_size)


# ----------------------------------------------------------------------------------------- scoring


class Scorer:
    """FID of n samples of a model against the whole folder: the 2015 Inception network, reference cached."""

    def __init__(self, data: Path, n: int, batch_size: int, seed: int, image_size: int = 32):
        from resdiff.inception import load_inception
        from resdiff.reference import reference_features

        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.net = load_inception(device="cpu")
        self.reference = reference_features(data, self.net, image_size, 3, batch_size=batch_size, log=print)[1]

    def __call__(self, model: torch.nn.Module | str, scheduler_config: dict | None, sampler: str = "ddim",
                 steps: int = 50, latent=None) -> tuple[float, torch.Tensor]:
        """(FID, the uint8 samples) of ``model`` (in memory with its training scheduler config and, for a latent
        model, its LatentSpace; or a folder), sampled here with resdiff's ``sampler``."""
        from resdiff.sampling import ImageGenerator, SamplingSettings

        settings = SamplingSettings(sampler=sampler, steps=steps, seed=self.seed, batch_size=self.batch_size, device="cpu")
        generator = ImageGenerator(model, settings, scheduler_config, latent=latent)
        return self._fid(lambda indices: generator.images(indices, progress=True), f"{sampler}-{steps}")

    def samples(self, images: torch.Tensor, sampler: str) -> tuple[float, torch.Tensor]:
        """(FID, the samples) of ``images``: n uint8 samples a contender drew with its own ``sampler``."""
        if len(images) != self.n:
            raise SystemExit(f"error: {len(images)} samples to score, not {self.n}")
        return self._fid(lambda indices: images[indices], sampler)

    def _fid(self, get_images: Callable[[list[int]], torch.Tensor], sampler: str) -> tuple[float, torch.Tensor]:
        from resdiff.features import sample_features
        from resdiff.metrics import fid_from_stats

        kept, seconds = [], {}

        def images(indices: list[int]) -> torch.Tensor:
            kept.append(get_images(indices))
            return kept[-1]

        stats, _ = sample_features(images, self.n, self.net, batch_size=self.batch_size, device=torch.device("cpu"),
                                   seconds=seconds)
        print(f"score: {self.n} samples ({sampler}) in {seconds['generation']:.0f} s, "
              f"their Inception features in {seconds['inception']:.0f} s", flush=True)
        return fid_from_stats(stats, self.reference), torch.cat(kept)


def save_grid(images: torch.Tensor, path: Path) -> str:
    from resdiff.images import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images[:GRID_IMAGES]).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ the runs


class Results:
    """OUT/results.json, rewritten whole after every new figure so that a killed run loses none."""

    def __init__(self, out: Path, header: dict):
        self.file = out / "results.json"
        self.data = json.loads(self.file.read_text()) if self.file.is_file() else {}
        for key, value in header.items():
            if self.data.get(key, value) != value:  # figures of another n or set must never share a table
                raise SystemExit(f"{self.file} holds results for {key}={self.data[key]}, not {value}; "
                                 f"pass the same settings to continue it, or another --out")
        self.data.update(header)
        self.data.setdefault("contenders", {})
        self.data.setdefault("budgets", {})
        self.data.setdefault("sweep", {})

    def put(self, section: str, key: str, value: dict) -> None:
        self.data[section][key] = value
        write_json("contenders", self.data, self.file)


@contextlib.contextmanager
def flag_file(path: Path | None):
    """``path`` (when given) exists while the block runs: other jobs on the machine wait for it to go, so that
    nothing else runs while a training clock does (scoring is not timed)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def train_to(contender, progress: Progress, seconds: float) -> Progress:
    """Step ``contender`` until its training clock reaches ``seconds``; only the steps count."""
    bar = tqdm(total=round(seconds), initial=min(round(progress.seconds), round(seconds)), unit="s",
               desc=f"train {contender.name}", dynamic_ncols=True)
    while progress.seconds < seconds:
        wait_while_held()  # another job holds the cores: the clock waits (bench/runner.py)
        start = time.perf_counter()
        images = contender.step()
        progress.seconds += time.perf_counter() - start
        progress.steps += 1
        progress.images += images
        bar.n = min(round(progress.seconds), round(seconds))
        bar.set_postfix(steps=progress.steps, refresh=False)
        bar.update(0)
    bar.close()
    return progress


def run_contender(name: str, args: argparse.Namespace, results: Results, scorer: Scorer) -> None:
    """Train ``name`` through every budget without a result, scoring (DDIM-50 unless told) and checkpointing at each."""
    todo = pending(results.data, name, args.budgets)
    if not todo:
        print(f"{name}: every budget has its result; skipped")
        return
    contender = make_contender(name, args.data, args.out, args.seed, recipes(args.variant).get(name), args.image_size)
    try:
        results.put("contenders", name, contender.describe())
        progress = contender.restore()
        if progress.steps:
            print(f"{name}: resumed from its checkpoint at step {progress.steps} ({progress.seconds:.1f} s trained)")
        for minutes in todo:
            if progress.seconds < minutes * 60:
                with flag_file(args.training_flag):
                    progress = train_to(contender, progress, minutes * 60)
                contender.save(progress)
            fid, images = scorer(contender.ema_model(), contender.scheduler_config(), args.sampler, args.steps,
                                 getattr(contender, "latent", lambda: None)())
            put_row(results, budget_row(name, minutes, fid, progress, images, args.out))
    finally:
        contender.close()


def budget_row(name: str, minutes: float, fid: float, progress: Progress, images: torch.Tensor, out: Path) -> dict:
    """results.json's row of one contender at one budget (its samples' grid saved beside)."""
    return {"contender": name, "budget_min": minutes, "fid": round(fid, 2), "train_s": round(progress.seconds, 1),
            "steps": progress.steps, "images": progress.images,
            "images_per_s": round(progress.images / max(progress.seconds, 1e-9), 1),
            "grid": save_grid(images, out / "grids" / f"{budget_key(name, minutes)}.png")}


def put_row(results: Results, row: dict) -> None:
    results.put("budgets", budget_key(row["contender"], row["budget_min"]), row)
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------ the peers, in their own process


def check_peers_python(python: Path) -> None:
    """One line saying how to make the peers' environment when its python is missing."""
    if not (python.is_file() and python.stat().st_mode & 0o111):
        raise SystemExit(f"error: {python} is missing: run make bench-peers (the peers' own environment; "
                         f"or pass --peers-python)")


def training_images(data: Path, out: Path) -> Path:
    """OUT/images.npy: the folder's images as every contender trains on them (32x32 RGB, composited on white),
    written once for the peers' processes."""
    from resdiff.reference import load_images

    path = out / "images.npy"
    if not path.is_file():
        write_images(path, load_images(data, 32, 3).numpy())
    return path


def run_peer(name: str, args: argparse.Namespace, results: Results, scorer: Scorer) -> None:
    """Train peer ``name`` (bench/peers.py, in the peers' environment) through every budget without a result, and
    score the samples its own sampler draws at each with the FID every contender gets."""
    todo = pending(results.data, name, args.budgets)
    if not todo:
        print(f"{name}: every budget has its result; skipped")
        return
    run_dir, images = args.out / "runs" / name, training_images(args.data, args.out)

    def peer(command: str, *flags: object) -> dict:
        threads = ["--threads", str(args.threads)] if args.threads else []
        cmd = [str(args.peers_python), "-m", "bench.peers", command, name, "--run-dir", str(run_dir),
               "--seed", str(args.seed), *threads, *map(str, flags)]
        return run_child(cmd, f"bench.peers {command} {name}")

    for minutes in todo:
        with flag_file(args.training_flag):
            peer("train", "--images", images, "--seconds", minutes * 60)
        samples = run_dir / "samples" / f"{budget_key(name, minutes)}.npy"
        done = peer("sample", "--n", args.fid_images, "--batch-size", args.batch_size, "--out", samples)
        described = {k: done[k] for k in ("parameters", "nfe", "sampler", "recipe", "device", "versions")}
        results.put("contenders", name, {**described, "batch": done["recipe"]["trainer"]["train_batch_size"]})
        fid, drawn = scorer.samples(torch.from_numpy(read_images(samples)), done["sampler"])
        progress = Progress(done["train_s"], done["steps"], done["images"])
        put_row(results, budget_row(name, minutes, fid, progress, drawn, args.out))


def run_sweep(name: str, args: argparse.Namespace, results: Results, scorer: Scorer) -> None:
    """FID of ``name``'s last model (its run directory's export) for every resdiff sampler at each NFE."""
    from resdiff.choices import SAMPLERS
    from resdiff.model_folder import latent_space, load_model

    model_dir = args.out / "runs" / name / "model"
    last = budget_key(name, max(args.budgets))
    if last not in results.data["budgets"] or not model_dir.is_dir():
        print(f"sweep: {name} has no model at its last budget yet; skipped")
        return
    model, scheduler_config = load_model(model_dir, torch.device("cpu"))
    latent = latent_space(model_dir, device="cpu")  # a latent model's samples are decoded before they are scored
    for sampler in args.samplers or SAMPLERS:
        for nfe in args.nfe:
            key = f"{last}/{sampler}@{nfe}"  # the model of the largest budget: a longer run is swept anew
            if key in results.data["sweep"]:
                continue
            steps, evaluations = steps_for_nfe(sampler, nfe, scheduler_config)
            # The budget's own score: the same samples (Results refuses a folder scored with another sampler).
            if (sampler, steps) == (args.sampler, args.steps):
                fid = results.data["budgets"][last]["fid"]
            else:
                fid, _ = scorer(model, scheduler_config, sampler, steps, latent)
            row = {"contender": name, "budget_min": max(args.budgets), "sampler": sampler, "nfe": evaluations,
                   "steps": steps, "fid": round(fid, 2)}
            results.put("sweep", key, row)
            print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------ reports

# Each contender's colour in every chart and on the grids (resdiff.charts' colour-blind-safe palette).
COLOURS = {"diffusers": "#D55E00", "ddpm": "#0072B2", "defaults": "#009E73", "lucidrains": "#CC79A7", "edm": "#E69F00"}


def budget_table(results: dict, contenders: list[str]) -> str:
    """Markdown: one row per budget, FID and training images/s of each contender."""
    rows = list(results["budgets"].values())
    budgets = sorted({r["budget_min"] for r in rows})
    by = {(r["contender"], r["budget_min"]): r for r in rows}
    head = ["budget (min)", *(f"FID {c}" for c in contenders), *(f"img/s {c}" for c in contenders)]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:"] * len(head)) + " |"]
    for b in budgets:
        cells = [f"{b:g}", *(str(by.get((c, b), {}).get("fid", "")) for c in contenders),
                 *(str(by.get((c, b), {}).get("images_per_s", "")) for c in contenders)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """The sweep's rows: each swept model (contender, minutes trained) with each sampler and NFE."""
    rows = sorted(results["sweep"].values(), key=lambda r: (r["contender"], r["budget_min"], r["sampler"], r["nfe"]))
    return table(rows, ["contender", "budget_min", "sampler", "nfe", "steps", "fid"]) if rows else "(no sweep yet)"


def fid_chart(results: dict) -> Figure:
    """FID against training minutes (log scale, ticked at the budgets), one line per contender."""
    from resdiff.charts import line_chart

    rows = list(results["budgets"].values())
    series = {name: [(r["budget_min"], r["fid"]) for r in rows if r["contender"] == name] for name in scored(results)}
    n, sampler = results.get("fid_images", "?"), f"{results.get('sampler', 'ddim').upper()}-{results.get('steps', 50)}"
    own = " (peers: their own)" if any(c in PEERS for c in series) else ""
    return line_chart(series, title=f"FID@{n} of {sampler} samples{own} against training time{_about(results)}",
                      x_label="training minutes (log scale)", y_label=f"FID@{n} (lower is better)", log_x=True,
                      x_ticks=sorted({r["budget_min"] for r in rows}), colours=COLOURS)


def scored(results: dict) -> list[str]:
    """The contenders with a budget score: those of CONTENDERS present, in its order, then the --variant ones."""
    names = {r["contender"] for r in results.get("budgets", {}).values()}
    return [c for c in CONTENDERS if c in names] + sorted(names - set(CONTENDERS))


def sweep_chart(results: dict) -> Figure | None:
    """FID against model evaluations (NFE, log scale), one line per sampler, for each swept contender's last
    model; None without a sweep. Ticks at the NFE budgets; a sampler whose evaluations fall between them (Heun's
    2 * steps - 1: 19 for 20) says its own in the legend."""
    from resdiff.charts import line_chart

    rows = list(results.get("sweep", {}).values())
    if not rows:
        return None
    nfes = sorted({r["nfe"] for r in rows})
    ticks = [n for k, n in enumerate(nfes[:-1]) if nfes[k + 1] > 1.2 * n] + nfes[-1:]  # Heun's 19 sits by 20: tick 20
    series, swept = {}, sorted({(r["contender"], r["budget_min"]) for r in rows})
    for sampler in sorted({r["sampler"] for r in rows}, key=_sampler_order):
        for contender, minutes in swept:  # one line per sampler and model: a longer run swept anew is a new line
            points = sorted((r["nfe"], r["fid"]) for r in rows
                            if (r["sampler"], r["contender"], r["budget_min"]) == (sampler, contender, minutes))
            if not points:
                continue
            own = [x for x, _ in points]
            name = sampler if len(swept) == 1 else f"{sampler}, {contender} {minutes:g} min"
            series[name if set(own) <= set(ticks) else f"{name} ({', '.join(map(str, own))} NFE)"] = points
    models = [f"{c} after {m:g} min" for c, m in swept]
    n = results.get("fid_images", "?")
    return line_chart(series, title=f"FID@{n} against model evaluations{_about(results, models)}",
                      x_label="model evaluations per sample (NFE, log scale)", y_label=f"FID@{n} (lower is better)",
                      log_x=True, x_ticks=ticks)


def _about(results: dict, models: tuple[str, ...] | list[str] = ()) -> str:
    """" (MODEL, ..., FOLDER)" for a chart's title: the models shown and the image folder the results were measured
    on (its last part), or nothing when there are neither."""
    parts = [*models, *([Path(results["data"]).name] if results.get("data") else [])]
    return f" ({', '.join(parts)})" if parts else ""


def _sampler_order(name: str) -> tuple[int, str]:
    """resdiff's samplers in resdiff.choices.SAMPLERS's order (the legend's), any other after them."""
    from resdiff.choices import SAMPLERS

    return (list(SAMPLERS).index(name), "") if name in SAMPLERS else (len(SAMPLERS), name)


def grids_picture(results: dict, contenders: list[str], path: Path) -> Path | None:
    """The grids of every contender at the largest budget they all reached, side by side under their names."""
    from PIL import Image, ImageDraw

    rows = results.get("budgets", {}).values()
    reached = [{r["budget_min"] for r in rows if r["contender"] == c} for c in contenders]
    common = set.intersection(*reached) if reached else set()
    if not common:
        return None
    budget = max(common)
    by = {r["contender"]: r for r in rows if r["budget_min"] == budget}
    grids = [Image.open(by[c]["grid"]).convert("RGB") for c in contenders]
    gap, head = 12, 36
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    image = Image.new("RGB", (width, head + max(g.height for g in grids)), "white")
    draw, x = ImageDraw.Draw(image), 0
    for name, grid in zip(contenders, grids):
        draw.text((x + 2, 4), f"{name}, {budget:g} min", fill=COLOURS.get(name, "#000000"))
        draw.text((x + 2, 18), f"FID@{results.get('fid_images', '?')} {by[name]['fid']}", fill=(60, 60, 60))
        image.paste(grid, (x, head))
        x += grid.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def draw_charts(results: dict, fid_path: Path, nfe_path: Path) -> list[Path]:
    """FID against training minutes at ``fid_path`` and, with a sampler sweep, FID against NFE at ``nfe_path``."""
    from resdiff.charts import save

    drawn = [save(fid_chart(results), fid_path)]
    if (sweep := sweep_chart(results)) is not None:
        drawn.append(save(sweep, nfe_path))
    return drawn


def samplers_note(results: dict, contenders: list[str]) -> str:
    """Which sampler scored each contender: resdiff's --sampler/--steps, or a peer's own (with its NFE)."""
    ours = f"resdiff's {results.get('sampler', 'ddim')}, {results.get('steps', 50)} steps"
    own = {c: f"{d['sampler']} ({d['nfe']} NFE)" for c, d in results.get("contenders", {}).items() if "nfe" in d}
    return "Samplers: " + "; ".join(f"{c}: {own.get(c, ours)}" for c in contenders)


def report(results: Results, out: Path) -> None:
    """Tables, charts and grids of every contender in the results file, not only this invocation's: a run of one
    contender into an earlier run's folder reports them side by side."""
    contenders = scored(results.data)
    budgets, sweep = budget_table(results.data, contenders), sweep_table(results.data)
    samplers = samplers_note(results.data, contenders)
    pictures = [*draw_charts(results.data, out / "fid_vs_time.png", out / "fid_vs_nfe.png"),
                grids_picture(results.data, contenders, out / "grids.png")]
    (out / "table.md").write_text(f"{budgets}\n\n{samplers}\n\nSampler sweep (the last model of each swept contender):"
                                  f"\n\n{sweep}\n")
    wrote = ", ".join(str(p) for p in [results.file, out / "table.md", *pictures] if p)
    print(f"machine: {machine()}\n{budgets}\n{samplers}\n\n{sweep}\nwrote {wrote}")


def report_only(file: Path) -> None:
    """The charts of a results file (a run's OUT/results.json, or a copy kept with the docs) drawn beside it as
    STEM-fid.png and STEM-nfe.png, and its tables printed; nothing is trained or scored."""
    results = json.loads(file.read_text())
    drawn = draw_charts(results, file.with_name(f"{file.stem}-fid.png"), file.with_name(f"{file.stem}-nfe.png"))
    print(f"{results.get('machine', 'machine not recorded')}, {results.get('date', 'no date')}\n"
          f"{budget_table(results, scored(results))}\n\n{sweep_table(results)}\nwrote {', '.join(map(str, drawn))}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="image folder (one set per invocation)")
    p.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                   help="only draw the charts of this results file beside it (STEM-fid.png, STEM-nfe.png) and print "
                        "its tables, e.g. docs/bench/contenders-openmoji.json; nothing is trained")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/contenders-<data folder name>)")
    p.add_argument("--budgets", type=float, nargs="+", default=[5, 10, 20, 40], help="minutes of training")
    p.add_argument("--fid-images", type=int, default=1000, help="samples per FID, equal for every contender")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                   help=f"which to run, of {', '.join(CONTENDERS)} and the --variant names (default: the former)")
    p.add_argument("--peers-python", type=Path, default=PEERS_PYTHON,
                   help="the python of the peers' environment (default: .venv-peers, made by make bench-peers)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="one more resdiff contender: the defaults with these overrides, e.g. "
                        "--variant lr2e-3 train.lr=2e-3 (repeatable; the defaults' tuning runs)")
    p.add_argument("--sampler", default="ddim",
                   help="sampler of the budget scores of resdiff's and diffusers' contenders (the peers use their own)")
    p.add_argument("--steps", type=int, default=50, help="its steps")
    p.add_argument("--training-flag", type=Path, help="a file that exists while a contender's training clock runs")
    p.add_argument("--nfe", type=int, nargs="*", default=list(NFES), help="model evaluations of the sampler sweep")
    p.add_argument("--sweep", nargs="*", default=["defaults"], help="the resdiff contenders whose last model is swept")
    p.add_argument("--samplers", nargs="+", metavar="SAMPLER",
                   help="the sweep's samplers (default: all of resdiff.choices.SAMPLERS)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=100, help="sampling and Inception batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32,
                   help="the resdiff contenders' training and scoring size (the reference is prepared at it too)")
    args = p.parse_args(argv)
    if args.report_only:
        return report_only(args.report_only)
    if args.data is None:
        p.error("--data is required (or --report-only RESULTS_JSON to redraw charts)")
    known = [*CONTENDERS, *recipes(args.variant)]
    if unknown := [c for c in args.contenders if c not in known]:
        p.error(f"unknown contender {unknown[0]!r}; choose from {', '.join(dict.fromkeys(known))}")
    from resdiff.choices import SAMPLERS
    if unknown := [s for s in args.samplers or [] if s not in SAMPLERS]:
        p.error(f"unknown sampler {unknown[0]!r}; choose from {', '.join(SAMPLERS)}")
    if any(c in PEERS for c in args.contenders):
        check_peers_python(args.peers_python)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or ROOT / "bench" / "results" / f"contenders-{args.data.resolve().name}"
    header = {"data": str(args.data.resolve()), "fid_images": args.fid_images, "sampler": args.sampler,
              "steps": args.steps, **({"image_size": args.image_size} if args.image_size != 32 else {})}
    results = Results(args.out, header)
    print(f"machine: {machine()}; data {args.data}; budgets {args.budgets} min; FID@{args.fid_images}", flush=True)
    if args.image_size != 32 and (unfit := [c for c in args.contenders if c in PEERS or c == "diffusers"]):
        p.error(f"--image-size {args.image_size}: {', '.join(unfit)} train at 32x32 only; choose resdiff contenders")
    scorer = Scorer(args.data, args.fid_images, args.batch_size, args.seed, args.image_size)
    for name in args.contenders:
        (run_peer if name in PEERS else run_contender)(name, args, results, scorer)
    for name in [c for c in args.sweep if c in args.contenders]:
        run_sweep(name, args, results, scorer)
    report(results, args.out)


if __name__ == "__main__":
    main()

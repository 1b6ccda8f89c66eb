"""evaluate.py's job: score a model's samples (or any images) against a reference set, across processes.

    samples (generated from a model folder, or read from a folder / .npz)
        -> FID Inception features, each process its share: images range(n)[rank::world], as sample.py shards
        -> float64 statistics summed across processes; features gathered on the main process
        -> FID against the reference's statistics; KID, precision/recall (k=3) and memorisation against its
           features (a statistics-only reference gives FID alone)
        -> a table on the terminal, EVAL/<name>.json with everything needed to reproduce it, EVAL/nearest.png

FID depends on the number of samples, so n, sampler, steps, seed and reference are printed beside every
figure. Image i of a model depends only on (seed, i) (resdiff.sampling), so nearest.png's samples are
generated again on the main process instead of being passed around.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .files import write_atomic
from .hardware import check_device
from .features import FeatureStats, extract_features
from .metrics import Memorisation, fid_from_stats, kid, memorisation, nearest_pairs_image, precision_recall
from .processes import gather_shares, join, on_main, rank_world, share
from .reference import image_dataset, reference_features, reference_images
from .checkpoint import MODEL_INDEX
from .rundir import LOG, QUALITY_PICTURE
from .sampling import ImageGenerator
from .settings import SamplingSettings, Scoring

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["evaluate", "Scoring", "default_eval_dir", "sample_features", "TrainingEvaluator", "quality_chart",
           "quality_picture"]

NEAREST_PAIRS = 32  # pairs in nearest.png


def default_eval_dir(model: str | Path | None, samples: str | Path | None) -> Path:
    """RUN/eval for a run directory (or a pipeline folder's parent); SAMPLES/eval, or beside an .npz."""
    if model is not None:
        path = Path(model)
        return (path.parent if (path / MODEL_INDEX).is_file() else path) / "eval"
    path = Path(samples)
    return (path if path.is_dir() else path.parent) / "eval"


def evaluate(
    *, ref: str | Path, model: str | Path | None = None, samples: str | Path | None = None, num_images: int = 50000,
    settings: SamplingSettings | None = None, scoring: Scoring | None = None, out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Score ``num_images`` samples of ``model`` (or the images of ``samples``) against ``ref`` (an image folder,
    an .npz of images, or a statistics .npz), on every launched process. Returns the result (also written as
    JSON into ``out``, default ``default_eval_dir``) on every process.

    ``settings``: sample.py's (default ``SamplingSettings()``). ``log`` None is quiet: no messages, no progress bars."""
    from .inception import load_inception

    settings, scoring = settings or SamplingSettings(), scoring or Scoring()
    _check(model, samples, settings, scoring)
    procs = join(check_device(settings.device), settings.timeout_s)
    world, main, say = procs.world, procs.is_main, procs.say(log)
    dev = procs.device if settings.device is None else torch.device(settings.device)
    net = load_inception(scoring.inception, device=dev, **({} if scoring.verify_inception else {"sha256": None}))
    started, seconds = time.perf_counter(), {}  # seconds: where the time went on this process (JSON and table)
    source, get_images, n, size, channels, described = (
        _model_source(model, num_images, replace(settings, device=dev)) if model is not None else _samples_source(samples))
    batch_size = settings.batch_size  # the feature batch too
    say(f"evaluate: {n} samples of {source} ({_describe(described)}) against {ref}, {world} process(es), device {dev}")
    # The reference first (cached after the first time), so a bad one fails in seconds, not after hours of
    # sampling; every process extracts its share of a folder, so none waits long in a collective.
    with _timed(seconds, "reference", dev):
        reference = reference_features(ref, net, size, channels, batch_size=batch_size, log=say)  # net is on dev
    stats, gen = sample_features(get_images, n, net, batch_size=batch_size, device=dev, progress=log is not None and main,
                                 seconds=seconds)
    rate = n / max(time.perf_counter() - started, 1e-9)
    with _timed(seconds, "metrics", dev):
        scored = _score(stats, gen, reference, dev, scoring.kid_subsets, scoring.kid_subset_size, scoring.k)

    def report() -> dict:
        result, mem = scored
        result.update(
            samples=n, source=str(source), reference=str(ref), settings=described, images_per_s=round(rate, 2),
            processes=world, device=str(dev), inception=getattr(net, "weights_sha256", None),
            inception_verified=scoring.verify_inception, time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=platform.node(),
        )
        folder = Path(out) if out is not None else default_eval_dir(model, samples)
        if mem is not None:  # the closest pairs, side by side: does the model copy its training images?
            top = mem.order[:NEAREST_PAIRS].tolist()
            result["memorisation"]["picture"] = str(nearest_pairs_image(
                get_images(top), reference_images(ref, reference[1], size, channels), _restricted(mem, top),
                folder / "nearest.png"))
        result.update(_training_curve(model), seconds={**seconds, "total": time.perf_counter() - started})
        file = folder / f"{_result_name(described, n)}.json"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(file, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        result["json"] = str(file)
        say(table(result))
        return result

    result = on_main(report)
    procs.barrier()
    procs.leave()
    return result


def _check(model: str | Path | None, samples: str | Path | None, settings: SamplingSettings, scoring: Scoring) -> None:
    """evaluate()'s arguments, checked before any weights load: the CLI and the Python API give the same lines."""
    if (model is None) == (samples is None):
        raise UsageError("pass either --model (generate samples) or --samples (score existing images), not both")
    settings.check()  # with --samples too: the batch size is the feature batch
    scoring.check()


def _training_curve(model: str | Path | None) -> dict:
    """{"training_curve": path} of the run's in-training FID curve, when ``model`` is a run that has one."""
    curve = default_eval_dir(model, None).parent / QUALITY_PICTURE if model is not None else None
    return {"training_curve": str(curve)} if curve is not None and curve.is_file() else {}


# ----------------------------------------------------------------------------- features of samples, across processes


def sample_features(
    get_images: Callable[[list[int]], torch.Tensor], n: int, net: torch.nn.Module, *, batch_size: int,
    device: torch.device, progress: bool = False, seconds: dict[str, float] | None = None,
) -> tuple[FeatureStats, torch.Tensor]:
    """Features of images 0..n-1, each process extracting its share ``range(n)[rank::world]`` (``get_images(indices)``
    gives uint8 (B, C, H, W)): the float64 statistics of all n, summed across processes, and all n features in
    image order, gathered on every process. ``seconds`` gathers this process's time in "generation" (``get_images``)
    and "inception" (the features)."""
    mine = share(n)
    stats, features = FeatureStats(), []
    bar = tqdm(total=len(mine), unit="img", disable=not progress, desc="samples -> features", leave=False)
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        with _timed(seconds, "generation", device):
            images = get_images(batch)
        # channels_last: 1.4x faster on CPU, the same features to float32 rounding (bench/inception_precision.py)
        with _timed(seconds, "inception", device):
            f = extract_features(images, net, batch_size=batch_size, device=device, channels_last=True)  # (B, 2048)
        stats.update(f)
        features.append(f)
        bar.update(len(batch))
    bar.close()
    stats.all_reduce()  # float64 sums of every process: the statistics of all n samples
    local = torch.cat(features) if features else torch.zeros(0, stats.dim)
    return stats, gather_shares(local, n)


@contextmanager
def _timed(seconds: dict[str, float] | None, part: str, device: torch.device):
    """Add the wall time of the block to ``seconds[part]`` (after the device's queued work is done). ``seconds``
    None times nothing, so training's evaluations do not wait for the GPU after every batch."""
    if seconds is None:
        yield
        return
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------- where the samples come from


def _model_source(model, num_images, settings: SamplingSettings):
    """Samples generated from a model folder: (source, images(indices), n, size, channels, settings as a dict).
    The model is made ready once; every batch of features then asks it for its images."""
    from .model_folder import find_model_folder

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise UsageError(f"number of images (--num-images) must be an integer of at least 2, got {num_images!r}")
    folder = find_model_folder(model)
    generator = ImageGenerator(folder, settings)
    size, channels = generator.config.sample_size, generator.config.in_channels
    size = size if isinstance(size, int) else tuple(size)  # (H, W) for non-square models
    s = settings
    described = dict(model=str(folder), sampler=s.sampler, steps=generator.steps, seed=s.seed,
                     guidance_scale=s.guidance_scale, eta=s.eta, class_labels=s.class_labels,
                     mixed_precision=s.mixed_precision)
    return folder, generator.images, num_images, size, channels, described


def _samples_source(samples):
    """Images read from a folder or an .npz: (source, images(indices), n, size, channels, settings)."""
    data = image_dataset(samples)
    first = data[0][0] if isinstance(data[0], (tuple, list)) else data[0]
    channels, (h, w) = first.shape[0], first.shape[1:]
    size = h if h == w else (h, w)  # the reference is prepared at the samples' shape

    def images(indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([data[i][0] if isinstance(data[i], (tuple, list)) else data[i] for i in indices])

    return Path(samples), images, len(data), size, channels, {"samples": str(samples)}


def _restricted(mem: Memorisation, top: list[int]) -> Memorisation:
    """The memorisation result of the samples ``top`` only, renumbered 0..len-1 (the images nearest.png gets)."""
    index = torch.tensor(top, dtype=torch.long)
    return Memorisation(mem.nearest[index], mem.distance[index], mem.threshold, mem.quantile, mem.fraction)


# ----------------------------------------------------------------------------- the figures


def _score(
    stats: FeatureStats, gen: torch.Tensor, reference: tuple[torch.Tensor | None, FeatureStats], device: torch.device,
    kid_subsets: int, kid_subset_size: int, k: int,
) -> tuple[dict, Memorisation | None]:
    """FID, KID, precision/recall and memorisation of the generated features against the reference's, computed by
    every process together (each its share of the work; all get the figures)."""
    ref_features, ref_stats = reference
    result: dict = {"fid": fid_from_stats(stats, ref_stats), "reference_images": ref_stats.count or None,
                    "kid": None, "precision": None, "recall": None, "memorisation": None}
    if ref_features is None:
        return result, None  # a statistics file: FID only
    subset = min(kid_subset_size, len(gen), len(ref_features))
    mean, std = kid(gen, ref_features, subsets=kid_subsets, subset_size=subset, device=device, split=True)
    result["kid"] = {"mean": mean, "std": std, "subsets": kid_subsets, "subset_size": subset}
    result["precision"], result["recall"] = precision_recall(ref_features, gen, k=k, device=device, split=True)
    result["k"] = k
    mem = memorisation(ref_features, gen, device=device, split=True)
    result["memorisation"] = mem.summary()
    return result, mem


def _describe(settings: dict) -> str:
    if "sampler" not in settings:
        return "images as given"
    guidance = f", guidance {settings['guidance_scale']:g}" if settings["guidance_scale"] != 1 else ""
    return f"{settings['sampler']}, {settings['steps']} steps, seed {settings['seed']}{guidance}"


def _result_name(settings: dict, n: int) -> str:
    if "sampler" in settings:
        return f"{settings['sampler']}-{settings['steps']}-n{n}-seed{settings['seed']}"
    return f"{Path(settings['samples']).stem}-n{n}"


def table(result: dict) -> str:
    """The result as a few aligned lines, with n and the settings beside the numbers."""
    lines = [f"resdiff evaluation: {result['samples']} samples ({_describe(result['settings'])}) of {result['source']}",
             f"  reference:    {result['reference']}"
             + (f" ({result['reference_images']} images)" if result.get("reference_images") else ""),
             f"  FID:          {result['fid']:.4f}   (n={result['samples']}; FID is comparable only at the same n)"]
    if result["kid"] is not None:
        kd = result["kid"]
        lines.append(f"  KID:          {kd['mean']:.5f} ± {kd['std']:.5f}   ({kd['subsets']} subsets of {kd['subset_size']})")
        lines.append(f"  precision:    {result['precision']:.4f}   recall: {result['recall']:.4f}   (k={result['k']})")
        m = result["memorisation"]
        lines.append(f"  memorisation: {100 * m['fraction_closer_than_threshold']:.1f}% of samples are closer to a training "
                     f"image than the median training image is to its nearest neighbour (about 50% when nothing is "
                     f"copied); closest pairs: {m.get('picture')}")
    else:
        lines.append("  KID, precision/recall, memorisation: need reference images, not a statistics file")
    if not result.get("inception_verified", True):
        lines.append("  note: Inception weights with another checksum: these figures are not comparable with published ones")
    if result.get("training_curve"):
        lines.append(f"  training:     FID and loss against step in {result['training_curve']}")
    if result.get("seconds"):
        t = result["seconds"]
        parts = ", ".join(f"{name} {t[name]:.1f} s" for name in ("reference", "generation", "inception", "metrics")
                          if name in t)
        lines.append(f"  time:         {t['total']:.1f} s ({parts}; the main process)")
    lines.append(f"  written:      {result.get('json')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- during training


def kid_figures(gen: torch.Tensor, ref: torch.Tensor, subsets: int, device: torch.device) -> dict[str, float]:
    """``kid@n`` and ``kid_std@n`` of n generated features against the reference, subsets of up to 1000.

    When a subset holds both sets whole (training's default: 64 samples against 64 reference images), every
    subset is the same pair of sets: one is computed and no spread is reported, since it would be 0 by
    construction rather than a measured uncertainty."""
    n, size = len(gen), min(1000, len(gen), len(ref))
    whole = size == len(gen) == len(ref)
    mean, std = kid(gen, ref, subsets=1 if whole else subsets, subset_size=size, device=device, split=True)
    return {f"kid@{n}": mean} if whole else {f"kid@{n}": mean, f"kid_std@{n}": std}


class TrainingEvaluator:
    """FID and KID of ``num_images`` EMA samples against the training data, for ``train.eval_every``.

    Every process generates and extracts its share of the samples (as previews do) and holds the reference
    (``reference_features`` of the training data, cached); FID is computed by each from the summed statistics,
    KID's subsets are shared out, so all get the same figures.
    They are labelled with n (``fid@2000``): FID falls as n grows, so only figures of the same n compare.
    ``settings`` say how the samples are drawn (its ``batch_size`` is also the feature batch).
    The trainer calls it every ``every`` steps and at the end. With ``run_dir``, the main process redraws
    ``run_dir/quality.png`` (FID and loss against step, from log.jsonl) at each call; the figures of this call
    are placed at the log's last step, which is this step when ``every`` is a multiple of ``log_every`` or the
    checkpoint interval (``auto``), since the trainer logs the loss there just before it evaluates.
    """

    def __init__(
        self, net: torch.nn.Module, reference: tuple[torch.Tensor | None, FeatureStats], *, every: int,
        num_images: int, settings: SamplingSettings, kid_subsets: int = 10, run_dir: str | Path | None = None,
    ):
        self.net, self.reference, self.every, self.num_images = net, reference, every, num_images
        self.settings, self.kid_subsets = settings, kid_subsets
        # where the features are computed: the settings' device, else where the network is
        self.device = torch.device(settings.device or next(net.parameters(), torch.empty(0)).device)
        self.picture = Path(run_dir) / QUALITY_PICTURE if run_dir is not None else None

    def __call__(self, model: torch.nn.Module, scheduler_config: dict) -> dict[str, float]:
        """The figures of ``model`` now, on every process (one broadcast from the main process)."""
        n = self.num_images
        generator = ImageGenerator(model, self.settings, scheduler_config)
        with generator.ready():  # eval mode and channels_last once, not once per batch
            stats, gen = sample_features(generator.images, n, self.net, batch_size=self.settings.batch_size,
                                         device=self.device)
        ref_features, ref_stats = self.reference  # every process holds them (it extracted its share)
        figures = {f"fid@{n}": fid_from_stats(stats, ref_stats)}
        if ref_features is not None:  # each process computes its share of KID's subsets
            figures.update(kid_figures(gen, ref_features, self.kid_subsets, self.device))
        if self.picture is not None and rank_world()[0] == 0:
            records = _read_records(self.picture.parent / LOG)
            step = max((int(r["step"]) for r in records if "step" in r), default=0)
            quality_picture([*records, {"step": step, **figures}], n, self.picture, kid=ref_features is not None)
        return figures


# ----------------------------------------------------------------------------- the training curve picture


def _read_records(log_file: Path) -> list[dict]:
    """The JSON records of a run's log.jsonl (an unreadable line, e.g. one cut off by a crash, is skipped)."""
    records = []
    for line in log_file.read_text().splitlines() if log_file.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def quality_chart(records: list[dict], n: int, *, kid: bool = True) -> Figure:
    """FID@n, KID@n (with ``kid``: the evaluation computes it) and the training loss of a run's log records against
    step. The panels are the same at every evaluation of a run, the first included."""
    from .charts import Panel, step_chart

    kid_panel = [Panel(f"kid@{n}", f"KID@{n}")] if kid else []
    panels = [Panel(f"fid@{n}", f"FID@{n} (lower is better)"), *kid_panel, Panel("loss", "training loss", log_y=True)]
    return step_chart(records, panels, title=f"EMA samples (n = {n}) and training loss; FID compares only at the same n")


def quality_picture(records: list[dict], n: int, path: str | Path, *, kid: bool = True) -> Path:
    """``quality_chart`` as a PNG at ``path``, written whole or not at all (a viewer never sees half of it)."""
    from .charts import save

    return save(quality_chart(records, n, kid=kid), path)

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
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from .layout import EVAL, MODEL_INDEX, QUALITY_PICTURE
from .errors import UsageError
from .files import write_atomic
from .hardware import check_device
from .hints import check_count
from .shapes import one_number
from .features import FeatureStats, sample_features, timed
from .metrics import Memorisation, fid_from_stats, kid, memorisation, nearest_pairs_image, precision_recall
from .processes import join, on_main
from .reference import image_dataset, reference_features, reference_images
from .layout import EVAL, MODEL_INDEX, QUALITY_PICTURE
from .sampling import ImageGenerator
from .settings import SamplingSettings, Scoring

__all__ = ["evaluate", "Scoring", "default_eval_dir", "table"]

NEAREST_PAIRS = 32  # pairs in nearest.png


def default_eval_dir(model: str | Path | None, samples: str | Path | None) -> Path:
    """RUN/eval for a run directory (or a pipeline folder's parent); SAMPLES/eval, or beside an .npz."""
    if model is not None:
        path = Path(model)
        return (path.parent if (path / MODEL_INDEX).is_file() else path) / EVAL
    path = Path(samples)
    return (path if path.is_dir() else path.parent) / EVAL


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
    with timed(seconds, "reference", dev):
        reference = reference_features(ref, net, size, channels, batch_size=batch_size, log=say)  # net is on dev
    stats, gen = sample_features(get_images, n, net, batch_size=batch_size, device=dev, progress=log is not None and main,
                                 seconds=seconds)
    rate = n / max(time.perf_counter() - started, 1e-9)
    with timed(seconds, "metrics", dev):
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


# ----------------------------------------------------------------------------- where the samples come from


def _model_source(model, num_images, settings: SamplingSettings):
    """Samples generated from a model folder: (source, images(indices), n, size, channels, settings as a dict).
    The model is made ready once; every batch of features then asks it for its images."""
    from .model_folder import find_model_folder

    check_count("number of images (--num-images)", num_images, least=2)
    folder = find_model_folder(model)
    generator = ImageGenerator(folder, settings)
    channels, size = generator.shape[0], one_number(generator.shape[1:])  # the images' (a latent model's decoded)
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
    size = one_number((h, w))  # the reference is prepared at the samples' shape

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

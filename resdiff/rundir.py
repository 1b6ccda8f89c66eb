"""The run directory: its file layout, and its life from start to export (config, identity, log, previews, the
model; disk space and leftovers checked, checkpoints written by every process together).

    RUN/config.yaml        the resolved config               RUN/log.jsonl   one JSON line per logged step
    RUN/identity.json      what the run learns from (data, diffusion, batch, seed), checked on resume
    RUN/samples/           preview grids, step-NNNNNNN.png   RUN/model/      the EMA model, a DDPMPipeline folder
    RUN/checkpoints/step-NNNNNNN/   resumable state, in the format of ``resdiff.checkpoint``
    RUN/.lock              names the process that owns the run, which holds a kernel lock on it (``resdiff.runlock``)

Every file is written under a temporary name and renamed into place (``resdiff.files``), so an interruption
leaves the old version or the new one, never half of one; ``remove_leftovers`` deletes what an interrupted
run left. Each checkpoint and its ``ema/`` folder (so also the exported ``model/``) get ``SHA256SUMS`` when
written. ``RUN/identity.json`` records what the run learns from (the data's location and listing, the data and
diffusion settings, batch size and seed, the model it started from); ``identity_changes`` names what a resume
would change, and ``earlier_training`` what a start from step 0 would replace. Every export of ``model/`` writes
its card (``resdiff.card``) from the run's files (``model_facts``); a card that cannot be written is a warning.

``RunDir`` is what the trainer holds: it saves and loads a ``TrainState`` and the EMA pipeline, writes the
log, previews and the exported model, and never lets the trainer name a file.
"""


from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .layout import (
    CHECKPOINTS, CHECKSUMS, CONFIG, EMA, IDENTITY, LOCK, LOG, MODEL, PIPELINE_FILES, SAMPLES, STEP_NAME, preview_name,
)
from .card import ModelFacts, write_card
from .checkpoint import (
    TrainState, checkpoint_bytes, checkpoint_dir, checkpoint_problem, complete_checkpoints, list_checkpoints,
    read_checkpoint, rotate_checkpoints, step_of, write_checkpoint_files,
)
from .config import Config, config_diff, load_config, save_config
from .errors import TrainingError, UsageError, one_line
from .files import (
    WRITE_ERRORS, fsync_tree, human_size, leftovers, replace_folder, temporary, write_atomic, write_checksums,
    write_problem,
)
from .processes import on_main
from .runlock import RunLock
from .shapes import shape_name

__all__ = [
    "RunDir", "ResumeRequest", "run_identity", "check_same_model", "check_disk", "remove_leftovers", "trim_log",
    "read_log", "write_config", "export_model", "human_size", "write_problem", "identity_changes", "write_identity",
    "earlier_training", "clear_run", "data_listing", "model_facts", "model_origin", "write_model_card", "INIT_SOURCE",
    "INIT_SHA256",
]

_PREVIEW = re.compile(STEP_NAME.replace("$", r"\.png$"))  # samples/step-NNNNNNN.png (RunDir.save_preview)
# identity.json's keys that the card reads: the model a fine-tuning run started from (None: from scratch).
INIT_SOURCE, INIT_SHA256 = "init.source", "init.sha256"


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN/config.yaml, written under a temporary name and renamed, so it is never half-written."""
    try:
        write_atomic(run_dir / CONFIG, lambda tmp: save_config(cfg, tmp))
    except OSError as err:
        raise UsageError(f"cannot write to run directory {run_dir}: {err.strerror or err}") from None


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what an interrupted run left half-written; returns their names. Call it holding the run's lock,
    so that no running process is writing them."""
    found = sorted([
        *leftovers(run_dir / CHECKPOINTS, "step-*"), *leftovers(run_dir / SAMPLES), *leftovers(run_dir, MODEL),
        *leftovers(run_dir, CONFIG), *leftovers(run_dir, LOG), *leftovers(run_dir, IDENTITY), *run_dir.glob(f"{LOCK}.stale.*"),
    ])
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [str(p.relative_to(run_dir)) for p in found]


def export_model(run_dir: Path, source: Path, warn: Callable[[str], None] = print) -> None:
    """Replace RUN/model with a copy of ``source`` (a checkpoint's EMA pipeline) and its card, never leaving it
    half-written. The card is described, not required: failing to write it is a warning (``warn``)."""
    target = run_dir / MODEL
    tmp = temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(source, tmp)
        write_model_card(tmp, run_dir, _checkpoint_step(source.parent), run_dir.name, warn)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(target, tmp)


def write_model_card(
    folder: Path, run_dir: Path | None, step: int | None, name: str, warn: Callable[[str], None]
) -> None:
    """Write the card of model folder ``folder`` (named ``name``) from what ``run_dir`` says of its model of ``step``
    (``model_facts``; no run directory: only what the folder says). Any failure (an unreadable config, a full disk,
    a huggingface_hub error) is a warning only: the model it describes is whole without it."""
    try:
        write_card(folder, model_facts(run_dir, step, name) if run_dir is not None else ModelFacts(name=name))
    except Exception as err:  # noqa: BLE001 (a card must never cost a checkpoint or an export)
        warn(f"warning: cannot write the model card in {folder} ({type(err).__name__}: {one_line(err)}); "
             f"the model itself is complete")


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return step_of(folder)
    except ValueError:
        return None


def data_listing(files: int, digest: str) -> str:
    """identity.json's ``data.listing``: how many files the data has and a fingerprint of their names and sizes."""
    return f"{files} files, sha256 {digest[:16]}"


def _listed_files(listing: object) -> int | None:
    """The file count of a ``data_listing``."""
    m = re.match(r"^(\d+) files, ", str(listing))
    return int(m.group(1)) if m else None


def _read_identity(run_dir: Path) -> dict:
    try:
        recorded = json.loads((run_dir / IDENTITY).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def model_facts(run_dir: Path, step: int | None, name: str) -> ModelFacts:
    """What the run directory says about its model of ``step`` (None: not known, then the newest of everything):
    the recipe and data from config.yaml and identity.json, the last evaluation and preview grid up to that step."""
    facts = ModelFacts(name=name, step=step)
    cfg = load_config(run_dir / CONFIG) if (run_dir / CONFIG).is_file() else None
    if cfg is not None:
        recipe = cfg.to_dict()
        recipe.pop("out", None)
        path = recipe["data"].pop("path", None)  # its name only: a local path may be private
        facts.recipe, facts.batch_size = recipe, cfg.train.batch_size
        facts.data_name = Path(path).name if path else "built-in demo shapes"
    identity = _read_identity(run_dir)
    facts.data_images = _listed_files(identity.get("data.listing"))
    if identity.get(INIT_SOURCE):
        facts.init_from = f"`{Path(identity[INIT_SOURCE]).name}` (weights SHA-256 {str(identity.get(INIT_SHA256))[:16]}...)"
    upto = float("inf") if step is None else step
    evaluations = [r for r in read_log(run_dir) if r["step"] <= upto and any("@" in k for k in r)]
    if evaluations:
        facts.evaluation = {k: v for k, v in evaluations[-1].items() if k == "step" or "@" in k}
    grids = sorted((int(m.group(1)), p) for p in (run_dir / SAMPLES).glob("step-*.png") if (m := _PREVIEW.match(p.name)))
    grids = [(s, p) for s, p in grids if s <= upto]
    if grids:
        facts.grid = grids[-1][1]
        how = f", {cfg.train.preview_sampler} sampler, {cfg.train.preview_steps} steps" if cfg is not None else ""
        facts.grid_caption = f"EMA samples at step {grids[-1][0]:,} (the training preview{how})."
    return facts


def model_origin(folder: Path) -> tuple[Path | None, int | None]:
    """The run directory a model folder belongs to and the step of its weights ((None, None): not a run's): a
    checkpoint's ``ema/``, or ``RUN/model``, whose step is that of the checkpoint it was copied from (the one whose
    ema/SHA256SUMS it carries; None once that checkpoint is gone)."""
    folder = Path(folder).resolve()
    if folder.name == EMA and folder.parent.parent.name == CHECKPOINTS:
        step = _checkpoint_step(folder.parent)
        if step is not None:
            return folder.parents[2], step
    if folder.name == MODEL and (folder.parent / CONFIG).is_file():
        try:
            sums = (folder / CHECKSUMS).read_bytes()
        except OSError:
            return folder.parent, None
        for ckpt in reversed(list_checkpoints(folder.parent)):
            with_sums = ckpt / EMA / CHECKSUMS
            if with_sums.is_file() and with_sums.read_bytes() == sums:
                return folder.parent, step_of(ckpt)
        return folder.parent, None
    return None, None


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes the shape of the model saved in ``run_dir``."""
    saved = run_dir / CONFIG
    if not saved.is_file():
        return
    old = load_config(saved)
    diffs = config_diff(_spec_blind(old), _spec_blind(cfg), "model")
    for key in ("image_size", "image_channels", "class_cond"):
        a, b = getattr(old.data, key), getattr(cfg.data, key)
        if a != b:
            diffs.append(f"data.{key}: {a} -> {b}")
    if diffs:
        raise UsageError(
            f"cannot resume {run_dir}: the config changes the model ({'; '.join(diffs)}); "
            f"use the original settings or a new --out"
        )


def _spec_blind(cfg: Config) -> Config:
    """``cfg`` with its autoencoder's SPEC reduced to whether there is one: the same files named by another path (a
    relative one, a moved folder) are the same model; other files are a change the identity names
    (``data.autoencoder``, the files' fingerprint)."""
    if cfg.model.get("autoencoder") is None:
        return cfg
    return dataclasses.replace(cfg, model={**cfg.model, "autoencoder": "an autoencoder"})


def _plain_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples become lists), so recorded and current values compare."""
    return json.loads(json.dumps(value))


# Identity keys added after runs were recorded, with the value every run had before: a resume of such a run that
# would train with another value (diffusion.schedule_shift "auto" on a latent run) is a change like any other.
IDENTITY_BEFORE = {"diffusion.immiscible": False, "diffusion.timestep_sampling": "uniform",
                   "diffusion.schedule_shift": 1.0}


def identity_changes(run_dir: Path, identity: dict[str, object]) -> list[str]:
    """What ``identity`` (dotted key -> value) changes against the one recorded in RUN/identity.json, as
    ``"key: old -> new"``; empty when nothing changes or nothing was recorded (a run from before identities)."""
    try:
        recorded = json.loads((run_dir / IDENTITY).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        return [f"{IDENTITY}: unreadable ({' '.join(str(err).split())})"]
    if not isinstance(recorded, dict):
        return [f"{IDENTITY}: not a JSON object"]
    if recorded:  # a run recorded before a key existed trained with the key's value of that time
        recorded = {**IDENTITY_BEFORE, **recorded}
    current = _plain_json(identity)
    return [f"{k}: {recorded[k]} -> {current[k]}" for k in current if k in recorded and recorded[k] != current[k]]


def write_identity(run_dir: Path, identity: dict[str, object]) -> None:
    """Record what the run learns from in RUN/identity.json (atomically)."""
    write_atomic(run_dir / IDENTITY, lambda tmp: tmp.write_text(json.dumps(_plain_json(identity), indent=1)))


def earlier_training(run_dir: Path, checkpoint_every: int) -> str | None:
    """What earlier training left in ``run_dir`` that a start from step 0 would replace, in a few words, or
    None: an exported model, or logged steps that reached a checkpoint (``checkpoint_every``). Steps logged
    before the first checkpoint are work a crash lost, which the run redoes (an elastic restart among them)."""
    found = []
    if (run_dir / MODEL).is_dir():
        found.append(f"the exported model {MODEL}/")
    steps = [record["step"] for record in read_log(run_dir)]
    if steps and max(steps) >= checkpoint_every:
        found.append(f"{LOG} up to step {max(steps)}")
    return " and ".join(found) or None


def clear_run(run_dir: Path) -> list[str]:
    """Delete what earlier training wrote (checkpoints, model, log, previews, identity): an explicit start over.
    Call it holding the run's lock. Returns the names removed."""
    removed = []
    for name in (CHECKPOINTS, MODEL, SAMPLES, LOG, IDENTITY):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed




def check_disk(run_dir: Path, parameters: int, keep: int = 3) -> None:
    """The run directory takes a new file, and its disk has room for the most the run will hold at once.

    That peak comes while a checkpoint is written: ``keep`` complete ones are kept and the new one is written
    before the oldest goes (``rotate_checkpoints``), and then the exported model is copied beside the one it
    replaces. With the default keep of 3 that is 4 x 16 + 2 x 4 = 72 bytes a parameter; what the run directory
    already holds of it (checkpoint folders, model/) is counted as there."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            probe.unlink()
        except OSError as err:
            raise UsageError(f"cannot write to {folder}: {err.strerror}; fix its permissions or choose another --out") from None
    checkpoint, model = checkpoint_bytes(parameters)
    held = len(list_checkpoints(run_dir))
    needed = (max(keep, held) + 1 - held) * checkpoint + (1 if (run_dir / MODEL).is_dir() else 2) * model
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UsageError(
            f"not enough free disk space in {run_dir}: {human_size(free)} free, but this run needs about "
            f"{human_size(needed)} more: one checkpoint of this {parameters / 1e6:.1f}M-parameter model takes about "
            f"{human_size(checkpoint)}, train.keep_checkpoints={keep} of them are kept ({held} now) and one more is "
            f"written before the oldest goes, and each export writes the model ({human_size(model)}) beside the "
            f"one it replaces; free some space, lower train.keep_checkpoints, or choose another --out"
        )


def _log_lines(run_dir: Path) -> list[tuple[str, dict | None]]:
    """Each line of RUN/log.jsonl with its record: a JSON object with an integer ``step``, or None for a line that is
    not one (cut off mid-write by a crash, or damaged)."""
    try:
        lines = (run_dir / LOG).read_text(errors="replace").splitlines(keepends=True)
    except OSError:
        return []
    parsed = []
    for line in lines:
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            record = None
        ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        parsed.append((line, record if ok else None))
    return parsed


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of RUN/log.jsonl in order (losses, learning rates, evaluations), each with its ``step``; lines a
    crash cut off are left out. The one reader of the log."""
    return [record for _, record in _log_lines(Path(run_dir)) if record is not None]


def trim_log(run_dir: Path, step: int) -> int:
    """Keep log.jsonl's records up to ``step``, where training continues from: records past it (work an
    interruption lost, which the run repeats) and a line cut off mid-write go. Returns how many went."""
    log = run_dir / LOG
    lines = _log_lines(run_dir)
    kept = [line for line, record in lines if record is not None and record["step"] <= step]
    if len(kept) < len(lines):
        write_atomic(log, lambda tmp: tmp.write_text("".join(kept)))
    return len(lines) - len(kept)

def run_identity(cfg: Config, dataset: object, source: object | None = None) -> dict[str, object]:
    """What a run learns from, as dotted keys: where the data is and a fingerprint of its listing (each file's
    name and size), the data and diffusion settings, the global batch size and the seed, and the model it started
    from (``source``, a ``resdiff.pretrained.InitSource``: its path and weights digest; None from scratch). ``dataset``
    is the training data (``files``, ``classes``, and ``root`` or a prepared dataset's ``source`` folder). A resume that changes any of them trains
    something else than the run's checkpoints were trained on."""
    d = cfg.data
    if d.path is None:
        data_source = f"built-in demo shapes ({shape_name(d.image_size)}, {d.demo_images} images)"
    else:
        data_source = str(Path(d.path).resolve())
    prepared = hasattr(dataset, "source")  # a prepared dataset names the folder it was made from
    base = Path(dataset.source if prepared else dataset.root)
    digest = hashlib.sha256("\n".join(dataset.classes).encode())
    for file in dataset.files:
        try:
            name = file.relative_to(base).as_posix()
        except ValueError:
            name = file.as_posix()
        size = "" if prepared else _size(file)  # a prepared dataset's source folder may be gone
        digest.update(f"\n{name}\t{size}".encode())
    identity = {"data.source": data_source, "data.listing": data_listing(len(dataset.files), digest.hexdigest())}
    for key in ("image_size", "image_channels", "class_cond", "random_flip", "random_crop"):
        identity[f"data.{key}"] = getattr(d, key)
    autoencoder = getattr(dataset, "autoencoder", None)  # a latent dataset's: the latents are its
    identity["data.autoencoder"] = autoencoder["fingerprint"] if autoencoder else None
    identity.update({f"diffusion.{k}": v for k, v in vars(cfg.diffusion).items()})
    identity.update({"train.batch_size": cfg.train.batch_size, "train.seed": cfg.train.seed})
    identity.update({INIT_SOURCE: str(source.path) if source else None, INIT_SHA256: source.sha256 if source else None})
    return identity


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:  # gone since the folder was read: the listing says so
        return -1


# ----------------------------------------------------------------------------- resuming: the one decision

_NEVER = ("never", "no", "none")


@dataclass
class ResumeRequest:
    """What the command line asks of the run directory's past: ``resume`` (auto: the newest complete checkpoint;
    never; or a checkpoint folder of this run), ``resume_anyway`` (continue although what the run learns from
    changed) and ``start_over`` (delete earlier training first)."""

    resume: str = "auto"
    resume_anyway: bool = False
    start_over: bool = False

def _named_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint --resume names (None for auto and never), checked: a complete checkpoint of this run."""
    if resume in ("auto", ""):
        return None
    if resume in _NEVER:
        if list_checkpoints(run_dir):
            raise UsageError(f"{run_dir} already has checkpoints; resume with --resume auto or choose a new --out")
        return None
    path = Path(resume)
    try:
        step_of(path)
    except ValueError:
        raise UsageError(f"--resume {resume}: not a checkpoint folder (expected .../checkpoints/step-NNNNNNN)") from None
    own = (run_dir / CHECKPOINTS).resolve()
    if path.resolve().parent != own:
        # Optimizer and RNG state are torch files; they are read only from this run's own checkpoints.
        raise UsageError(f"--resume {resume}: not a checkpoint of this run ({own}); a run resumes only its own checkpoints")
    if not path.exists():
        raise UsageError(f"--resume {resume}: no such checkpoint")
    problem = checkpoint_problem(path)
    if problem:
        raise UsageError(f"--resume {resume}: not a complete checkpoint: {problem}")
    return path


def _check_continuity(path: Path, cfg: Config, request: ResumeRequest, identity: dict, resuming: bool, echo: Callable[[str], None]) -> None:
    """A resume continues the same run; a start from step 0 replaces no earlier training; unless asked."""
    if resuming:
        _check_same_source(path, identity, request)  # first: a fine-tuning run's model section is its source's
        check_same_model(path, cfg)
        changes = identity_changes(path, identity)
        if changes and not request.resume_anyway:
            raise UsageError(
                f"cannot resume {path}: it was trained with other data or settings ({'; '.join(changes)}); "
                f"start a new run with another --out, or pass --resume-anyway to continue this one with the new ones"
            )
        if changes:
            echo(f"warning: --resume-anyway: {path} continues with changed data or settings ({'; '.join(changes)})")
        return
    earlier = earlier_training(path, cfg.train.checkpoint_every)
    if earlier:
        raise UsageError(
            f"{path} holds earlier training ({earlier}) but no checkpoint to resume from; starting over would "
            f"replace it: choose a new --out, or pass --start-over to replace it"
        )


def _check_same_source(path: Path, identity: dict, request: ResumeRequest) -> None:
    """A resume starts from the model the run started from (--init-from, or none), unless ``resume_anyway``."""
    changes = identity_changes(path, {k: identity[k] for k in (INIT_SOURCE, INIT_SHA256)})
    if changes and not request.resume_anyway:
        raise UsageError(
            f"cannot resume {path}: it started from another model ({'; '.join(changes)}); resume with the "
            f"--init-from it started from (or none, if it started from scratch), or choose a new --out"
        )


def _prepared(
    run: RunDir, cfg: Config, request: ResumeRequest, explicit: Path | None, identity: dict, parameters: int,
    echo: Callable[[str], None],
) -> list[Path]:
    """The main process's part of ``RunDir.resume``: everything up to the checkpoints to try, newest first."""
    path = run.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} is a file, not a folder; choose another --out")
    existed = path.exists()
    try:
        run.open()  # the folder and its lock
        removed = remove_leftovers(path)
        if removed:
            echo(f"warning: removed what an interrupted run left half-written in {path}: {', '.join(removed)}")
        if request.start_over and explicit is None:
            cleared = clear_run(path)
            if cleared:
                echo(f"note: --start-over: removed {', '.join(cleared)} from {path}")
        if explicit is not None:
            candidates = [explicit]
        elif request.resume in _NEVER:
            candidates = []
        else:
            candidates = complete_checkpoints(path, warn=echo)[::-1]
            damaged = list_checkpoints(path)
            if damaged and not candidates:
                raise UsageError(
                    f"{path / CHECKPOINTS} holds {len(damaged)} checkpoint folder(s) but none is complete "
                    f"({damaged[-1].name}: {checkpoint_problem(damaged[-1])}); move the damaged folders away "
                    f"to start over, or choose a new --out"
                )
        _check_continuity(path, cfg, request, identity, bool(candidates), echo)
        check_disk(path, parameters, cfg.train.keep_checkpoints)
        if not candidates:  # a resumed run records its config once the checkpoint has loaded
            write_config(path, cfg)
        write_identity(path, identity)
        return candidates
    except BaseException as err:
        # Release the lock, and remove the run directory if this run made it (only if it is still empty).
        run.lock.release()
        if not existed:
            with contextlib.suppress(OSError):
                remove_leftovers(path)
                path.rmdir()
        if isinstance(err, OSError):
            raise UsageError(f"cannot write to run directory {path}: {err.strerror or err}") from None
        raise


# ----------------------------------------------------------------------------- what the trainer holds


class RunDir:
    """A run directory as the trainer sees it: it asks to save and load state, log, preview and export, and the
    names of the files stay in here. Methods marked "main process" are called on the main process only."""

    def __init__(self, path: str | Path, warn: Callable[[str], None] = print):
        self.path = Path(path)
        self.warn = warn
        self.lock = RunLock(self.path, warn=warn)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    def open(self) -> None:
        """Create the folder if needed and take its lock (main process)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create run directory {self.path}: {err.strerror}") from None
        self.lock.acquire()

    def has_model(self) -> bool:
        return (self.path / MODEL / PIPELINE_FILES[0]).is_file()

    def describe_model(self, step: int) -> None:
        """Rewrite model/'s card, the model being of ``step`` (main process): called once that step's preview and
        evaluation are in, which come after its checkpoint and export. A failure is a warning."""
        if self.has_model():
            write_model_card(self.model_dir, self.path, step, self.path.name, self.warn)

    # --------------------------------------------------------------------- the log and previews (main process)
    def append_log(self, record: dict) -> None:
        """One JSON line in log.jsonl; a failed write is a TrainingError saying what to do."""
        try:
            with open(self.path / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise TrainingError(
                f"cannot write {self.path / LOG} at step {record.get('step')} ({write_problem(err)}); "
                f"free disk space in {self.path} (or fix its permissions), then resume with the same command"
            ) from None

    def save_preview(self, step: int, save: Callable[[Path], object]) -> Path:
        """samples/step-NNNNNNN.png, written by ``save(path)`` under a temporary name (a grid with its final name
        is always whole)."""
        path = self.path / SAMPLES / preview_name(step)
        try:
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, save)
        except OSError as err:
            raise TrainingError(
                f"cannot write preview {path} ({write_problem(err)}); free disk space in {self.path}, "
                f"then resume with the same command"
            ) from None
        return path

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, state: TrainState, ema: object, *, rank: int, agree: Callable[[bool], bool], keep: int,
        records: dict[str, dict] | None = None,
    ) -> Path:
        """Write checkpoint ``state.step`` on every process (each writes its own RNG state, the main process the
        rest), with ``ema`` (a DDPMPipeline) as its ``ema/`` folder; then export the EMA model and keep the
        ``keep`` newest complete checkpoints (see ``rotate_checkpoints``). Returns the folder.

        It is written under a temporary name, fsynced and renamed into place. ``agree(ok)`` is a collective: True
        when every process's ``ok`` is. A failed write anywhere (disk full, a read-only or vanished folder)
        removes the temporary folder, leaves every earlier checkpoint as it was, and raises a TrainingError on
        every process that names the folder."""
        main = rank == 0
        final = checkpoint_dir(self.path, state.step)
        tmp = temporary(final)
        error: BaseException | None = None
        if main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except WRITE_ERRORS as err:
                error = err
        ok = agree(error is None)  # also the barrier: no process writes before the folder exists
        if ok:
            try:
                write_checkpoint_files(tmp, state, ema, rank, records)
            except WRITE_ERRORS as err:
                error = err
            ok = agree(error is None)  # also: every process's rng file is written now
        if not ok:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(self._save_failed(final, error, "checkpoint", state.step))
        what = "checkpoint"
        if main:
            try:  # the sums cover every process's files, so they come after the agreement
                write_checksums(tmp / EMA)
                write_checksums(tmp, skip=(EMA,))
                fsync_tree(tmp)
                replace_folder(final, tmp)  # a checkpoint of this step from before an interruption is replaced
                what = "model export"
                export_model(self.path, final / EMA, self.warn)
                rotate_checkpoints(final, keep)
            except WRITE_ERRORS as err:
                error = err
        if not agree(error is None):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(self._save_failed(final, error, what, state.step))
        return final

    def _save_failed(self, final: Path, error: BaseException | None, what: str, step: int) -> str:
        """The message of a failed checkpoint: what failed, what is still there, what to do."""
        done = [p for p in complete_checkpoints(self.path) if p != final]
        kept = f"the last complete checkpoint, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
        if final.is_dir() and checkpoint_problem(final) is None:
            kept = f"the checkpoint {final} itself is complete"
        why = write_problem(error) if error is not None else "it failed on another process"
        where = final.parent if what == "checkpoint" else self.path / MODEL
        return (f"cannot write the {what} of step {step} in {where} ({why}); {kept}. "
                f"Free disk space there (or fix its permissions), then resume with the same command")

    def load_checkpoint(
        self, path: Path, *, rank: int, world: int, device: torch.device
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """A checkpoint read into memory on ``device``: the training state and the EMA weights. Nothing is
        applied, so a damaged file (any error raised here) leaves the trainer untouched."""
        return read_checkpoint(path, rank=rank, world=world, device=device)

    def resume(
        self, request: ResumeRequest, *, cfg: Config, identity: Callable[[], dict[str, object]], parameters: int,
        rank: int, world: int, device: torch.device, agree: Callable[[bool], bool], warn: Callable[[str], None] = print,
    ) -> tuple[Path, TrainState, dict[str, torch.Tensor]] | None:
        """What the run continues from, decided here and nowhere else; every process calls it, at the first write.

        The main process checks what ``request`` names (a checkpoint of this run, complete), takes ``RUN/.lock``,
        removes what an interrupted run left half-written (``--start-over``: earlier training too), picks the
        checkpoints to try (newest complete first), checks that a resume continues the same run (the same source
        model, the same model, the same ``identity()``: data, diffusion, batch size and seed; else a one-line
        refusal unless ``resume_anyway``) and that a start from step 0 replaces no earlier training, checks that
        the disk has room for ``parameters``, and writes config.yaml and identity.json. Every process learns the
        outcome, so an error stops all of them alike. Then every process reads the first checkpoint all of them
        can (``load_first``: with --resume auto it falls back past damaged ones). Returns (the checkpoint, its
        training state, the EMA weights), or None for a new run."""
        explicit = _named_checkpoint(self.path, request.resume)

        def prepare() -> list[str]:
            return [str(p) for p in _prepared(self, cfg, request, explicit, identity(), parameters, warn)]

        candidates = [Path(p) for p in on_main(prepare)]
        try:
            return self.load_first(candidates, rank=rank, world=world, device=device, agree=agree,
                                   fallback=explicit is None, warn=warn if rank == 0 else None)
        except BaseException:
            self.lock.release()
            raise

    def load_first(
        self, candidates: list[Path], *, rank: int, world: int, device: torch.device, agree: Callable[[bool], bool],
        fallback: bool, warn: Callable[[str], None] | None = None,
    ) -> tuple[Path, TrainState, dict[str, torch.Tensor]] | None:
        """The first checkpoint of ``candidates`` (newest first) that every process can read (``agree(ok)`` is the
        collective), read into memory: (its folder, the training state, the EMA weights); None without candidates.
        A damaged one (a changed file, a truncated one, wrong keys) is passed over with a line to ``warn`` when
        ``fallback`` (--resume auto); else, and when none loads, it is a UsageError naming each failure."""
        failures = []
        for path in candidates:
            try:
                loaded, error = self.load_checkpoint(path, rank=rank, world=world, device=device), None
            except Exception as err:  # any damage in any file: truncated, corrupt, unpicklable, wrong keys
                loaded, error = None, err
            if agree(error is None):
                return path, *loaded
            reason = one_line(error) if error is not None else "unreadable on another process"
            failures.append(f"{path.name}: {reason}")
            if not fallback:
                break
            if warn is not None and path != candidates[-1]:
                warn(f"warning: cannot load checkpoint {path} ({reason}); falling back to the one before it")
        if failures:
            raise UsageError(
                f"cannot resume {self.path}: no checkpoint loads ({'; '.join(failures)}); move the damaged "
                f"checkpoint folders away to start over, or choose a new --out"
            )
        return None

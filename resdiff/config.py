"""Training configuration: dataclasses with defaults, YAML presets, dotted overrides, checked values.

A config is built in three layers, each overriding the one before:

    defaults (the dataclasses below) -> a YAML file (only the keys it sets) -> `section.key=value` overrides

Every value is then coerced to the type its field declares and range-checked; any mistake raises one
`UsageError` line that names the key, the value, where it came from, and what to do.
"""

import dataclasses
import difflib
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .choices import EMA_SIGMA_REL_MAX, IMAGE_CHANNELS, PRECISIONS, SAMPLERS, TIMESTEP_SAMPLING
from .errors import UsageError
from .hints import coerce, describe, plain
from .shapes import as_written, is_image_size, one_number


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    path: str | None = None  # None: the built-in demo dataset (procedural shapes)
    image_size: int | tuple[int, int] = 32  # one side (square), or [height, width]; also "64x128" or "64 128"
    image_channels: int = 3  # 1 (grayscale) or 3 (RGB); model.channels is the U-Net's width
    class_cond: bool = False
    random_flip: bool = True
    random_crop: bool = False
    cache: bool | str = "auto"  # keep decoded images in memory: true | false | "auto" (up to cache_limit_gb)
    cache_limit_gb: float = 2.0  # cache="auto" keeps the decoded images in memory up to this size
    num_workers: int | str = "auto"  # DataLoader worker processes, or "auto" (see resdiff.batches.loader_workers)
    demo_images: int = 2000  # size of the built-in demo dataset


@dataclass
class DiffusionConfig:
    """The noise schedule and the training objective."""

    num_train_timesteps: int = 1000
    # The cosine schedule (Nichol & Dhariwal 2021) with v-prediction (Salimans & Ho 2022): clean shapes in a few
    # hundred steps where epsilon on the linear schedule still samples noise (epsilon on cosine: FID +82% on
    # OpenMoji at equal time; docs/benchmarks.md, "How the defaults were chosen").
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2 (alias: cosine)
    beta_start: float = 1e-4  # linear and scaled_linear only
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"  # epsilon | v_prediction | sample (aliases: eps, v, x0)
    min_snr_gamma: float | None = 5.0  # Min-SNR-5 loss weighting (Hang et al. 2023); None: plain MSE
    label_dropout: float = 0.1  # classifier-free guidance: probability of dropping the class label
    # Immiscible diffusion (Li et al. 2024): each batch's noise is paired with its images by least total distance
    # (a linear assignment) instead of at random, so that each noise is trained towards a nearby image.
    immiscible: bool = False
    # Which timesteps training draws: uniform, or "laplace": the log-SNRs Laplace(0, 0.5)-distributed, most of the
    # steps near SNR 1 (Hang et al. 2024, "Improved Noise Schedule for Diffusion Training"); sampling is unchanged.
    timestep_sampling: str = "uniform"  # uniform | laplace
    # Shift the schedule towards noise: every timestep's SNR divided by shift^2 (1: the schedule as named). Large or
    # many-channel inputs keep their layout readable at a noise level that hides a small image's, so they want more
    # noise (Hoogeboom et al. 2023 "simple diffusion", section 3.1; Esser et al. 2024 "SD3" shift, section 5.3.2).
    # auto: resdiff.diffusion.LATENT_SCHEDULE_SHIFT for a latent run, 1 for pixels; a run records the number.
    schedule_shift: float | str = "auto"


@dataclass
class TrainConfig:
    """The optimisation loop, EMA, logging, checkpoints and previews."""

    # The defaults are a short run tuned by FID on real images at equal training time, one change at a time
    # (bench/tuning.py; docs/benchmarks.md): 1,200 steps of 16 images, lr 1e-3, EMA 0.995. Long runs of big
    # models want the papers' settings instead (the cifar10 config: lr 2e-4, batch 128, EMA 0.9999).
    steps: int = 1200
    batch_size: int = 16  # global, summed over processes and accumulation steps; 32 -> 16 at equal time: FID -10.8%
    lr: float = 1e-3  # 5e-4: FID +17%; 2e-3: +4.5% with batch 16 and Min-SNR
    warmup_steps: int = 50
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.995  # a short run averages its last ~200 steps; long runs: 0.9999
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + n) / (10 + n))
    ema_sigma_rel: float | None = None  # EDM2's power-function EMA of this relative width instead of ema_decay
    mixed_precision: str = "no"  # one of resdiff.choices.PRECISIONS: no | fp16 | bf16
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 400
    keep_checkpoints: int = 3
    preview_every: int = 400
    preview_images: int = 16
    # DPM-Solver++(2M) at 20 steps: 40% of DDIM-50's cost for previews and in-training evaluations
    preview_sampler: str = "dpm++"  # one of resdiff.choices.SAMPLERS: ddpm | ddim | dpm++ | euler | heun
    preview_steps: int = 20
    trackers: list[str] = field(default_factory=list)  # e.g. [tensorboard] or [wandb]
    compile: bool = False
    channels_last: bool = False
    timeout_s: float = 600.0  # how long a process waits for the others in a collective before giving up
    # FID/KID of EMA samples against the training data (RUN/quality.png). An integer: every eval_every steps and at
    # the end, eval_images samples each (0: never). auto: at every checkpoint when the FID Inception weights are in
    # the cache (`python -m resdiff.inception` puts them there), and the evaluations together never take more than
    # about a tenth of the training time so far: one that would takes fewer images, or is skipped, and the log says
    # which. Samples use preview_sampler/preview_steps.
    eval_every: int | str = "auto"
    # Samples per evaluation (and reference images); figures are labelled with their n (fid@64). FID of 64 samples
    # is biased and noisy: a trend to watch during training; evaluate.py scores a model properly.
    eval_images: int = 64


@dataclass
class Config:
    """A whole training run. `model` holds {"preset": name, **UNet keyword overrides}."""

    model: dict = field(default_factory=lambda: {"preset": "auto"})
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = None  # run directory

    def to_dict(self) -> dict:
        """The config as plain YAML-ready values (tuples become lists)."""
        return plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------
# What a valid value is, beyond its type. Keys are dotted names; a rule is (test, what it needs).

_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")

_RULES = {
    "data.image_size": (is_image_size, "must be > 0"),
    "data.image_channels": (lambda v: v in IMAGE_CHANNELS, "must be 1 (grayscale) or 3 (RGB)"),
    "data.cache": (lambda v: v in (True, False, "auto"), "must be true, false or auto"),
    "data.num_workers": (lambda v: v == "auto" or (isinstance(v, int) and v >= 0), "must be auto or an integer >= 0"),
    "data.demo_images": _POSITIVE,
    "data.cache_limit_gb": _NON_NEGATIVE,
    "diffusion.num_train_timesteps": _POSITIVE,
    "diffusion.beta_start": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "diffusion.beta_end": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "diffusion.min_snr_gamma": _POSITIVE,
    "diffusion.schedule_shift": (lambda v: v == "auto" or (isinstance(v, float) and v > 0), "must be auto or > 0"),
    "diffusion.label_dropout": _FRACTION,
    "train.steps": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.adam_betas": (lambda v: all(0 <= b < 1 for b in v), "must both be in [0, 1)"),
    "train.grad_clip": _POSITIVE,
    "train.grad_accum": _POSITIVE,
    "train.ema_decay": _FRACTION,
    "train.ema_sigma_rel": (lambda v: 0 < v <= EMA_SIGMA_REL_MAX,
                            f"must be in (0, {EMA_SIGMA_REL_MAX}] (EDM2 uses 0.05 to 0.10)"),
    "train.seed": _NON_NEGATIVE,
    "train.log_every": _POSITIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.preview_every": _POSITIVE,
    "train.preview_images": _POSITIVE,
    "train.preview_steps": _POSITIVE,
    "train.timeout_s": _POSITIVE,
    "train.eval_every": (lambda v: v == "auto" or (isinstance(v, int) and v >= 0), "must be auto or an integer >= 0"),
    "train.eval_images": (lambda v: v >= 2, "must be at least 2"),
}

_CHOICES = {
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "diffusion.timestep_sampling": TIMESTEP_SAMPLING,
    "train.mixed_precision": tuple(PRECISIONS),
    "train.preview_sampler": tuple(SAMPLERS),
}

_ALIASES = {
    "diffusion.beta_schedule": {"cosine": "squaredcos_cap_v2"},
    "diffusion.prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"},
    "train.mixed_precision": {"false": "no", "fp32": "no"},  # YAML 1.1 reads a bare `no` as false
    "train.preview_sampler": {"dpmpp": "dpm++"},
}


# ---------------------------------------------------------------------------------------------
# YAML reading: PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; read it as a number.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-4`, `2e5`), as YAML 1.2 does, and refuses
    aliases (`*name`): a config is a few plain values, and ten nested aliases of nine items each (a "billion
    laughs" file of 200 bytes) are 9**10 values to any code that walks or prints them. Tags other than the
    standard ones (`!!python/object:...`) are refused by SafeLoader; this says so in words."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in config files; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_undefined(self, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in config files, which hold plain values only", node.start_mark
        )


_Loader.add_constructor(None, _Loader.construct_undefined)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes lists inline (`channel_mult: [1, 2, 2]`) and mappings as blocks."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


# The configs that ship with resdiff (package data), found by name from any directory: --config cifar10.
SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """The names of the configs that ship with resdiff (``--config NAME``), sorted."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """The YAML file ``name_or_path`` means: a file that exists, else a shipped config of that name (``folder64`` or
    ``folder64.yaml``); anything else is a UsageError that lists the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and (SHIPPED / f"{path.stem}.yaml").is_file() and path.suffix in ("", ".yaml"):
        return SHIPPED / f"{path.stem}.yaml"
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    raise UsageError(f"config file '{name_or_path}' {what}; pass the path of a YAML file or the name of a shipped "
                     f"config: {', '.join(shipped_configs())}")


def _read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file (or shipped config name); a missing, unreadable, broken or non-mapping file is a
    UsageError."""
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file '{path}' ({e}); pass a readable YAML file") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise UsageError(f"config file '{path}' is not valid YAML ({problem}{where}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config file '{path}' must be a mapping of sections (model, data, diffusion, train, out), "
            f"got a {type(data).__name__}"
        )
    return data


def _parse_override(item: str) -> tuple[str, object]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001). Values are YAML; text that isn't YAML stays a string."""
    name, eq, text = item.partition("=")
    name = name.strip()
    if not eq or not name:
        raise UsageError(f"override {item!r} must have the form section.key=value, e.g. train.ema_decay=0.999")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        value = text.strip()
    return name, value



# ---------------------------------------------------------------------------------------------
# One value: coerced to its field's type (resdiff.hints), canonicalised and range-checked.


def _checked(name: str, value, hint, source: str):
    """One field's value, coerced to its type, canonicalised and range-checked; else a UsageError."""
    choices = _CHOICES.get(name)
    if name == "data.image_size":
        value = as_written(value)
    if choices and isinstance(value, (str, bool)):
        value = str(value).strip().lower()
        value = _ALIASES.get(name, {}).get(value, value)
    try:
        value = coerce(value, hint)
    except TypeError:
        raise UsageError(f"{name} must be {describe(hint)}, got {value!r} ({source})") from None
    if choices and value not in choices:
        raise UsageError(
            f"{name} must be one of {', '.join(choices)}, got {value!r} ({source}){_did_you_mean(value, choices)}"
        )
    test, needs = _RULES.get(name, (None, ""))
    if test is not None and value is not None and not test(value):
        raise UsageError(f"{name} {needs}, got {value!r} ({source})")
    if name == "data.image_size":
        value = one_number(value)  # a square pair is the one number: configs, run directories and models agree
    return value


# ---------------------------------------------------------------------------------------------
# Keys: which dotted names exist, and what to suggest for the ones that don't.


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _keys(obj, prefix: str = "") -> dict[str, object]:
    """Every dotted key of a config dataclass -> its type hint ('model' -> dict, 'train.lr' -> float)."""
    hints = typing.get_type_hints(type(obj))
    keys = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(_keys(value, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = hints[f.name]
    return keys


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "out")
_KEYS = _keys(Config())
_TOP_NAMES = ", ".join([*_SECTIONS, "out"])


def _check_name(name: str, source: str, model_keys: set[str] | None) -> None:
    """Raise a UsageError with a did-you-mean unless `name` is a settable dotted key."""
    section, _, key = name.partition(".")
    if name in _KEYS and _KEYS[name] is not dict:
        return
    free_key = key and "." not in key and (key == "preset" or model_keys is None or key in model_keys)
    if section == "model" and free_key:
        return
    if name in _SECTIONS:
        example = next(k for k in [*_KEYS, "model.preset"] if k.startswith(name + "."))
        raise UsageError(f"'{name}' is a config section, not a key ({source}); set one key, e.g. {example}=...")
    known = [k for k in _KEYS if _KEYS[k] is not dict] + ["model.preset"] + [f"model.{k}" for k in model_keys or ()]
    hint = _did_you_mean(name, known)
    if not hint and section == "model" and model_keys is None:
        hint = "; model keys are the UNet's keyword arguments, e.g. model.channels"
    if not hint:
        in_section = [k.partition(".")[2] for k in known if k.startswith(section + ".")]
        listing = f"{section} keys are: {', '.join(in_section)}" if in_section else "sections are: " + _TOP_NAMES
        hint = f"; {listing}"
    raise UsageError(f"unknown config key {name!r} ({source}){hint}")


def _flatten_file(data: dict, source: str) -> dict[str, object]:
    """A config file's nested mapping -> {'train.lr': value, 'out': value, ...}."""
    flat = {}
    for top, value in data.items():
        if top in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UsageError(f"'{top}' must be a mapping of keys ({source}), got {value!r}")
            flat.update({f"{top}.{key}": v for key, v in value.items()})
        elif top in _KEYS:
            flat[top] = value
        else:
            hint = _did_you_mean(top, [*_SECTIONS, "out"]) or "; sections are: " + _TOP_NAMES
            raise UsageError(f"unknown config section {str(top)!r} ({source}){hint}")
    return flat


# ---------------------------------------------------------------------------------------------
# The public API.


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    model_keys: Iterable[str] | None = None,
) -> Config:
    """Defaults, then the YAML file at `path` (if any: a path, or a shipped config's name such as "cifar10"), then
    `section.key=value` overrides, all checked.

    `model_keys` (the UNet constructor's parameter names) limits which `model.*` keys are accepted;
    None accepts any.
    """
    model_keys = set(model_keys) if model_keys is not None else None
    given: dict[str, tuple[object, str]] = {}  # dotted key -> (raw value, where it came from)
    if path is not None:
        source = f"in {path}"
        for name, value in _flatten_file(_read_yaml(path), source).items():
            _check_name(name, source, model_keys)
            given[name] = (value, source)
    for item in overrides:
        name, value = _parse_override(item)
        source = f"from override {item!r}"
        _check_name(name, source, model_keys)
        given[name] = (value, source)

    cfg = Config()
    for name, (value, source) in given.items():
        section, _, key = name.rpartition(".")
        if section == "model":
            if key == "preset" and not isinstance(value, str):
                raise UsageError(f"model.preset must be a preset name (a string), got {value!r} ({source})")
            cfg.model[key] = value
        else:
            owner = getattr(cfg, section) if section else cfg
            setattr(owner, key, _checked(name, value, _KEYS[name], source))

    d = cfg.diffusion
    if d.beta_start >= d.beta_end:
        sources = {given[k][1] for k in ("diffusion.beta_start", "diffusion.beta_end") if k in given}
        raise UsageError(
            f"diffusion.beta_start ({d.beta_start}) must be below diffusion.beta_end ({d.beta_end}) "
            f"({'; '.join(sorted(sources))})"
        )
    return cfg


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text (what RUN/config.yaml holds and ``train.py --print-config`` prints)."""
    return "# resdiff config, fully resolved; reload with load_config(path) or train.py --config\n" + sections_yaml(cfg.to_dict())


def sections_yaml(sections: dict) -> str:
    """Config sections (``Config.to_dict()`` or part of it) as config.yaml writes them: lists inline, mappings as blocks."""
    return yaml.dump(sections, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML; `load_config(path)` gives back an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg))


def config_diff(a: Config, b: Config, section: str) -> list[str]:
    """The keys of one section that differ between two configs, as 'model.channels: 64 -> 128' lines."""
    if section not in [*_SECTIONS, "out"]:
        raise ValueError(f"unknown config section {section!r}; expected one of {', '.join(_SECTIONS)}, out")
    old, new = a.to_dict()[section], b.to_dict()[section]
    if not isinstance(old, dict):
        return [] if old == new else [f"{section}: {old!r} -> {new!r}"]
    lines = []
    for key in [*old, *(k for k in new if k not in old)]:
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            lines.append(f"{section}.{key}: {_show(old.get(key, _UNSET))} -> {_show(new.get(key, _UNSET))}")
    return lines


_UNSET = object()


def _show(value) -> str:
    """A value for a diff line; keys that one side doesn't set show as 'unset'."""
    return "unset" if value is _UNSET else repr(value)

"""Config: defaults, YAML presets, dotted overrides, type and range checks, round trip, diff."""

import os
from pathlib import Path

import pytest

from resdiff.config import Config, DataConfig, DiffusionConfig, TrainConfig, config_diff, load_config, save_config
from resdiff.errors import UsageError, run_cli

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "resdiff" / "configs"

# The UNet keyword names, written out so these tests do not depend on resdiff.unet.
MODEL_KEYS = [
    "sample_size", "in_channels", "out_channels", "channels", "channel_mult", "num_res_blocks",
    "attention_resolutions", "head_channels", "dropout", "norm_groups", "norm_eps", "flip_sin_to_cos",
    "freq_shift", "time_injection", "resblock_updown", "downsample_padding", "zero_init_last",
    "num_classes", "block", "cardinality", "squeeze_excite", "mid_attention_norm",
]  # fmt: skip


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def usage_error(*args, **kwargs) -> str:
    """The message of the UsageError that load_config(*args, **kwargs) raises; it must be one line."""
    with pytest.raises(UsageError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults and presets ---


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model == {"preset": "auto"}
    assert cfg.data == DataConfig() and cfg.data.path is None and cfg.data.cache == "auto"
    assert cfg.diffusion == DiffusionConfig() and cfg.diffusion.beta_start == 1e-4
    assert cfg.train == TrainConfig() and cfg.train.adam_betas == (0.9, 0.999) and cfg.train.trackers == []
    assert cfg.out is None


def test_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.model["channels"] = 8
    a.train.trackers.append("wandb")
    assert b.model == {"preset": "auto"} and b.train.trackers == []


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_config(path, model_keys=MODEL_KEYS)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr > 0
    assert isinstance(cfg.diffusion.beta_start, float)


def test_presets_follow_their_papers():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert names == {"cifar10.yaml", "celebahq256.yaml", "folder64.yaml", "landscape64x128.yaml"}

    cifar = load_config(CONFIGS / "cifar10.yaml", model_keys=MODEL_KEYS)
    assert cifar.model == {"preset": "ddpm-cifar10", "dropout": 0.1}
    assert (cifar.train.batch_size, cifar.train.lr, cifar.train.warmup_steps) == (128, 2e-4, 5000)
    assert (cifar.train.steps, cifar.train.ema_decay, cifar.train.grad_clip) == (800000, 0.9999, 1.0)
    diffusion = cifar.diffusion
    assert (diffusion.beta_start, diffusion.beta_end, diffusion.num_train_timesteps) == (1e-4, 0.02, 1000)
    assert (diffusion.beta_schedule, diffusion.prediction_type, diffusion.min_snr_gamma) == ("linear", "epsilon", None)
    assert cifar.data.image_size == 32 and cifar.data.random_flip

    celeba = load_config(CONFIGS / "celebahq256.yaml", model_keys=MODEL_KEYS)
    assert celeba.model["preset"] == "ddpm-celebahq-256" and celeba.data.image_size == 256
    assert (celeba.train.batch_size, celeba.train.lr, celeba.train.steps) == (64, 2e-5, 500000)
    assert celeba.train.mixed_precision == "bf16"
    assert (celeba.diffusion.prediction_type, celeba.diffusion.min_snr_gamma) == ("epsilon", None)

    folder = load_config(CONFIGS / "folder64.yaml", model_keys=MODEL_KEYS)
    assert folder.model["time_injection"] == "scale_shift" and folder.model["channel_mult"] == [1, 2, 3, 4]
    assert folder.model["sample_size"] == folder.data.image_size == 64
    assert folder.data.path is None and folder.train.lr == 1e-4


TUNED = {"diffusion.prediction_type": "v_prediction", "diffusion.beta_schedule": "squaredcos_cap_v2",
         "diffusion.min_snr_gamma": 5.0}


def test_the_defaults_are_the_tuned_recipe():
    """Config() is the recipe chosen on real images (docs/benchmarks.md), not the DDPM paper's."""
    cfg = Config()
    assert cfg.model == {"preset": "auto"} and cfg.data.image_size == 32 and cfg.data.path is None
    assert {k: getattr(cfg.diffusion, k.split(".")[1]) for k in TUNED} == TUNED
    t = cfg.train
    assert (t.steps, t.batch_size, t.lr, t.warmup_steps, t.ema_decay) == (1200, 16, 1e-3, 50, 0.995)
    assert (t.preview_sampler, t.preview_steps, t.eval_every, t.eval_images) == ("dpm++", 20, "auto", 64)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_names_its_recipe_first(path):
    """The first line says which recipe a config uses; only the paper reproductions keep the paper's objective."""
    first = path.read_text().splitlines()[0]
    cfg = load_config(path, model_keys=MODEL_KEYS)
    recipe = {k: getattr(cfg.diffusion, k.split(".")[1]) for k in TUNED}
    if "paper" in first and "reproduction" in first:
        assert recipe != TUNED and cfg.diffusion.prediction_type == "epsilon"
    else:
        assert first.startswith("# Recipe: resdiff's tuned diffusion recipe") and recipe == TUNED


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from resdiff.config import find_config, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert shipped_configs() == ["celebahq256", "cifar10", "folder64", "landscape64x128"]
    assert load_config("folder64") == load_config(CONFIGS / "folder64.yaml") == load_config("folder64.yaml")
    local = write(tmp_path, "train:\n  steps: 7\n", "folder64.yaml")  # a file of that name here wins
    assert find_config("folder64.yaml").resolve() == local and load_config("folder64.yaml").train.steps == 7
    message = usage_error("folder65")
    assert message == ("config file 'folder65' does not exist; pass the path of a YAML file or the name of a shipped "
                       "config: celebahq256, cifar10, folder64, landscape64x128")


# --- merging ---


def test_partial_yaml_keeps_the_other_defaults(tmp_path):
    path = write(tmp_path, "train:\n  steps: 10\nmodel:\n  channels: 32\nout: runs/a\n")
    cfg = load_config(path)
    assert cfg.train.steps == 10
    assert cfg.train.lr == TrainConfig().lr and cfg.data == DataConfig()
    assert cfg.model == {"preset": "auto", "channels": 32}
    assert cfg.out == "runs/a"


def test_empty_file_and_empty_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "train:\n", "y.yaml")) == Config()


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 10\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.steps=20"])
    assert cfg.train.steps == 20 and cfg.train.lr == 1e-3


def test_later_override_wins():
    assert load_config(overrides=["train.seed=1", "train.seed=2"]).train.seed == 2


# --- values of each type ---


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("train.steps=123", "train", "steps", 123),
        ("train.steps=1e3", "train", "steps", 1000),
        ("train.lr=1e-4", "train", "lr", 1e-4),
        ("train.lr=2e-4", "train", "lr", 2e-4),
        ("train.lr=3", "train", "lr", 3.0),
        ("train.lr=0.5", "train", "lr", 0.5),
        ("train.ema_decay=0.999", "train", "ema_decay", 0.999),
        ("train.ema_sigma_rel=0.1", "train", "ema_sigma_rel", 0.1),
        ("data.class_cond=true", "data", "class_cond", True),
        ("data.random_flip=false", "data", "random_flip", False),
        ("data.cache=false", "data", "cache", False),
        ("data.cache=auto", "data", "cache", "auto"),
        ("train.grad_clip=null", "train", "grad_clip", None),
        ("train.grad_clip=~", "train", "grad_clip", None),
        ("diffusion.min_snr_gamma=5", "diffusion", "min_snr_gamma", 5.0),
        ("data.path=/x", "data", "path", "/x"),
        ("data.path=null", "data", "path", None),
        ("train.trackers=[tensorboard]", "train", "trackers", ["tensorboard"]),
        ("train.trackers=[tensorboard, wandb]", "train", "trackers", ["tensorboard", "wandb"]),
        ("train.trackers=[]", "train", "trackers", []),
        ("train.adam_betas=[0.9, 0.95]", "train", "adam_betas", (0.9, 0.95)),
        ("train.adam_betas=[0, 0.99]", "train", "adam_betas", (0.0, 0.99)),
        ("train.mixed_precision=bf16", "train", "mixed_precision", "bf16"),
        ("train.mixed_precision=no", "train", "mixed_precision", "no"),
        ("train.preview_sampler=DDIM", "train", "preview_sampler", "ddim"),
        ("diffusion.beta_schedule=cosine", "diffusion", "beta_schedule", "squaredcos_cap_v2"),
        ("diffusion.prediction_type=eps", "diffusion", "prediction_type", "epsilon"),
        ("diffusion.prediction_type=v", "diffusion", "prediction_type", "v_prediction"),
        ("diffusion.prediction_type=x0", "diffusion", "prediction_type", "sample"),
    ],
)
def test_override_values(override, section, key, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), key)
    assert value == expected and type(value) is type(expected)


def test_top_level_and_model_overrides():
    cfg = load_config(
        overrides=["out=runs/x", "model.channels=64", "model.channel_mult=[1,2,2]", "model.preset=ddpm-cifar10",
                   "model.dropout=1e-1", "model.time_injection=scale_shift"],
        model_keys=MODEL_KEYS,
    )  # fmt: skip
    assert cfg.out == "runs/x"
    assert cfg.model == {"preset": "ddpm-cifar10", "channels": 64, "channel_mult": [1, 2, 2], "dropout": 0.1,
                         "time_injection": "scale_shift"}  # fmt: skip


def test_override_that_is_not_yaml_stays_a_string():
    assert load_config(overrides=["data.path=/data/{set"]).data.path == "/data/{set"


def test_numbers_written_in_yaml_files(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; the config must read it as a number, also in model.
    text = (
        "diffusion:\n  beta_start: 1e-4\n  beta_end: 2e-2\n"
        "train:\n  lr: 2e-4\n  weight_decay: 0\n  steps: 1e4\n  ema_decay: '0.99'\n"
        "model:\n  norm_eps: 1e-6\n"
    )
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.diffusion.beta_start == 1e-4 and type(cfg.diffusion.beta_start) is float
    assert cfg.diffusion.beta_end == 0.02
    assert cfg.train.lr == 2e-4 and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 0.0 and type(cfg.train.weight_decay) is float
    assert cfg.train.steps == 10000 and type(cfg.train.steps) is int
    assert cfg.train.ema_decay == 0.99
    assert cfg.model["norm_eps"] == 1e-6


def test_bare_no_in_yaml_means_no_mixed_precision(tmp_path):
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"


# --- mistakes ---


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "train:\n  ema_decy: 0.9\n")
    message = usage_error(path)
    assert "unknown config key 'train.ema_decy'" in message
    assert str(path) in message
    assert "did you mean 'train.ema_decay'?" in message

    message = usage_error(overrides=["train.ema_decy=0.9"])
    assert "did you mean 'train.ema_decay'?" in message and "train.ema_decy=0.9" in message


def test_unknown_key_without_a_close_match_lists_the_section():
    message = usage_error(overrides=["data.zzzzzz=1"])
    assert "unknown config key 'data.zzzzzz'" in message and "image_size" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    message = usage_error(write(tmp_path, "trian:\n  steps: 5\n"))
    assert "unknown config section 'trian'" in message and "did you mean 'train'?" in message
    assert "did you mean 'train.steps'?" in usage_error(overrides=["trian.steps=5"])


def test_section_used_as_a_key():
    message = usage_error(overrides=["train=5"])
    assert "'train' is a config section" in message and "train.steps=" in message
    assert "'model' is a config section" in usage_error(overrides=["model=tiny"])


def test_section_that_is_not_a_mapping(tmp_path):
    message = usage_error(write(tmp_path, "train: 5\n"))
    assert "'train' must be a mapping" in message


def test_override_without_equals_shows_the_form():
    message = usage_error(overrides=["train.steps"])
    assert "'train.steps'" in message and "section.key=value" in message
    assert "section.key=value" in usage_error(overrides=["=5"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=abc", "train.steps must be an integer, got 'abc'"),
        ("train.steps=2.5", "train.steps must be an integer, got 2.5"),
        ("train.steps=true", "train.steps must be an integer, got True"),
        ("train.steps=null", "train.steps must be an integer, got None"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.lr=.nan", "train.lr must be a number"),
        ("train.grad_clip=off", "train.grad_clip must be a number or null, got False"),
        ("data.class_cond=1", "data.class_cond must be true or false, got 1"),
        ("data.class_cond=maybe", "data.class_cond must be true or false, got 'maybe'"),
        ("train.trackers=tensorboard", "train.trackers must be a list of strings, got 'tensorboard'"),
        ("train.adam_betas=[0.9]", "train.adam_betas must be a list of 2 numbers, got [0.9]"),
        ("train.adam_betas=[0.9, x]", "train.adam_betas must be a list of 2 numbers"),
        ("data.path=[a, b]", "data.path must be a string or null"),
        ("out={a: 1}", "out must be a string or null"),
    ],
)
def test_wrong_type(override, expected):
    message = usage_error(overrides=[override])
    assert expected in message and f"from override {override!r}" in message


def test_wrong_type_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: abc\n")
    message = usage_error(path)
    assert "train.steps must be an integer, got 'abc'" in message and str(path) in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=0", "train.steps must be > 0, got 0"),
        ("train.batch_size=-1", "train.batch_size must be > 0"),
        ("data.image_size=0", "data.image_size must be > 0"),
        ("diffusion.num_train_timesteps=0", "diffusion.num_train_timesteps must be > 0"),
        ("train.grad_accum=0", "train.grad_accum must be > 0"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be > 0"),
        ("train.log_every=0", "train.log_every must be > 0"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be > 0"),
        ("train.preview_every=-5", "train.preview_every must be > 0"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.ema_decay=1", "train.ema_decay must be in [0, 1), got 1.0"),
        ("train.ema_decay=-0.1", "train.ema_decay must be in [0, 1)"),
        ("train.ema_sigma_rel=0.5", "train.ema_sigma_rel must be in (0, 0.28]"),
        ("diffusion.label_dropout=1.0", "diffusion.label_dropout must be in [0, 1)"),
        ("data.image_channels=2", "data.image_channels must be 1 (grayscale) or 3 (RGB), got 2"),
        ("data.cache=sometimes", "data.cache must be true, false or auto, got 'sometimes'"),
        ("train.grad_clip=0", "train.grad_clip must be > 0"),
        ("train.adam_betas=[0.9, 1.0]", "train.adam_betas must both be in [0, 1)"),
        ("diffusion.beta_end=0.00001", "diffusion.beta_start (0.0001) must be below diffusion.beta_end (1e-05)"),
    ],
)
def test_out_of_range(override, expected):
    message = usage_error(overrides=[override])
    assert expected in message and override in message


def test_boundary_values_are_accepted():
    cfg = load_config(overrides=["train.ema_decay=0", "diffusion.label_dropout=0", "data.image_channels=1",
                                 "train.warmup_steps=0", "data.num_workers=0"])  # fmt: skip
    assert cfg.train.ema_decay == 0.0 and cfg.data.image_channels == 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("diffusion.beta_schedule=lin", "diffusion.beta_schedule must be one of linear, scaled_linear, squared"),
        ("diffusion.prediction_type=vpred", "diffusion.prediction_type must be one of epsilon, v_prediction, sample"),
        ("diffusion.timestep_sampling=lognormal", "diffusion.timestep_sampling must be one of uniform, laplace, got 'lognormal'"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
        ("train.mixed_precision=yes", "train.mixed_precision must be one of no, fp16, bf16, got 'true'"),
        ("train.preview_sampler=dim", "preview_sampler must be one of ddpm, ddim, dpm++, euler, heun, unipc, dpm++3m, dpm++sde, got 'dim'"),
    ],
)
def test_bad_choice(override, expected):
    assert expected in usage_error(overrides=[override])


def test_bad_choice_suggests_the_closest():
    assert "did you mean 'ddim'?" in usage_error(overrides=["train.preview_sampler=dim"])


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    message = usage_error(path)
    assert str(path) in message and "does not exist" in message


def test_non_mapping_file_is_named(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    message = usage_error(path)
    assert str(path) in message and "mapping" in message


def test_broken_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  lr: [1, 2\n")
    message = usage_error(path)
    assert str(path) in message and "not valid YAML" in message and "line" in message


def test_model_keys_are_checked_when_given(tmp_path):
    message = usage_error(overrides=["model.chanels=64"], model_keys=MODEL_KEYS)
    assert "unknown config key 'model.chanels'" in message and "did you mean 'model.channels'?" in message
    message = usage_error(write(tmp_path, "model:\n  atention_resolutions: [16]\n"), model_keys=MODEL_KEYS)
    assert "did you mean 'model.attention_resolutions'?" in message
    # Without model_keys any model key passes through, for the trainer to check against the UNet.
    assert load_config(overrides=["model.chanels=64"]).model["chanels"] == 64


def test_model_preset_must_be_a_name():
    assert "model.preset must be a preset name" in usage_error(overrides=["model.preset=[a]"])


# --- saving, round trip, diff ---


def test_to_dict_is_plain():
    d = Config().to_dict()
    assert d["train"]["adam_betas"] == [0.9, 0.999] and isinstance(d["train"]["adam_betas"], list)
    assert d["model"] == {"preset": "auto"} and d["out"] is None
    assert set(d) == {"model", "data", "diffusion", "train", "out"}


@pytest.mark.parametrize("preset", [None, "folder64.yaml"])
def test_save_then_load_round_trips(tmp_path, preset):
    overrides = ["train.adam_betas=[0.5,0.9]", "train.trackers=[tensorboard]", "diffusion.min_snr_gamma=5",
                 "train.grad_clip=null", "out=runs/x", "data.cache=false", "train.lr=1e-5",
                 "diffusion.beta_start=1e-05", "model.channel_mult=[1,2]"]  # fmt: skip
    cfg = load_config(preset and CONFIGS / preset, overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path, model_keys=MODEL_KEYS)
    assert again == cfg
    assert type(again.train.adam_betas) is tuple


def test_config_diff():
    a = load_config(overrides=["model.channels=64", "train.lr=1e-4"])
    b = load_config(overrides=["model.channels=128", "model.dropout=0.1", "train.lr=1e-4", "train.steps=5"])
    assert config_diff(a, b, "model") == ["model.channels: 64 -> 128", "model.dropout: unset -> 0.1"]
    assert config_diff(a, b, "train") == ["train.steps: 1200 -> 5"]
    assert config_diff(a, b, "data") == []
    assert config_diff(a, a, "model") == []
    assert config_diff(a, load_config(overrides=["out=r"]), "out") == ["out: None -> 'r'"]
    with pytest.raises(ValueError):
        config_diff(a, b, "nope")


def test_the_old_name_data_channels_points_to_data_image_channels():
    """data.channels was renamed on 2026-11-27; the key is refused with the new name to use."""
    assert "did you mean 'data.image_channels'?" in usage_error(overrides=["data.channels=1"])
    with pytest.raises(UsageError, match="data.image_channels must be 1 .* got 2"):
        load_config(None, ["data.image_channels=2"])


# ----------------------------------------------------------------------------- image shapes


@pytest.mark.parametrize("text, want", [
    ("64x128", (64, 128)), ("64X128", (64, 128)), ("64 128", (64, 128)), ("64,128", (64, 128)), ("[64, 128]", (64, 128)),
    ("48", 48), ("[32, 32]", 32), ("32x32", 32),
])
def test_image_size_takes_one_side_or_height_and_width(text, want):
    assert load_config(None, [f"data.image_size={text}"]).data.image_size == want


@pytest.mark.parametrize("text", ["abc", "[1, 2, 3]", "64x0", "[-4, 8]", "1.5x3"])
def test_a_bad_image_size_is_one_line(text):
    with pytest.raises(UsageError, match=r"data.image_size must be"):
        load_config(None, [f"data.image_size={text}"])


def test_image_size_pairs_round_trip_through_yaml(tmp_path):
    from resdiff.config import save_config

    (tmp_path / "a.yaml").write_text("data:\n  image_size: [48, 32]\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.data.image_size == (48, 32)
    save_config(cfg, tmp_path / "b.yaml")
    assert "image_size: [48, 32]" in (tmp_path / "b.yaml").read_text()
    assert load_config(tmp_path / "b.yaml") == cfg


def test_the_landscape_config_loads():
    from resdiff.build import model_keys

    cfg = load_config("landscape64x128", model_keys=model_keys())
    assert cfg.data.image_size == (64, 128)


# --- hostile files: aliases and tags ---

# Ten levels of nine aliases each in train.lr: 9**10 (3.5 billion) numbers to anything that walks or prints it.
ALIAS_BOMB = "\n".join(
    ["train:", "  lr:", "    - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    + [f"    - &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 10)] + [""]
)
TAG = "train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n"


def test_aliases_are_refused(tmp_path):
    message = usage_error(write(tmp_path, "train:\n  steps: &n 5\n  log_every: *n\n"))
    assert message == (f"config file '{tmp_path / 'x.yaml'}' is not valid YAML (alias *n is not allowed in config "
                       "files; write the value out at line 3); fix the syntax there")
    assert load_config(write(tmp_path, "train:\n  steps: &n 5\n")).train.steps == 5  # an anchor alone is harmless


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    message = usage_error(write(tmp_path, TAG.format(marker=marker)))
    assert "tag !!python/object/apply:os.system is not allowed in config files, which hold plain values only" in message
    assert not marker.exists()


def _train_in_child(argv: list[str], err_file: str) -> None:
    """A forked child: train.py's main as `python train.py` runs it, with its address space capped 2 GB above
    what it has (so an expansion fails fast instead of swapping the machine); stderr goes to ``err_file``."""
    import resource
    import sys

    from tiny_runs import load_script

    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    with open(err_file, "w") as err:
        sys.stderr = err
        code = load_script("train_cli", "train.py").main(argv)
        err.flush()
    os._exit(code)


@pytest.mark.parametrize("case", ["alias bomb", "python tag"])
def test_hostile_config_files_through_train_py(case, tmp_path):
    """train.py --config FILE with an alias bomb in train.lr, or a !!python tag: one line, exit code 2, and nothing
    written (no run directory, the tag's command not run). An expanding bomb would hit the child's memory cap or
    never end; the join's generous limit only keeps a regression from hanging the suite."""
    import multiprocessing

    import resdiff.build  # noqa: F401  (imported before the clock starts, as train.py's start-up would)

    marker, run = tmp_path / "marker", tmp_path / "run"
    path = write(tmp_path, ALIAS_BOMB if case == "alias bomb" else TAG.format(marker=marker))
    err = tmp_path / "stderr.txt"
    child = multiprocessing.get_context("fork").Process(
        target=_train_in_child, args=(["--config", str(path), "--out", str(run)], str(err)))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 2, f"exit {child.exitcode}: {err.read_text()[-2000:]}"
    text = err.read_text()
    assert text.count("\n") == 1 and text.startswith(f"error: config file '{path}' is not valid YAML ("), text
    assert not run.exists() and not marker.exists() and not (tmp_path / "runs").exists()


def test_the_config_imports_without_torch_or_diffusers():
    """Reading and checking a config (a CLI's first step, a notebook's `from resdiff.config import ...`) loads
    neither torch nor diffusers: the package imports its public names on first use, and the choices the config
    checks against live in resdiff.choices. The package's names still resolve (diffusers finds a saved
    pipeline's ["resdiff", "UNet"] this way) and an unknown one is an AttributeError."""
    import subprocess
    import sys

    code = (
        "import sys, resdiff.config\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import resdiff\n"
        "assert 'UNet' in dir(resdiff) and not hasattr(resdiff, 'NoSuchName')\n"
        "assert 'torch' not in sys.modules\n"
        "from resdiff import UNet\n"
        "assert resdiff.UNet is UNet and UNet.__module__ == 'resdiff.unet' and 'diffusers' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

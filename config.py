"""The training configuration: one typed dataclass whose defaults are the seed recipe, the presets, and the
command-line flags generated from its fields (shared with the benchmarks' settings).

    cfg = parse_config(["--data", "DIR", "--preset", "seed"])   # defaults ← preset ← explicit flags
"""
from __future__ import annotations

import argparse
import textwrap
from dataclasses import asdict, dataclass, fields

REFERENCE_BATCH = 12  # pairs per optimizer step in the seed recipe; `lr` is quoted at this batch


@dataclass
class Config:
    preset: str = "auto"  # seed | fast | demo | auto (fast on a GPU, demo on a CPU)
    data: str = ""  # ODIR folder (data.xlsx or full_df.csv + images); empty: the synthetic demo set
    out: str = "runs"  # run folders are created in here
    name: str = ""  # run folder name; default: date-time
    resume: str = ""  # a run folder (or its last.pt) to continue from
    dry_run: bool = False  # read and check the data, print what would be trained on, exit
    strict: bool = False  # a bad or missing eye image is fatal instead of leaving the patient out
    cache_dir: str = ""  # prepared images; default $ODIR_CACHE/prepared or ~/.cache/odir-dual/prepared
    synthetic_patients: int = 600  # size of the generated demo set when --data is not given
    # model
    backbone: str = "convnext_small"  # any timm model name
    pretrained: bool = True  # timm's ImageNet weights (downloaded once by timm)
    weights_file: str = ""  # local backbone weights for offline hosts (implies --pretrained)
    embed_dim: int = 512  # per-eye token width in the head
    heads: int = 8  # cross-attention heads
    dropout: float = 0.2
    # data
    img_px: int = 384  # training and inference image side, pixels
    prepare_px: int = 0  # short side of the prepared copies, pixels; 0: same as img_px
    val_fraction: float = 0.15
    weighted_sampling: bool = True  # draw patients by label rarity
    same_eye_aug: bool = False  # one augmentation draw for both eyes (default: independent per eye)
    loader_threads: int = 0  # DALI CPU threads; 0: min(cores, 8)
    # optimisation
    epochs: int = 25
    batch_size: int = 6  # pairs per step per rank
    accum_steps: int = 2  # steps per optimizer update
    lr: float = 5e-5  # head learning rate at 12 pairs per update; scaled by sqrt(pairs per update / 12)
    backbone_lr_mult: float = 0.1  # backbone learning rate = lr × this
    weight_decay: float = 2e-5
    warmup_epochs: float = 3.0  # linear warm-up, then cosine to zero
    clip_grad: float = 1.0  # max gradient norm; 0: off
    patience: int = 5  # early stopping: epochs without a better validation F1 macro; 0: off
    seed: int = 42
    # speed
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + scaler; fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the training model
    stop_after_steps: int = 0  # stop after this many optimizer updates (saving last.pt); 0: run to the end


PRESETS = {
    # Exactly the seed's recipe (best_model.py in ../shared/seed): for comparison and reproduction.
    "seed": dict(backbone="convnext_small", img_px=384, batch_size=6, accum_steps=2, epochs=25, lr=5e-5,
                 backbone_lr_mult=0.1, weight_decay=2e-5, warmup_epochs=3.0, clip_grad=1.0, patience=5,
                 weighted_sampling=True, precision="auto", compile=False),
    # The GPU throughput recipe: 8× larger updates (lr scaled by sqrt(96/12)), bf16, channels_last, compiled.
    "fast": dict(backbone="convnext_small", img_px=384, batch_size=96, accum_steps=1, epochs=25, lr=5e-5,
                 backbone_lr_mult=0.1, weight_decay=2e-5, warmup_epochs=3.0, clip_grad=1.0, patience=0,
                 precision="auto", compile=True),
    # CPU-sized: a small backbone from scratch at 128 px on the synthetic set, a few minutes on 2 cores.
    "demo": dict(backbone="test_resnet", pretrained=False, img_px=128, batch_size=32, accum_steps=1, epochs=15,
                 lr=2e-3, backbone_lr_mult=1.0, weight_decay=1e-4, warmup_epochs=1.0, patience=0,
                 embed_dim=128, dropout=0.1, compile=False),
}


# ----------------------------------------------------------------------------------------------- config


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, help_of=lambda f: f"default {f.default!r}") -> None:
    """One flag per dataclass field (`img_px` → `--img-px`; bools get `--x/--no-x`), all defaulting to None so
    that only what the user typed comes back (see `explicit_values`). Also used by the benchmarks' settings."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of(f))
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None,
                                help=help_of(f))


def explicit_values(args: argparse.Namespace) -> dict:
    """The flags the user actually gave (the others are None)."""
    return {k: v for k, v in vars(args).items() if v is not None}


def parse_config(argv=None, description: str | None = None) -> Config:
    """Flags generated from Config's fields; a preset fills the fields the user did not set."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, Config)
    return resolve_config(explicit_values(parser.parse_args(argv)))


def resolve_config(explicit: dict) -> Config:
    """Defaults ← preset ← explicit values. `auto` picks fast on a GPU, demo on a CPU."""
    preset = explicit.get("preset", "auto")
    if preset == "auto":
        import torch

        preset = "fast" if torch.cuda.is_available() else "demo"
    if preset not in PRESETS:
        raise SystemExit(f"--preset {preset!r}: choose one of {', '.join(PRESETS)} or auto")
    values = {**PRESETS[preset], **explicit, "preset": preset}
    if values.get("weights_file"):
        values["pretrained"] = True
    if values.get("precision", "auto") not in ("auto", "bf16", "fp16", "fp32"):
        raise SystemExit(f"--precision {values['precision']!r}: choose auto, bf16, fp16 or fp32")
    return Config(**values)


def format_config(cfg: Config) -> str:
    """The config as wrapped `name=value` lines, for the log."""
    items = " ".join(f"{k}={v!r}" for k, v in asdict(cfg).items())
    return "config: " + textwrap.fill(items, 116, subsequent_indent="  ", break_on_hyphens=False)




def config_from_dict(saved: dict) -> Config:
    """A Config from a saved dict (config.json, a checkpoint): fields added or dropped since are tolerated."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in names})

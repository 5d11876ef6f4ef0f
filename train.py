"""Train the dual-eye ODIR network: `python train.py` (a CPU demo on synthetic fundus images) or
`python train.py --data ODIR_FOLDER [--preset seed|fast|demo] [--flags]`.

Multi-GPU: `torchrun --nproc-per-node N train.py --data ...` (each rank reads its own shard; only rank 0 writes).
Every flag is a field of `Config`; `--help` lists them with their defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import CLASSES

HERE = Path(__file__).resolve().parent
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


def parse_config(argv=None) -> Config:
    """Flags generated from Config's fields; a preset fills the fields the user did not set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"default {f.default}")
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=None,
                                help=f"default {f.default!r}")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return resolve_config(args)


def resolve_config(explicit: dict) -> Config:
    """Defaults ← preset ← explicit values. `auto` picks fast on a GPU, demo on a CPU."""
    preset = explicit.get("preset", "auto")
    if preset == "auto":
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
    import textwrap

    items = " ".join(f"{k}={v!r}" for k, v in asdict(cfg).items())
    return "config: " + textwrap.fill(items, 116, subsequent_indent="  ", break_on_hyphens=False)


# ----------------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine to 0 (per optimizer update)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(precision: str, device: torch.device):
    """None (fp32) or the autocast dtype for this device."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions() -> dict:
    import timm

    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__), "timm": timm.__version__,
                "numpy": np.__version__}
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return versions


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """A checkpoint is data, never code: plain tensors, numbers and strings only."""
    return torch.load(path, map_location="cpu", weights_only=True)


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next update, after writing last.pt."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Give the caller its own handlers back (train.main may run inside a larger program or a test)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this update (with torchrun: at the end of this "
              "epoch), writing last.pt; again to stop at once", flush=True)


# ----------------------------------------------------------------------------------------------- data


def data_folder(cfg: Config, is_main: bool) -> Path:
    """The ODIR folder to train on; the synthetic demo set (generated once, cached) when --data is not given."""
    if cfg.data:
        return Path(cfg.data)
    from pipeline.data import cache_root
    from pipeline.synthetic import ensure_synthetic_odir

    root = cache_root() / "synthetic"
    if is_main:
        print(f"no --data given: using the synthetic ODIR demo set ({cfg.synthetic_patients} patients) in {root}")
        ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)
    barrier()
    return ensure_synthetic_odir(root, n_patients=cfg.synthetic_patients)  # rank 0: a cache hit by now


def load_data(cfg: Config, folder: Path, is_main: bool):
    """(patients, left_out): rank 0 prepares the images, the others then find them up to date."""
    from pipeline.data import load_prepared

    kwargs = dict(cache_dir=cfg.cache_dir or None, strict=cfg.strict)
    if is_main:
        result = load_prepared(folder, cfg.prepare_px or cfg.img_px, progress=True, **kwargs)
    barrier()
    if not is_main:
        result = load_prepared(folder, cfg.prepare_px or cfg.img_px, progress=False, **kwargs)
    return result


def split_table(patients, cfg: Config, run_dir: Path | None, resume_dir: Path | None):
    """Seeded multi-label stratified split; reloaded from the run folder when resuming."""
    from pipeline.odir import label_matrix
    from pipeline.split import load_split, save_split, stratified_split

    if resume_dir is not None:
        ids_train, ids_val = load_split(resume_dir / "split.csv")
    else:
        tr, va = stratified_split(label_matrix(patients), cfg.val_fraction, cfg.seed)
        ids_train, ids_val = patients["id"].to_numpy()[tr], patients["id"].to_numpy()[va]
        if run_dir is not None:
            save_split(run_dir / "split.csv", ids_train, ids_val)
    by_id = patients.set_index("id", drop=False)
    missing = set(ids_train).union(ids_val) - set(by_id.index)
    if missing:
        raise SystemExit(f"split.csv names {len(missing)} patient(s) that are no longer usable, e.g. "
                         f"{sorted(missing)[:5]}: was the data changed since the run started?")
    return by_id.loc[ids_train].reset_index(drop=True), by_id.loc[ids_val].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- distributed


def setup_distributed():
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed, so the autotuned kernels are reused
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_replicas(model, device, is_main) -> None:
    """After DDP training every rank must hold the same weights: compare a checksum across ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        total = torch.stack([p.double().sum() for p in model.parameters()]).sum()
        mine = torch.stack([total, torch.stack([p.double().abs().sum() for p in model.parameters()]).sum()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine.to(device))
    if is_main:
        same = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
        print(f"replicas identical across {len(gathered)} ranks: {'yes' if same else 'NO'}")
        if not same:
            raise SystemExit("DDP replicas diverged: " + ", ".join(f"{g[0].item():.10g}" for g in gathered))


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision (early stop, Ctrl-C) for every rank, so all stop on the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------- model


def build_model(cfg: Config, pretrained: bool | None = None):
    """The network from a config (also how export.py rebuilds a checkpoint's model)."""
    from model import DualEyeNet

    pretrained = cfg.pretrained if pretrained is None else pretrained
    try:
        return DualEyeNet(cfg.backbone, num_classes=len(CLASSES), embed_dim=cfg.embed_dim, heads=cfg.heads,
                          dropout=cfg.dropout, pretrained=pretrained, weights_file=cfg.weights_file or None)
    except RuntimeError as e:
        if pretrained and not cfg.weights_file:
            raise SystemExit(f"could not load pretrained weights for {cfg.backbone!r} ({e}). On a host with no "
                             "network pass --weights-file PATH (timm's .safetensors/.pth for this backbone), "
                             "or --no-pretrained to start from random weights.") from e
        raise


def make_optimizer(model, cfg: Config, lr: float):
    """AdamW with the backbone at lr × backbone_lr_mult, everything else at lr."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [dict(params=backbone, lr_mult=cfg.backbone_lr_mult), dict(params=head, lr_mult=1.0)]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model, loader, amp_dtype, device, n_rows: int) -> torch.Tensor:
    """Logits (n_rows, 8), float32 on the CPU, in table order (padding dropped)."""
    model.eval()
    out = torch.zeros(n_rows, len(CLASSES))
    for left, right, _, index in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(left, right)
        keep = index >= 0
        out[index[keep].cpu()] = logits[keep].float().cpu()
    model.train()
    return out


def evaluate(y_true, probs, thresholds=None) -> dict:
    """Multi-label metrics (2-D F1/AUC) and the official ODIR score, both at 0.5 and at tuned thresholds."""
    from model import multilabel_metrics, odir_score

    out = {"at_0.5": multilabel_metrics(y_true, probs, 0.5), "odir": odir_score(y_true, probs)}
    if thresholds is not None:
        out["tuned"] = multilabel_metrics(y_true, probs, thresholds)
    return out


# ----------------------------------------------------------------------------------------------- run folder


class RunLog:
    """The run folder: config, split, left-out patients, metrics history (CSV), curves (PNG), checkpoints."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv = run_dir / "metrics.csv"

    def history(self) -> list[dict]:
        if not self.csv.exists():
            return []
        with open(self.csv) as f:
            return list(csv.DictReader(f))

    def append(self, row: dict, keep_epochs_below: int | None = None):
        rows = [r for r in self.history() if keep_epochs_below is None or int(r["epoch"]) < keep_epochs_below]
        rows.append({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})
        tmp = self.csv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[-1]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)
        self.plot(rows)

    def plot(self, rows):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [int(r["epoch"]) for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key in ("train_loss", "val_loss"):
            a.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
        for key in ("train_f1_macro", "val_f1_macro", "val_f1_micro", "val_odir"):
            b.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
        a.set_xlabel("epoch"), b.set_xlabel("epoch"), a.legend(), b.legend(), b.set_ylim(0, 1)
        a.set_title("loss"), b.set_title("F1 macro/micro at 0.5; ODIR = official score")
        fig.tight_layout()
        fig.savefig(self.dir / "curves.png", dpi=90)
        plt.close(fig)


def print_epoch(row: dict, header: bool):
    cols = ["epoch", "train_loss", "val_loss", "train_f1_macro", "val_f1_micro", "val_f1_macro", "val_odir"]
    cols += [f"f1_{c}" for c in CLASSES] + ["pairs_per_s", "data_pct", "epoch_s"]
    names = {"train_f1_macro": "trF1ma", "val_f1_micro": "F1mi", "val_f1_macro": "F1ma", "val_odir": "ODIR",
             "train_loss": "trLoss", "val_loss": "vaLoss", "pairs_per_s": "pairs/s", "epoch_s": "sec",
             "data_pct": "data%"}
    if header:
        print(" ".join(f"{names.get(c, c):>7}" for c in cols))
    print(" ".join(f"{row[c]:>7.3f}" if isinstance(row[c], float) else f"{row[c]:>7}" for c in cols), flush=True)


# ----------------------------------------------------------------------------------------------- main


def checkpoint_payload(model, cfg, *, thresholds, mean, std, epoch, step, best, extra=None) -> dict:
    """Everything export.py and score.py need, as plain data (loads with weights_only=True)."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(cfg),
        "classes": list(CLASSES),
        "thresholds": [float(t) for t in thresholds],
        "img_px": cfg.img_px,
        "mean": list(mean),
        "std": list(std),
        "versions": library_versions(),
        "commit": git_commit(),
        "epoch": epoch,
        "step": step,
        "best": best,
        "format": "odir-dual/1",
    }
    payload.update(extra or {})
    return payload


def main(argv=None):
    cfg = parse_config(argv)
    resume_dir = None
    if cfg.resume:
        resume_dir = Path(cfg.resume)
        resume_dir = resume_dir.parent if resume_dir.suffix == ".pt" else resume_dir
        state = load_checkpoint(resume_dir / "last.pt")
        saved = Config(**state["config"])
        cfg = dataclasses.replace(saved, resume=cfg.resume, stop_after_steps=cfg.stop_after_steps)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    torch.manual_seed(cfg.seed)

    run_dir = None
    if not cfg.dry_run:
        run_dir = resume_dir or Path(cfg.out) / (cfg.name or time.strftime("%Y%m%d-%H%M%S"))
    if is_main:
        print(f"odir-dual · commit {git_commit()} · {json.dumps(library_versions())}")
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} × {world} rank(s)")
        print(format_config(cfg))

    # The folder actually used (the synthetic set's cache folder for the demo) is recorded in the config, so
    # --resume and export.py find the same images.
    cfg = dataclasses.replace(cfg, data=str(data_folder(cfg, is_main)))
    patients, left_out = load_data(cfg, Path(cfg.data), is_main)
    train_tab, val_tab = split_table(patients, cfg, run_dir if is_main else None, resume_dir)
    if is_main:
        from pipeline.data import left_out_summary
        from pipeline.odir import describe

        print(f"usable patients: {len(patients)}; {left_out_summary(left_out)}")
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            left_out.to_csv(run_dir / "left_out.csv", index=False)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            if len(left_out):
                print(f"  every left-out eye and why: {run_dir / 'left_out.csv'}")
        print(describe(patients))
        print(f"split (seed {cfg.seed}): train {len(train_tab)} · validation {len(val_tab)}")
    if cfg.dry_run:
        if is_main:
            for r in left_out.itertuples():
                print(f"  left out {r.id}: {r.eye} eye {r.path}: {r.reason}")
        return None
    stop = StopRequest()
    try:
        return fit(cfg, train_tab, val_tab, run_dir, rank, world, device, resume_dir, stop)
    finally:
        stop.restore()


def fit(cfg, train_tab, val_tab, run_dir, rank, world, device, resume_dir, stop: StopRequest):
    from model import backbone_norm, count_parameters, hybrid_loss, pos_weights_from_labels, tune_thresholds
    from pipeline.dali import Augment, eval_loader, train_loader
    from pipeline.odir import label_matrix

    is_main = rank == 0
    log = RunLog(run_dir) if is_main else None
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    in_dtype = amp_dtype or torch.float32  # images arrive in the autocast dtype: half the bytes of fp32
    mean, std = backbone_norm(cfg.backbone)  # what the pretrained weights expect (ImageNet's for ConvNeXt)

    model = build_model(cfg, pretrained=cfg.pretrained and resume_dir is None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if is_main:
        print(f"model: {cfg.backbone} dual-eye · {count_parameters(model) / 1e6:.1f}M parameters "
              f"({count_parameters(model.backbone) / 1e6:.1f}M in the backbone)")

    pairs_per_update = cfg.batch_size * cfg.accum_steps * world
    lr = cfg.lr * math.sqrt(pairs_per_update / REFERENCE_BATCH)
    optimizer = make_optimizer(model, cfg, lr)
    y_train = label_matrix(train_tab)
    pos_weight = pos_weights_from_labels(y_train).to(device)

    step = 0  # optimizer updates done
    best = {"f1_macro": -1.0, "epoch": -1}
    if resume_dir is not None:
        state = load_checkpoint(resume_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        step, best = state["step"], state["best"]
        if is_main:
            print(f"resumed {resume_dir} at update {step} (epoch {state['epoch']})")

    micro_start = step * cfg.accum_steps
    augment = Augment(same_for_both_eyes=cfg.same_eye_aug)
    loader = train_loader(train_tab, cfg.batch_size, cfg.img_px, device, augment=augment,
                          weighted=cfg.weighted_sampling, seed=cfg.seed, rank=rank, world=world,
                          start_step=micro_start, step_multiple=cfg.accum_steps, dtype=in_dtype, mean=mean,
                          std=std, num_threads=cfg.loader_threads or None)
    updates_per_epoch = loader.source.steps // cfg.accum_steps
    total_updates = updates_per_epoch * cfg.epochs
    warmup_updates = max(1, round(cfg.warmup_epochs * updates_per_epoch))
    val_loader = None
    if is_main:
        val_loader = eval_loader(val_tab["left"], val_tab["right"], cfg.batch_size, cfg.img_px, device,
                                 dtype=in_dtype, mean=mean, std=std, num_threads=cfg.loader_threads or None)
        print(f"{updates_per_epoch} updates/epoch of {pairs_per_update} pairs · head lr {lr:.2e} · "
              f"backbone lr {lr * cfg.backbone_lr_mult:.2e} · precision {amp_dtype or 'fp32'} · "
              f"compile {cfg.compile} · channels_last {cfg.channels_last}")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                                if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model, dynamic=False)  # batch shapes are fixed by design

    y_val = label_matrix(val_tab)
    thresholds = np.full(len(CLASSES), 0.5)
    # The baseline every number is read against: always predict the training prevalence.
    trivial = evaluate(y_val, np.broadcast_to(y_train.mean(0), y_val.shape).copy())
    start_epoch = step // updates_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0, data_s = time.perf_counter(), 0.0
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        train_probs, train_rows = [], []
        n_batches = len(loader)  # the first pass after a resume is shorter
        bar = _progress(n_batches, epoch, cfg.epochs, is_main)
        optimizer.zero_grad(set_to_none=True)
        micro_done, micro0 = 0, step * cfg.accum_steps  # micro-steps are numbered across the run
        t_data = time.perf_counter()
        for micro, (left, right, labels, index) in enumerate(loader):
            data_s += time.perf_counter() - t_data
            sync = (micro + 1) % cfg.accum_steps == 0
            ctx = train_model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = train_model(left, right)
                loss = hybrid_loss(logits.float(), labels, pos_weight)
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach()
            micro_done += 1
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), micro0 + micro, first_bad)
            train_probs.append(torch.sigmoid(logits.detach().float()))
            train_rows.append(labels)
            if sync:
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_mult"] * lr_factor(step, total_updates, warmup_updates)
                if cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if bar is not None and (step % 10 == 0 or micro + 1 == n_batches):
                    _check_finite(first_bad, epoch, cfg.accum_steps)
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_sum.item() / micro_done:.4f}",
                                    pairs_s=f"{micro_done * cfg.batch_size * world / elapsed:.1f}")
                # A signal stops a single process at once; DDP ranks may see it at different updates, so they
                # stop together at the end of the epoch (the flag is broadcast from rank 0 below).
                stop_now = (stop.requested and world == 1) or (cfg.stop_after_steps and step >= cfg.stop_after_steps)
                if stop_now:
                    break
            if bar is not None:
                bar.update(1)
            t_data = time.perf_counter()
        if bar is not None:
            bar.close()
        _check_finite(first_bad, epoch, cfg.accum_steps)
        epoch_s = time.perf_counter() - t0
        finished_epoch = step % updates_per_epoch == 0
        stop_now = broadcast_flag(bool(stop.requested or (cfg.stop_after_steps and step >= cfg.stop_after_steps)),
                                  device)

        if is_main and finished_epoch:
            from model import multilabel_metrics

            logits = predict(model, val_loader, amp_dtype, device, len(val_tab))
            val_loss = float(hybrid_loss(logits, torch.as_tensor(y_val, dtype=torch.float32), pos_weight.cpu()))
            probs = torch.sigmoid(logits).numpy()
            metrics = evaluate(y_val, probs)
            train_m = multilabel_metrics(torch.cat(train_rows).cpu().numpy(), torch.cat(train_probs).cpu().numpy())
            row = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / max(1, micro_done),
                   "val_loss": val_loss, "train_f1_macro": train_m["f1_macro"],
                   "val_f1_micro": metrics["at_0.5"]["f1_micro"], "val_f1_macro": metrics["at_0.5"]["f1_macro"],
                   "val_odir": metrics["odir"]["final"], "val_auc_macro": metrics["at_0.5"]["auc_macro"],
                   **{f"f1_{c}": metrics["at_0.5"]["f1"][c] for c in CLASSES},
                   "pairs_per_s": micro_done * cfg.batch_size * world / epoch_s, "data_s": data_s,
                   "data_pct": 100 * data_s / epoch_s,  # time blocked waiting for the pipeline
                   "epoch_s": epoch_s, "lr": lr * lr_factor(step - 1, total_updates, warmup_updates)}
            log.append(row, keep_epochs_below=epoch + 1)
            print_epoch(row, header=epoch == start_epoch)
            if row["val_f1_macro"] > best["f1_macro"]:
                best = {"f1_macro": float(row["val_f1_macro"]), "epoch": epoch + 1}
                thresholds = tune_thresholds(y_val, probs)
                metrics["tuned"] = multilabel_metrics(y_val, probs, thresholds)
                save_atomic(checkpoint_payload(model, cfg, thresholds=thresholds, mean=mean, std=std,
                                               epoch=epoch + 1, step=step, best=best,
                                               extra={"val_metrics": _plain(metrics),
                                                      "trivial_metrics": _plain(trivial)}),
                            run_dir / "best.pt")
        if is_main:
            save_atomic(checkpoint_payload(model, cfg, thresholds=thresholds, mean=mean, std=std, epoch=epoch,
                                           step=step, best=best,
                                           extra={"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                                  "rng_cpu": torch.get_rng_state()}),
                        run_dir / "last.pt")
        early = broadcast_flag(bool(cfg.patience and finished_epoch
                                    and epoch + 1 - best["epoch"] >= cfg.patience), device)
        if early and is_main:
            print(f"early stopping: no better validation F1 macro for {cfg.patience} epochs")
        if stop_now or early:
            break
    check_replicas(model, device, is_main)
    if is_main:
        return report_best(run_dir, val_tab, y_val, device)
    return None


def report_best(run_dir: Path, val_tab, y_val, device):
    """Final evaluation of best.pt on the validation split: metrics at 0.5 and at the tuned thresholds."""
    best_path = run_dir / "best.pt"
    if not best_path.exists():
        print(f"no completed epoch yet: resume with --resume {run_dir}")
        return None
    ckpt = load_checkpoint(best_path)
    m = ckpt["val_metrics"]
    print(f"\nbest epoch {ckpt['best']['epoch']} → {best_path}")
    print(f"validation ({len(val_tab)} patients)   F1 micro  F1 macro  AUC macro   "
          + "  ".join(f"{c:>5}" for c in CLASSES))
    for key, label in (("at_0.5", "threshold 0.5     "), ("tuned", "tuned thresholds  ")):
        r = m[key]
        print(f"  {label}          {r['f1_micro']:.3f}     {r['f1_macro']:.3f}     {r['auc_macro']:.3f}      "
              + "  ".join(f"{r['f1'][c]:.3f}" for c in CLASSES))
    t = ckpt["trivial_metrics"]["at_0.5"]
    print(f"  trivial predictor           {t['f1_micro']:.3f}     {t['f1_macro']:.3f}     {t['auc_macro']:.3f}      "
          + "  ".join(f"{t['f1'][c]:.3f}" for c in CLASSES) + "   (always the training prevalence)")
    for label, o in (("model", m["odir"]), ("trivial", ckpt["trivial_metrics"]["odir"])):
        print(f"  official ODIR score, {label:<7} (flattened, 0.5): kappa {o['kappa']:.3f} · F1 {o['f1']:.3f} · "
              f"AUC {o['auc']:.3f} · final {o['final']:.3f}")
    print(f"  thresholds: " + " ".join(f"{c}={t:.2f}" for c, t in zip(CLASSES, ckpt["thresholds"])))
    return ckpt


def _plain(obj):
    """Metrics as JSON-able plain data (numpy scalars → float) for a weights_only checkpoint."""
    return json.loads(json.dumps(obj, default=float))


def _check_finite(first_bad, epoch, accum):
    bad = int(first_bad.item())
    if bad >= 0:
        raise SystemExit(f"loss is NaN or infinite at epoch {epoch + 1}, update {bad // accum + 1} (counted from "
                         "the start of the run); stopping. The last good checkpoints are untouched. Try a lower "
                         "--lr, --precision fp32, or check the data.")


def _progress(total, epoch, epochs, is_main):
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", mininterval=2, leave=False,
                dynamic_ncols=True)


if __name__ == "__main__":
    from pipeline.data import DataError
    from pipeline.odir import SheetError

    try:
        main()
    except (DataError, SheetError, FileNotFoundError) as e:  # bad input: the message names the file, row, column
        sys.exit(f"error: {e}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

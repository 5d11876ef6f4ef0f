"""Issue 12's speed options: validation batching and its no-sync predict, regional compilation, the persistent
compile cache, the new flags, and the training-step benchmark's candidate rows with their logit differences."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from odir_dual.common.cli import UsageError
from odir_dual.training import config
from odir_dual.training import engine
from odir_dual.model.factory import build_model
from odir_dual.training.config import Config


def tiny_model(backbone="test_convnext"):
    torch.manual_seed(0)
    return build_model(Config(backbone=backbone, pretrained=False, embed_dim=32, heads=4, dropout=0.0))


# ----------------------------------------------------------------------------------------------- flags


def test_speed_flags_parse_and_bad_values_name_the_flag():
    cfg = config.parse_config(["--regional-compile", "--compile-mode", "max-autotune", "--eval-batch-size", "64"])
    assert (cfg.regional_compile, cfg.compile, cfg.compile_mode, cfg.eval_batch_size) == (True, True,
                                                                                           "max-autotune", 64)
    with pytest.raises(UsageError, match="--compile-mode"):
        config.parse_config(["--compile-mode", "fastest"])


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("n_rows, cfg, expected", [
    (525, Config(batch_size=96), 175),  # at most 192: 3 batches of 175 instead of 192 + 192 + 141
    (90, Config(batch_size=32), 45),  # the demo: 2 x 45 instead of 32 + 32 + 26
    (90, Config(batch_size=32, eval_batch_size=200), 90),
    (7, Config(batch_size=32), 7),
    (0, Config(batch_size=32), 1),
])
def test_eval_batch_is_large_and_evened_out(n_rows, cfg, expected):
    assert engine.eval_batch_pairs(n_rows, cfg) == expected


class _RowEcho(nn.Module):
    """Logits = the first 8 values of the left image: each pair says which row it is."""

    def forward(self, left, right):
        return left.flatten(1)[:, :8] * 1.0


def test_predict_puts_rows_in_table_order_and_drops_padding():
    n = 5
    batches = []
    for index in ([3, 0, 4], [1, 2, -1]):  # shuffled rows, then one padding pair (index -1)
        idx = torch.tensor(index)
        left = torch.stack([torch.full((3, 2, 4), float(i if i >= 0 else 99)) for i in index])
        batches.append((left, left, None, idx))
    out = engine.predict(_RowEcho(), batches, None, torch.device("cpu"), n)
    assert out.shape == (n, 8) and out.device.type == "cpu"
    assert torch.equal(out, torch.arange(n, dtype=torch.float32)[:, None].expand(n, 8))  # no 99 anywhere


# ----------------------------------------------------------------------------------------------- compilation


@pytest.mark.parametrize("backbone, block_names", [("test_convnext", {"ConvNeXtBlock"}),
                                                   ("test_resnet", {"BasicBlock", "Bottleneck"})])
def test_repeated_blocks_are_every_backbone_block(backbone, block_names):
    model = tiny_model(backbone)
    blocks = engine.repeated_blocks(model.backbone)
    expected = [m for m in model.backbone.modules() if type(m).__name__ in block_names]
    assert len(blocks) == len(expected) > 1 and all(any(b is m for m in expected) for b in blocks)


def test_compile_cache_is_kept_in_the_project_cache_unless_the_user_chose(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("ODIR_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    engine.persist_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what `import timm` leaves there
    engine.persist_compile_cache()
    assert cache_dir() == str(tmp_path / "torch-compile")  # where Inductor now writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    engine.persist_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


@pytest.mark.slow
def test_regional_compile_trains_like_eager_and_keeps_checkpoint_names(monkeypatch, tmp_path):
    monkeypatch.setenv("ODIR_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager, regional = tiny_model(), tiny_model()
    keys = list(regional.state_dict())
    cfg = Config(regional_compile=True, compile=True, precision="fp32", clip_grad=0.0)
    steppers = [engine.make_stepper(m, c, torch.device("cpu"), 1e-3, torch.ones(8))
                for m, c in ((eager, Config(precision="fp32", clip_grad=0.0)), (regional, cfg))]
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    labels = (torch.rand(2, 8, generator=g) < 0.5).float()
    (loss_e, logits_e), (loss_r, logits_r) = (s.step(left, right, labels, update=True) for s in steppers)
    torch.testing.assert_close(logits_r, logits_e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(regional(left, right), eager(left, right), atol=1e-5, rtol=1e-4)  # after the update
    assert list(regional.state_dict()) == keys  # no _orig_mod. prefixes: checkpoints load anywhere
    assert os.listdir(tmp_path / "torch-compile")  # the compile cache went to the project cache


# ----------------------------------------------------------------------------------------------- candidates


def test_depthwise_variants_compute_the_same_convolution():
    from benchmarks.candidates import apply_variant

    model = tiny_model().to(memory_format=torch.channels_last).eval()
    left, right = (torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last) for _ in range(2))
    for gamma in (p for n, p in model.named_parameters() if n.endswith("gamma")):
        gamma.data.fill_(0.5)  # timm's 1e-6 layer scale would hide any block's error from the logits
    with torch.no_grad():
        ref = model(left, right)
        for variant in ("dw_nchw", "dw_shift"):
            changed = apply_variant(copy.deepcopy(model), variant)
            torch.testing.assert_close(changed(left, right), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no layer"):
        apply_variant(tiny_model("test_resnet"), "dw_shift")


def test_master_weights_step_in_fp32_and_hand_bf16_weights_back():
    from benchmarks.candidates import MasterWeights

    masters = nn.Linear(4, 2)
    model = copy.deepcopy(masters).to(torch.bfloat16)
    opt = MasterWeights(torch.optim.SGD(masters.parameters(), lr=1e-3), model, masters)
    before = masters.weight.detach().clone()
    model(torch.ones(3, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(masters.weight, before)  # an fp32 update of 1e-3 x grad: lost if applied in bf16
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, masters.weight.to(torch.bfloat16))
    assert model.weight.grad is None


@pytest.mark.slow  # the benchmark's imports (DALI, onnxruntime for the header) and four rows: ~20 s idle
def test_candidate_rows_run_and_report_their_logit_difference(monkeypatch, tmp_path):
    import benchmarks.common
    from benchmarks import train_step

    monkeypatch.setattr(benchmarks.common, "RESULTS_DIR", tmp_path)
    rc = train_step.main(["--device", "cpu", "--rows", "fast_dw_shift,fast_nchw,fast_b128", "--img-px", "32",
                          "--steps", "1", "--warmup", "2", "--fast-batch", "3", "--results", "t", "--threads", "0"])
    rows = {r["key"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rc == 0 and list(rows) == ["fast", "fast_dw_shift", "fast_nchw", "fast_b128"]  # fast added first
    assert rows["fast"]["dlogit_first"] == 0.0 and rows["fast_b128"]["batch"] == 4
    for key in ("fast_dw_shift", "fast_nchw"):  # the same maths: tiny differences, also after the updates
        assert rows[key]["dlogit_first"] < 1e-4 and rows[key]["dlogit_after"] < 1e-4
    assert rows["fast_b128"]["dlogit_after"] is None  # another batch and lr: no comparable updates


def test_gpu_check_parses_and_its_budget_fits_8_minutes():
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    budget_s = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", text).group(1))
    kill_after_s = int(re.search(r"--kill-after=(\d+)", text).group(1))
    assert budget_s + kill_after_s <= 480  # every stage's limit is a slot of this budget (see slot())


# ----------------------------------------------------------------------------------------------- malloc

FAULTS_OF_FREED_BLOCKS = """
import resource, sys, torch
from odir_dual.pipeline.host import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(10):
    torch.ones(64 << 18)  # 64 MB: the heap grows until freed blocks coalesce into ones large enough to reuse
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 << 18)  # allocated, written and freed, as a training step's activations are
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or os.uname().sysname != "Linux", reason="glibc: Linux")
def test_train_py_reuses_freed_memory_instead_of_faulting_it_in_again():
    """train.py's process keeps freed blocks (pipeline/host.py): after a warm-up, 10 × 64 MB allocated, written and
    freed fault almost no pages in, where glibc's default unmaps each block and faults all 163,840 pages in again."""
    import subprocess
    import sys

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_FREED_BLOCKS, mode], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    (applied_default, default), (applied, kept) = faults("default"), faults("keep")
    assert applied and not applied_default
    assert default > 10 * (64 << 20) // 4096 * 0.9, default  # every page of every block, again
    assert kept < default / 50, (kept, default)

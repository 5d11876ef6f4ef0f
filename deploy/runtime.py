"""An exported ONNX model at run time: the onnxruntime session factory, the model's metadata, the batch runner.

Used by score.py (scoring folders) and export.py (checking every export against PyTorch). The CUDA provider is
only ever listed where a usable GPU is present, so machines without one see no provider warnings.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from odir_dual.common.errors import OdirError
from odir_dual.pipeline.constants import MAX_IMG_PX, MAX_PREPARE_PX
from odir_dual.pipeline.host import driver_gpu_count, usable_cores

ONNX_FORMAT = "odir-dual-onnx/1"  # metadata_props["format"] of every ONNX file export.py writes


class ModelFileError(OdirError, ValueError):
    """Not an ONNX model exported by export.py; the message names the file."""


class ProviderError(OdirError, ValueError):
    """An onnxruntime provider that cannot be used here (`--provider cuda` without a usable GPU)."""


def cuda_usable() -> bool:
    """A CUDA GPU is visible (to torch when installed, else to the CUDA driver) and this onnxruntime build has the
    CUDA provider. The light scoring install (no torch) asks the driver: onnxruntime-gpu lists its CUDA provider
    whether or not a GPU exists."""
    import onnxruntime as ort  # optional: comes with the [score] and [train] extras, not with the core install

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if has_torch():
        import torch  # optional: the light scoring install has no torch

        return torch.cuda.is_available()
    return driver_gpu_count() > 0


def has_torch() -> bool:
    """torch is installed (the full install); the light scoring install has no torch."""
    return importlib.util.find_spec("torch") is not None


def resolve_provider(provider: str = "auto") -> str:
    """auto → "cuda" when usable, else "cpu". Asking for cuda where it is not usable is an error."""
    if provider not in ("auto", "cpu", "cuda"):
        raise ProviderError(f"provider {provider!r}: choose auto, cpu or cuda")
    if provider == "cpu":
        return "cpu"
    usable = cuda_usable()
    if provider == "cuda" and not usable:
        raise ProviderError("--provider cuda: no CUDA GPU visible to torch, or onnxruntime has no CUDA provider")
    return "cuda" if usable else "cpu"


def session_options(threads: int | None = None):
    """Errors-only logging, all graph optimisations, one intra-op thread per usable core."""
    import onnxruntime as ort  # optional: as in cuda_usable

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or usable_cores()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def ort_session(path, providers=("CPUExecutionProvider",), threads: int | None = None):
    """The one place an onnxruntime session is made: errors-only logging, all graph optimisations."""
    import onnxruntime as ort  # optional: as in cuda_usable

    ort.set_default_logger_severity(3)  # errors only, also for messages emitted before the session exists
    return ort.InferenceSession(str(path), session_options(threads), providers=list(providers))


def load_session(path, provider: str = "auto", *, threads: int | None = None):
    """An onnxruntime session for one of our ONNX files, and its metadata.

    Args:
        path: an .onnx file written by export.py.
        provider: "auto" (CUDA when usable, else CPU), "cpu" or "cuda". The CUDA provider is never listed on a
            machine without a usable GPU, so onnxruntime prints no provider warnings there.
        threads: CPU intra-op threads (default: the usable cores).

    Returns:
        (session, meta, provider used). meta: classes (list), thresholds (np.ndarray), img_px, prepare_px, mean,
        std, input_dtype ("float32"/"float16"), backbone, commit, config (dict), raw (every metadata string),
        quality (`model_quality`: test figures; {} for older exports), untrusted ({class: why}),
        eye_thresholds (np.ndarray of the per-eye head, whose output eye_probs the model then has; None without).

    Raises:
        ModelFileError: missing, not ONNX, not exported by export.py, or its shapes or metadata do not fit
            (`check_model_shapes`).
    """
    import onnxruntime as ort  # optional: as in cuda_usable

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    ort.set_default_logger_severity(3)  # errors only, also for messages emitted before the session exists
    provider = resolve_provider(provider)
    if provider == "cuda" and has_torch():
        import torch  # optional; and loaded before the CUDA provider, so onnxruntime uses torch's CUDA/cuDNN libraries

        providers = [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
    elif provider == "cuda":  # light install: the CUDA/cuDNN wheels onnxruntime-gpu[cuda,cudnn] brought, if any
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort_session(path, providers, threads)
    except Exception as e:  # noqa: BLE001 - InvalidProtobuf, Fail, InvalidGraph, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = "; a training checkpoint? export it first: python export.py RUN/best.pt" if path.suffix == ".pt" else ""
        raise ModelFileError(f"{path}: not a loadable ONNX model ({first}){hint}") from None
    raw = dict(session.get_modelmeta().custom_metadata_map)
    if raw.get("format") != ONNX_FORMAT:
        raise ModelFileError(f"{path}: not an odir-dual ONNX model (metadata format {raw.get('format')!r}, expected "
                             f"{ONNX_FORMAT!r}); export a checkpoint with `python export.py RUN/best.pt`")
    meta = parse_metadata(raw, path)
    meta["untrusted"] = dict(meta["quality"].get("untrusted") or {})  # test figures, untrusted classes: model/trust.py
    inputs = {i.name: i.type for i in session.get_inputs()}
    if set(inputs) != {"left", "right"}:
        raise ModelFileError(f"{path}: expected inputs left, right; found {', '.join(inputs)}")
    meta["input_dtype"] = "float16" if inputs["left"] == "tensor(float16)" else "float32"
    check_model_shapes(session, meta, path)
    return session, meta, provider


def parse_metadata(raw: dict[str, str], path) -> dict:
    """The metadata strings export.py writes, parsed and checked by type before any work (a damaged or hand-edited
    file is one ModelFileError naming the field, never a TypeError after every pair was scored)."""
    def field(name: str, kind, check=lambda v: True, what: str = "", default=None):
        text = raw.get(name, default)
        if text is None:
            raise ModelFileError(f"{path}: odir-dual metadata without {name!r}; export the checkpoint again")
        try:
            value = json.loads(text) if kind is not str else text
        except ValueError:
            value = ValueError
        if value is ValueError or not isinstance(value, kind) or isinstance(value, bool) or not check(value):
            raise ModelFileError(f"{path}: metadata {name} = {text[:80]!r}; expected {what or kind.__name__}; "
                                 "export the checkpoint again with `python export.py RUN/best.pt`")
        return value

    def numbers(n: int | None):
        return lambda v: (n is None or len(v) == n) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in v)

    img_px = field("img_px", int, what="a whole number of pixels")
    return dict(
        classes=field("classes", list, lambda v: all(isinstance(c, str) for c in v), "a list of class names"),
        thresholds=np.asarray(field("thresholds", list, numbers(None), "a list of numbers"), np.float64),
        img_px=img_px, prepare_px=field("prepare_px", int, what="a whole number of pixels") if raw.get("prepare_px")
        else img_px,
        mean=tuple(field("mean", list, numbers(3), "a list of 3 numbers")),
        std=tuple(field("std", list, numbers(3), "a list of 3 numbers")),
        backbone=raw.get("backbone", ""), commit=raw.get("commit", ""),
        config=field("config", dict, what="a JSON object", default="{}"), raw=raw,
        quality=field("quality", dict, what="a JSON object", default="{}") if raw.get("quality") else {},
        eye_thresholds=np.asarray(field("eye_thresholds", list, numbers(None), "a list of numbers"), np.float64)
        if "eye_thresholds" in raw else None)


def check_model_shapes(session, meta: dict, path) -> None:
    """What score.py relies on, checked before any image is prepared: inputs left/right (N, 3, img_px, img_px)
    with a free batch N, outputs exactly probs and logits (N, K) (and eye_probs (N, 2, K) exactly when the metadata
    has per-eye thresholds), K thresholds in [0, 1] (per-eye too), 3 means, 3 stds > 0.

    Raises:
        ModelFileError: naming the file and the first thing that does not fit.
    """
    k, img_px = len(meta["classes"]), meta["img_px"]

    def fail(what: str):
        raise ModelFileError(f"{path}: {what}; export the checkpoint again with `python export.py RUN/best.pt`")

    if img_px < 1 or meta["prepare_px"] < 1:
        fail(f"img_px {img_px} / prepare_px {meta['prepare_px']} in the metadata: must be >= 1")
    if img_px > MAX_IMG_PX or meta["prepare_px"] > MAX_PREPARE_PX:
        fail(f"img_px {img_px} / prepare_px {meta['prepare_px']} in the metadata: at most {MAX_IMG_PX} / "
             f"{MAX_PREPARE_PX} px (a larger value is a damaged or crafted file, and would need gigabytes per image)")
    for i in session.get_inputs():
        shape = list(i.shape)
        if len(shape) != 4:
            fail(f"input {i.name} has shape {shape}, expected (N, 3, {img_px}, {img_px})")
        if isinstance(shape[0], int):
            fail(f"input {i.name} has a fixed batch of {shape[0]} (shape {shape}); score.py needs a free batch N")
        if shape[1] != 3 or any(isinstance(d, int) and d != img_px for d in shape[2:]):
            fail(f"input {i.name} has shape {shape}, but its metadata says (N, 3, {img_px}, {img_px})")
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    eyes = meta.get("eye_thresholds") is not None
    expected = ["probs", "logits", *(["eye_probs"] if eyes else [])]
    if list(outputs) != expected:
        fail(f"outputs {', '.join(outputs)}; expected exactly {', '.join(expected)}"
             + (" (the metadata has per-eye thresholds)" if eyes else ""))
    for name, shape in outputs.items():
        want = [2, k] if name == "eye_probs" else [k]
        if len(shape) != 1 + len(want) or isinstance(shape[0], int) or shape[1:] != want:
            fail(f"output {name} has shape {shape}, expected (N, {', '.join(map(str, want))}) for the {k} classes "
                 "of the metadata")
    for name in ("thresholds", "eye_thresholds") if eyes else ("thresholds",):
        thr = meta[name]
        if thr.shape != (k,) or not np.all((thr >= 0) & (thr <= 1)):
            fail(f"{thr.size} {name.replace('_', '-')} {thr.tolist()} in the metadata; expected {k} values in "
                 "[0, 1], one per class")
    for name in ("mean", "std"):
        values = np.asarray(meta[name], np.float64)
        if values.shape != (3,) or not np.all(np.isfinite(values)) or (name == "std" and not np.all(values > 0)):
            fail(f"{name} {list(meta[name])} in the metadata; expected 3 finite numbers (std > 0)")


class OrtRunner:
    """(left, right) batches (torch tensors or numpy arrays) → (probabilities (B, K), per-eye probabilities
    (B, 2, K) or None for a model without the per-eye head), numpy float32.

    CPU, or numpy batches: plain `session.run` on contiguous numpy copies. CUDA with torch tensors: I/O binding of
    the tensors' device memory (no host round trip), after a device synchronisation: DALI and torch write the buffers
    on their own streams (docs/DALI-NOTES.md: binding DALI buffers raced otherwise).
    """

    def __init__(self, session, provider: str):
        self.session, self.provider = session, provider
        self.np_dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.k = session.get_outputs()[0].shape[1]
        self.eyes = "eye_probs" in [o.name for o in session.get_outputs()]

    def __call__(self, left, right) -> tuple[np.ndarray, np.ndarray | None]:
        if self.provider == "cuda" and not isinstance(left, np.ndarray):
            return self._run_cuda(left, right)
        # numpy batches (the light loader) go through session.run on either provider: onnxruntime copies them
        feeds = {"left": np.ascontiguousarray(_host(left), dtype=self.np_dtype),
                 "right": np.ascontiguousarray(_host(right), dtype=self.np_dtype)}
        out = self.session.run(["probs", *(["eye_probs"] if self.eyes else [])], feeds)
        return out[0], (out[1] if self.eyes else None)

    def _run_cuda(self, left, right) -> tuple[np.ndarray, np.ndarray | None]:
        import torch  # optional: as in cuda_usable (only torch tensors come here)

        dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        device = torch.device("cuda", torch.cuda.current_device())
        # dense NCHW on the GPU (DALI hands out NHWC buffers viewed as channels_last)
        left = left.to(device=device, dtype=dtype).contiguous()
        right = right.to(device=device, dtype=dtype).contiguous()
        probs = torch.empty((left.shape[0], self.k), dtype=torch.float32, device=device)
        eye_probs = torch.empty((left.shape[0], 2, self.k), dtype=torch.float32, device=device) if self.eyes else None
        torch.cuda.synchronize(device)  # every producer stream is done before onnxruntime reads
        binding = self.session.io_binding()
        for name, t in (("left", left), ("right", right)):
            binding.bind_input(name, "cuda", device.index, self.np_dtype, tuple(t.shape), t.data_ptr())
        binding.bind_output("probs", "cuda", device.index, np.float32, tuple(probs.shape), probs.data_ptr())
        binding.bind_output("logits", "cuda", device.index)  # onnxruntime allocates it on the device
        if self.eyes:
            binding.bind_output("eye_probs", "cuda", device.index, np.float32, tuple(eye_probs.shape),
                                eye_probs.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return probs.cpu().numpy(), (eye_probs.cpu().numpy() if self.eyes else None)


def _host(batch) -> np.ndarray:
    """A numpy array of a numpy or torch batch (torch only imported by whoever made the tensor)."""
    return batch if isinstance(batch, np.ndarray) else batch.cpu().numpy()

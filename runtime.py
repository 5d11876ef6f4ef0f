"""An exported ONNX model at run time: the onnxruntime session factory, the model's metadata, the batch runner.

Used by score.py (scoring folders) and export.py (checking every export against PyTorch). The CUDA provider is
only ever listed where a usable GPU is present, so machines without one see no provider warnings.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.host import usable_cores

ONNX_FORMAT = "odir-dual-onnx/1"  # metadata_props["format"] of every ONNX file export.py writes


class ModelFileError(ValueError):
    """Not an ONNX model exported by export.py; the message names the file."""


def cuda_usable() -> bool:
    """torch sees a CUDA GPU and this onnxruntime build has the CUDA provider."""
    import torch
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_provider(provider: str = "auto") -> str:
    """auto → "cuda" when usable, else "cpu". Asking for cuda where it is not usable is an error."""
    if provider not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider {provider!r}: choose auto, cpu or cuda")
    if provider == "cpu":
        return "cpu"
    usable = cuda_usable()
    if provider == "cuda" and not usable:
        raise SystemExit("--provider cuda: no CUDA GPU visible to torch, or onnxruntime has no CUDA provider")
    return "cuda" if usable else "cpu"


def session_options(threads: int | None = None):
    """Errors-only logging, all graph optimisations, one intra-op thread per usable core."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or usable_cores()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def ort_session(path, providers=("CPUExecutionProvider",), threads: int | None = None):
    """The one place an onnxruntime session is made: errors-only logging, all graph optimisations."""
    import onnxruntime as ort

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
        std, input_dtype ("float32"/"float16"), backbone, commit, config (dict), raw (every metadata string).

    Raises:
        ModelFileError: missing, not ONNX, or not exported by export.py.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    ort.set_default_logger_severity(3)  # errors only, also for messages emitted before the session exists
    provider = resolve_provider(provider)
    if provider == "cuda":
        import torch  # loaded before the CUDA provider: onnxruntime then uses the CUDA/cuDNN libraries torch loaded

        providers = [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
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
    try:
        meta = dict(
            classes=json.loads(raw["classes"]), thresholds=np.asarray(json.loads(raw["thresholds"]), np.float64),
            img_px=int(raw["img_px"]), prepare_px=int(raw.get("prepare_px") or raw["img_px"]),
            mean=tuple(json.loads(raw["mean"])), std=tuple(json.loads(raw["std"])),
            backbone=raw.get("backbone", ""), commit=raw.get("commit", ""),
            config=json.loads(raw.get("config", "{}")), raw=raw,
        )
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: odir-dual metadata incomplete or malformed ({type(e).__name__}: {e})") from None
    inputs = {i.name: i.type for i in session.get_inputs()}
    if set(inputs) != {"left", "right"}:
        raise ModelFileError(f"{path}: expected inputs left, right; found {', '.join(inputs)}")
    meta["input_dtype"] = "float16" if inputs["left"] == "tensor(float16)" else "float32"
    return session, meta, provider


class OrtRunner:
    """(left, right) torch batches → probabilities (B, K) as numpy float32, on the session's device.

    CPU: plain `session.run` on contiguous numpy copies. CUDA: I/O binding of the torch tensors' device memory (no
    host round trip); the device is synchronised before binding, because DALI/torch write the buffers on their own
    streams and onnxruntime reads them on its stream (docs/DALI-NOTES.md: binding DALI buffers raced otherwise).
    """

    def __init__(self, session, provider: str):
        self.session, self.provider = session, provider
        self.np_dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        self.k = session.get_outputs()[0].shape[1]

    def __call__(self, left, right) -> np.ndarray:
        if self.provider == "cuda":
            return self._run_cuda(left, right)
        feeds = {"left": np.ascontiguousarray(left.cpu().numpy(), dtype=self.np_dtype),
                 "right": np.ascontiguousarray(right.cpu().numpy(), dtype=self.np_dtype)}
        return self.session.run(["probs"], feeds)[0]

    def _run_cuda(self, left, right) -> np.ndarray:
        import torch

        dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        device = torch.device("cuda", torch.cuda.current_device())
        # dense NCHW on the GPU (DALI hands out NHWC buffers viewed as channels_last)
        left = left.to(device=device, dtype=dtype).contiguous()
        right = right.to(device=device, dtype=dtype).contiguous()
        probs = torch.empty((left.shape[0], self.k), dtype=torch.float32, device=device)
        torch.cuda.synchronize(device)  # every producer stream is done before onnxruntime reads
        binding = self.session.io_binding()
        for name, t in (("left", left), ("right", right)):
            binding.bind_input(name, "cuda", device.index, self.np_dtype, tuple(t.shape), t.data_ptr())
        binding.bind_output("probs", "cuda", device.index, np.float32, tuple(probs.shape), probs.data_ptr())
        binding.bind_output("logits", "cuda", device.index)  # onnxruntime allocates it on the device
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return probs.cpu().numpy()

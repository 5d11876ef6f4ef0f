"""One patient's pair through an exported model, from Python: the library form of score.py for a single pair.

    from odir_dual.deploy.predict import load_model
    model = load_model("runs/NAME")                      # its best.onnx (or an .onnx file), onnxruntime
    result = model.predict("12_left.jpg", "12_right.jpg")  # paths, PIL images or (H, W, 3) uint8 arrays
    result["probabilities"]["D"], result["labels"]       # calibrated probabilities; the classes above threshold

The photographs are prepared exactly as score.py prepares them (fundus crop, resize: `pipeline.prepare`), then
decoded by `pipeline.light` (numpy + Pillow), so it runs in the light scoring install too.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from odir_dual.deploy.runtime import load_session
from odir_dual.model.eyes import findings
from odir_dual.model.trust import untrusted_lines
from odir_dual.pipeline.constants import EYES
from odir_dual.pipeline.prepare import BadImage, prepare_image


@dataclass
class Model:
    """An exported model ready for single pairs (`load_model`)."""

    session: object
    meta: dict  # load_session's: classes, thresholds, calibration applied, quality, untrusted
    provider: str
    path: Path

    def predict(self, left, right, *, tta: bool = False) -> dict:
        """One patient: {"probabilities": {class: p}, "labels": [classes above their threshold], "thresholds":
        {class: t}, "untrusted": {class: why} (model/trust.py: shown, never to be relied on), "notes": [lines]}.

        Args:
            left, right: the two eyes: a file path, a PIL image, or an (H, W, 3) uint8 RGB array each.
            tta: average with the horizontally flipped pair, as score.py --tta.

        Raises:
            pipeline.prepare.BadImage: an eye that is not a usable photograph (the message names the eye).
        """
        from odir_dual.score import score_pairs  # (score.py's batch runner: the same path as a folder takes)

        with tempfile.TemporaryDirectory(prefix="odir-predict-") as tmp:
            prepared = [_prepared(image, eye, Path(tmp), self.meta["prepare_px"])
                        for eye, image in (("left", left), ("right", right))]
            probs, eye_probs = score_pairs(self.session, self.meta, [prepared[0]], [prepared[1]],
                                           provider=self.provider, batch_size=1, tta=tta, progress=False, loader="pil")
        classes, thresholds, probs = list(self.meta["classes"]), self.meta["thresholds"], probs[0]
        out = {"probabilities": {c: float(p) for c, p in zip(classes, probs)},
               "labels": [c for c, p, t in zip(classes, probs, thresholds) if p > t],
               "thresholds": {c: float(t) for c, t in zip(classes, thresholds)},
               "untrusted": dict(self.meta["untrusted"]), "notes": untrusted_lines(self.meta["untrusted"])}
        if eye_probs is not None:  # the per-eye head: "findings" in words, per eye its probabilities (model/eyes.py)
            out.update(findings=findings(eye_probs[0] > self.meta["eye_thresholds"]),
                       eye_probabilities={e: {c: float(p) for c, p in zip(classes, eye_probs[0][i])}
                                          for i, e in enumerate(EYES)})
        return out


def load_model(path, provider: str = "cpu", threads: int | None = None) -> Model:
    """A run folder (its best.onnx) or an .onnx file written by export.py, in onnxruntime.

    Raises:
        deploy.runtime.ModelFileError: not such a model (the message names the file).
    """
    from odir_dual.score import resolve_model

    path = resolve_model(path)
    session, meta, provider = load_session(path, provider, threads=threads)
    return Model(session, meta, provider, Path(path))


def _prepared(image, eye: str, folder: Path, short_px: int) -> str:
    """The eye's photograph prepared (crop, resize) into `folder`; arrays and PIL images are saved first."""
    src = image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BadImage(f"{eye} eye: expected an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        src = folder / f"{eye}_input.png"
        image.convert("RGB").save(src)
    dst = folder / f"{eye}.jpg"
    try:
        prepare_image(src, dst, short_px)
    except BadImage as e:
        raise BadImage(f"{eye} eye: {e.reason}") from None
    return str(dst)

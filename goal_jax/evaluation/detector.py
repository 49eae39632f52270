"""The detection hook of the image metrics.

A detector is any callable ``(image uint8 [H, W, 3], labels: list[str]) -> list[Detection]``
where each detection's ``label`` is one of ``labels`` and its box is xyxy in [0, 1]
(fractions of the width / height). LayoutGPT scores NSR-1K images with GLIP (Swin-L,
threshold 0.7), which has no maintained open implementation in the transformers stack;
:class:`GroundingDinoDetector` uses GroundingDINO (``transformers``'
``GroundingDinoForObjectDetection``, e.g. a local copy of ``IDEA-Research/grounding-dino-base``)
as an open stand-in: an open-vocabulary grounded detector of the same family (text-prompted,
box + phrase outputs). Numbers are therefore comparable between our runs, not to the
paper's GLIP numbers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Detection:
    """label: one of the requested labels; score in [0, 1]; box: xyxy in [0, 1]."""

    label: str
    score: float
    box: tuple[float, float, float, float]


Detector = Callable[[np.ndarray, Sequence[str]], list[Detection]]


class GroundingDinoDetector:
    """GroundingDINO (transformers) as the detector hook.

    The text prompt is the labels joined as ``"a. b. c."`` (lowercase, GroundingDINO's
    format). For each query box: confidence = max over text tokens of sigmoid(logit) (as
    transformers' ``post_process_grounded_object_detection``); its label = the requested
    label whose tokens have the highest probability. A box is kept when its confidence
    exceeds ``box_threshold`` and its label's probability exceeds ``text_threshold``
    (GroundingDINO's two thresholds). Boxes come from ``pred_boxes`` (centre, size; relative)
    as xyxy in [0, 1].

    Args:
      folder: a local transformers GroundingDINO folder (config, weights, processor and
        tokenizer files).
      box_threshold, text_threshold: GroundingDINO's thresholds.
      device: torch device string.
    """

    def __init__(self, folder: str, box_threshold: float = 0.35, text_threshold: float = 0.25,
                 device: str = "cpu"):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"detector folder not found: {folder}")
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
            folder, local_files_only=True).to(device).eval()
        self.device = device
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.folder = folder

    def prompt(self, labels: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The text prompt and each label's character span in it."""
        text, spans = "", []
        for label in labels:
            name = " ".join(str(label).lower().split())
            spans.append((len(text), len(text) + len(name)))
            text += name + ". "
        return text.strip(), spans

    def __call__(self, image: np.ndarray, labels: Sequence[str]) -> list[Detection]:
        import torch
        from PIL import Image

        labels = [str(x) for x in labels]
        if not labels:
            return []
        text, spans = self.prompt(labels)
        inputs = self.processor(images=Image.fromarray(np.asarray(image, np.uint8)), text=text,
                                return_tensors="pt").to(self.device)
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) != inputs["input_ids"].shape[1]:
            raise RuntimeError("GroundingDINO processor and tokenizer disagree on the tokens")
        positions = [[i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b]
                     for a, b in spans]
        with torch.no_grad():
            outputs = self.model(**inputs)
        probs = torch.sigmoid(outputs.logits[0]).cpu().numpy()  # [queries, max_text_len]
        boxes = outputs.pred_boxes[0].cpu().numpy()  # [queries, 4] (cx, cy, w, h), relative
        confidence = probs.max(axis=-1)
        per_label = np.stack([probs[:, pos].max(axis=-1) if pos else np.zeros(len(probs))
                              for pos in positions], axis=-1)
        out = []
        for q in np.nonzero(confidence > self.box_threshold)[0]:
            k = int(per_label[q].argmax())
            if per_label[q, k] <= self.text_threshold:
                continue
            cx, cy, w, h = (float(v) for v in boxes[q])
            box = tuple(min(max(v, 0.0), 1.0)
                        for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            out.append(Detection(labels[k], float(confidence[q]), box))
        return out

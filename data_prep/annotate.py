"""Boxes for generated images: phrases of each prompt, grounded by GroundingDINO.

For every image of ``<work>/manifest.jsonl`` (generate_images.py):

1. Phrases: the prompt record's own ``phrases`` (prompts.py / coco_captions.py write them; each
   must occur in the prompt as whole words, case-insensitive), else the noun phrases of the
   prompt (``--extractor``: spaCy noun chunks when spaCy is installed, else the rule-based
   fallback documented in ``phrases.py``).
2. Detection: open-vocabulary detection with GroundingDINO through transformers
   (``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``; ``--model`` is a local folder or
   a hub id such as ``IDEA-Research/grounding-dino-base``). The text query is the phrases,
   lower-cased, joined as ``"a red car. a blue bench."``; each phrase's tokens are found from
   the tokenizer's character offsets.
3. Assignment: for query box q, ``box score = max`` of its token probabilities (sigmoid of the
   logits) over all phrase tokens; ``phrase score(q, p) = max`` over the tokens of phrase p.
   Box q is a candidate for p when ``box score > --box-threshold`` (0.35) and ``phrase score >
   --text-threshold`` (0.25). Each phrase gets its best candidate (highest phrase score); a
   phrase with a count n > 1 (``three apples``) gets up to n candidates, greedily, skipping
   boxes overlapping an already taken one by IoU > ``--nms-iou`` (0.5), each labelled with the
   phrase without its number word (``apples``). Phrases with no candidate (or fewer than their
   count) are reported, not guessed.

Output (in ``<work>``): ``annotations.jsonl`` in goal_jax's data format
(``goal_jax.data.format``: ``xyxy_pixels`` boxes of the stored image, ``caption`` = the
prompt, ``category``, ``source`` = where the prompt came from; extra keys ``score`` per box and
``missing_phrases`` per item), ``annotate_summary.json`` (counts, every phrase without a box) and
the review page ``review.html`` (review.py). Resumable: finished items are kept in
``annotations.jsonl`` as they are done and skipped on the next run with the same settings
(model, thresholds, extractor; recorded in ``annotate_settings.json``; other settings need
``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # python data_prep/annotate.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import common  # noqa: E402
from data_prep import phrases as phrases_lib  # noqa: E402
from data_prep.common import DataPrepError  # noqa: E402

ANNOTATIONS = "annotations.jsonl"
SETTINGS = "annotate_settings.json"
SUMMARY = "annotate_summary.json"
DEFAULT_MODEL = "IDEA-Research/grounding-dino-base"


# ----------------------------------------------------------------------------------------------
# Phrases.
# ----------------------------------------------------------------------------------------------


def item_phrases(prompt: str, given: Sequence[dict] | None, extractor: str = "auto"
                 ) -> tuple[list[phrases_lib.Phrase], list[dict]]:
    """The phrases to ground for one prompt -> (phrases, problems).

    ``given``: the record's ``[{"phrase", "count"}]`` or None (then extracted). A given phrase
    that does not occur in the prompt is a problem ``{"phrase", "reason"}`` and is skipped.
    """
    if not given:
        return phrases_lib.extract(prompt, extractor), []
    out, problems, pos = [], [], 0
    for entry in given:
        text = entry.get("phrase") if isinstance(entry, dict) else entry
        count = entry.get("count", 1) if isinstance(entry, dict) else 1
        if not isinstance(text, str) or not text.strip():
            problems.append({"phrase": str(text), "reason": "empty or not a string"})
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            problems.append({"phrase": text, "reason": f"count must be an integer >= 1, got {count!r}"})
            continue
        at = phrases_lib.find_phrase(prompt, text, pos)
        if at < 0:
            at = phrases_lib.find_phrase(prompt, text)
        if at < 0:
            problems.append({"phrase": text, "reason": "not in the prompt"})
            continue
        end = at + len(text.strip())
        exact = prompt[at:end]
        instance = exact
        first, _, rest = exact.partition(" ")
        if count > 1 and rest and (first.lower() in phrases_lib.NUMBER_WORDS or first.isdigit()):
            instance = rest
        out.append(phrases_lib.Phrase(exact, at, end, count, instance))
        pos = end
    return out, problems


# ----------------------------------------------------------------------------------------------
# Detection.
# ----------------------------------------------------------------------------------------------


def query_text(phrases: Sequence[phrases_lib.Phrase]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO text ``"p1. p2."`` (lower case, dots removed inside phrases) and each
    phrase's character span in it."""
    parts, spans, pos = [], [], 0
    for p in phrases:
        t = " ".join(p.text.replace(".", " ").lower().split())
        spans.append((pos, pos + len(t)))
        parts.append(t + ".")
        pos += len(t) + 2  # ". "
    return " ".join(parts), spans


def token_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]], input_ids: Sequence[int]
                ) -> list[list[int]]:
    """Token indices (in ``input_ids``) of each character span of ``text``."""
    enc = tokenizer(text, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(input_ids):
        raise DataPrepError("the tokenizer's ids differ from the processor's (cannot map phrases to tokens)")
    special = set(tokenizer.all_special_ids)
    out = []
    for s, e in spans:
        out.append([k for k, ((a, b), tid) in enumerate(zip(enc["offset_mapping"], enc["input_ids"]))
                    if tid not in special and b > a and a >= s and b <= e])
    return out


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assign_boxes(probs, boxes_xyxy, phrase_tokens: Sequence[Sequence[int]], counts: Sequence[int],
                 box_threshold: float, text_threshold: float, nms_iou: float = 0.5
                 ) -> list[list[tuple[int, float]]]:
    """Best boxes per phrase (module docstring, step 3).

    Args:
      probs: float array [Q, T] token probabilities of the Q query boxes.
      boxes_xyxy: float array [Q, 4] (any units; only used for IoU).
      phrase_tokens: token indices of each phrase (into T).
      counts: boxes wanted per phrase.

    Returns:
      per phrase, the chosen [(query index, phrase score)], best first (may be shorter than
      the count, or empty).
    """
    import numpy as np

    probs = np.asarray(probs, np.float64)
    all_tokens = sorted({t for toks in phrase_tokens for t in toks})
    if not all_tokens:
        return [[] for _ in phrase_tokens]
    box_score = probs[:, all_tokens].max(axis=1)
    out = []
    for toks, count in zip(phrase_tokens, counts):
        if not toks:
            out.append([])
            continue
        score = probs[:, list(toks)].max(axis=1)
        ok = np.nonzero((box_score > box_threshold) & (score > text_threshold))[0]
        order = sorted(ok.tolist(), key=lambda q: (-score[q], -box_score[q], q))
        chosen: list[tuple[int, float]] = []
        for q in order:
            if len(chosen) >= count:
                break
            if any(iou(boxes_xyxy[q], boxes_xyxy[c]) > nms_iou for c, _ in chosen):
                continue
            chosen.append((q, float(score[q])))
        out.append(chosen)
    return out


class Detector:
    """GroundingDINO from a folder or hub id, on ``device``."""

    def __init__(self, model: str, device: str | None = None):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise DataPrepError(f"cannot load GroundingDINO from {model!r}: {e}") from None
        self.tokenizer = self.processor.tokenizer
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def detect(self, image, phrases: Sequence[phrases_lib.Phrase]):
        """-> (probs [Q, T] numpy, boxes [Q, 4] xyxy pixels of ``image``, token spans)."""
        import numpy as np

        text, spans = query_text(phrases)
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_text_len:
            raise DataPrepError(f"query has {len(ids)} tokens, the model takes {self.max_text_len}")
        tokens = token_spans(self.tokenizer, text, spans, ids)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with self.torch.no_grad():
            out = self.model(**inputs)
        logits = out.logits[0, :, :len(ids)].float().cpu().numpy()
        probs = 1.0 / (1.0 + np.exp(-logits))
        cx, cy, w, h = out.pred_boxes[0].float().cpu().numpy().T
        width, height = image.size
        boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                          (cx + w / 2) * width, (cy + h / 2) * height], axis=1)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        return probs, boxes, tokens


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------


def annotate_item(detector, work: str, line: dict, box_threshold: float, text_threshold: float,
                  nms_iou: float, extractor: str) -> dict:
    """One manifest line -> one annotations.jsonl object (goal_jax data format + extras)."""
    from PIL import Image
    from goal_jax.data import format as fmt

    item_id, prompt = line["id"], line["prompt"]
    path = os.path.join(work, line["image"])
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as e:
        raise DataPrepError(f"item {item_id}: cannot read image {path} ({type(e).__name__}: {e})") from None
    phrases, missing = item_phrases(prompt, line.get("phrases"), extractor)
    out_phrases, out_boxes, scores = [], [], []
    if phrases:
        probs, boxes, tokens = detector.detect(image, phrases)
        chosen = assign_boxes(probs, boxes, tokens, [p.count for p in phrases],
                              box_threshold, text_threshold, nms_iou)
        for p, toks, picks in zip(phrases, tokens, chosen):
            if not toks:
                missing.append({"phrase": p.text, "reason": "no tokens in the query (truncated?)"})
                continue
            if len(picks) < p.count:
                reason = "no box above the thresholds" if not picks else \
                    f"{len(picks)} of {p.count} boxes above the thresholds"
                missing.append({"phrase": p.text, "reason": reason})
            for q, score in picks:
                out_phrases.append(p.instance or p.text)
                out_boxes.append([round(float(v), 2) for v in boxes[q]])
                scores.append(round(score, 4))
    category = line.get("category", "")
    record = fmt.Record(
        id=item_id, image=line["image"], caption=prompt, phrases=out_phrases, boxes=out_boxes,
        box_format="xyxy_pixels", category=category if category in fmt.CATEGORIES else "",
        source=line.get("prompt_source", "") or "")
    obj = record.to_json()
    for ann, score in zip(obj["annotations"], scores):
        ann["score"] = score
    obj["missing_phrases"] = missing
    obj["image_source"] = line.get("source", "")
    obj["width"], obj["height"] = image.size
    return obj


def annotate_folder(work: str, model: str, box_threshold: float = 0.35,
                    text_threshold: float = 0.25, nms_iou: float = 0.5, extractor: str = "auto",
                    device: str | None = None, overwrite: bool = False, show_progress: bool = True,
                    write_review_page: bool = True, detector=None) -> dict:
    """Annotates every image of ``<work>/manifest.jsonl``; returns the summary dict."""
    from goal_jax.data import format as fmt

    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold),
                        ("nms_iou", nms_iou)):
        if not 0.0 <= value <= 1.0:
            raise DataPrepError(f"{name} must be in [0, 1], got {value}")
    manifest_path = os.path.join(work, "manifest.jsonl")
    lines = list(common.Manifest(manifest_path).records.values()) if os.path.isfile(manifest_path) else None
    if lines is None:
        raise DataPrepError(f"no manifest.jsonl in {work} (run generate_images.py first)")
    for line in lines:
        for key in ("prompt", "image"):
            if not isinstance(line.get(key), str) or not line[key]:
                raise DataPrepError(f"manifest {manifest_path} item {line['id']}: missing '{key}'")
    settings = {"model": model, "box_threshold": box_threshold, "text_threshold": text_threshold,
                "nms_iou": nms_iou, "extractor": extractor}
    settings_path, out_path = os.path.join(work, SETTINGS), os.path.join(work, ANNOTATIONS)
    done: dict[str, dict] = {}
    if os.path.isfile(out_path) and not overwrite:
        old = {}
        if os.path.isfile(settings_path):
            with open(settings_path, encoding="utf-8") as f:
                old = json.load(f)
        if old != settings:
            raise DataPrepError(f"{out_path} was made with other settings ({old}); pass --overwrite "
                                "to annotate again with the new ones")
        done = {r["id"]: r for r in common.read_jsonl(out_path, "annotations file")
                if isinstance(r.get("id"), str)}
        common.write_jsonl(out_path, done.values())  # drops a line cut by an interruption
    elif os.path.isfile(out_path):
        os.remove(out_path)
    common.json_dump(settings, settings_path)
    todo = [line for line in lines if line["id"] not in done]
    if todo and detector is None:
        detector = Detector(model, device)
    errors = []
    bar = common.progress_bar(len(todo), "annotate", not show_progress)
    try:
        for line in todo:
            try:
                obj = annotate_item(detector, work, line, box_threshold, text_threshold, nms_iou, extractor)
            except DataPrepError as e:
                errors.append({"id": line["id"], "error": str(e)})
            else:
                common.append_jsonl(out_path, obj)
                done[obj["id"]] = obj
            bar.update(1)
    finally:
        bar.close()
    ordered = [done[line["id"]] for line in lines if line["id"] in done]
    common.write_jsonl(out_path, ordered)
    records, format_errors = fmt.read_annotations(out_path)
    summary = {
        "items": len(ordered), "annotated_this_run": len(todo) - len(errors),
        "boxes": sum(len(r["annotations"]) for r in ordered),
        "items_without_boxes": [r["id"] for r in ordered if not r["annotations"]],
        "phrases_without_box": [dict(m, id=r["id"]) for r in ordered for m in r["missing_phrases"]],
        "errors": errors, "format_errors": format_errors, "settings": settings,
    }
    common.json_dump(summary, os.path.join(work, SUMMARY))
    if write_review_page:
        from data_prep import review

        review.write_page(work)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.annotate", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", help="folder of generate_images.py (manifest.jsonl, images/)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="GroundingDINO folder or hub id (default: %(default)s)")
    p.add_argument("--box-threshold", type=float, default=0.35,
                   help="min box score (max token probability) of a candidate (default: %(default)s)")
    p.add_argument("--text-threshold", type=float, default=0.25,
                   help="min probability of the phrase's tokens for the box (default: %(default)s)")
    p.add_argument("--nms-iou", type=float, default=0.5,
                   help="boxes of one counted phrase overlap at most this IoU (default: %(default)s)")
    p.add_argument("--extractor", choices=("auto", "spacy", "rules"), default="auto",
                   help="phrase extractor for records without phrases (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="annotate everything again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = annotate_folder(args.work, args.model, args.box_threshold, args.text_threshold,
                                  args.nms_iou, args.extractor, args.device, args.overwrite,
                                  not args.quiet)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume.", file=sys.stderr)
        return 130
    print(f"{summary['items']} items, {summary['boxes']} boxes; "
          f"{len(summary['phrases_without_box'])} phrases without a box, "
          f"{len(summary['items_without_boxes'])} items without any box, "
          f"{len(summary['errors'])} errors (details: {os.path.join(args.work, SUMMARY)})")
    print(f"review page: {os.path.join(args.work, 'review.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

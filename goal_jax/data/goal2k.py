"""The ``goal2k`` tensorflow-datasets builder: a format-1 folder -> TFDS ArrayRecord files.

Source: a folder in the on-disk format of docs/data_format.md (``annotations.jsonl`` and
optionally ``annotations_val.jsonl``; or a ``"split": "val"`` field per line). It is given as
the TFDS manual dir (``DownloadConfig(manual_dir=...)``) or as ``Goal2kConfig(source_dir=...)``.

Files: ArrayRecord (``file_format="array_record"``, version 1.1.0), so a split is a random-access
source (:func:`data_source`, ``tfds.data_source``) that the streaming pipeline (pipeline.py, grain)
reads item by item. Version 1.0.0 builds (TFRecord files, read whole into memory by the earlier
pipeline) are not read: :func:`data_source` names the old folder and how to rebuild.

Features of every example (``disable_shuffling``: examples keep the source order):
  id        Text   the item id (annotation ``id`` or ``"line <n>"``)
  image     Image  uint8 [H, W, 3], PNG-encoded (lossless: pixels equal the decoded source)
  caption   Text
  phrases   Sequence(Text) [N]
  boxes     float32 [N, 4]   xyxy = [x0, y0, x1, y1] (left, top, right, bottom) in [0, 1]
  category  Text   ("" when absent)
  source    Text   ("" when absent)

Validation while building (rules in format.clean_annotations): items whose JSON line is
malformed, whose image is missing or cannot be decoded, or that keep no box are dropped; boxes
overshooting by < 1 px are clamped; out-of-bounds (>= 1 px), degenerate (< 1 px side) and
empty-phrase boxes are dropped; more than 30 boxes keep the 30 largest. Everything dropped or
clamped is listed by id in the build summary, logged and written as ``build_summary.json``
into the dataset version folder. No good item in a split -> ``DatasetBuildError``.

The build is keyed by its source: ``source.json`` in the version folder records the source
folder's absolute path and a content fingerprint (:func:`source_fingerprint`). Building into a
data dir that already holds a goal2k built from another folder, or from this folder before its
content changed, raises :class:`SourceChangedError` instead of reusing the stale build.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from goal_jax.data import format as fmt

logger = logging.getLogger(__name__)

SUMMARY_FILE = "build_summary.json"
FILE_FORMAT = "array_record"  # random access (tfds.data_source); TFDS's default is TFRecord
SOURCE_FILE = "source.json"


class DatasetBuildError(ValueError):
    """The source folder yields no usable item (or is not a dataset folder)."""


class SourceChangedError(ValueError):
    """The data dir holds a goal2k build of another source (or of an older content)."""


def source_fingerprint(source_dir: str) -> str:
    """sha256 (hex) of the annotation files' bytes and of every other file's relative path and
    size in ``source_dir``: changes when an annotation, an image name or an image size changes."""
    import hashlib

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(source_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, source_dir).replace(os.sep, "/")
            digest.update(rel.encode() + b"\0")
            if name in (fmt.ANNOTATIONS_FILE, fmt.VAL_ANNOTATIONS_FILE):
                with open(path, "rb") as f:
                    digest.update(f.read())
            else:
                digest.update(str(os.path.getsize(path)).encode())
            digest.update(b"\0")
    return digest.hexdigest()


def check_source(builder: "Goal2k", source_dir: str, fingerprint: str) -> None:
    """Raises SourceChangedError unless the prepared ``builder`` was built from ``source_dir``
    with this content (``source.json``; builds without it are compared by path only)."""
    version_dir = os.fspath(builder.data_dir)
    want = {"source_dir": os.path.abspath(source_dir), "fingerprint": fingerprint}
    path = os.path.join(version_dir, SOURCE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
    else:
        with open(os.path.join(version_dir, SUMMARY_FILE), encoding="utf-8") as f:
            have = {"source_dir": json.load(f).get("source_dir"), "fingerprint": fingerprint}
    if have != want:
        what = ("another folder" if have.get("source_dir") != want["source_dir"]
                else "this folder before its content changed")
        raise SourceChangedError(
            f"{version_dir} holds goal2k built from {what} ({have.get('source_dir')}, "
            f"fingerprint {str(have.get('fingerprint'))[:12]}); the source is now "
            f"{want['source_dir']} (fingerprint {fingerprint[:12]}). Delete {version_dir} to "
            "rebuild it, or build into another data dir")


@dataclasses.dataclass
class Goal2kConfig(tfds.core.BuilderConfig):
    """``source_dir``: the format-1 folder; when None the TFDS manual dir is used.

    A config with a source_dir needs its own name (e.g. ``Goal2kConfig(name="mydata",
    source_dir=...)``): TFDS refuses a custom config named like the built-in "default"."""

    source_dir: str | None = None


def decode_image(path: str) -> np.ndarray:
    """Reads an image file -> uint8 [H, W, 3] (grey / RGBA / palette converted to RGB).

    Raises:
      FileNotFoundError: the file is missing; OSError/ValueError: it cannot be decoded.
    """
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def validate_split(source_dir: str, records: list[fmt.Record], max_boxes: int = fmt.MAX_BOXES
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Checks images and boxes of one split's records.

    Returns:
      (good, report): good = [{"record", "phrases", "boxes"}] in source order; report =
      {"dropped_items": [{"id", "reason"}], "dropped_boxes": [{"id", "index", "phrase", "box",
      "reason"}], "clamped_boxes": [{"id", "index", "box"}]}.
    """
    good, dropped_items, dropped_boxes, clamped_boxes = [], [], [], []
    for rec in records:
        path = os.path.join(source_dir, rec.image)
        if not os.path.isfile(path):
            dropped_items.append({"id": rec.id, "reason": f"missing image {rec.image}"})
            continue
        try:
            pixels = decode_image(path)
        except Exception as e:  # PIL raises several types for broken files
            dropped_items.append({"id": rec.id, "reason": f"undecodable image {rec.image} ({type(e).__name__}: {e})"})
            continue
        height, width = pixels.shape[:2]
        phrases, boxes, dropped, clamped = fmt.clean_annotations(rec, width, height, max_boxes)
        dropped_boxes += [dict(id=rec.id, **d) for d in dropped]
        clamped_boxes += [dict(id=rec.id, **c) for c in clamped]
        if not boxes:
            dropped_items.append({"id": rec.id, "reason": "no valid box left"})
            continue
        good.append({"record": rec, "phrases": phrases, "boxes": boxes})
    return good, {"dropped_items": dropped_items, "dropped_boxes": dropped_boxes,
                  "clamped_boxes": clamped_boxes}


def _count(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Counts by reason, with numbers stripped ("out of bounds by 3 px" -> "out of bounds")."""
    counter = collections.Counter()
    for e in entries:
        reason = e["reason"]
        key = reason.split(" (")[0].split(" by ")[0]
        if key.startswith("missing image"):
            key = "missing image"
        elif key.startswith("undecodable image"):
            key = "undecodable image"
        elif key.startswith("over max_boxes"):
            key = "over max_boxes"
        elif key.startswith("duplicate id"):
            key = "duplicate id"
        elif key.startswith("malformed JSON"):
            key = "malformed JSON"
        counter[key] += 1
    return dict(sorted(counter.items()))


def scan_source(source_dir: str, max_boxes: int = fmt.MAX_BOXES
                ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Reads and validates a whole format-1 folder -> (good items per split, build summary).

    Raises:
      DatasetBuildError: no annotations file, or a split with lines but no good item.
    """
    main = os.path.join(source_dir, fmt.ANNOTATIONS_FILE)
    val = os.path.join(source_dir, fmt.VAL_ANNOTATIONS_FILE)
    if not os.path.isfile(main):
        raise DatasetBuildError(f"{source_dir} is not a goal2k source folder: {fmt.ANNOTATIONS_FILE} not found")
    records, errors = fmt.read_annotations(main)
    for e in errors:
        e["file"] = fmt.ANNOTATIONS_FILE
    if os.path.isfile(val):
        val_records, val_errors = fmt.read_annotations(val, default_split="val")
        for e in val_errors:
            e["file"] = fmt.VAL_ANNOTATIONS_FILE
        ids = {r.id for r in records}
        for r in val_records:
            if r.id in ids:
                val_errors.append({"id": r.id, "reason": "duplicate id (also in annotations.jsonl)",
                                   "file": fmt.VAL_ANNOTATIONS_FILE})
        records += [r for r in val_records if r.id not in ids]
        errors += val_errors
    summary: dict[str, Any] = {"source_dir": os.path.abspath(source_dir), "max_boxes": max_boxes,
                               "unreadable_lines": errors, "splits": {}}
    good_by_split: dict[str, list[dict[str, Any]]] = {}
    for split in fmt.SPLITS:
        split_records = [r for r in records if r.split == split]
        if not split_records:
            continue
        good, report = validate_split(source_dir, split_records, max_boxes)
        good_by_split[split] = good
        summary["splits"][split] = {
            "items_read": len(split_records),
            "items_kept": len(good),
            "boxes_kept": sum(len(g["boxes"]) for g in good),
            "items_dropped_by_reason": _count(report["dropped_items"]),
            "boxes_dropped_by_reason": _count(report["dropped_boxes"]),
            "boxes_clamped": len(report["clamped_boxes"]),
            **report,
        }
    summary["unreadable_lines_by_reason"] = _count(errors)
    summary["items_kept"] = sum(len(g) for g in good_by_split.values())
    summary["items_dropped"] = len(errors) + sum(
        len(s["dropped_items"]) for s in summary["splits"].values())
    summary["boxes_dropped"] = sum(len(s["dropped_boxes"]) for s in summary["splits"].values())
    empty = [s for s, g in good_by_split.items() if not g]
    if not good_by_split or empty or "train" not in good_by_split:
        where = ", ".join(empty) if empty else "train"
        reasons = {**summary["unreadable_lines_by_reason"]}
        for s in summary["splits"].values():
            for k, v in s["items_dropped_by_reason"].items():
                reasons[k] = reasons.get(k, 0) + v
        raise DatasetBuildError(
            f"goal2k: no good item in split {where} of {source_dir} "
            f"({summary['items_dropped']} items dropped: {reasons}); see the listed ids: "
            + json.dumps([*errors, *[d for s in summary['splits'].values() for d in s['dropped_items']]][:20]))
    return good_by_split, summary


class Goal2k(tfds.core.GeneratorBasedBuilder):
    """GOAL2K-style layout dataset (image, caption, phrases, normalized xyxy boxes)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (TFRecord files).",
                     "1.1.0": "ArrayRecord files: random access for the streaming pipeline."}
    BUILDER_CONFIGS = [Goal2kConfig(name="default", description="format-1 folder from manual_dir or source_dir")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place a folder in the goal_jax on-disk format (annotations.jsonl + images, see "
        "docs/data_format.md) as the manual dir, or pass Goal2kConfig(source_dir=...).")

    def __init__(self, *args, max_boxes: int = fmt.MAX_BOXES, **kwargs):
        self._max_boxes = max_boxes
        self.build_summary: dict[str, Any] | None = None
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "phrases": tfds.features.Sequence(tfds.features.Text()),
                "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "category": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
            disable_shuffling=True,
            homepage="https://github.com/",
        )

    def _source_dir(self, dl_manager) -> str:
        config_dir = getattr(self.builder_config, "source_dir", None)
        if config_dir:
            return os.fspath(config_dir)
        return os.fspath(dl_manager.manual_dir)

    def _split_generators(self, dl_manager):
        source_dir = self._source_dir(dl_manager)
        good, summary = scan_source(source_dir, self._max_boxes)
        self.build_summary = summary
        logger.info("goal2k build summary: %s", json.dumps(
            {k: v for k, v in summary.items() if k != "splits"} | {
                s: {k: v for k, v in d.items() if not isinstance(v, list)}
                for s, d in summary["splits"].items()}))
        for split in summary["splits"].values():
            for d in split["dropped_items"] + split["dropped_boxes"]:
                logger.warning("goal2k: dropped %s", d)
        for e in summary["unreadable_lines"]:
            logger.warning("goal2k: dropped %s", e)
        return {split: self._generate_examples(source_dir, items) for split, items in good.items()}

    def _generate_examples(self, source_dir, items):
        for k, item in enumerate(items):
            rec = item["record"]
            yield k, {
                "id": rec.id,
                "image": decode_image(os.path.join(source_dir, rec.image)),
                "caption": rec.caption,
                "phrases": item["phrases"],
                "boxes": np.asarray(item["boxes"], np.float32).reshape(-1, 4),
                "category": rec.category,
                "source": rec.source,
            }

    def download_and_prepare(self, *args, **kwargs):
        """TFDS preparation, then ``build_summary.json`` written next to the dataset files."""
        super().download_and_prepare(*args, **kwargs)
        if self.build_summary is not None:
            with open(os.path.join(os.fspath(self.data_dir), SUMMARY_FILE), "w", encoding="utf-8") as f:
                json.dump(self.build_summary, f, indent=1)


def build_goal2k(source_folder: str, data_dir: str, max_boxes: int = fmt.MAX_BOXES
                 ) -> tuple[Goal2k, dict[str, Any]]:
    """Builds (or reuses, if already prepared from the same source) the goal2k TFDS dataset of
    ``source_folder``; raises SourceChangedError when ``data_dir`` holds a build of another
    source or of an older content of this one.

    Returns:
      (builder, summary): the prepared builder (``builder.as_data_source("train")``, or
      :func:`data_source`) and the build summary (read back from ``build_summary.json`` when
      the dataset already existed).
    """
    source_folder, data_dir = os.path.expanduser(source_folder), os.path.expanduser(data_dir)
    if not os.path.isdir(source_folder):
        raise DatasetBuildError(f"goal2k source folder not found: {source_folder}")
    fingerprint = source_fingerprint(source_folder)
    builder = Goal2k(data_dir=data_dir, max_boxes=max_boxes)
    if builder.is_prepared():
        check_source(builder, source_folder, fingerprint)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_folder))
    record = os.path.join(os.fspath(builder.data_dir), SOURCE_FILE)
    if not os.path.isfile(record):
        with open(record, "w", encoding="utf-8") as f:
            json.dump({"source_dir": os.path.abspath(source_folder),
                       "fingerprint": fingerprint}, f, indent=1)
    summary = builder.build_summary
    if summary is None:
        with open(os.path.join(os.fspath(builder.data_dir), SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    return builder, summary


def data_source(data_dir: str, split: str = "train"):
    """The random-access source of one split of the goal2k built in ``data_dir``.

    Returns:
      a ``tfds`` ``ArrayRecordDataSource``: ``len(src)`` items, ``src[i]`` (and
      ``src.__getitems__(indices)``) -> {"id", "caption", "category", "source": bytes,
      "image": bytes (the stored PNG, not decoded), "phrases": list[bytes] [N],
      "boxes": float32 [N, 4]}. Opening reads only the dataset info, not the items.

    Raises:
      ValueError: no goal2k of this version in ``data_dir`` (naming an older build found there
        and how to rebuild it), a build not in ArrayRecord files, or no such split.
    """
    data_dir = os.path.expanduser(data_dir)
    builder = Goal2k(data_dir=data_dir)
    if not builder.is_prepared():
        raise ValueError(_not_prepared_message(data_dir, builder))
    if split not in builder.info.splits:
        raise ValueError(f"goal2k dataset in {data_dir} has no split {split!r} "
                         f"(it has {sorted(builder.info.splits)})")
    formats = {f.value for f in builder.info.available_file_formats()}
    if FILE_FORMAT not in formats:
        raise ValueError(
            f"goal2k in {builder.data_dir} is stored as {sorted(formats)}, not {FILE_FORMAT}; "
            f"the streaming pipeline needs random access. Delete {builder.data_dir} and rebuild "
            "with goal2k.build_goal2k(source_folder, data_dir) (or config field data.source)")
    return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()},
                                  file_format=FILE_FORMAT)


def _not_prepared_message(data_dir: str, builder: Goal2k) -> str:
    version_root = os.path.dirname(os.fspath(builder.data_dir))
    older = sorted(v for v in (os.listdir(version_root) if os.path.isdir(version_root) else [])
                   if v != str(Goal2k.VERSION)
                   and os.path.isfile(os.path.join(version_root, v, "dataset_info.json")))
    if not older:
        return (f"no prepared goal2k dataset in {data_dir} (expected {builder.data_dir}); build "
                "it with goal2k.build_goal2k(source_folder, data_dir) or pass source_dir=")
    old = os.path.join(version_root, older[-1])
    source = ""
    if os.path.isfile(os.path.join(old, SOURCE_FILE)):
        with open(os.path.join(old, SOURCE_FILE), encoding="utf-8") as f:
            source = f" (built from {json.load(f).get('source_dir')})"
    return (f"{data_dir} holds goal2k version {older[-1]} only, in {old}{source}: TFRecord "
            f"files of the earlier in-memory pipeline. The streaming pipeline reads version "
            f"{Goal2k.VERSION} (ArrayRecord). Rebuild it from its source folder with "
            "goal2k.build_goal2k(source_folder, data_dir), or set config field data.source "
            f"(the training program then builds it); {old} can be deleted afterwards")

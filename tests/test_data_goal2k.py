"""On-disk format, goal2k TFDS builder and synthetic shapes dataset."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from goal_jax.data import format as fmt
from goal_jax.data import goal2k, shapes


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _as_numpy(builder, split):
    """Every example of a split, decoded (image uint8 [H, W, 3]), from the ArrayRecord files."""
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_build_shapes_dataset_reads_back_equal_to_source(tmp_path):
    src, data_dir = str(tmp_path / "src"), str(tmp_path / "tfds")
    shapes.write_shapes_dataset(src, num_items=12, resolution=64, seed=3, val_items=3)
    builder, summary = goal2k.build_goal2k(src, data_dir)
    assert summary["items_kept"] == 15 and summary["items_dropped"] == 0
    assert summary["boxes_dropped"] == 0
    assert os.path.isfile(os.path.join(builder.data_dir, goal2k.SUMMARY_FILE))
    # ArrayRecord files (random access for the streaming pipeline), version 1.1.0
    assert builder.info.file_format.value == "array_record" and str(builder.version) == "1.1.0"
    assert sorted(f for f in os.listdir(builder.data_dir) if ".array_record-" in f) == [
        "goal2k-train.array_record-00000-of-00001", "goal2k-val.array_record-00000-of-00001"]
    for split, file in (("train", fmt.ANNOTATIONS_FILE), ("val", fmt.VAL_ANNOTATIONS_FILE)):
        source = _read_jsonl(os.path.join(src, file))
        built = _as_numpy(builder, split)
        assert len(built) == len(source) == {"train": 12, "val": 3}[split]
        for ex, rec in zip(built, source):
            assert ex["id"].decode() == rec["id"]
            assert ex["caption"].decode() == rec["caption"]
            assert ex["category"].decode() == rec["category"]
            assert ex["source"].decode() == "template"
            assert [p.decode() for p in ex["phrases"]] == [a["phrase"] for a in rec["annotations"]]
            expected = np.array([a["box"] for a in rec["annotations"]], np.float32) / 64.0
            np.testing.assert_allclose(ex["boxes"], expected, rtol=0, atol=1e-7)
            pixels = np.asarray(Image.open(os.path.join(src, rec["image"])).convert("RGB"))
            np.testing.assert_array_equal(ex["image"], pixels)
    # A second build call reuses the prepared dataset and its written summary.
    _, again = goal2k.build_goal2k(src, data_dir)
    assert again == json.loads(json.dumps(summary))


def _write_png(folder, name, size=(32, 32), color=(200, 10, 10)):
    path = os.path.join(folder, name)
    Image.new("RGB", size, color).save(path)
    return name


def test_bad_inputs_are_counted_and_listed_by_id(tmp_path):
    src = tmp_path / "bad"
    (src / "img").mkdir(parents=True)
    s = str(src)
    good = _write_png(s, "img/good.png")
    with open(src / "img" / "broken.png", "wb") as f:
        f.write(b"not an image at all")
    ok_box = {"phrase": "a red square", "box": [4, 4, 20, 20]}
    lines = [
        {"id": "good", "image": good, "caption": "a red square", "box_format": "xyxy_pixels",
         "annotations": [ok_box, {"phrase": "a cat", "box": [-0.5, 2, 32.4, 10]}]},
        {"id": "missing", "image": "img/nothere.png", "caption": "a cat", "box_format": "xyxy_pixels",
         "annotations": [ok_box]},
        {"id": "broken", "image": "img/broken.png", "caption": "a cat", "box_format": "xyxy_pixels",
         "annotations": [ok_box]},
        {"id": "oob", "image": good, "caption": "a cat", "box_format": "xyxy_normalized",
         "annotations": [{"phrase": "a cat", "box": [0.5, 0.5, 1.2, 0.9]},
                         {"phrase": "a dog", "box": [0.1, 0.1, 0.5, 0.5]}]},
        {"id": "zero", "image": good, "caption": "a cat", "box_format": "xyxy_pixels",
         "annotations": [{"phrase": "a cat", "box": [5, 5, 5, 20]}, ok_box]},
        {"id": "emptyphrase", "image": good, "caption": "a cat", "box_format": "xyxy_pixels",
         "annotations": [ok_box, {"phrase": "  ", "box": [1, 1, 9, 9]}]},
        None,  # malformed JSON line (line 7)
        {"id": "many", "image": good, "caption": "many cats", "box_format": "xyxy_pixels",
         "annotations": [{"phrase": f"cat {i}", "box": [0, 0, 1 + i * 0.5, 8]} for i in range(40)]},
        {"id": "nobox", "image": good, "caption": "a cat", "box_format": "xyxy_pixels",
         "annotations": [{"phrase": "a cat", "box": [3, 3, 2, 9]}]},
    ]
    with open(src / fmt.ANNOTATIONS_FILE, "w") as f:
        for obj in lines:
            f.write("{\"id\": \"x\", broken\n" if obj is None else json.dumps(obj) + "\n")
    builder, summary = goal2k.build_goal2k(s, str(tmp_path / "tfds"))
    train = summary["splits"]["train"]
    dropped_items = {d["id"]: d["reason"] for d in train["dropped_items"]}
    assert dropped_items["missing"].startswith("missing image img/nothere.png")
    assert dropped_items["broken"].startswith("undecodable image img/broken.png")
    assert dropped_items["nobox"] == "no valid box left"
    assert summary["unreadable_lines"][0]["id"] == "line 7"
    assert summary["unreadable_lines"][0]["reason"].startswith("malformed JSON")
    assert summary["items_dropped"] == 4
    boxes = [(d["id"], d["index"], d["reason"].split(" (")[0].split(" by ")[0]) for d in train["dropped_boxes"]]
    assert ("oob", 0, "out of bounds") in boxes
    assert ("zero", 0, "degenerate") in boxes
    assert ("emptyphrase", 1, "empty phrase") in boxes
    assert ("nobox", 0, "degenerate") in boxes
    many = sorted(i for (k, i, r) in boxes if k == "many")
    assert many == list(range(10)) and all(r == "over max_boxes=30" for (k, _, r) in boxes if k == "many")
    assert train["boxes_dropped_by_reason"] == {
        "degenerate": 2, "empty phrase": 1, "out of bounds": 1, "over max_boxes": 10}
    assert train["items_dropped_by_reason"] == {
        "missing image": 1, "no valid box left": 1, "undecodable image": 1}
    assert [(c["id"], c["index"]) for c in train["clamped_boxes"]] == [("good", 1)]
    with open(os.path.join(builder.data_dir, goal2k.SUMMARY_FILE)) as f:
        assert json.load(f)["items_dropped"] == 4

    built = {ex["id"].decode(): ex for ex in _as_numpy(builder, "train")}
    assert sorted(built) == ["emptyphrase", "good", "many", "oob", "zero"]
    np.testing.assert_allclose(built["good"]["boxes"][1], [0, 2 / 32, 1, 10 / 32], atol=1e-7)
    np.testing.assert_allclose(built["oob"]["boxes"], [[0.1, 0.1, 0.5, 0.5]], atol=1e-7)
    assert [p.decode() for p in built["many"]["phrases"]] == [f"cat {i}" for i in range(10, 40)]
    assert built["zero"]["boxes"].shape == (1, 4)


def test_dataset_without_good_item_fails_clearly(tmp_path):
    src = tmp_path / "allbad"
    src.mkdir()
    with open(src / fmt.ANNOTATIONS_FILE, "w") as f:
        f.write(json.dumps({"id": "a1", "image": "gone.png", "caption": "a cat",
                            "box_format": "xyxy_pixels",
                            "annotations": [{"phrase": "a cat", "box": [0, 0, 4, 4]}]}) + "\n")
        f.write("not json\n")
    with pytest.raises(goal2k.DatasetBuildError, match=r"no good item in split train") as e:
        goal2k.build_goal2k(str(src), str(tmp_path / "tfds"))
    assert "a1" in str(e.value) and "line 2" in str(e.value) and "missing image" in str(e.value)
    with pytest.raises(goal2k.DatasetBuildError, match="annotations.jsonl not found"):
        goal2k.build_goal2k(str(tmp_path), str(tmp_path / "tfds2"))


def test_parse_record_errors_name_the_item():
    base = {"id": "k9", "image": "a.png", "caption": "a cat", "box_format": "xyxy_pixels",
            "annotations": [{"phrase": "a cat", "box": [0, 0, 1, 1]}]}
    cases = [
        ({"box_format": "xywh"}, "item k9: 'box_format' must be one of"),
        ({"caption": ""}, "item k9: 'caption' must be a non-empty string"),
        ({"annotations": [{"phrase": "a", "box": [0, 0, 1]}]}, "item k9: annotation 0 'box' must be 4 numbers"),
        ({"category": "colour"}, "item k9: 'category' must be one of"),
        ({"image": "/abs.png"}, "item k9: 'image' must be relative"),
        ({"split": "test"}, "item k9: 'split' must be one of"),
    ]
    for change, message in cases:
        with pytest.raises(fmt.DataFormatError, match=message):
            fmt.parse_record({**base, **change}, 1)
    rec = fmt.parse_record({k: v for k, v in base.items() if k != "id"}, 12)
    assert rec.id == "line 12" and rec.split == "train" and rec.category == ""


def test_shapes_dataset_is_deterministic_and_boxes_are_tight(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    shapes.write_shapes_dataset(a, 13, resolution=64, seed=5, val_items=2)
    shapes.write_shapes_dataset(b, 13, resolution=64, seed=5, val_items=2)
    shapes.write_shapes_dataset(c, 13, resolution=64, seed=6, val_items=2)
    files = sorted(os.path.relpath(os.path.join(r, n), a) for r, _, ns in os.walk(a) for n in ns)
    assert len(files) == 13 + 2 + 2
    for rel in files:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    with open(os.path.join(a, fmt.ANNOTATIONS_FILE), "rb") as fa, \
            open(os.path.join(c, fmt.ANNOTATIONS_FILE), "rb") as fc:
        assert fa.read() != fc.read()

    records, errors = fmt.read_annotations(os.path.join(a, fmt.ANNOTATIONS_FILE))
    assert errors == [] and len(records) == 13
    assert {r.category for r in records} == {"color", "shape", "texture", "spatial", "counting", "complex"}
    vocab = set(shapes.VOCABULARY)
    for r in records:
        assert set(r.caption.replace(",", "").split()) <= vocab, r.caption
        assert 1 <= len(r.boxes) <= 4
        for p in r.phrases:
            assert p in r.caption
    # Spatial captions are true for their boxes.
    for r in records:
        if r.category == "spatial":
            a0, a1 = r.boxes
            if "to the left of" in r.caption:
                assert a0[2] <= a1[0]
            elif "to the right of" in r.caption:
                assert a1[2] <= a0[0]
            elif " above " in r.caption:
                assert a0[3] <= a1[1]
            else:
                assert a1[3] <= a0[1]

    # Tight boxes: on a plain background the object pixels fill exactly the boxes' extent.
    checked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        pixels, caption, phrases, boxes = shapes.render_item(rng, "color", 64)
        corner = pixels[0, 0]
        if not (pixels[0] == corner).all() or not (pixels[:, 0] == corner).all():
            continue  # noisy background
        fg = (np.abs(pixels.astype(int) - corner.astype(int)).sum(-1) > 0)
        for x0, y0, x1, y1 in boxes:
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            inside = fg[y0:y1, x0:x1]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            fg[y0:y1, x0:x1] = False
        assert not fg.any(), "object pixels outside every box"
        checked += 1
    assert checked >= 5

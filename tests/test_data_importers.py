"""GLIGEN TSV and LayoutGPT NSR-1K importers on small hand-written samples."""

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from goal_jax.data import format as fmt
from goal_jax.data import goal2k, importers


def _jpeg_b64(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue(), base64.b64encode(buf.getvalue()).decode()


def test_gligen_tsv_import_then_build(tmp_path):
    raw, b64 = _jpeg_b64(40, 20)
    caption = "a cat on the left and a dog"
    emb = base64.b64encode(np.zeros(4, np.float32).tobytes()).decode()
    rows = [
        ("g1", {"data_id": "g1", "image": b64, "file_name": "g1.jpg", "caption": caption,
                "annos": [{"bbox": [2, 3, 10, 5], "tokens_positive": [[0, 5]],
                           "text_embedding_before": emb, "image_embedding_after": emb},
                          {"bbox": [20, 1, 15, 12], "tokens_positive": [[24, 27], [2, 5]]}]}),
        ("d7", {"data_id": "d7", "image": b64, "is_det": True,
                "annos": [{"bbox": [0, 0, 40, 20], "category_name": "person"},
                          {"bbox": [5, 5, 10, 10], "category_name": "car"}]}),
        ("bad1", {"data_id": "bad1", "image": "***not base64***", "caption": "x", "annos": []}),
        ("bad2", {"data_id": "bad2", "image": b64, "caption": "a cat",
                  "annos": [{"bbox": [0, 0, 5, 5], "tokens_positive": [[0, 50]]}]}),
    ]
    tsv = tmp_path / "train.tsv"
    with open(tsv, "w") as f:
        for key, obj in rows:
            f.write(f"{key}\t{json.dumps(obj)}\n")
        f.write("bad3\t{not json\n")
    out = str(tmp_path / "imported")
    summary = importers.import_gligen_tsv(str(tsv), out)
    assert summary["items_written"] == 2
    reasons = {d["id"]: d["reason"] for d in summary["items_dropped"]}
    assert reasons["bad1"] == "'image' is missing or not valid base64"
    assert reasons["bad2"].startswith("tokens_positive span [0, 50] is outside the caption")
    assert reasons["row 5"].startswith("malformed JSON")

    records, errors = fmt.read_annotations(os.path.join(out, fmt.ANNOTATIONS_FILE))
    assert errors == []
    g1, d7 = records
    assert (g1.id, g1.caption, g1.phrases) == ("g1", caption, ["a cat", "cat dog"])
    assert g1.boxes == [[2, 3, 12, 8], [20, 1, 35, 13]] and g1.box_format == "xyxy_pixels"
    assert g1.source == "gligen" and g1.image == "images/g1.jpg"
    with open(os.path.join(out, g1.image), "rb") as f:
        assert f.read() == raw  # written as-is, not re-encoded
    assert (d7.caption, d7.phrases) == ("person, car", ["person", "car"])
    assert d7.boxes == [[0, 0, 40, 20], [5, 5, 15, 15]]

    builder, build_summary = goal2k.build_goal2k(out, str(tmp_path / "tfds"))
    assert build_summary["items_kept"] == 2
    ex = builder.as_data_source("train")[0]
    np.testing.assert_allclose(ex["boxes"], [[2 / 40, 3 / 20, 12 / 40, 8 / 20], [0.5, 0.05, 35 / 40, 13 / 20]],
                               atol=1e-7)
    assert ex["image"].shape == (20, 40, 3)


def test_nsr1k_counting_and_spatial(tmp_path):
    counting = [
        {"id": 38700, "image_id": 42471, "num_object": [["clock", 2]],
         "object_list": [["clock", [0.5, 0.25, 0.25, 0.5]], ["clock", [0.0, 0.0, 0.1, 0.2]]],
         "prompt": "an image of two clocks", "sub-type": "single-category", "type": "template"},
        {"id": 38701, "object_list": [["cup", [0.1, 0.1]]], "prompt": "a cup"},
    ]
    spatial = [
        {"id": 739, "image_id": 16164, "obj1": ["toilet", [0.0, 0.25, 0.2, 0.25]],
         "obj2": ["dog", [0.5, 0.5, 0.375, 0.25]], "prompt": "a toilet to the left of a dog",
         "relation": "left", "type": "template"},
        {"id": 740, "obj1": ["bird", [0.1, 0.1, 0.2, 0.2]], "prompt": "a bird under a car"},
    ]
    for name, data in (("counting.val.json", counting), ("spatial.val.json", spatial)):
        with open(tmp_path / name, "w") as f:
            json.dump(data, f)
    s1 = importers.import_nsr1k(str(tmp_path / "counting.val.json"), str(tmp_path / "counting.jsonl"))
    s2 = importers.import_nsr1k(str(tmp_path / "spatial.val.json"), str(tmp_path / "spatial.jsonl"))
    assert s1["items_written"] == 1 and s2["items_written"] == 1
    assert s1["items_dropped"] == [{"id": "38701", "reason": "object_list[0] box must be [x, y, w, h], got [0.1, 0.1]"}]
    assert s2["items_dropped"][0]["id"] == "740"
    assert "neither 'object_list'" in s2["items_dropped"][0]["reason"]

    (c,), errors = fmt.read_annotations(str(tmp_path / "counting.jsonl"), require_image=False)
    assert errors == []
    assert (c.id, c.image, c.caption, c.category, c.source) == ("38700", "", "an image of two clocks", "counting", "nsr1k")
    assert c.box_format == "xyxy_normalized" and c.phrases == ["clock", "clock"]
    np.testing.assert_allclose(c.boxes, [[0.5, 0.25, 0.75, 0.75], [0.0, 0.0, 0.1, 0.2]], atol=1e-12)
    (s,), _ = fmt.read_annotations(str(tmp_path / "spatial.jsonl"), require_image=False)
    assert s.category == "spatial" and s.phrases == ["toilet", "dog"]
    np.testing.assert_allclose(s.boxes, [[0.0, 0.25, 0.2, 0.5], [0.5, 0.5, 0.875, 0.75]], atol=1e-12)
    with open(tmp_path / "spatial.jsonl") as f:
        assert json.loads(f.readline())["relation"] == "left"
    # Layout-only files are not image datasets: reading them as such names the item.
    _, errs = fmt.read_annotations(str(tmp_path / "spatial.jsonl"))
    assert errs == [{"id": "739", "reason": "'image' must be a non-empty relative path, got ''"}]
    with pytest.raises(ValueError, match="expected a JSON list"):
        with open(tmp_path / "obj.json", "w") as f:
            json.dump({"id": 1}, f)
        importers.import_nsr1k(str(tmp_path / "obj.json"), str(tmp_path / "x.jsonl"))


def test_nsr1k_zero_area_boxes_are_listed_not_silent(tmp_path):
    """A zero-area box is left out of the layout and listed; the entry (its prompt) stays."""
    counting = [{"id": 7, "num_object": [["cup", 2]], "prompt": "two cups", "type": "template",
                 "sub-type": "single-category",
                 "object_list": [["cup", [0.1, 0.1, 0.2, 0.2]], ["cup", [0.5, 0.5, 0.0, 0.3]]]}]
    with open(tmp_path / "counting.val.json", "w") as f:
        json.dump(counting, f)
    s = importers.import_nsr1k(str(tmp_path / "counting.val.json"), str(tmp_path / "c.jsonl"))
    assert s["items_written"] == 1 and s["items_dropped"] == []
    assert s["boxes_dropped"] == [{"id": "7", "reason": "object_list[1] ('cup') box has zero "
                                                        "width or height: [0.5, 0.5, 0.0, 0.3]"}]
    line = json.loads(open(tmp_path / "c.jsonl").readline())
    assert line["boxes_dropped"] == 1 and line["prompt_type"] == "template"
    assert [a["phrase"] for a in line["annotations"]] == ["cup"]
    assert line["num_object"] == [["cup", 2]]

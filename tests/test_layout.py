"""Layout type: validation errors name the item, padding, JSON / JSONL parsing."""

import json

import numpy as np
import pytest

from goal_jax import layout as layout_lib
from goal_jax.layout import Layout, LayoutError


def test_padding_matches_gligen_pipeline():
    layout = Layout(["a red cat", " a blue dog "], [[0.1, 0.2, 0.5, 0.9], [0.5, 0.0, 1.0, 1.0]])
    assert layout.phrases == ("a red cat", "a blue dog")
    boxes, masks, phrases = layout.padded()
    assert boxes.shape == (30, 4) and boxes.dtype == np.float32
    assert masks.shape == (30,) and masks.dtype == np.float32
    np.testing.assert_array_equal(boxes[:2], np.float32([[0.1, 0.2, 0.5, 0.9], [0.5, 0, 1, 1]]))
    np.testing.assert_array_equal(boxes[2:], 0.0)
    np.testing.assert_array_equal(masks, [1.0, 1.0] + [0.0] * 28)
    assert phrases == ["a red cat", "a blue dog"] + [""] * 28

    b, m, p = layout_lib.pad_layouts([layout, Layout()], max_boxes=4)
    assert b.shape == (2, 4, 4) and m.shape == (2, 4)
    np.testing.assert_array_equal(m, [[1, 1, 0, 0], [0, 0, 0, 0]])
    assert p == [["a red cat", "a blue dog", "", ""], ["", "", "", ""]]
    np.testing.assert_array_equal(b[1], 0.0)


def test_thirty_boxes_allowed_and_roundtrip():
    phrases = [f"object {i}" for i in range(30)]
    boxes = [[0.0, 0.0, 0.5, 0.5]] * 30
    layout = Layout.create(phrases, boxes)
    assert len(layout) == 30
    item = layout_lib.parse_item({"caption": "c", **layout.to_dict(), "seed": 3, "id": "x-1"})
    assert item.layout == layout and item.seed == 3 and item.id == "x-1"
    assert layout_lib.parse_item(item.to_dict()) == item


@pytest.mark.parametrize("phrases,boxes,message", [
    (["cat"], [[0.1, 0.2, 1.2, 0.5]],
     "item 7: box 0 ('cat') is outside [0, 1]: [0.1, 0.2, 1.2, 0.5]"),
    (["cat"], [[-0.1, 0.2, 0.3, 0.5]], "item 7: box 0 ('cat') is outside [0, 1]"),
    (["cat", "dog"], [[0.1, 0.1, 0.2, 0.2], [0.6, 0.2, 0.4, 0.5]],
     "item 7: box 1 ('dog') has x0 >= x1: [0.6, 0.2, 0.4, 0.5]"),
    (["cat"], [[0.1, 0.2, 0.1, 0.5]], "item 7: box 0 ('cat') has x0 >= x1"),
    (["cat"], [[0.1, 0.5, 0.3, 0.5]], "item 7: box 0 ('cat') has y0 >= y1: [0.1, 0.5, 0.3, 0.5]"),
    (["cat", "  "], [[0.1, 0.1, 0.2, 0.2]] * 2, "item 7: phrase 1 is empty"),
    ([3], [[0.1, 0.1, 0.2, 0.2]], "item 7: phrase 0 must be a string, got 3"),
    ([f"o{i}" for i in range(31)], [[0.1, 0.1, 0.2, 0.2]] * 31,
     "item 7: 31 boxes, at most 30 are supported"),
    (["cat"], [], "item 7: 1 phrases but 0 boxes (one phrase per box)"),
    (["cat"], [[0.1, 0.1, 0.2]], "item 7: box 0 ('cat') must be 4 numbers [x0, y0, x1, y1]"),
    (["cat"], [[0.1, 0.1, "0.2", 0.3]], "item 7: box 0 ('cat') must be 4 numbers"),
    (["cat"], [[0.1, 0.1, float("nan"), 0.3]], "item 7: box 0 ('cat') has a non-finite"),
    ("cat", [[0.1, 0.1, 0.2, 0.3]], "item 7: 'phrases' must be a list of strings"),
])
def test_bad_layouts_name_the_item(phrases, boxes, message):
    with pytest.raises(LayoutError) as e:
        Layout.create(phrases, boxes, name="item 7")
    assert message in str(e.value)


def test_constructor_validates_too():
    with pytest.raises(LayoutError, match=r"layout: box 0 \('cat'\) is outside \[0, 1\]"):
        Layout(["cat"], [[0, 0, 2, 1]])


@pytest.mark.parametrize("text,message", [
    ('{"caption": "x", "phrases": ["a"], "boxes": [[0,0,1,1]]',
     "cli: malformed JSON: Expecting ',' delimiter at line 1 column"),
    ("[1, 2]", "cli: expected a JSON object, got list"),
    ('{"caption": "x", "phrases": ["a"]}', "cli: missing key 'boxes'"),
    ('{"phrases": [], "boxes": []}', "cli: missing key 'caption'"),
    ('{"caption": 3, "phrases": [], "boxes": []}', "cli: 'caption' must be a string, got 3"),
    ('{"caption": "x", "phrases": [], "boxes": [], "seed": -1}',
     "cli: 'seed' must be an integer in [0, 2**32), got -1"),
    ('{"caption": "x", "phrases": [], "boxes": [], "seed": 1.5}', "cli: 'seed' must be an integer"),
    ('{"caption": "x", "phrases": [], "boxes": [], "id": "../etc"}', "cli: 'id' must be 1-128"),
    ('{"caption": "x", "phrases": [], "boxs": []}', "cli: unknown key(s) ['boxs']"),
])
def test_bad_json(text, message):
    with pytest.raises(LayoutError) as e:
        layout_lib.parse_json(text, "cli")
    assert message in str(e.value)


def test_caption_optional_when_not_required():
    item = layout_lib.parse_json('{"phrases": ["a cat"], "boxes": [[0, 0, 0.5, 0.5]]}',
                                 require_caption=False)
    assert item.caption is None and item.seed is None and item.id is None
    assert item.layout.boxes == ((0.0, 0.0, 0.5, 0.5),)


def test_read_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = {"caption": "a cat", "phrases": ["a cat"], "boxes": [[0.1, 0.1, 0.6, 0.9]], "seed": 1}
    lines = [json.dumps(good), "", json.dumps({**good, "id": 12})]
    path.write_text("\n".join(lines) + "\n")
    items = layout_lib.read_jsonl(str(path))
    assert [n for n, _ in items] == [1, 3]
    assert items[1][1].id == "12" and items[0][1].id is None
    assert items[0][1].layout.phrases == ("a cat",)

    bad = dict(good, boxes=[[0.1, 0.1, 0.6, 1.5]])
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(LayoutError, match=r"prompts.jsonl line 2: box 0 \('a cat'\) is outside"):
        layout_lib.read_jsonl(str(path))

    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(LayoutError, match=r"prompts.jsonl line 2: malformed JSON"):
        layout_lib.read_jsonl(str(path))

    dup = dict(good, id="a")
    path.write_text(json.dumps(dup) + "\n" + json.dumps(dup) + "\n")
    with pytest.raises(LayoutError, match=r"prompts.jsonl line 2: id 'a' already used on line 1"):
        layout_lib.read_jsonl(str(path))

"""NSR-1K layout metrics exactly as LayoutGPT's eval_counting_layout.py / eval_spatial_layout.py
compute them, goal_jax's stricter matching, prediction files (LayoutGPT's llm_output JSON and
goal_jax's plan JSONL), the 19 all-zero-box spatial.val entries and the results files.

The excerpts below are hand-written in the real formats (NSR-1K val entries, LayoutGPT's
llm_output entries); ids and boxes are made up. Expected numbers were computed by hand (the
comments) and agree with what LayoutGPT's own scripts print when run on these excerpts:
eval_counting_layout.py: Precision 55.00 %, Recall 60.00 %, IoU 55.00 %, MAE 1.00, acc 28.57 %;
eval_spatial_layout.py: template (#eg 5) Acc 60.00 %, #miss 1; natural (#eg 2) Acc 50.00 %,
#miss 1; Overall acc 0.5714, missing 2.
"""

import json
import os

import pytest
from conftest import load_script

from goal_jax import layout as layout_lib
from goal_jax import planner as P
from goal_jax.data import importers
from goal_jax.evaluation import matching, metrics, nsr, report


def _o(name, x, y, w, h):
    return [name, [x, y, w, h]]

B = [0.1, 0.1, 0.2, 0.2]
COUNTING_VAL = [
    {"id": 101, "image_id": 1, "num_object": [["apple", 3]],
     "object_list": [_o("apple", 0.0, 0.0, 0.2, 0.2), _o("apple", 0.3, 0.0, 0.2, 0.2),
                     _o("apple", 0.6, 0.0, 0.2, 0.2)],
     "prompt": "three apples on a table", "sub-type": "single-category", "type": "template"},
    {"id": 102, "image_id": 2, "num_object": [["potted plant", 2], ["cat", 1]],
     "object_list": [_o("potted plant", 0.0, 0.0, 0.3, 0.5), _o("potted plant", 0.5, 0.0, 0.3, 0.5),
                     _o("cat", 0.2, 0.6, 0.3, 0.3)],
     "prompt": "two potted plants and a cat", "sub-type": "two-categories", "type": "template"},
    {"id": 103, "image_id": 3, "num_object": [["dog", 2], ["cat", 1]],
     "object_list": [_o("dog", 0.0, 0.0, 0.3, 0.3), _o("dog", 0.5, 0.0, 0.3, 0.3),
                     _o("cat", 0.2, 0.6, 0.3, 0.3)],
     "prompt": "a picture of two dogs along with a cat, the number of dogs is more than that of cats",
     "sub-type": "comparison", "type": "template"},
    {"id": 104, "image_id": 4, "num_object": [["hot dog", 1], ["person", 2]],
     "object_list": [_o("hot dog", 0.4, 0.6, 0.2, 0.1), _o("person", 0.0, 0.1, 0.3, 0.8),
                     _o("person", 0.6, 0.1, 0.3, 0.8)],
     "prompt": "two people sharing a hot dog", "sub-type": "real", "type": "mscoco"},
    {"id": 105, "image_id": 5, "num_object": [["cup", 1]],
     "object_list": [_o("cup", 0.4, 0.4, 0.2, 0.2)],
     "prompt": "there is one cup in the image", "sub-type": "single-category", "type": "template"},
]
COUNTING_PRED = [
    {"iter": 0, "query_id": 101, "prompt": "three apples on a table",
     "object_list": [["apple", B], ["apple", B], ["red apple", B]]},
    {"iter": 1, "query_id": 101, "prompt": "three apples on a table",
     "object_list": [["apples", B], ["apples", B], ["a pear", B], [None, B]]},
    {"iter": 0, "query_id": 102, "prompt": "two potted plants and a cat",
     "object_list": [["potted-plant", B], ["potted-plant", B], ["cat", B]]},
    {"iter": 0, "query_id": 103, "prompt": "comparison",
     "object_list": [["dog", B], ["dog", B], ["dog", B], ["cat", B]]},
    {"iter": 1, "query_id": 103, "prompt": "comparison",
     "object_list": [["dog", B], ["dog", B], ["cat", B]]},
    {"iter": 0, "query_id": 104, "prompt": "two people sharing a hot dog",
     "object_list": [["hot dog", B], ["person", B], ["person", B], ["dog", B]]},
    {"iter": 1, "query_id": 104, "prompt": "two people sharing a hot dog",
     "object_list": [["the person", B], ["people", B], ["a hot dog", B]]},
]
SPATIAL_VAL = [
    {"id": 201, "image_id": 11, "obj1": _o("cat", 0.0, 0.3, 0.3, 0.3), "obj2": _o("dog", 0.6, 0.3, 0.3, 0.3),
     "prompt": "a cat to the left of a dog", "relation": "left", "type": "template"},
    {"id": 202, "image_id": 12, "obj1": _o("parking meter", 0.4, 0.0, 0.2, 0.3),
     "obj2": _o("car", 0.2, 0.5, 0.6, 0.4), "prompt": "a parking meter above a car",
     "relation": "top", "type": "template"},
    {"id": 203, "image_id": 13, "obj1": _o("tv", 0.0, 0.3, 0.3, 0.3), "obj2": _o("couch", 0.5, 0.3, 0.4, 0.4),
     "prompt": "a tv next to a couch in a living room", "relation": "next to", "type": "natural"},
    {"id": 219, "image_id": -1, "obj1": _o("train", 0.0, 0.0, 0.0, 0.0),
     "obj2": _o("surfboard", 0.0, 0.0, 0.0, 0.0), "prompt": "A train on top of a surfboard",
     "relation": "top", "type": "template"},
]
SPATIAL_PRED = [
    {"iter": 0, "query_id": 201, "prompt": "a cat to the left of a dog",
     "object_list": [["cat", [0.0, 0.4, 0.2, 0.6]], ["dog", [0.6, 0.4, 0.8, 0.6]]]},
    {"iter": 1, "query_id": 201, "prompt": "a cat to the left of a dog",
     "object_list": [["cats", [0.6, 0.4, 0.8, 0.6]], ["dog", [0.0, 0.4, 0.2, 0.6]],
                     ["cat", [0, 0, 0, 0]]]},
    {"iter": 0, "query_id": 202, "prompt": "a parking meter above a car",
     "object_list": [["parking-meter", [0.4, 0.0, 0.6, 0.3]], ["car", [0.2, 0.5, 0.8, 0.9]]]},
    {"iter": 0, "query_id": 203, "prompt": "a tv next to a couch in a living room",
     "object_list": [["television", [0.0, 0.3, 0.3, 0.6]], ["sofa", [0.5, 0.3, 0.9, 0.7]]]},
    {"iter": 1, "query_id": 203, "prompt": "a tv next to a couch in a living room",
     "object_list": [["tv", [0.0, 0.3, 0.3, 0.6]], ["couch", [0.5, 0.3, 0.9, 0.7]]]},
    {"iter": 0, "query_id": 219, "prompt": "A train on top of a surfboard",
     "object_list": [["train", [0.2, 0.0, 0.8, 0.4]], [None, [0.1, 0.5, 0.9, 0.9]],
                     ["surf board", [0.1, 0.5, 0.9, 0.9]]]},
    {"iter": 1, "query_id": 202, "prompt": "a parking meter above a car",
     "object_list": [["car", [0.2, 0.0, 0.8, 0.4]], ["meter", [0.4, 0.6, 0.6, 0.9]]]},
]

# Per counting prediction (LayoutGPT matching | goal_jax matching), by hand:
#  101/0: apple, apple, "red apple" (contains "apple") -> 3 apples: P R IoU 1, MAE 0, right.
#  101/1: "apples" loses its leading "a" ("pples", in neither direction with "apple"), "a pear"
#         no, None not counted -> 0 of 3: P R IoU 0, MAE 3 | 2 apples of 3 boxes: 2/3, MAE 1.
#  102/0: "potted-plant" (LayoutGPT's parser hyphenates) is not "potted plant"; 1 cat of 3
#         boxes: P 1/3, R 1/3, IoU 1/3, MAE 1 | all right.
#  103/0, 103/1 (comparison, 2 dogs > 1 cat): 3 dogs wrong; 2 dogs + 1 cat right (both rules).
#  104/0: "hot dog" ("ot dog" after stripping "the " characters) and "dog" both count as hot
#         dog, 2 persons: P 3/4, R 1, IoU 3/4, MAE 1/2, wrong | "dog" is no hot dog: P 3/4, R 1,
#         IoU 1, right.
#  104/1: "the person" -> person, "people" no, "a hot dog" -> hot dog: P R IoU 2/3, MAE 1/2 |
#         "people" is a person: all right.
COUNTING_ROWS = {
    "layoutgpt": [(1, 1, 1, 0, 1), (0, 0, 0, 3, 0), (1 / 3, 1 / 3, 1 / 3, 1, 0), None, None,
                  (3 / 4, 1, 3 / 4, 0.5, 0), (2 / 3, 2 / 3, 2 / 3, 0.5, 0)],
    "goal_jax": [(1, 1, 1, 0, 1), (2 / 3, 2 / 3, 2 / 3, 1, 0), (1, 1, 1, 0, 1), None, None,
                 (3 / 4, 1, 1, 0, 1), (1, 1, 1, 0, 1)],
}
COMPARISON_RIGHT = [0.0, 1.0]
# Per spatial prediction (correct, missing), LayoutGPT | goal_jax:
#  201/0 cat left of dog: right | right.  201/1: the closest name to "cat" is "cats" (the
#  [0,0,0,0] "cat" is left out), right of the dog: wrong | wrong.  202/0 "parking-meter" above
#  the car: right | right.  203/0 "television" / "sofa" are not close to "tv" / "couch":
#  missing | missing.  203/1 tv left of couch, "next to": right | right.  219/0 "surf board" is
#  close to "surfboard" (None names left out), train above: right | missing (other words).
#  202/1 "meter" is not close enough to "parking meter" (ratio 0.56 < 0.6): missing | it is the
#  name's head noun, below the car: wrong.
SPATIAL_ROWS = {
    "layoutgpt": [(True, False), (False, False), (True, False), (False, True), (True, False),
                  (True, False), (False, True)],
    "goal_jax": [(True, False), (False, False), (True, False), (False, True), (True, False),
                 (False, True), (False, False)],
}


@pytest.fixture
def nsr_files(tmp_path):
    root = tmp_path / "NSR-1K"
    (root / "counting").mkdir(parents=True)
    (root / "spatial").mkdir()
    (root / "counting" / "counting.val.json").write_text(json.dumps(COUNTING_VAL))
    (root / "spatial" / "spatial.val.json").write_text(json.dumps(SPATIAL_VAL))
    (tmp_path / "gpt.counting.json").write_text(json.dumps(COUNTING_PRED))
    (tmp_path / "gpt.spatial.json").write_text(json.dumps(SPATIAL_PRED))
    return tmp_path


def _items(nsr_files, task):
    items, dropped = nsr.load(str(nsr_files / "NSR-1K" / task / f"{task}.val.json"),
                              str(nsr_files / "work"))
    assert dropped == []
    return items


def test_layoutgpt_counting_excerpt(nsr_files):
    items = _items(nsr_files, "counting")
    preds = nsr.read_predictions(str(nsr_files / "gpt.counting.json"), items)
    assert [(p.item.id, p.iter) for p in preds] == [("101", 0), ("101", 1), ("102", 0),
                                                   ("103", 0), ("103", 1), ("104", 0), ("104", 1)]
    assert preds[1].names[-1] is None
    for m, expected in COUNTING_ROWS.items():
        for p, exp in zip(preds, expected):
            s = nsr.prediction_scores(p.item, p.names, p.boxes, m)
            if exp is None:
                assert s["comparison"] and s["precision"] is None
                continue
            got = (s["precision"], s["recall"], s["iou"], s["mae"], s["accuracy"])
            assert got == pytest.approx(exp), (m, p.item.id, p.iter)
        cmp_scores = [nsr.prediction_scores(p.item, p.names, p.boxes, m)["accuracy"]
                      for p in preds[3:5]]
        assert cmp_scores == COMPARISON_RIGHT
    res = nsr.score_predictions(items, preds, str(nsr_files / "out"))
    assert (res["n"], res["n_prompts"], res["prompts_without_prediction"]) == (7, 4, 1)
    lg = res["layout"]
    # What eval_counting_layout.py prints for this excerpt.
    assert (lg["precision"], lg["recall"], lg["iou"], lg["mae"], lg["accuracy"]) == pytest.approx(
        (0.55, 0.60, 0.55, 1.0, 2 / 7))
    assert (lg["n"], lg["n_counted"], lg["n_comparison"], lg["matching"]) == (7, 5, 2, "layoutgpt")
    tmpl, coco = lg["by_type"]["template"], lg["by_type"]["mscoco"]
    assert (tmpl["precision"], tmpl["accuracy"], tmpl["n"], tmpl["n_counted"]) == pytest.approx(
        (4 / 9, 2 / 5, 5, 3))
    assert (coco["precision"], coco["recall"], coco["accuracy"]) == pytest.approx(
        (17 / 24, 5 / 6, 0.0))
    gj = res["layout_goal_jax"]
    assert (gj["precision"], gj["recall"], gj["iou"], gj["mae"], gj["accuracy"]) == pytest.approx(
        ((1 + 2 / 3 + 1 + 3 / 4 + 1) / 5, (4 + 2 / 3) / 5, (4 + 2 / 3) / 5, 0.2, 5 / 7))
    rows = [json.loads(x) for x in open(nsr_files / "out" / "nsr1k_counting_prediction_scores.jsonl")]
    assert [r["iter"] for r in rows] == [0, 1, 0, 0, 1, 0, 1]
    assert rows[5]["layout"]["counts"] == {"hot dog": 2, "person": 2}
    assert rows[5]["layout_goal_jax"]["counts"] == {"hot dog": 1, "person": 2}


def test_layoutgpt_spatial_excerpt(nsr_files):
    items = _items(nsr_files, "spatial")
    preds = nsr.read_predictions(str(nsr_files / "gpt.spatial.json"), items)
    for m, expected in SPATIAL_ROWS.items():
        got = [tuple(nsr.prediction_scores(p.item, p.names, p.boxes, m).values())
               for p in preds]
        assert got == expected, m
    res = nsr.score_predictions(items, preds)
    lg, gj = res["layout"], res["layout_goal_jax"]
    # What eval_spatial_layout.py prints for this excerpt.
    assert (lg["accuracy"], lg["missing"], lg["n"]) == (pytest.approx(4 / 7), 2, 7)
    assert lg["by_type"] == {"template": {"accuracy": 0.6, "missing": 1, "n": 5},
                             "natural": {"accuracy": 0.5, "missing": 1, "n": 2}}
    assert (gj["accuracy"], gj["missing"]) == (pytest.approx(3 / 7), 2)
    assert gj["by_type"]["template"] == {"accuracy": 0.4, "missing": 1, "n": 5}


def test_layoutgpt_matching_rules():
    # Article removal strips leading characters, not words (as str.lstrip does).
    assert matching.layoutgpt_strip("a cat") == "cat"
    assert matching.layoutgpt_strip("apple") == "pple"
    assert matching.layoutgpt_strip("elephant") == "lephant"
    assert matching.layoutgpt_strip("the person") == "person"
    assert matching.layoutgpt_strip("an ant") == ""  # "t" is one of "the "'s characters
    assert matching.layoutgpt_count_name("an ant", ["cup", "bowl"]) == "cup"  # "" is in "cup"
    # Substring either way, each later name compared with the replacement.
    assert matching.layoutgpt_count_name("window next to a chair", ["chair"]) == "chair"
    assert matching.layoutgpt_count_name("dog", ["hot dog", "person"]) == "hot dog"
    assert matching.layoutgpt_count_name("car", ["carpet", "pet"]) == "pet"
    assert matching.layoutgpt_count_name("giraffes eating leaves", ["giraffe"]) == "giraffe"
    assert matching.layoutgpt_count_name("bus", ["cup"]) == "bus"
    # Spatial: the closest name only (difflib, ratio >= 0.6), every box with exactly it.
    boxes = [[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3], [0, 0, 0, 0]]
    assert matching.layoutgpt_spatial_boxes("cat", ["cat", "cats", "cat", "cat"], boxes) == [
        [0, 0, 1, 1], [2, 2, 3, 3]]
    assert matching.layoutgpt_spatial_boxes("tv", ["television"], boxes[:1]) == []
    with pytest.raises(ValueError, match="unknown matching 'exact'"):
        matching.count_by_name(["cat"], ["cat"], "exact")


def test_goal_jax_matching_fixes_the_substring_defects():
    m = matching.goal_jax_matches
    assert not m("chair", "window next to a chair")  # the head is "window"
    assert not m("dog", "hot dog") and not m("bear", "teddy bear")
    assert m("hot dog", "a hot dog") and not m("hot dog", "dog")
    assert m("giraffe", "giraffes eating leaves")  # every word singular; the chunk ends at -ing
    assert m("parking meter", "parking-meter") and m("potted plant", "two potted-plants")
    assert m("fire hydrant", "hydrant") and m("car", "a red car")
    assert not m("car", "carpet") and not m("car", "car tire") and not m("cat", None)
    assert P.singular("broccolis") == "broccoli" and P.singular("skis") == "ski"
    assert P.singular("tennis") == "tennis" and P.singular("bus") == "bus"
    assert m("broccoli", "three broccolis")
    # Detected "giraffes eating leaves" counts for giraffe in goal_jax's rule only once.
    s = metrics.counting_score([("giraffe", 2)], ["giraffes eating leaves", "giraffe"],
                               matching="goal_jax")
    assert s["counts"] == {"giraffe": 2} and s["accuracy"] == 1.0


def test_detection_counting_is_layoutgpts_glip_rule():
    """GLIP/eval_counting.py: right categories / distinct ground-truth names over all images;
    a comparison prompt is right at most once but has two names in the denominator."""
    plain = metrics.detection_counting_score([("apple", 2), ("banana", 1)],
                                             ["apple", "apple ", "banana", "banana"])
    assert (plain["correct_categories"], plain["categories"], plain["all_correct"]) == (1, 2, False)
    cmp = metrics.detection_counting_score([("giraffe", 3), ("zebra", 1)],
                                           ["giraffe"] * 3 + ["zebra"] * 2, comparison=True)
    assert (cmp["correct_categories"], cmp["categories"], cmp["all_correct"]) == (1, 2, True)
    # Labels must be the name exactly (GLIP's entities are the prompt's names).
    assert metrics.detection_counting_score([("cat", 1)], ["cats"])["correct_categories"] == 0
    summary = metrics.summarize_detection_counting([plain, cmp])
    assert summary == {"accuracy": 2 / 4, "image_accuracy": 0.5, "n": 2, "categories": 4}
    sp = metrics.detection_spatial_score("cat", "dog", "left", ["cat", "dog"],
                                         [(0, 0, 1, 1), (2, 0, 3, 1)])
    assert sp == {"correct": True, "missing": False}
    assert metrics.detection_spatial_score("cat", "dog", "left", ["a cat", "dog"],
                                           [(0, 0, 1, 1), (2, 0, 3, 1)])["missing"]


def test_zero_box_entries_kept_for_scoring_and_reported(nsr_files, tmp_path):
    """spatial.val ids 919-937 have all-zero boxes: the prompt is scored, the ground-truth
    layout is reported missing, images from "gt" layouts skip it, in-context examples skip it
    with a warning."""
    path = str(nsr_files / "NSR-1K" / "spatial" / "spatial.val.json")
    summary = importers.import_nsr1k(path, str(tmp_path / "gt.jsonl"))
    assert summary["items_written"] == 4 and summary["items_dropped"] == []
    assert summary["boxes_dropped"] == [
        {"id": "219", "reason": "obj1 ('train') box has zero width or height: [0.0, 0.0, 0.0, 0.0]"},
        {"id": "219", "reason": "obj2 ('surfboard') box has zero width or height: "
                                "[0.0, 0.0, 0.0, 0.0]"}]
    items = _items(nsr_files, "spatial")
    zero = items[3]
    assert (zero.id, zero.obj1, zero.obj2, zero.layout_complete, len(zero.layout)) == (
        "219", "train", "surfboard", False, 0)
    assert all(it.layout_complete for it in items[:3]) and items[2].prompt_type == "natural"
    with pytest.warns(UserWarning, match=r"skipped 1 entries with a zero-area box .*ids 219"):
        examples = P.load_examples(path)
    assert [e.caption for e in examples] == [e["prompt"] for e in SPATIAL_VAL[:3]]
    drawn = []

    def generator(caption, layout, seed):
        import numpy as np

        drawn.append(caption)
        return np.zeros((8, 8, 3), np.uint8)

    res = nsr.evaluate(items, str(tmp_path / "gt_run"), P.RulePlanner(), generator, "gt")
    image = res["spatial"]["image"]
    assert res["spatial"]["no_gt_layout"] == ["219"]
    assert image["skipped_no_gt_layout"] == 1 and image["n_images"] == 3
    assert "A train on top of a surfboard" not in drawn
    assert sorted(os.listdir(tmp_path / "gt_run" / "images" / "spatial")) == [
        "201_0.png", "202_0.png", "203_0.png"]
    assert res["spatial"]["layout"]["n"] == 4  # the prompt itself is scored
    rows = report.rows_from_nsr(res)
    assert {"task": "spatial", "metric": "prompts without images (no ground-truth layout)",
            "value": 1, "n": 4} in rows
    assert {"task": "spatial", "metric": "prompts without a ground-truth layout (zero-area "
            "boxes; still scored)", "value": 1, "n": 4} in rows


def test_prediction_file_errors(nsr_files, tmp_path):
    items = _items(nsr_files, "counting")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(COUNTING_PRED[0], query_id=999)]))
    with pytest.raises(ValueError, match=r"bad.json entry 0: query_id 999 is not an id"):
        nsr.read_predictions(str(bad), items)
    bad.write_text(json.dumps([dict(COUNTING_PRED[0], object_list=[["cat", [0, 0, 1]]])]))
    with pytest.raises(ValueError, match=r"query_id 101\) object_list\[0\]: box must be 4"):
        nsr.read_predictions(str(bad), items)
    bad.write_text(json.dumps([dict(COUNTING_PRED[0], object_list=[[3, [0, 0, 1, 1]]])]))
    with pytest.raises(ValueError, match=r"object_list\[0\] must be \[name or null"):
        nsr.read_predictions(str(bad), items)
    # A plan JSONL: ids "<task>-<id>" or bare, else the caption; unknown ids are errors.
    plan = tmp_path / "plan.jsonl"
    lay = layout_lib.Layout(("apple",) * 3, ((0.1, 0.1, 0.2, 0.2),) * 3)
    lines = [layout_lib.LayoutItem("three apples on a table", lay, None, "counting-101"),
             layout_lib.LayoutItem("there is one cup in the image",
                                   layout_lib.Layout(("cup",), ((0.4, 0.4, 0.6, 0.6),)))]
    plan.write_text("".join(json.dumps(x.to_dict()) + "\n" for x in lines))
    preds = nsr.read_predictions(str(plan), items)
    assert [p.item.id for p in preds] == ["101", "105"]
    res = nsr.score_predictions(items, preds)
    assert res["layout"]["accuracy"] == 1.0 and res["prompts_without_prediction"] == 3
    plan.write_text(json.dumps(layout_lib.LayoutItem("x", lay, None, "counting-7").to_dict()))
    with pytest.raises(ValueError, match=r"plan.jsonl line 1: id 'counting-7' is not an NSR-1K "
                                         r"counting id"):
        nsr.read_predictions(str(plan), items)
    plan.write_text(json.dumps(layout_lib.LayoutItem("x", lay, None, "spatial-101").to_dict()))
    with pytest.raises(ValueError, match=r"id 'spatial-101' is not an NSR-1K counting id"):
        nsr.read_predictions(str(plan), items)
    bad.write_text(json.dumps([dict(COUNTING_PRED[0], iter="0")]))
    with pytest.raises(ValueError, match=r"'iter' must be an integer, got '0'"):
        nsr.read_predictions(str(bad), items)
    plan.write_text(json.dumps(layout_lib.LayoutItem("no such prompt", lay).to_dict()))
    with pytest.raises(ValueError, match="matches 0 NSR-1K prompts"):
        nsr.read_predictions(str(plan), items)


def test_evaluate_script_scores_prediction_files(nsr_files, tmp_path, capsys):
    evaluate = load_script("evaluate")
    out = tmp_path / "out_counting"
    argv = ["nsr", "--nsr", str(nsr_files / "NSR-1K"), "--task", "counting", "--predictions",
            str(nsr_files / "gpt.counting.json"), "--output_dir", str(out)]
    assert evaluate.main(argv) == 0
    doc = json.load(open(out / "results.json"))
    c = doc["counting"]
    assert (c["precision"], c["recall"], c["accuracy"], c["iou"]) == pytest.approx(
        (55.0, 60.0, 100 * 2 / 7, 55.0))
    assert (c["mae"], c["n"], c["n_counted"], c["matching"]) == (pytest.approx(1.0), 7, 5,
                                                                 "layoutgpt")
    assert doc["counting_goal_jax"]["accuracy"] == pytest.approx(100 * 5 / 7)
    md = open(out / "results.md").read()
    assert "| counting | layout precision (LayoutGPT matching) | 55.00 | 5 |" in md
    assert "| counting | layout accuracy (LayoutGPT matching) | 28.57 | 7 |" in md
    assert "| counting | layout accuracy (goal_jax matching) | 71.43 | 7 |" in md
    assert "| counting | mscoco: layout precision (LayoutGPT matching) | 70.83 | 2 |" in md
    assert "| counting | prompts without a prediction (not scored) | 1 | 5 |" in md
    out = tmp_path / "out_spatial"
    argv = ["nsr", "--nsr", str(nsr_files / "NSR-1K"), "--task", "spatial", "--predictions",
            str(nsr_files / "gpt.spatial.json"), "--output_dir", str(out)]
    assert evaluate.main(argv) == 0
    doc = json.load(open(out / "results.json"))
    assert doc["spatial"] == {"accuracy": pytest.approx(100 * 4 / 7), "missing": 2, "n": 7,
                              "matching": "layoutgpt"}
    assert doc["spatial_goal_jax"]["accuracy"] == pytest.approx(100 * 3 / 7)
    md = open(out / "results.md").read()
    assert "| spatial | natural: layout accuracy (LayoutGPT matching) | 50.00 | 2 |" in md
    assert "| spatial | layout missing (LayoutGPT matching) | 2 | 7 |" in md
    assert ("| spatial | prompts without a ground-truth layout (zero-area boxes; still scored) "
            "| 1 | 4 |") in md
    # Errors: a name, not a traceback.
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query_id": 5, "object_list": []}]))
    argv[-3] = str(bad)
    assert evaluate.main(argv) == 2
    assert "query_id 5 is not an id of the NSR-1K file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(argv[:3] + argv[5:])  # --predictions without --task

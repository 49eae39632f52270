"""The shapes-world oracle (goal_jax.evaluation.oracle) with the shipped weights: the phrase
and caption parser, readings and verdicts on renders with known answers, the scoring command."""

import json
import os

import numpy as np
import pytest

from conftest import load_script
from scripts import sample as sample_script
from goal_jax import layout as layout_lib
from goal_jax.data import shapes
from goal_jax.evaluation import oracle as oracle_lib
from goal_jax.evaluation import oracle_model

RES = 64


@pytest.fixture(scope="module")
def oracle():
    return oracle_lib.Oracle.load()


def _renders(n, seed=(2026, 12)):
    """The first n items of a held-out seed (categories cycling), boxes relative."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cat = shapes.CATEGORY_CYCLE[i % len(shapes.CATEGORY_CYCLE)]
        image, caption, objs = shapes.render_item_objects(rng, cat, RES)
        out.append((image, {"id": f"r{i}", "caption": caption, "category": cat,
                            "phrases": [o["phrase"] for o in objs],
                            "boxes": [[v / RES for v in o["box"]] for o in objs]}, objs))
    return out


# ----------------------------------------------------------------------------------------------
# Parsing.
# ----------------------------------------------------------------------------------------------


def test_parse_phrase():
    P = oracle_lib.PhraseSpec
    assert oracle_lib.parse_phrase("a red striped circle") == P("circle", "red", "striped")
    assert oracle_lib.parse_phrase("yellow stars") == P("star", "yellow", None, plural=True)
    assert oracle_lib.parse_phrase("an orange hexagon") == P("hexagon", "orange")
    assert oracle_lib.parse_phrase("a star") == P("star")
    assert oracle_lib.parse_phrase("A Dotted Green Square") == P("square", "green", "dotted")


@pytest.mark.parametrize("phrase,message", [
    ("a red octagon", "phrase 'a red octagon' has the word 'octagon', which is not in the shapes "
                      "vocabulary"),
    ("a red blue circle", "phrase 'a red blue circle' names two colors ('red' and 'blue')"),
    ("a red", "phrase 'a red' names no shape"),
])
def test_parse_phrase_errors(phrase, message):
    with pytest.raises(oracle_lib.OracleError) as e:
        oracle_lib.parse_phrase(phrase, "item 7 phrase 0")
    assert str(e.value).startswith("item 7 phrase 0: " + message)


def test_parse_caption_every_category():
    for image, item, objs in _renders(12, seed=(5, 5)):
        spec = oracle_lib.parse_caption(item["caption"], item["phrases"], item["id"])
        assert spec.category == item["category"], item["caption"]
        if spec.category == "counting":
            assert spec.count == len(objs)
        if spec.category == "spatial":
            assert spec.pair == (0, 1)
            assert shapes.RELATIONS[spec.relation] in item["caption"]
    spec = oracle_lib.parse_caption("a red star to the left of a blue circle",
                                    ["a blue circle", "a red star"])
    assert (spec.category, spec.relation, spec.pair) == ("spatial", "left", (1, 0))
    with pytest.raises(oracle_lib.OracleError, match="^stars: spatial caption 'a red star above "
                                                     "a circle': 'a circle' is not one of the layout"):
        oracle_lib.parse_caption("a red star above a circle", ["a red star", "a square"], "stars")


# ----------------------------------------------------------------------------------------------
# Readings and verdicts.
# ----------------------------------------------------------------------------------------------


def test_readings_match_the_drawn_objects(oracle):
    renders = _renders(6)
    results = oracle.score_items([r[0] for r in renders], [r[1] for r in renders])
    for (image, item, objs), result in zip(renders, results):
        assert result["category"] == item["category"]
        assert result["verdict"] is True, (item["caption"], result)
        assert result["score"] == 1.0, (item["caption"], result)
        for box, obj in zip(result["boxes"], objs):
            rd = box["reading"]
            assert (rd["present"], rd["color"], rd["shape"], rd["texture"]) == \
                (True, obj["color"], obj["shape"], obj["texture"]), (item["caption"], rd)
            assert rd["iou"] > 0.6
    counting = results[4]
    assert counting["count"] == counting["expected_count"] == len(renders[4][2])
    assert results[3]["relation_ok"] is True


def test_wrong_layouts_get_wrong_verdicts(oracle):
    renders = _renders(6)
    image, item, objs = renders[0]  # color: "a <color> <shape>" (+ one more)
    wrong = next(c for c in shapes.COLORS if c != objs[0]["color"])
    phrases = list(item["phrases"])
    phrases[0] = f"a {wrong} {objs[0]['shape']}"
    r = oracle.score_item(image, " and ".join(phrases), phrases, item["boxes"], "recolored")
    assert (r["verdict"], r["boxes"][0]["color_ok"], r["boxes"][0]["shape_ok"]) == (False, False, True)
    # graded: one of the colour-named boxes has its colour (the verdict needs both)
    named = [b for b in r["boxes"] if b["color_ok"] is not None]
    assert r["category"] == "color" and r["score"] == pytest.approx(
        sum(b["color_ok"] for b in named) / len(named)) == pytest.approx(1 - 1 / len(named))

    image, item, objs = renders[3]  # spatial: flip the relation
    flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
    spec = oracle_lib.parse_caption(item["caption"], item["phrases"])
    caption = item["caption"].replace(shapes.RELATIONS[spec.relation],
                                      shapes.RELATIONS[flip[spec.relation]])
    r = oracle.score_item(image, caption, item["phrases"], item["boxes"], "flipped")
    assert (r["relation"], r["relation_ok"], r["verdict"]) == (flip[spec.relation], False, False)
    assert all(b["correct"] for b in r["boxes"])
    assert r["score"] == pytest.approx(2 / 3)  # both objects right, the relation wrong

    image, item, objs = renders[4]  # counting: one more than drawn
    n = len(objs)
    caption = item["caption"].replace(shapes.NUMBERS[n], shapes.NUMBERS.get(n + 1, "two"))
    r = oracle.score_item(image, caption, item["phrases"], item["boxes"], "miscounted")
    assert (r["count"], r["verdict"]) == (n, False)
    # graded: 1 - |count - expected| / expected, floored at 0 (here 4 drawn, "two" asked -> 0)
    expected = r["expected_count"]
    assert r["score"] == pytest.approx(max(0.0, 1 - abs(n - expected) / expected)), caption
    r2 = oracle.score_item(image, item["caption"].replace(shapes.NUMBERS[n], shapes.NUMBERS[n - 1]),
                           item["phrases"], item["boxes"], "one fewer")
    assert (r2["count"], r2["expected_count"]) == (n, n - 1)
    assert r2["score"] == pytest.approx(max(0.0, 1 - 1 / (n - 1)))

    # A box over plain background: nothing there.
    image = np.full((RES, RES, 3), 200, np.uint8)
    r = oracle.score_item(image, "a red circle", ["a red circle"], [[0.3, 0.3, 0.6, 0.6]], "empty")
    rd = r["boxes"][0]["reading"]
    assert (rd["present"], rd["iou"], rd["detected_box"], r["verdict"]) == (False, 0.0, None, False)
    assert r["score"] == 0.0


def test_bad_boxes_are_errors_naming_the_item(oracle):
    image = np.full((RES, RES, 3), 200, np.uint8)
    with pytest.raises(oracle_lib.OracleError, match=r"^odd: box 0 \[0.5, 0.2, 0.4, 0.6\] has x0 >= x1"):
        oracle.score_item(image, "a red circle", ["a red circle"], [[0.5, 0.2, 0.4, 0.6]], "odd")
    with pytest.raises(oracle_lib.OracleError, match=r"^big: box 0 \[0.0, 0.0, 64.0, 64.0\] is outside"):
        oracle.score_item(image, "a red circle", ["a red circle"], [[0, 0, 64, 64]], "big")
    with pytest.raises(oracle_lib.OracleError, match="^two: 1 phrases but 2 boxes"):
        oracle.score_item(image, "a red circle", ["a red circle"], [[0, 0, .5, .5]] * 2, "two")


def test_find_extents_of_a_drawn_square():
    image = np.full((RES, RES, 3), 200.0, np.float32)
    image[10:30, 20:44] = shapes.COLORS["blue"]
    [ext] = oracle_lib.find_extents(image, np.array([[18.0, 10.0, 44.0, 30.0]]))
    assert ext.box == (20.0, 10.0, 44.0, 30.0)
    assert ext.iou == pytest.approx(24 * 20 / (26 * 20))
    assert (ext.color, ext.color_share) == ("blue", 1.0)


# ----------------------------------------------------------------------------------------------
# Shipped weights and the scoring command.
# ----------------------------------------------------------------------------------------------


def test_shipped_weights_are_small_and_documented():
    folder = oracle_lib.DEFAULT_DIR
    size = os.path.getsize(os.path.join(folder, oracle_model.WEIGHTS_FILE))
    assert size < 1_000_000
    with open(os.path.join(folder, oracle_model.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["command"].startswith("python -m goal_jax.evaluation.oracle train --out ")
    assert config["color_method"] in ("cnn", "vote")
    ceiling = config["validation"]["ceiling"]
    assert ceiling["boxes"]["color_in_box"] >= 0.9
    assert config["validation"]["floor"]["boxes"]["color_in_box"] <= 0.3


def _write_sample_folder(folder, renders):
    for image, item, _ in renders:
        lay = layout_lib.Layout(tuple(item["phrases"]), tuple(tuple(b) for b in item["boxes"]))
        sample_script.write_outputs(str(folder), sample_script.Item(item["id"], item["caption"], lay, 0, "test"),
                             image, {"settings": {"num_inference_steps": 0}})


def test_evaluate_oracle_command(tmp_path):
    renders = _renders(6)
    samples = tmp_path / "samples"
    samples.mkdir()
    _write_sample_folder(samples, renders[:3])
    evaluate = load_script("evaluate")
    out = tmp_path / "out"
    assert evaluate.main(["oracle", "--samples", str(samples), "--output_dir", str(out)]) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert [r["id"] for r in res["items"]] == ["r0", "r1", "r2"]
    assert [r["category"] for r in res["items"]] == ["color", "shape", "texture"]
    assert [r["verdict"] for r in res["items"]] == [True, True, True]
    n_boxes = sum(len(r[1]["boxes"]) for r in renders[:3])
    summary = res["summary"]
    assert summary["boxes"]["n"] == n_boxes
    assert (summary["boxes"]["present"], summary["boxes"]["correct"], summary["verdict"]) == (1.0, 1.0, 1.0)
    assert summary["categories"]["color"]["verdict"] == 1.0
    assert summary["score"] == summary["categories"]["color"]["score"] == 1.0
    assert summary["categories"]["color"]["boxes"]["color_in_box"] == 1.0
    assert summary["categories"]["shape"]["boxes"]["color_in_box"] is None  # no colour named
    assert "| color | 1 | 100.0 % | 100.0 % | 100.0 % | 100.0 % |" in (out / "results.md").read_text()


def test_evaluate_oracle_command_errors(tmp_path, capsys):
    evaluate = load_script("evaluate")
    image, item, _ = _renders(1)[0]
    item = dict(item, phrases=["a red octagon"] + item["phrases"][1:])
    _write_sample_folder(tmp_path, [(image, item, None)])
    assert evaluate.main(["oracle", "--samples", str(tmp_path)]) == 2
    assert "error: r0 phrase 0: phrase 'a red octagon' has the word 'octagon'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main(["oracle", "--samples", str(empty)]) == 2
    assert f"error: {empty}: no sample metadata" in capsys.readouterr().err


def test_heldout_layouts_are_valid_and_deterministic():
    items = oracle_lib.heldout_layouts(6, prefix="floor")
    assert items == oracle_lib.heldout_layouts(6, prefix="floor")
    assert [it["id"] for it in items] == [f"floor-{i:03d}" for i in range(6)]
    assert [it["seed"] for it in items] == list(range(6))
    for it in items:
        parsed = layout_lib.parse_item(it, it["id"])
        assert parsed.layout.phrases == tuple(it["phrases"])
    cats = [oracle_lib.parse_caption(it["caption"], it["phrases"]).category for it in items]
    assert cats == list(shapes.CATEGORY_CYCLE)


def test_crop_sampler_labels():
    sampler = oracle_model.CropSampler(seed=3, pool_items=12)
    crops, labels = sampler.batch(64)
    again = oracle_model.CropSampler(seed=3, pool_items=12).batch(64)
    np.testing.assert_array_equal(crops, again[0])
    assert crops.shape == (64, oracle_model.CROP_SIZE, oracle_model.CROP_SIZE, 3)
    assert crops.dtype == np.float32 and 0.0 <= crops.min() and crops.max() <= 1.0
    absent = labels["present"] == 0
    assert 0 < absent.sum() < 64
    for head, n in (("color", len(shapes.COLORS)), ("shape", len(shapes.SHAPES)),
                    ("texture", len(shapes.TEXTURES))):
        assert (labels[head][absent] == -1).all()
        assert ((0 <= labels[head][~absent]) & (labels[head][~absent] < n)).all()

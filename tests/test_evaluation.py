"""Evaluation: planner metrics on hand-made layouts, CLIP similarity against transformers, and
the NSR-1K / T2I-CompBench harnesses end to end on mini files in the real formats.

Generators: ``draw_layout`` (each box filled with its phrase's colour, deterministic) with a
matching colour "detector" gives known image metrics; the last test runs
scripts/evaluate.py with the real grounded sampler on the tiny demo pipeline."""

import json
import os
import zlib

import numpy as np
import pytest
from conftest import load_script

from goal_jax import layout as layout_lib
from goal_jax import planner as P
from goal_jax.evaluation import compbench, metrics, nsr, report
from goal_jax.evaluation.detector import Detection, GroundingDinoDetector
from goal_jax.evaluation.generate import Request, load_images, render

FP32_TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Planner metrics on hand-made layouts.
# ----------------------------------------------------------------------------------------------


def test_counting_scores_known_values():
    gt = [("apple", 3), ("banana", 2)]
    # 2 apples, 3 bananas and a car: intersection 2 + 2 = 4 of 6 predicted, 5 true.
    s = metrics.counting_score(gt, ["apple", "red apple", "banana", "bananas", "a banana", "car"])
    assert s["counts"] == {"apple": 2, "banana": 3}
    assert s["precision"] == pytest.approx(4 / 6) and s["recall"] == pytest.approx(4 / 5)
    assert s["iou"] == pytest.approx(4 / 6) and s["mae"] == pytest.approx(1.0)
    assert s["accuracy"] == 0.0
    exact = metrics.counting_score(gt, ["apple"] * 3 + ["yellow banana"] * 2)
    assert (exact["precision"], exact["recall"], exact["accuracy"], exact["mae"]) == (1, 1, 1, 0)
    none = metrics.counting_score(gt, ["car"])
    assert (none["precision"], none["recall"], none["accuracy"]) == (0.0, 0.0, 0.0)
    # Comparison prompts: accuracy only.
    cmp_gt = [("giraffe", 4), ("zebra", 3)]
    assert metrics.counting_score(cmp_gt, ["giraffe"] * 4 + ["zebra"] * 2, True)["accuracy"] == 1
    assert metrics.counting_score(cmp_gt, ["giraffe"] * 3 + ["zebra"] * 2, True)["accuracy"] == 0
    assert metrics.counting_score(cmp_gt, ["giraffe"] * 4 + ["zebra"] * 5, True)["accuracy"] == 0
    tie = [("car", 2), ("bus", 2)]
    assert metrics.counting_score(tie, ["car", "car", "bus", "bus"], True)["accuracy"] == 1
    assert metrics.counting_score(tie, ["car", "car", "bus"], True)["accuracy"] == 0
    rows = [s, exact, none, metrics.counting_score(cmp_gt, ["giraffe"] * 4 + ["zebra"], True)]
    summary = metrics.summarize_counting(rows)
    assert summary["precision"] == pytest.approx((4 / 6 + 1 + 0) / 3)
    assert summary["recall"] == pytest.approx((4 / 5 + 1 + 0) / 3)
    assert summary["accuracy"] == pytest.approx(2 / 4)
    assert (summary["n"], summary["n_comparison"]) == (4, 1)
    with pytest.raises(ValueError, match="needs 2 names"):
        metrics.counting_score([("a", 1)], [], True)


def test_spatial_scores_known_values():
    left, right = (0.0, 0.3, 0.3, 0.7), (0.6, 0.3, 0.9, 0.7)
    top, bottom = (0.3, 0.0, 0.7, 0.3), (0.3, 0.6, 0.7, 0.9)
    assert metrics.spatial_relation(left, right) == "left"
    assert metrics.spatial_relation(right, left) == "right"
    assert metrics.spatial_relation(top, bottom) == "top"
    assert metrics.spatial_relation(bottom, top) == "bottom"
    assert metrics.spatial_relation(left, left) == "diagonal"
    # 60 degrees above the horizontal: top (sin > sqrt(2)/2), not right.
    assert metrics.spatial_relation((0.5, 0.0, 0.6, 0.1), (0.4, 0.1732, 0.5, 0.2732)) == "top"
    assert metrics.relation_holds("next to", [left], [right])
    assert not metrics.relation_holds("top", [left], [right])
    # Any pair counts (LayoutGPT): one of the two cats is left of the dog.
    assert metrics.relation_holds("left", [right, left], [(0.45, 0.3, 0.55, 0.7)])
    phrases, boxes = ["red cat", "dog"], [left, right]
    assert metrics.spatial_score("cat", "dog", "left", phrases, boxes) == {
        "correct": True, "missing": False}
    assert metrics.spatial_score("cat", "dog", "right", phrases, boxes) == {
        "correct": False, "missing": False}
    assert metrics.spatial_score("cat", "bus", "left", phrases, boxes) == {
        "correct": False, "missing": True}
    rows = [{"correct": True, "missing": False}, {"correct": False, "missing": True},
            {"correct": True, "missing": False}, {"correct": False, "missing": False}]
    assert metrics.summarize_spatial(rows) == {"accuracy": 0.5, "missing": 1, "n": 4}
    with pytest.raises(ValueError, match="unknown relation 'behind'"):
        metrics.relation_holds("behind", [left], [right])


def test_detection_counting_and_labels():
    gt = [("apple", 2), ("banana", 1)]
    s = metrics.detection_counting_score(gt, ["apple", "apple", "banana", "banana"])
    assert (s["correct_categories"], s["categories"], s["all_correct"]) == (1, 2, False)
    c = metrics.detection_counting_score([("giraffe", 3), ("zebra", 1)],
                                         ["giraffe"] * 3 + ["zebra"] * 2, True)
    assert (c["correct_categories"], c["categories"], c["all_correct"]) == (1, 2, True)


def test_grounding_dino_detector(tmp_path):
    """The GroundingDINO hook on a tiny random transformers model: boxes and scores equal
    transformers' own post-processing; each box's label is the requested label with the
    highest token probability."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoImageProcessorPil,
                              GroundingDinoProcessor, SwinConfig)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "dog"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=tok).save_pretrained(
        str(tmp_path))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4,
                                   image_size=64, patch_size=4, out_features=["stage1",
                                                                              "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16,
                               max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
        max_text_len=32, num_feature_levels=2, encoder_n_points=1, decoder_n_points=1)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(str(tmp_path))

    det = GroundingDinoDetector(str(tmp_path), box_threshold=0.6, text_threshold=0.0)
    assert det.prompt(["Cat", "dog"]) == ("cat. dog.", [(0, 3), (5, 8)])
    image = np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    found = det(image, ["cat", "dog"])
    from PIL import Image

    inputs = det.processor(images=Image.fromarray(image), text="cat. dog.", return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[2, 6, 5, 7, 5, 3]]
    with torch.no_grad():
        outputs = det.model(**inputs)
    ref = det.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.6, text_threshold=0.0)[0]
    assert 0 < len(found) == len(ref["scores"]) < 10
    assert np.abs(np.array([d.score for d in found]) - ref["scores"].numpy()).max() <= 1e-6
    assert np.abs(np.array([d.box for d in found]) - ref["boxes"].numpy().clip(0, 1)).max() \
        <= 1e-6
    keep = (torch.sigmoid(outputs.logits[0]).max(-1).values > 0.6).numpy()
    expected = ["cat" if a >= b else "dog" for a, b in outputs.logits[0, keep][:, [1, 3]].tolist()]
    assert [d.label for d in found] == expected
    # The text threshold drops boxes whose best label is not confident enough.
    strict = GroundingDinoDetector(str(tmp_path), box_threshold=0.6, text_threshold=0.999)(
        image, ["cat", "dog"])
    assert len(strict) < len(found)
    assert det(image, []) == []


# ----------------------------------------------------------------------------------------------
# A tiny CLIP, its parity with transformers, and the drawing generator / colour detector.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tokenizer_dir):
    import torch
    import transformers

    from goal_jax import text as text_lib

    tok = text_lib.load_tokenizer(tokenizer_dir)
    folder = str(tmp_path_factory.mktemp("clip"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    scorer = metrics.ClipScorer.from_folder(folder, tokenizer_dir, batch_size=4)
    return folder, scorer


def test_clip_similarity_matches_transformers(tiny_clip, tokenizer_dir):
    """Whole scoring path (tokenize, preprocess, both towers, projections, cosine) against
    transformers CLIPModel + CLIPImageProcessor on images whose short side is the CLIP size
    (crop only); measured max abs diff ~1e-7."""
    import torch
    import transformers
    from transformers import CLIPImageProcessorPil

    folder, scorer = tiny_clip
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (5, 32, 40, 3)).astype(np.uint8)
    texts = ["a red cat", "two blue dogs", "a cat left of a tree", "a yellow star", "photo"]
    ours = scorer.score(images, texts)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                        "width": 32})
    pixels = torch.tensor(proc(images=list(images), return_tensors="np")["pixel_values"])
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        v = model.get_image_features(pixel_values=pixels)
        t = model.get_text_features(input_ids=ids)
    v = getattr(v, "pooler_output", v)
    t = getattr(t, "pooler_output", t)
    ref = torch.nn.functional.cosine_similarity(v, t).numpy()
    print("CLIP similarity max abs diff vs transformers:", np.abs(ours - ref).max())
    assert ours.shape == (5,)
    assert np.abs(ours - ref).max() <= FP32_TOL, np.abs(ours - ref).max()
    with pytest.raises(ValueError, match="must be uint8"):
        scorer.score(images.astype(np.float32), texts)
    with pytest.raises(ValueError, match="5 images but 2 texts"):
        scorer.score(images, texts[:2])


def test_clip_tokenizer_fallback(tiny_clip, tokenizer_dir):
    """A CLIP folder without tokenizer files: the fallback (the pipeline's tokenizer/) is used,
    or the error says which flag to give."""
    from goal_jax.text import TokenizerError

    folder, scorer = tiny_clip
    with pytest.raises(TokenizerError, match=r"has no tokenizer .*give --clip_tokenizer"):
        metrics.ClipScorer.from_folder(folder)
    with pytest.raises(TokenizerError, match=r"no CLIP tokenizer: .*give --clip_tokenizer"):
        metrics.ClipScorer.from_folder(folder, fallback_tokenizer=folder)
    fallback = metrics.ClipScorer.from_folder(folder, batch_size=4,
                                              fallback_tokenizer=tokenizer_dir)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    texts = ["a red cat", "a dog"]
    np.testing.assert_array_equal(fallback.score(images, texts), scorer.score(images, texts))


SIZE = 64


def colour(phrase):
    """The fill colour of a phrase: from its head noun (so 'red cat' and 'cat' agree)."""
    head = (P.normalize_name(phrase) or ("?",))[-1]
    c = zlib.crc32(head.encode()).to_bytes(4, "little")[:3]
    return tuple(int(v) // 2 * 2 for v in c)  # never white (255 is odd)


def draw_layout(caption, layout, seed):
    """Deterministic stand-in generator: white canvas, each box filled with its colour."""
    img = np.full((SIZE, SIZE, 3), 255, np.uint8)
    for phrase, (x0, y0, x1, y1) in zip(layout.phrases, layout.boxes):
        img[round(y0 * SIZE):round(y1 * SIZE), round(x0 * SIZE):round(x1 * SIZE)] = colour(phrase)
    return img


def colour_detector(image, labels):
    """Finds each label's colour regions (4-connected components) -> Detections."""
    out = []
    for label in labels:
        mask = np.all(image == np.array(colour(label), np.uint8), axis=-1)
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            stack, pts = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pts.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            ys, xs = zip(*pts)
            out.append(Detection(label, 1.0, (min(xs) / SIZE, min(ys) / SIZE,
                                              (max(xs) + 1) / SIZE, (max(ys) + 1) / SIZE)))
    return out


def test_render_resumes_and_checks(tmp_path):
    lay = layout_lib.Layout(("cat",), ((0.25, 0.25, 0.75, 0.75),))
    reqs = [Request("a cat", lay, 0, str(tmp_path / "a.png")),
            Request("a cat", lay, 1, str(tmp_path / "b.png"))]
    assert render(reqs, draw_layout) == 2
    (start, images), = list(load_images([r.path for r in reqs]))
    assert start == 0 and images.shape == (2, SIZE, SIZE, 3)
    assert images[0, 32, 32].tolist() == list(colour("cat"))
    assert render(reqs, draw_layout) == 0  # existing images are kept (resume)
    assert render(reqs, draw_layout, overwrite=True) == 2
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="generator returned float64"):
        render([Request("x", lay, 0, str(tmp_path / "c.png"))],
               lambda c, l, s: np.zeros((8, 8, 3)))


# ----------------------------------------------------------------------------------------------
# NSR-1K end to end on mini files (LayoutGPT's json format).
# ----------------------------------------------------------------------------------------------


def _obj(name, x, y, w, h):
    return [name, [x, y, w, h]]


COUNTING = [
    {"id": 38700, "image_id": 42471, "num_object": [["clock", 2]],
     "object_list": [_obj("clock", 0.05, 0.3, 0.3, 0.4), _obj("clock", 0.6, 0.3, 0.3, 0.4)],
     "prompt": "an image of two clocks", "sub-type": "single-category", "type": "template"},
    {"id": 38701, "image_id": 393768, "num_object": [["clock", 3]],
     "object_list": [_obj("clock", 0.0, 0.0, 0.2, 0.2), _obj("clock", 0.4, 0.4, 0.2, 0.2),
                     _obj("clock", 0.7, 0.7, 0.2, 0.2)],
     "prompt": "three clocks", "sub-type": "single-category", "type": "template"},
    {"id": 39036, "image_id": 1, "num_object": [["giraffe", 4], ["zebra", 3]],
     "object_list": [_obj("zebra", 0.0, 0.0, 0.1, 0.1), _obj("zebra", 0.2, 0.0, 0.1, 0.1),
                     _obj("zebra", 0.4, 0.0, 0.1, 0.1), _obj("giraffe", 0.0, 0.5, 0.1, 0.2),
                     _obj("giraffe", 0.2, 0.5, 0.1, 0.2), _obj("giraffe", 0.4, 0.5, 0.1, 0.2),
                     _obj("giraffe", 0.6, 0.5, 0.1, 0.2)],
     "prompt": "a picture of four giraffes along with a few zebras, the number of giraffes is "
               "more than that of zebras", "sub-type": "comparison", "type": "template"},
    {"id": 39290, "image_id": 565797, "num_object": [["car", 1], ["cat", 1]],
     "object_list": [_obj("cat", 0.2, 0.05, 0.5, 0.3), _obj("car", 0.02, 0.5, 0.96, 0.45)],
     "prompt": "a cat with a big fluffy tail sitting on top of a car tire ",
     "sub-type": "real", "type": "mscoco"},
    {"id": 38750, "image_id": 7, "num_object": [["dog", 2]],
     "object_list": [_obj("dog", 0.1, 0.1, 0.3, 0.3), _obj("dog", 0.6, 0.6, 0.3, 0.3)],
     "prompt": "a photo of 3 dogs", "sub-type": "single-category", "type": "template"},
]
SPATIAL = [
    {"id": 739, "image_id": 16164, "obj1": _obj("toilet", 0.0, 0.2, 0.2, 0.3),
     "obj2": _obj("dog", 0.5, 0.5, 0.4, 0.3), "prompt": "a toilet to the left of a dog",
     "relation": "left", "type": "template"},
    {"id": 741, "image_id": 566038, "obj1": _obj("bird", 0.27, 0.6, 0.3, 0.2),
     "obj2": _obj("car", 0.3, 0.1, 0.6, 0.2), "prompt": "a bird under a car",
     "relation": "bottom", "type": "template"},
    {"id": 756, "image_id": 523403, "obj1": _obj("tv", 0.33, 0.05, 0.3, 0.2),
     "obj2": _obj("dog", 0.2, 0.5, 0.4, 0.4), "prompt": "a tv on top of a dog",
     "relation": "top", "type": "template"},
    {"id": 760, "image_id": 562851, "obj1": _obj("bench", 0.55, 0.4, 0.4, 0.3),
     "obj2": _obj("bird", 0.05, 0.45, 0.2, 0.2), "prompt": "a bench and a bird",
     "relation": "right", "type": "template"},
    {"id": 765, "image_id": 327383, "obj1": _obj("car", 0.05, 0.4, 0.3, 0.3),
     "obj2": _obj("bus", 0.5, 0.3, 0.45, 0.5), "prompt": "a car", "relation": "left",
     "type": "template"},
]
# The rule planner on these prompts (derived by hand in the module docstring's rules):
#  counting precision per prompt 1, 1, - (the giraffe/zebra prompt is a "comparison" prompt: only
#  its accuracy counts, and 4 giraffes > 3 zebras is right), 2/3 (cat + "big fluffy tail sitting"
#  + "car tire"), 2/3 (3 dogs for 2) -> 5/6; recall 1 everywhere; accuracy 4/5;
#  MAE (0+0+0+1)/4.
#  spatial: correct, correct, correct, wrong ("a bench and a bird": bench placed left),
#  missing ("a car": no bus) -> accuracy 3/5, 1 missing.
EXPECTED_LAYOUT = {
    "counting": {"precision": 5 / 6, "recall": 1.0, "accuracy": 0.8, "mae": 0.25, "n": 5},
    "spatial": {"accuracy": 0.6, "missing": 1, "n": 5},
}


@pytest.fixture
def nsr_dir(tmp_path):
    root = tmp_path / "NSR-1K"
    (root / "counting").mkdir(parents=True)
    (root / "spatial").mkdir()
    (root / "counting" / "counting.val.json").write_text(json.dumps(COUNTING, indent=4))
    (root / "spatial" / "spatial.val.json").write_text(json.dumps(SPATIAL, indent=4))
    return str(root)


def _load_all(nsr_dir, out):
    files = nsr.find_files(nsr_dir)
    assert sorted(files) == ["counting", "spatial"]
    items = []
    for task in ("counting", "spatial"):
        got, dropped = nsr.load(files[task], out)
        assert dropped == []
        items += got
    return items


def test_nsr_end_to_end(nsr_dir, tmp_path, tiny_clip):
    _, scorer = tiny_clip
    out = str(tmp_path / "run")
    items = _load_all(nsr_dir, out)
    assert [it.id for it in items] == ["38700", "38701", "39036", "39290", "38750", "739",
                                       "741", "756", "760", "765"]
    giraffes = items[2]
    assert dict(giraffes.counts) == {"giraffe": 4, "zebra": 3}
    assert items[5].relation == "left" and (items[5].obj1, items[5].obj2) == ("toilet", "dog")
    assert items[5].layout.boxes[0] == pytest.approx((0.0, 0.2, 0.2, 0.5))

    planner = P.RulePlanner()
    results = {}
    for source in ("planned", "gt"):
        results[source] = nsr.evaluate(items, os.path.join(out, source), planner, draw_layout,
                                       source, n_iter=2, seed=3, clip_scorer=scorer,
                                       detector=colour_detector)
    res = results["planned"]
    for task, expected in EXPECTED_LAYOUT.items():
        for key, value in expected.items():
            assert res[task]["layout"][key] == pytest.approx(value), (task, key)
        assert res[task]["planner_failures"] == 0
    # Detection on images drawn from the planned layouts: counting prompts right are 1, 2, 3
    # (the "car tire" box is not a car; 3 dogs for 2): 3/5 images; LayoutGPT's GLIP accuracy
    # is right categories / categories = 4/7 (1+1+1+1+0 of 1+1+2+2+1: the comparison prompt is
    # right once but has two names); spatial as the layouts.
    det = res["counting"]["image"]["detection"]
    assert det["image_accuracy"] == pytest.approx(3 / 5)
    assert det["accuracy"] == pytest.approx(4 / 7) and det["n"] == 10
    assert det["categories"] == 14
    assert res["spatial"]["image"]["detection"] == {"accuracy": 0.6, "missing": 2, "n": 10}
    # Images drawn from the ground-truth layouts: every count and relation is detected.
    gt = results["gt"]
    # (LayoutGPT's GLIP accuracy tops out at 6/7 here: the comparison prompt's second name.)
    assert gt["counting"]["image"]["detection"]["image_accuracy"] == 1.0
    assert gt["counting"]["image"]["detection"]["accuracy"] == pytest.approx(6 / 7)
    assert gt["spatial"]["image"]["detection"] == {"accuracy": 1.0, "missing": 0, "n": 10}

    # Files: images named <id>_<iter>.png (LayoutGPT's GLIP scripts), per-item rows, planned
    # layouts readable by scripts/sample.py, CLIP values recomputable from the PNGs.
    from PIL import Image

    run = os.path.join(out, "planned")
    assert sorted(os.listdir(os.path.join(run, "images", "spatial"))) == sorted(
        f"{i}_{k}.png" for i in (739, 741, 756, 760, 765) for k in (0, 1))
    rows = [json.loads(x) for x in open(os.path.join(run, "nsr1k_counting_items.jsonl"))]
    assert [r["id"] for r in rows] == ["38700", "38701", "39036", "39290", "38750"]
    assert rows[4]["layout_scores"]["counts"] == {"dog": 3}
    assert [e["seed"] for e in rows[0]["images"]] == [3, 4]
    img = np.asarray(Image.open(os.path.join(run, rows[0]["images"][1]["path"])).convert("RGB"))
    assert np.array_equal(img, draw_layout(None, planner.plan(rows[0]["prompt"]), 0))
    again = scorer.score(img[None], [rows[0]["prompt"]])[0]
    assert abs(again - rows[0]["images"][1]["clip"]) <= FP32_TOL
    clips = [e["clip"] for r in rows for e in r["images"]]
    assert res["counting"]["image"]["clip"]["mean"] == pytest.approx(np.mean(clips))
    planned = layout_lib.read_jsonl(os.path.join(run, "nsr1k_counting_planned.jsonl"))
    assert [it.id for _, it in planned][:2] == ["counting-38700", "counting-38701"]
    assert planned[0][1].layout == planner.plan("an image of two clocks")

    # A second run reuses the images (resume) and gives the same numbers.
    rerun = nsr.evaluate(items, run, planner, draw_layout, "planned", n_iter=2, seed=3,
                         clip_scorer=scorer, detector=colour_detector)
    assert rerun["counting"]["image"]["generated"] == 0
    assert rerun["counting"]["image"]["detection"] == res["counting"]["image"]["detection"]

    md, js = report.write(run, "NSR-1K", res, {"planner": "rule", "n_iter": 2},
                          checkpoint="draw_layout (test generator)")
    text = open(md).read()
    print(text)
    # n per metric: precision leaves the comparison prompt out.
    assert "| counting | layout precision (LayoutGPT matching) | 83.33 | 4 |" in text
    assert "| counting | layout accuracy (LayoutGPT matching) | 80.00 | 5 |" in text
    # goal_jax's matching: the planner's "car tire" is no car (LayoutGPT: "car" is in it).
    assert "| counting | layout accuracy (goal_jax matching) | 60.00 | 5 |" in text
    assert "| counting | mscoco: layout recall (goal_jax matching) | 50.00 | 1 |" in text
    assert "| spatial | layout accuracy (LayoutGPT matching) | 60.00 | 5 |" in text
    assert "| spatial | layout missing (LayoutGPT matching) | 1 | 5 |" in text
    assert "| spatial | template: layout accuracy (LayoutGPT matching) | 60.00 | 5 |" in text
    assert ("| counting | detection accuracy, LayoutGPT's GLIP rule (planned layouts) | 57.14 "
            "| 14 |") in text
    assert ("| counting | detection accuracy, all counts right (planned layouts) | 60.00 "
            "| 10 |") in text
    assert "- checkpoint: `draw_layout (test generator)`" in text
    doc = json.load(open(js))
    assert doc["settings"] == {"planner": "rule", "n_iter": 2}
    assert doc["results"]["spatial"]["layout"]["missing"] == 1


def test_nsr_bad_entries(tmp_path):
    path = tmp_path / "spatial.val.json"
    entries = [dict(SPATIAL[0]), dict(SPATIAL[1], relation="behind"),
               {"id": 9, "prompt": "x"}]
    path.write_text(json.dumps(entries))
    items, dropped = nsr.load(str(path), str(tmp_path / "out"))
    assert [it.id for it in items] == ["739"]
    reasons = {d["id"]: d["reason"] for d in dropped}
    assert "relation 'behind' is not one of" in reasons["741"]
    assert "neither 'object_list'" in reasons["9"]
    with pytest.raises(FileNotFoundError, match="holds neither counting"):
        nsr.find_files(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="needs a planner"):
        nsr.evaluate(items, str(tmp_path / "o"), None, draw_layout, "planned")


def test_nsr_counts_from_num_object_and_sub_type():
    """When the layout JSONL carries NSR-1K's num_object / sub-type (as ``num_object`` /
    ``sub_type``), they define the counts and the comparison rule."""
    line = {"id": "39036", "image": "", "caption": COUNTING[2]["prompt"],
            "box_format": "xyxy_normalized", "category": "counting",
            "annotations": [{"phrase": "zebra", "box": [0.0, 0.0, 0.1, 0.1]},
                            {"phrase": "giraffe", "box": [0.0, 0.5, 0.1, 0.7]}],
            "num_object": [["giraffe", 4], ["zebra", 2]], "sub_type": "comparison"}
    item = nsr.item_from_line(line)
    assert item.counts == (("giraffe", 4), ("zebra", 2)) and item.comparison
    # The rule planner's 4 giraffes + 3 zebras keep "more giraffes than zebras": right.
    assert nsr.layout_scores(item, P.RulePlanner().plan(item.prompt))["accuracy"] == 1.0
    del line["num_object"], line["sub_type"]
    plain = nsr.item_from_line(line)
    assert plain.counts == (("zebra", 1), ("giraffe", 1)) and not plain.comparison


# ----------------------------------------------------------------------------------------------
# T2I-CompBench end to end on a mini prompt file.
# ----------------------------------------------------------------------------------------------

PROMPTS = "a green bench and a blue bowl\n\na red cat on the left of a dog\tignored\n"


def test_compbench_end_to_end(tmp_path, tiny_clip):
    _, scorer = tiny_clip
    prompt_file = tmp_path / "color_val.txt"
    prompt_file.write_text(PROMPTS)
    out = str(tmp_path / "color_val")
    res = compbench.run(str(prompt_file), out, P.RulePlanner(), draw_layout, n_images=2,
                        seed=42, clip_scorer=scorer)
    names = sorted(os.listdir(os.path.join(out, "samples")))
    assert names == ["a green bench and a blue bowl_000000.png",
                     "a green bench and a blue bowl_000001.png",
                     "a red cat on the left of a dog_000002.png",
                     "a red cat on the left of a dog_000003.png"]
    # Their scorers' parsing of the names: prompt = split("_")[0]; index from the last
    # (CLIPScore, BLIP-VQA) or the second (UniDet) field.
    assert [n.split("_")[0] for n in names] == ["a green bench and a blue bowl"] * 2 + [
        "a red cat on the left of a dog"] * 2
    assert [int(n.split("_")[-1].split(".")[0]) for n in names] == [0, 1, 2, 3]
    assert [int(n.split("_")[1].split(".")[0]) for n in names] == [0, 1, 2, 3]
    assert res["category"] == "color" and res["prompts"] == 2 and res["images"] == 4
    clip_json = json.load(open(os.path.join(out, "annotation_clip", "vqa_result.json")))
    assert [c["question_id"] for c in clip_json] == [0, 1, 2, 3]
    from PIL import Image

    img = np.asarray(Image.open(os.path.join(out, "samples", names[2])).convert("RGB"))
    assert abs(scorer.score(img[None], ["a red cat on the left of a dog"])[0]
               - clip_json[2]["answer"]) <= FP32_TOL
    assert res["clip"]["mean"] == pytest.approx(np.mean([c["answer"] for c in clip_json]))
    rows = [json.loads(x) for x in open(os.path.join(out, "layouts.jsonl"))]
    assert rows[1]["phrases"] == ["red cat", "dog"] and rows[1]["images"] == names[2:]
    assert "python BLIP_vqa.py --out_dir=" + os.path.abspath(out) + "/" in open(
        os.path.join(out, "SCORING.md")).read()
    md, _ = report.write(str(tmp_path), "T2I-CompBench", {"color_val": res}, {"n_images": 2})
    text = open(md).read()
    assert "| color | images | 4 | 2 |" in text
    assert f"| color | CLIPScore | {res['clip']['mean']:.4f} | 4 |" in text
    # Another run's files in samples/ would be scored too: refused.
    with pytest.raises(ValueError, match="holds 3 file"):
        compbench.run(str(prompt_file), out, P.RulePlanner(), draw_layout, n_images=1)


def test_compbench_prompt_errors(tmp_path):
    bad = tmp_path / "shape_val.txt"
    bad.write_text("a round clock\na square_box\n")
    with pytest.raises(compbench.PromptFileError, match=r"shape_val.txt line 2: .* contains '_'"):
        compbench.read_prompts(str(bad))
    empty = tmp_path / "texture_val.txt"
    empty.write_text("\n\n")
    with pytest.raises(compbench.PromptFileError, match="no prompts"):
        compbench.read_prompts(str(empty))
    assert compbench.category_of("x/non_spatial_val.txt") == "non_spatial"
    assert compbench.category_of("color_val_unseen.txt") == "color"
    assert compbench.category_of("mine.txt") is None


# ----------------------------------------------------------------------------------------------
# scripts/evaluate.py with the real grounded sampler on the tiny demo pipeline.
# ----------------------------------------------------------------------------------------------


def test_evaluate_script_with_real_sampler(tmp_path, nsr_dir, monkeypatch):
    from conftest import TEST_WORDS
    from goal_jax import demo_models

    for var in (P.ENV_MODEL, P.ENV_LOCAL_LM):
        monkeypatch.delenv(var, raising=False)
    evaluate = load_script("evaluate")
    # Planner metrics only (no model).
    out = tmp_path / "nsr"
    assert evaluate.main(["nsr", "--nsr", nsr_dir, "--output_dir", str(out)]) == 0
    doc = json.load(open(out / "results.json"))
    assert doc["results"]["counting"]["layout"]["precision"] == pytest.approx(5 / 6)
    assert doc["results"]["spatial"]["layout"]["accuracy"] == pytest.approx(0.6)
    assert doc["checkpoint"] is None and doc["settings"]["planner"] == "rule"

    # T2I-CompBench with the GLIGEN sampler (2 DDIM steps) on the 32x32 demo pipeline.
    models = demo_models.write_demo_models(str(tmp_path / "demo"), words=TEST_WORDS,
                                           resolution=32)
    prompt_file = tmp_path / "spatial_val.txt"
    prompt_file.write_text("a red cat on the left of a dog\na blue car above a tree\n")
    out = tmp_path / "cb"
    argv = ["compbench", "--prompts", str(prompt_file), "--output_dir", str(out),
            "--pretrained", models.pipeline, "--steps", "2", "--cfg", "2.0", "--n_images", "1",
            "--num_devices", "1", "--clip", models.clip,
            "--clip_tokenizer", os.path.join(models.pipeline, "tokenizer")]
    assert evaluate.main(argv) == 0
    samples = sorted(os.listdir(out / "spatial_val" / "samples"))
    assert samples == ["a blue car above a tree_000001.png",
                       "a red cat on the left of a dog_000000.png"]
    from PIL import Image

    img = np.asarray(Image.open(out / "spatial_val" / "samples" / samples[1]))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0
    doc = json.load(open(out / "results.json"))
    res = doc["results"]["spatial_val"]
    assert (res["category"], res["images"], res["generated"]) == ("spatial", 2, 2)
    assert doc["settings"]["sampling"]["num_steps"] == 2
    assert doc["checkpoint"] == os.path.abspath(models.pipeline)
    clip_json = json.load(open(out / "spatial_val" / "annotation_clip" / "vqa_result.json"))
    assert res["clip"]["mean"] == pytest.approx(np.mean([c["answer"] for c in clip_json]))
    assert all(-1.0 <= c["answer"] <= 1.0 for c in clip_json)

    # NSR-1K images from the planned layouts with the same sampler settings (the compiled
    # program is reused), CLIP-scored; the CLIP folder has no tokenizer: the pipeline's is used.
    out = tmp_path / "nsr_images"
    argv = ["nsr", "--nsr", nsr_dir, "--tasks", "spatial", "--limit", "2", "--output_dir",
            str(out), "--pretrained", models.pipeline, "--steps", "2", "--cfg", "2.0",
            "--num_devices", "1", "--clip", models.clip]
    assert evaluate.main(argv) == 0
    assert sorted(os.listdir(out / "images" / "spatial")) == ["739_0.png", "741_0.png"]
    doc = json.load(open(out / "results.json"))
    image = doc["results"]["spatial"]["image"]
    assert (image["layouts"], image["n_images"], image["generated"]) == ("planned", 2, 2)
    assert image["clip"]["n"] == 2 and doc["results"]["spatial"]["layout"]["accuracy"] == 1.0
    assert "counting" not in doc["results"]

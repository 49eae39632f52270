"""data_prep phrase extraction and annotate.py end to end with a tiny random GroundingDINO
(transformers, built here: ResNet backbone, 1-layer BERT text encoder, 20 queries)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import annotate, common, phrases


def texts(caption):
    return [(p.text, p.count, p.instance) for p in phrases.extract_rules(caption)]


def test_rule_based_phrases_on_hand_made_prompts():
    assert texts("a red car and a blue bench") == [("a red car", 1, "a red car"),
                                                   ("a blue bench", 1, "a blue bench")]
    assert texts("A man riding a horse next to two brown dogs.") == [
        ("A man", 1, "A man"), ("a horse", 1, "a horse"), ("two brown dogs", 2, "brown dogs")]
    assert texts("three apples on the left of a wooden table") == [
        ("three apples", 3, "apples"), ("a wooden table", 1, "a wooden table")]
    assert texts("A group of people standing in front of a building") == [
        ("A group of people", 1, "A group of people"), ("a building", 1, "a building")]
    assert texts("a cat sitting on top of a striped couch") == [
        ("a cat", 1, "a cat"), ("a striped couch", 1, "a striped couch")]
    assert texts("The pizza is on a plate of food with the knife to the right.") == [
        ("The pizza", 1, "The pizza"), ("a plate of food", 1, "a plate of food"),
        ("the knife", 1, "the knife")]
    assert texts("red apples and a hot dog, 3 cups") == [
        ("red apples", 1, "red apples"), ("a hot dog", 1, "a hot dog"), ("3 cups", 3, "cups")]
    assert texts("it is in the background") == []
    # Offsets point into the caption.
    caption = "Two zebras and a giraffe"
    assert [(p.start, p.end) for p in phrases.extract_rules(caption)] == [(0, 10), (15, 24)]


def test_object_mentions_and_helpers():
    assert phrases.object_mentions("A man riding a horse next to two dogs and a hot dog") == [
        ("person", 1), ("horse", 1), ("dog", 2), ("hot dog", 1)]
    assert phrases.object_mentions("people on bikes") == [("person", 2), ("bicycle", 2)]
    assert [phrases.plural(w) for w in ("bus", "knife", "potted plant", "cherry", "sheep", "dog")] == [
        "buses", "knives", "potted plants", "cherries", "sheep", "dogs"]
    assert [phrases.article(w) for w in ("umbrella", "orange", "unicorn", "car")] == ["an", "an", "a", "a"]
    assert phrases.find_phrase("A Red car near a red carpet", "a red car") == 0
    assert phrases.find_phrase("a red carpet", "a red car") == -1
    with pytest.raises(ValueError, match="phrase extractor must be auto, spacy or rules"):
        phrases.extract("x", "nltk")


def test_item_phrases_from_records():
    got, problems = annotate.item_phrases(
        "Three apples beside a blue cup", [{"phrase": "three apples", "count": 3},
                                           {"phrase": "a blue cup", "count": 1},
                                           {"phrase": "a green fork", "count": 1},
                                           {"phrase": "a blue cup", "count": 0}])
    assert [(p.text, p.start, p.count, p.instance) for p in got] == [
        ("Three apples", 0, 3, "apples"), ("a blue cup", 20, 1, "a blue cup")]
    assert problems == [{"phrase": "a green fork", "reason": "not in the prompt"},
                        {"phrase": "a blue cup", "reason": "count must be an integer >= 1, got 0"}]
    got, problems = annotate.item_phrases("a dog under a tree", None, "rules")
    assert [p.text for p in got] == ["a dog", "a tree"] and problems == []


def test_assign_boxes_by_hand():
    # 4 query boxes, 6 tokens; phrase A = tokens [1, 2], phrase B = token [4] (count 2).
    probs = np.array([
        [0.0, 0.9, 0.2, 0.0, 0.1, 0.0],   # q0: A 0.9
        [0.0, 0.5, 0.6, 0.0, 0.8, 0.0],   # q1: A 0.6, B 0.8
        [0.0, 0.1, 0.1, 0.0, 0.7, 0.0],   # q2: B 0.7 (overlaps q1 by IoU 0.6)
        [0.0, 0.3, 0.0, 0.0, 0.4, 0.0],   # q3: box score 0.4
    ])
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [22, 20, 32, 30], [50, 50, 60, 60]], float)
    got = annotate.assign_boxes(probs, boxes, [[1, 2], [4]], [1, 2], 0.35, 0.25, nms_iou=0.5)
    assert got == [[(0, 0.9)], [(1, 0.8), (3, 0.4)]]  # q2 suppressed (IoU 2/3 with q1)
    got = annotate.assign_boxes(probs, boxes, [[1, 2], [4]], [1, 2], 0.35, 0.25, nms_iou=0.7)
    assert got == [[(0, 0.9)], [(1, 0.8), (2, 0.7)]]
    got = annotate.assign_boxes(probs, boxes, [[1, 2], [4], []], [1, 1, 1], 0.85, 0.25)
    assert got == [[(0, 0.9)], [], []]  # only q0 passes the box threshold
    assert annotate.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


WORDS = ("a an the red blue green car bench dog dogs cat two tree under and of").split()


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    import torch
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig,
                              GroundingDinoForObjectDetection, GroundingDinoProcessor,
                              ResNetConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil)

    folder = str(tmp_path_factory.mktemp("gdino"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + list(WORDS)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = GroundingDinoConfig(
        backbone_config=ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8, 8, 8],
                                     depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128}),
        tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def make_work(folder):
    rng = np.random.default_rng(0)
    manifest = common.Manifest(os.path.join(folder, "manifest.jsonl"))
    items = [
        ("color_0000", "a red car and a blue bench", [{"phrase": "a red car", "count": 1},
                                                      {"phrase": "a blue bench", "count": 1}], "color"),
        ("counting_0000", "two dogs and a cat", [{"phrase": "two dogs", "count": 2},
                                                 {"phrase": "a cat", "count": 1}], "counting"),
        ("coco_7", "a dog under a green tree", None, "spatial"),
    ]
    for i, (rid, prompt, ph, cat) in enumerate(items):
        size = (96, 64) if i != 1 else (64, 80)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", f"{rid}.png"))
        manifest.add({"id": rid, "prompt": prompt, "image": f"images/{rid}.png", "phrases": ph,
                      "category": cat, "source": "api:test", "seed": None, "time": "t",
                      "prompt_source": "coco" if ph is None else "template"})
    return items


def test_annotate_end_to_end(gdino_dir, tmp_path):
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from goal_jax.data import format as fmt

    work = str(tmp_path / "work")
    make_work(work)
    summary = annotate.annotate_folder(work, gdino_dir, box_threshold=0.0, text_threshold=0.0,
                                       nms_iou=1.0, extractor="rules", device="cpu",
                                       show_progress=False)
    assert summary["items"] == 3 and summary["annotated_this_run"] == 3
    assert summary["errors"] == [] and summary["format_errors"] == []
    records, errors = fmt.read_annotations(os.path.join(work, "annotations.jsonl"))
    assert errors == [] and [r.id for r in records] == ["color_0000", "counting_0000", "coco_7"]
    r0, r1, r2 = records
    assert r0.phrases == ["a red car", "a blue bench"] and r0.box_format == "xyxy_pixels"
    assert r0.category == "color" and r0.source == "template" and r0.caption == "a red car and a blue bench"
    assert r1.phrases == ["dogs", "dogs", "a cat"]  # count 2 -> two boxes labelled without "two"
    assert r2.phrases == ["a dog", "a green tree"] and r2.source == "coco"  # extracted by rules
    for rec, (w, h) in zip(records, [(96, 64), (64, 80), (96, 64)]):
        for box in rec.boxes:
            assert 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h

    # Independent check of item 0 with transformers' own pipeline pieces: the chosen box of
    # each phrase is the query with the highest probability over the phrase's tokens.
    processor = AutoProcessor.from_pretrained(gdino_dir)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(gdino_dir).eval()
    image = Image.open(os.path.join(work, "images", "color_0000.png")).convert("RGB")
    inputs = processor(images=image, text="a red car. a blue bench.", return_tensors="pt")
    assert inputs["input_ids"][0].tolist()[1:4] == [processor.tokenizer.convert_tokens_to_ids(t)
                                                   for t in ("a", "red", "car")]
    with torch.no_grad():
        out = model(**inputs)
    post = processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(64, 96)])[0]
    probs = torch.sigmoid(out.logits[0]).numpy()
    for phrase_tokens, box in zip(([1, 2, 3], [5, 6, 7]), r0.boxes):
        q = int(probs[:, phrase_tokens].max(axis=1).argmax())
        np.testing.assert_allclose(box, post["boxes"][q].numpy(), atol=0.006)
    line = common.read_jsonl(os.path.join(work, "annotations.jsonl"))[0]
    scores = [a["score"] for a in line["annotations"]]
    np.testing.assert_allclose(scores, [probs[:, [1, 2, 3]].max(), probs[:, [5, 6, 7]].max()], atol=1e-4)
    assert os.path.isfile(os.path.join(work, "review.html"))

    # Resume: nothing left to do (no model is even loaded); other settings need --overwrite.
    summary = annotate.annotate_folder(work, gdino_dir, box_threshold=0.0, text_threshold=0.0,
                                       nms_iou=1.0, extractor="rules", show_progress=False,
                                       detector="unused")
    assert summary["annotated_this_run"] == 0 and summary["items"] == 3
    with pytest.raises(common.DataPrepError, match=r"box_threshold must be in \[0, 1\], got 1.5"):
        annotate.annotate_folder(work, gdino_dir, box_threshold=1.5, show_progress=False)
    with pytest.raises(common.DataPrepError, match="made with other settings"):
        annotate.annotate_folder(work, gdino_dir, box_threshold=0.5, show_progress=False)

    # Thresholds no box can pass (scores must be > 1): every phrase is reported, none guessed.
    summary = annotate.annotate_folder(work, gdino_dir, box_threshold=1.0, text_threshold=1.0,
                                       extractor="rules", overwrite=True, show_progress=False)
    assert summary["boxes"] == 0
    assert summary["items_without_boxes"] == ["color_0000", "counting_0000", "coco_7"]
    assert summary["phrases_without_box"][0] == {"phrase": "a red car", "reason":
                                                 "no box above the thresholds", "id": "color_0000"}
    assert len(summary["phrases_without_box"]) == 6
    with open(os.path.join(work, "annotate_summary.json")) as f:
        assert json.load(f)["boxes"] == 0


def test_commands_have_help(capsys):
    from data_prep import coco_captions, generate_images, prompts, review

    for module in (prompts, coco_captions, generate_images, annotate, review):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        assert "usage: python -m data_prep." in capsys.readouterr().out


def test_four_commands_end_to_end(gdino_dir, tmp_path, monkeypatch, capsys):
    """prompts -> generate_images (fake image API on 127.0.0.1) -> annotate -> review apply,
    all through the command-line entry points, into a folder the goal2k builder accepts."""
    from test_data_prep_api import FakeServer, png_b64

    from data_prep import generate_images, prompts, review
    from goal_jax.data import goal2k

    server = FakeServer(default=lambda req: (200, {"data": [{"b64_json": png_b64(
        (len(server.requests) * 60, 90, 30), size=(96, 64))}]}, {}))
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-e2e")
        work, final = tmp_path / "work", tmp_path / "goal2k_src"
        assert prompts.main(["--out", str(work / "prompts.jsonl"), "--counts",
                             "color=2,counting=1", "--quiet"]) == 0
        assert generate_images.main(["--prompts", str(work / "prompts.jsonl"), "--out", str(work),
                                     "--base-url", server.url, "--rpm", "0", "--quiet"]) == 0
        assert len(server.requests) == 3
        assert annotate.main([str(work), "--model", gdino_dir, "--box-threshold", "0",
                              "--text-threshold", "0", "--device", "cpu", "--quiet"]) == 0
        assert "review page:" in capsys.readouterr().out
        items = common.read_jsonl(str(work / "annotations.jsonl"))
        decisions = {it["id"]: {"decision": "accept" if i < 2 else "reject", "notes": ""}
                     for i, it in enumerate(items)}
        with open(work / "decisions.json", "w") as f:
            json.dump({"format": "goal_jax-review-decisions", "version": 1, "decisions": decisions}, f)
        assert review.main(["apply", str(work), "--decisions", str(work / "decisions.json"),
                            "--out", str(final), "--quiet"]) == 0
        assert "2 train + 0 val items (2 accepted, 1 rejected" in capsys.readouterr().out
        good, build = goal2k.scan_source(str(final))
        assert [g["record"].id for g in good["train"]] == ["color_0000", "color_0001"]
        assert build["items_kept"] == 2 and build["boxes_dropped"] == 0
        assert [g["phrases"] for g in good["train"]] == [
            [p["phrase"] for p in items[k]["annotations"]] for k in (0, 1)]
    finally:
        server.close()

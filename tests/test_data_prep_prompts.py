"""data_prep prompt generation (counts per category, determinism, uniqueness, phrases) and
COCO caption selection."""

import collections
import json

import pytest

from data_prep import coco_captions, common, phrases, prompts


def test_default_counts_per_category_and_no_duplicates():
    counts = prompts.split_counts(1000, list(prompts.CATEGORIES))
    assert counts == {"color": 143, "shape": 143, "texture": 143, "spatial": 143,
                      "counting": 143, "non_spatial": 143, "complex": 142}
    records = prompts.generate_prompts(counts, seed=0)
    assert len(records) == 1000
    assert collections.Counter(r["category"] for r in records) == counts
    assert len({r["prompt"] for r in records}) == 1000
    assert len({r["id"] for r in records}) == 1000
    assert records[0]["id"] == "color_0000" and records[-1]["id"] == "complex_0141"
    for r in records:
        assert r["source"] == "template" and r["template"] == r["prompt"] and r["seed"] == 0
        # Every intended phrase is a whole-word substring of its prompt, in order.
        pos = 0
        for p in r["phrases"]:
            at = phrases.find_phrase(r["prompt"], p["phrase"], pos)
            assert at >= pos, (r["prompt"], p)
            pos = at + len(p["phrase"])
            assert isinstance(p["count"], int) and p["count"] >= 1
        n = {"complex": (2, 3)}.get(r["category"], (2,))
        assert len(r["phrases"]) in n
        if r["category"] == "counting":
            assert r["phrases"][0]["count"] in (2, 3, 4, 5)
            word = r["phrases"][0]["phrase"].split()[0]
            assert phrases.NUMBER_WORDS[word] == r["phrases"][0]["count"]
        else:
            assert all(p["count"] == 1 for p in r["phrases"])


def test_templates_by_category():
    recs = {r["category"]: r for r in prompts.generate_prompts({c: 1 for c in prompts.CATEGORIES}, 3)}
    vocab = prompts.Vocabulary()
    color = recs["color"]["phrases"]
    assert all(p["phrase"].split()[1] in vocab.colors for p in color)
    assert recs["color"]["prompt"] == f"{color[0]['phrase']} and {color[1]['phrase']}"
    spatial = recs["spatial"]["prompt"]
    assert any(f" {rel} " in spatial for rel in vocab.relations)
    subject = recs["non_spatial"]["phrases"][0]["phrase"].split(" ", 1)[1]
    assert vocab.supercategory[subject] in ("person", "animal")
    assert any(f" {a} " in recs["non_spatial"]["prompt"] for a in vocab.actions)


def test_determinism_by_seed_and_category_independence():
    counts = {"color": 50, "spatial": 50, "counting": 50}
    a = prompts.generate_prompts(counts, seed=7)
    b = prompts.generate_prompts(counts, seed=7)
    c = prompts.generate_prompts(counts, seed=8)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    # A category's prompts do not depend on which other categories are drawn.
    only = prompts.generate_prompts({"spatial": 50}, seed=7)
    assert [r["prompt"] for r in only] == [r["prompt"] for r in a if r["category"] == "spatial"]


def test_prompt_errors(tmp_path):
    with pytest.raises(common.DataPrepError, match="unknown prompt category 'colour'"):
        prompts.generate_prompts({"colour": 3})
    with pytest.raises(common.DataPrepError, match="--counts: unknown category 'size'"):
        prompts.parse_counts("color=3,size=2")
    with pytest.raises(common.DataPrepError, match="--counts: color needs a non-negative integer"):
        prompts.parse_counts("color=x")
    # A vocabulary that cannot give enough distinct prompts.
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    for name in ("colors", "shapes", "textures", "spatial_relations", "actions"):
        (vocab / f"{name}.txt").write_text("a1\na2\n")
    (vocab / "counts.txt").write_text("two\t2\n")
    (vocab / "coco_objects.txt").write_text("person\tperson\ncup\tkitchen\n")
    with pytest.raises(common.DataPrepError, match=r"category color: only 4 distinct prompts after \d+ "
                                                   "draws, 5 requested"):
        prompts.generate_prompts({"color": 5}, vocab_dir=str(vocab), max_attempts_per_prompt=50)
    (vocab / "counts.txt").write_text("one\t1\n")
    with pytest.raises(common.DataPrepError, match="counts.txt: expected 'word<TAB>number >= 2'"):
        prompts.Vocabulary(str(vocab))


def test_prompts_cli(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert prompts.main(["--out", str(out), "--total", "20", "--categories", "color,shape,spatial"]) == 0
    assert "wrote 20 prompts" in capsys.readouterr().out
    recs = common.read_jsonl(str(out))
    assert collections.Counter(r["category"] for r in recs) == {"color": 7, "shape": 7, "spatial": 6}
    assert prompts.main(["--out", str(out), "--counts", "texture=4"]) == 0
    assert [r["id"] for r in common.read_jsonl(str(out))] == [f"texture_{i:04d}" for i in range(4)]
    assert prompts.main(["--out", str(out), "--rewrite", "llm", "--api-key-env", "NO_SUCH_KEY_VAR"]) == 1
    assert "needs an API key in $NO_SUCH_KEY_VAR" in capsys.readouterr().err
    assert prompts.main(["--out", str(out), "--categories", "color,sizes"]) == 1
    assert "unknown ['sizes']" in capsys.readouterr().err


def test_shipped_coco_vocabulary():
    vocab = prompts.Vocabulary()
    assert len(vocab.objects) == 80 and len(set(vocab.objects)) == 80
    assert vocab.objects[:3] == ["person", "bicycle", "car"] and vocab.objects[-1] == "toothbrush"
    assert collections.Counter(vocab.supercategory.values())["animal"] == 10


COCO = {
    "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
               {"id": 3, "file_name": "000000000003.jpg"}, {"id": 4, "file_name": "000000000004.jpg"}],
    "annotations": [
        {"id": 10, "image_id": 1, "caption": "A cat sitting on a couch next to a laptop."},
        {"id": 11, "image_id": 1, "caption": "A cat and a laptop on a brown couch"},      # 2nd of image 1
        {"id": 20, "image_id": 2, "caption": "A kitchen with white cabinets and wooden floors"},  # no COCO objects
        {"id": 21, "image_id": 2, "caption": "Three sheep grazing in a green field"},    # 3 objects
        {"id": 30, "image_id": 3, "caption": "a tall building"},                       # too short
        {"id": 31, "image_id": 3, "caption": "A small house to the left of a tall building"},  # spatial
        {"id": 40, "image_id": 4, "caption": "a cat sitting on a couch next to a laptop"},   # duplicate of 10
        {"id": 41, "image_id": 4, "caption": "A man rides a horse down a quiet road"},
    ],
}


def test_coco_caption_selection():
    records, stats = coco_captions.select_captions(COCO, num=10)
    assert [r["id"] for r in records] == ["coco_10", "coco_21", "coco_31", "coco_41"]
    assert [r["category"] for r in records] == ["spatial", "counting", "spatial", "complex"]
    assert records[0]["prompt"] == "A cat sitting on a couch next to a laptop"
    assert [p["phrase"] for p in records[0]["phrases"]] == ["A cat", "a couch", "a laptop"]
    assert records[1]["phrases"][0] == {"phrase": "Three sheep", "count": 3}
    assert records[0]["coco_file_name"] == "000000000001.jpg" and records[0]["source"] == "coco"
    assert records[3]["object_categories"] == ["horse", "person"]
    assert stats == {"annotations": 8, "length": 1, "not_multi_object": 1, "duplicate": 1,
                     "per_image_limit": 1, "qualifying": 4, "selected": 4,
                     "by_category": {"spatial": 2, "counting": 1, "complex": 1}}
    # Sampling is seeded and keeps file order; the same seed gives the same selection.
    a, _ = coco_captions.select_captions(COCO, num=2, seed=1)
    b, _ = coco_captions.select_captions(COCO, num=2, seed=1)
    assert a == b and len(a) == 2
    assert [r["id"] for r in a] == sorted((r["id"] for r in a), key=lambda i: int(i[5:]))
    with pytest.raises(common.DataPrepError, match="annotation 0 needs 'image_id' and a string 'caption'"):
        coco_captions.select_captions({"annotations": [{"caption": "x"}]})


def test_coco_captions_cli(tmp_path, capsys):
    src = tmp_path / "captions_train2017.json"
    src.write_text(json.dumps(COCO))
    out = tmp_path / "coco.jsonl"
    assert coco_captions.main([str(src), "--out", str(out), "--num", "3", "--extractor", "rules"]) == 0
    assert len(common.read_jsonl(str(out))) == 3 and "wrote 3 captions" in capsys.readouterr().out
    assert coco_captions.main([str(tmp_path / "missing.json"), "--out", str(out)]) == 1
    assert "captions file not found" in capsys.readouterr().err

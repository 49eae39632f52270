"""T2I-CompBench: the scorer command and result file of every category, the 3-in-1 constraint
checked before anything runs, reruns and interrupted renders, and `compbench summarize`
reading the scorers' outputs (hand-written vqa_result.json files in their format) back."""

import json
import os

import numpy as np
import pytest
from conftest import load_script

from goal_jax import planner as P
from goal_jax.evaluation import compbench, generate

# category -> (script in SCORING.md, result file it writes), per T2I-CompBench's README/scripts.
EXPECTED = {
    "color": ("python BLIP_vqa.py --out_dir=", "annotation_blip/vqa_result.json"),
    "shape": ("python BLIP_vqa.py --out_dir=", "annotation_blip/vqa_result.json"),
    "texture": ("python BLIP_vqa.py --out_dir=", "annotation_blip/vqa_result.json"),
    "spatial": ("python 2D_spatial_eval.py --outpath=",
                "labels/annotation_obj_detection_2d/vqa_result.json"),
    "3d_spatial": ("python 3D_spatial_eval.py --outpath=",
                   "labels/annotation_obj_detection_3d/vqa_result.json"),
    "numeracy": ("python numeracy_eval.py --outpath=", "annotation_num/vqa_result.json"),
    "non_spatial": ("python CLIPScore_eval/CLIP_similarity.py --outpath=",
                    "annotation_clip/vqa_result.json"),
    "complex": ("python 3_in_1.py --outpath=", "annotation_3_in_1/vqa_result.json"),
}


def blank(caption, layout, seed):
    return np.full((8, 8, 3), seed % 256, np.uint8)


def test_scoring_commands_for_every_category(tmp_path):
    d = os.path.abspath(str(tmp_path)) + "/"
    for cat, (script, result) in EXPECTED.items():
        text = compbench.scoring_commands(str(tmp_path), cat)
        assert script + d in text, cat
        assert f"Scores: `{d}{result}`" in text, cat
        others = {s for c, (s, _) in EXPECTED.items() if c != cat and c != "complex"}
        if cat != "complex":
            assert not any(s + d in text for s in others - {script}), cat
    cx = compbench.scoring_commands(str(tmp_path), "complex")
    assert f"python 2D_spatial_eval.py --outpath={d} --complex=True" in cx
    assert f"python CLIPScore_eval/CLIP_similarity.py --outpath={d} --complex=True" in cx
    assert f"python BLIP_vqa.py --out_dir={d}" in cx
    assert "--complex=True" not in compbench.scoring_commands(str(tmp_path), "spatial")
    partial = compbench.scoring_commands(str(tmp_path), "complex", three_in_one=False)
    assert "3_in_1.py" not in partial and "3-in-1 is left out" in partial
    unknown = compbench.scoring_commands(str(tmp_path), None)
    assert all(s + d in unknown for s, _ in EXPECTED.values())


def test_three_in_one_constraint_checked_up_front(tmp_path, capsys):
    cx = tmp_path / "complex_val.txt"
    cx.write_text("a red car and a blue bird\na cat chasing a dog\n")
    with pytest.raises(compbench.CompBenchError, match=r"exactly 10 images per complex prompt, "
                       r"got n_images=2; use --n_images 10"):
        compbench.preflight(str(cx), 2)
    with pytest.raises(compbench.CompBenchError, match=r"\(2 prompts here\), got limit=1"):
        compbench.preflight(str(cx), 10, limit=1)
    assert compbench.preflight(str(cx), 10) == ["a red car and a blue bird", "a cat chasing a dog"]
    assert compbench.preflight(str(cx), 2, limit=1, complex_partial=True) == [
        "a red car and a blue bird"]
    color = tmp_path / "color_val.txt"
    color.write_text("a red car\n")
    assert compbench.preflight(str(color), 1, limit=1) == ["a red car"]
    # The script refuses before loading any model (the pipeline folder does not exist).
    evaluate = load_script("evaluate")
    argv = ["compbench", "--prompts", str(color), str(cx), "--output_dir", str(tmp_path / "o"),
            "--n_images", "2", "--pretrained", str(tmp_path / "no_such_pipeline")]
    assert evaluate.main(argv) == 2
    assert "3-in-1 scorer reads exactly 10 images" in capsys.readouterr().err
    # --complex_partial generates anyway; SCORING.md then leaves 3-in-1 out.
    res = compbench.run(str(cx), str(tmp_path / "cx"), P.RulePlanner(), blank, n_images=2,
                        complex_partial=True)
    assert res["images"] == 4
    assert "3_in_1.py" not in open(tmp_path / "cx" / "SCORING.md").read()


def test_rerun_with_smaller_limit_and_interrupted_render(tmp_path, capsys):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text("a red car\na blue bird\na green apple\n")
    out = tmp_path / "runs"
    evaluate = load_script("evaluate")
    compbench.run(str(prompts), str(out / "color_val"), P.RulePlanner(), blank, n_images=1)
    # A rerun with a smaller --limit would leave 2 images its scorers read: a message, exit 2.
    argv = ["compbench", "--prompts", str(prompts), "--output_dir", str(out), "--limit", "1",
            "--n_images", "1"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds 2 file(s) of another run (e.g. 'a blue bird_000001.png'" in err
    assert "Traceback" not in err

    # An interrupted render leaves no half-written file; a stale .tmp-* is removed on resume.
    calls = []

    def flaky(caption, layout, seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return blank(caption, layout, seed)

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        compbench.run(str(prompts), str(fresh), P.RulePlanner(), flaky, n_images=1)
    assert sorted(os.listdir(fresh / "samples")) == ["a red car_000000.png"]
    (fresh / "samples" / ".tmp-a blue bird_000001.png").write_bytes(b"partial")
    res = compbench.run(str(prompts), str(fresh), P.RulePlanner(), blank, n_images=1)
    assert res["generated"] == 2
    assert sorted(os.listdir(fresh / "samples")) == [
        "a blue bird_000001.png", "a green apple_000002.png", "a red car_000000.png"]
    assert generate.remove_partial_writes([str(fresh / "samples")]) == 0


def _write(path, answers):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump([{"question_id": i, "answer": a} for i, a in enumerate(answers)], f)


def test_summarize_reads_the_scorers_outputs(tmp_path, capsys):
    root = tmp_path / "compbench"
    for name, n in (("color_val", 2), ("spatial_val", 2), ("numeracy_val", 1)):
        (root / name / "samples").mkdir(parents=True)
        for i in range(n):
            (root / name / "samples" / f"a prompt_{i:06d}.png").write_bytes(b"")
    # BLIP-VQA writes answers as strings ("0.5000"), UniDet as numbers.
    _write(root / "color_val" / "annotation_blip" / "vqa_result.json", ["0.5000", "0.7000"])
    _write(root / "spatial_val" / "labels" / "annotation_obj_detection_2d" / "vqa_result.json",
           [0.25, 0.75])
    rows = compbench.collect_scores([str(root)])
    assert [(r["run"], r["category"], r["n"], r["samples"]) for r in rows] == [
        ("color_val", "color", 2, 2), ("numeracy_val", "numeracy", 0, 1),
        ("spatial_val", "spatial", 2, 2)]
    assert rows[0]["score"] == pytest.approx(60.0) and rows[2]["score"] == pytest.approx(50.0)
    evaluate = load_script("evaluate")
    assert evaluate.main(["compbench", "summarize", str(root)]) == 0
    text = open(root / "compbench_scores.md").read()
    assert "| color_val | color | BLIP-VQA | 60.00 | 2 | 2 | 34.41 | 53.55 |" in text
    assert "| spatial_val | spatial | UniDet | 50.00 | 2 | 2 | 35.42 | 37.28 |" in text
    assert "| numeracy_val | numeracy | UniDet (numeracy_eval.py) | not scored yet | 0 | 1 | - | - |" in text
    assert "numeracy_val/annotation_num/vqa_result.json" in text
    _write(root / "spatial_val" / "labels" / "annotation_obj_detection_2d" / "vqa_result.json",
           [{"x": 1}])
    with open(root / "spatial_val" / "labels" / "annotation_obj_detection_2d" / "vqa_result.json",
              "w") as f:
        json.dump([{"question_id": 0}], f)
    capsys.readouterr()
    assert evaluate.main(["compbench", "summarize", str(root)]) == 2
    assert "entry 0: no numeric 'answer'" in capsys.readouterr().err
    assert evaluate.main(["compbench", "summarize", str(tmp_path / "nothing")]) == 2

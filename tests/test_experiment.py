"""The shapes-world GOAL experiment driver (experiments/shapes_world).

The smoke run (two arms x one seed x three steps) runs on the shipped world
(assets/shapes_world) when it is there, else on a smoke world built here with
scripts/world.py :smoke (never skipped). Checked: results.json has every field for every
arm x seed x category, the arms' configs are what they claim, RESULTS.md is regenerated
from results.json alone, and a rerun resumes without training again; a new session (empty
workdir, the old --out) restores every run from results.json without training, keeps arms it
was not asked for and drops mismatching ones; the attention figure's numbers; the export of
the GOAL arm as a diffusers pipeline folder, and the demo on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "assets", "shapes_world")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if os.path.isdir(os.path.join(SHIPPED, "pipeline")):
        return SHIPPED
    work = str(tmp_path_factory.mktemp("world"))
    out = os.path.join(work, "out")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "world.py"), "--config",
                    os.path.join(REPO, "configs", "world.py") + ":smoke", "--workdir", work,
                    "--out", out], check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="module")
def smoke(world, tmp_path_factory):
    from experiments.shapes_world import run

    base = tmp_path_factory.mktemp("exp")
    workdir, out = str(base / "work"), str(base / "out")
    argv = ["--world", world, "--workdir", workdir, "--out", out, "--size", "smoke"]
    assert run.main(argv) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    return {"argv": argv, "workdir": workdir, "out": out, "results": results}


def test_results_have_every_arm_seed_category(smoke):
    from experiments.shapes_world import arms

    r = smoke["results"]
    size = arms.SIZES["smoke"]
    assert r["size"]["name"] == "smoke" and r["size"]["steps"] == 3
    assert sorted(r["arms"]) == sorted(size.arms) == ["goal", "ldm_only"]
    assert [(x["arm"], x["seed"]) for x in r["runs"]] == [("ldm_only", 0), ("goal", 0)]
    n_items = size.eval_per_category * len(arms.CATEGORIES)
    assert len(r["eval"]["layouts"]) == n_items
    for run in r["runs"] + [{"eval": v} for v in r["references"].values()]:
        ev = run["eval"]
        assert set(ev["categories"]) == set(arms.CATEGORIES)
        for s in ev["categories"].values():
            assert s["n"] == size.eval_per_category
            assert 0.0 <= s["oracle"] <= s["score"] <= 1.0 and -1.0 <= s["clip"] <= 1.0
        assert ev["scorer"] == "oracle-graded-1"
        assert ev["settings"]["num_steps"] == size.sample_steps
    for run in r["runs"]:
        assert len(run["eval_items"]) == n_items
        assert np.isclose(run["eval"]["oracle"],
                          np.mean([it["verdict"] for it in run["eval_items"]]))
        assert np.isclose(run["eval"]["score"],
                          np.mean([it["score"] for it in run["eval_items"]]))
        # a layout whose every check passes has score 1; the score never falls below the verdict
        assert all(it["score"] >= it["verdict"] for it in run["eval_items"])
        assert run["eval"]["checkpoint"]["step"] == 3
        curve = run["train"]["curve"]
        assert [p["step"] for p in curve] == [1, 2, 3]
        assert all(np.isfinite(p["ldm"]) and p["ldm"] > 0 for p in curve)
    # The world's own renders are what the oracle was made for: it must read them well.
    assert r["references"]["ground_truth"]["oracle"] >= 0.6
    assert set(r["finetune_set"]["quotas"]) == set(arms.CATEGORIES)
    assert r["finetune_set"]["disjoint"]["shared_layouts"] == 0
    assert r["timing"]["train_step_s_mean"] > 0


def test_arm_configs_differ_only_in_the_losses(smoke):
    r = smoke["results"]
    ldm, goal = r["arms"]["ldm_only"]["config"], r["arms"]["goal"]["config"]
    assert (ldm["train.alpha"], ldm["train.beta"]) == (0.0, 0.0)
    assert (goal["train.alpha"], goal["train.beta"]) == (1e-2, 1e-3)
    assert goal["train.maa_part"] == "up"
    assert goal["train.maa_resolution"] == r["world"]["maa_resolution"] == (
        8 if r["world"]["resolution"] == 64 else 4)
    assert {k for k in goal if goal[k] != ldm[k]} == {"train.alpha", "train.beta"}
    assert goal["data.source"] == r["finetune_set"]["folder"]
    assert goal["demo_models"] is False and goal["num_devices"] == 1
    by_arm = {x["arm"]: x["train"]["final"] for x in r["runs"]}
    # α = β = 0 never computes the alignment terms; GOAL does, and its total is eq. 15.
    assert by_arm["ldm_only"]["dsa"] == 0.0 and by_arm["ldm_only"]["maa"] == 0.0
    g = by_arm["goal"]
    assert g["dsa"] > 0 and g["maa"] > 0
    np.testing.assert_allclose(g["total"], g["ldm"] + 1e-2 * g["dsa"] + 1e-3 * g["maa"],
                               rtol=1e-5)


def test_loss_scales_measured(smoke):
    s = smoke["results"]["scales"]
    part = s["parts"]["up"]
    assert [b["t_range"][0] for b in part["by_t"]] == sorted(b["t_range"][0] for b in part["by_t"])
    for term in ("ldm", "dsa", "maa"):
        assert part["overall"][term]["value"] > 0
        assert part["overall"][term]["grad_norm"] > 0
    np.testing.assert_allclose(part["balance_alpha"], part["overall"]["ldm"]["grad_norm"]
                               / part["overall"]["dsa"]["grad_norm"], rtol=1e-6)
    np.testing.assert_allclose(part["overall"]["dsa"]["value"],
                               np.mean([b["dsa"]["value"] for b in part["by_t"]]), rtol=1e-5)


def test_results_md_regenerated_from_results_json_alone(smoke, tmp_path):
    from experiments.shapes_world import report

    out = smoke["out"]
    with open(os.path.join(out, "RESULTS.md"), encoding="utf-8") as f:
        written = f.read()
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(out, "results.json"), alone / "results.json")
    assert report.main([str(alone / "results.json")]) == 0
    assert (alone / "RESULTS.md").read_text(encoding="utf-8") == written
    assert (alone / "loss_curves.png").stat().st_size > 0
    r = smoke["results"]
    goal = report.arm_stats(r, "goal")["color"]["mean"]
    assert f"| GOAL | 1 | {100 * goal:.1f} |" in written
    assert "## Table 1 analogue" in written and "## Closing note" in written
    assert "Fewer than two seeds per arm" in written


def test_results_md_without_the_paper_weights_arm_compares_the_best_goal_arm(smoke):
    """Only LDM-only and a balanced GOAL arm evaluated: the sweep table and the closing note
    show that arm against LDM-only (GOAL at the paper's weights is said to be missing)."""
    import copy

    from experiments.shapes_world import report

    r = copy.deepcopy(smoke["results"])
    r["arms"]["goal_bal1"] = r["arms"].pop("goal")
    for run in r["runs"]:
        run["arm"] = "goal_bal1" if run["arm"] == "goal" else run["arm"]
    md = report.markdown(r)
    assert "## α / β sweep" in md and "(goal_bal1) | 1 |" in md
    closing = md.split("## Closing note")[1]
    assert "`goal` (the paper's weights) is not evaluated; the best GOAL-family arm by mean " \
           "score, `goal_bal1`, against LDM-only:" in closing
    assert "| category | goal_bal1 | LDM-only | Δ | SE | > 2 SE |" in closing
    assert "not both evaluated" not in md
    del r["runs"][[x["arm"] for x in r["runs"]].index("goal_bal1")]
    assert "GOAL and LDM-only are not both evaluated yet." in report.markdown(r)


def test_rerun_resumes_without_training(smoke, capsys):
    from experiments.shapes_world import run

    logs = {x["arm"]: os.path.join(x["run_dir"], "train.log") for x in smoke["results"]["runs"]}
    before = {a: os.path.getsize(p) for a, p in logs.items()}
    assert run.main(smoke["argv"]) == 0
    printed = capsys.readouterr().out
    assert "training " not in printed and "ETA" in printed and "rescored" not in printed
    assert {a: os.path.getsize(p) for a, p in logs.items()} == before
    with open(os.path.join(smoke["out"], "results.json"), encoding="utf-8") as f:
        again = json.load(f)
    assert [x["eval"]["categories"] for x in again["runs"]] == \
        [x["eval"]["categories"] for x in smoke["results"]["runs"]]



def test_scheduled_sampling_evaluation_shares_the_trained_runs(smoke, tmp_path, capsys):
    """--sample_beta 0.3 evaluates the same checkpoints in files of its own: nothing is
    trained, the full-grounding evaluations stay byte for byte, and the results say β."""
    from experiments.shapes_world import run

    run_dirs = [x["run_dir"] for x in smoke["results"]["runs"]]
    before = {d: open(os.path.join(d, "eval.json"), "rb").read() for d in run_dirs}
    out = str(tmp_path / "scheduled")
    argv = ["--world", smoke["argv"][1], "--workdir", smoke["workdir"], "--out", out,
            "--size", "smoke", "--sample_beta", "0.3", "--attention_layouts", "0"]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training " not in printed
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["eval"]["settings"]["beta"] == 0.3 and results["size"]["sample_beta"] == 0.3
    for d in run_dirs:
        assert open(os.path.join(d, "eval.json"), "rb").read() == before[d]
        with open(os.path.join(d, "eval-beta0.3.json"), encoding="utf-8") as f:
            assert json.load(f)["settings"]["beta"] == 0.3
        assert np.load(os.path.join(d, "samples-beta0.3.npz"))["images"].dtype == np.uint8
    assert os.path.isfile(os.path.join(smoke["workdir"], "references-beta0.3", "base.json"))
    md = open(os.path.join(out, "RESULTS.md"), encoding="utf-8").read()
    assert "first 30 % of the steps only" in md
    assert run.main(argv[:-4] + ["--sample_beta", "1.5"]) == 2
    assert "--sample_beta 1.5: the grounded share of the sampling steps must lie in [0, 1]" \
        in capsys.readouterr().err


def test_changed_config_in_existing_run_is_refused(smoke, capsys):
    from experiments.shapes_world import run

    assert run.main(smoke["argv"] + ["--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "was made with another configuration" in err and "train.steps" in err


def test_missing_world_is_an_error(tmp_path, capsys):
    from experiments.shapes_world import run

    assert run.main(["--world", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w"),
                     "--out", str(tmp_path / "o"), "--size", "smoke"]) == 2
    assert f"no {tmp_path / 'nowhere' / 'pipeline'}" in capsys.readouterr().err


def test_quotas_and_disjointness():
    from experiments.shapes_world import arms, datasets

    q = datasets.category_quotas(2000, arms.FINETUNE_MIX)
    assert sum(q.values()) == 2000 and q["color"] == 500 and q["counting"] == 100
    assert sum(datasets.category_quotas(7, arms.FINETUNE_MIX).values()) == 7
    ft = [{"id": "a", "caption": "a red circle and a blue star",
           "annotations": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.4, 0.4]},
                           {"phrase": "a blue star", "box": [0.5, 0.5, 0.9, 0.9]}]}]
    ev = [{"id": "e", "caption": "a red circle and a blue star",
           "boxes": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]}]
    with pytest.raises(ValueError, match=r"\('e', 'a'\)"):
        datasets.check_disjoint(ft, ev)
    ev[0]["boxes"][0] = [0.2, 0.1, 0.4, 0.4]
    assert datasets.check_disjoint(ft, ev)["eval_captions_in_finetune"] == 1


def test_difference_standard_error():
    from experiments.shapes_world import report

    a, b = report.stats([0.6, 0.7, 0.8]), report.stats([0.4, 0.5, 0.6])
    d = report.difference(a, b)
    np.testing.assert_allclose(d["diff"], 0.2)
    np.testing.assert_allclose(d["se"], np.sqrt(2 * 0.01 / 3))
    assert d["significant"] is True
    assert report.difference(report.stats([0.5]), b)["se"] is None


def test_ablation_differences_table():
    from experiments.shapes_world import report

    def run(arm, seed, colour):
        cats = {c: {"score": 0.5} for c in report.CATEGORIES}
        cats["color"] = {"score": colour}
        return {"arm": arm, "seed": seed, "eval": {"categories": cats}}

    results = {"references": {}, "runs": [
        run("ldm_only", 0, 0.4), run("ldm_only", 1, 0.5), run("ldm_only", 2, 0.6),
        run("no_maalign", 0, 0.6), run("no_maalign", 1, 0.7), run("no_maalign", 2, 0.8),
        run("goal", 0, 0.7)]}
    lines = report._ablation_diff_lines(results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines
            if line.startswith("| ") and "−" in line}
    # Only the comparisons whose two arms are evaluated; colour is the first category.
    assert sorted(rows) == ["DSAlign only − LDM only (Table 5)", "GOAL − DSAlign only (Table 5)"]
    se = 100 * np.sqrt(2 * 0.01 / 3)
    assert rows["DSAlign only − LDM only (Table 5)"][:2] == ["3", f"+20.0 ± {se:.1f}*"]
    assert rows["GOAL − DSAlign only (Table 5)"][:3] == ["1", "+0.0", "+0.0"]
    assert report._ablation_diff_lines({"references": {}, "runs": [run("goal", 0, 0.5)]}) == []


# ----------------------------------------------------------------------------------------------
# Results that survive across sessions (persist.py): only <out> (git) is kept.
# ----------------------------------------------------------------------------------------------


def _session(smoke, tmp_path, name, extra=(), edit=None):
    """Runs the smoke experiment again as a new session: a fresh, empty workdir and a copy of
    the first run's --out (optionally edited by ``edit(results)``). -> (results, printed,
    workdir, out)."""
    from experiments.shapes_world import run

    out, workdir = str(tmp_path / name / "out"), str(tmp_path / name / "work")
    shutil.copytree(smoke["out"], out)
    if edit is not None:
        path = os.path.join(out, "results.json")
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        edit(results)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f)
    argv = ["--world", smoke["argv"][1], "--workdir", workdir, "--out", out, "--size", "smoke",
            *extra]
    assert run.main(argv) == 0
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        return json.load(f), out, workdir


def _same_run(a: dict, b: dict) -> None:
    for key in ("arm", "seed", "config_string", "overrides", "train", "eval", "eval_items"):
        assert a[key] == b[key], key


def test_new_session_restores_every_run_without_training(smoke, tmp_path, capsys):
    from experiments.shapes_world import persist

    capsys.readouterr()
    again, out, workdir = _session(smoke, tmp_path, "s2")
    printed = capsys.readouterr().out
    # Nothing trained or sampled: no run directory, no train.log, no reference samples.
    assert "training " not in printed and not os.path.exists(os.path.join(workdir, "runs"))
    assert not os.path.exists(os.path.join(workdir, "references"))
    assert "loss scales restored" in printed
    first = smoke["results"]
    assert [(r["arm"], r["seed"]) for r in again["runs"]] == [("ldm_only", 0), ("goal", 0)]
    for a, b in zip(first["runs"], again["runs"]):
        _same_run(a, b)
        assert b["restored_from"] == {"results": os.path.join(out, "results.json"),
                                      "run_dir": a["run_dir"]}
        assert a["overrides"]["data.source"] == "<workdir>/finetune"
    for name in ("ground_truth", "base"):
        assert {k: v for k, v in again["references"][name].items() if k != "restored_from"} \
            == first["references"][name]
    assert again["scales"] == first["scales"] and again["balance"] == first["balance"]
    assert again["attention"] == first["attention"]
    for key in ("train_s", "eval_s", "train_step_s_mean"):
        assert again["timing"][key] == first["timing"][key]
    # The pictures: the grid drawn from grid_images.npz is the same PNG.
    old = persist.read_grid_images(os.path.join(smoke["out"], persist.GRID_IMAGES))
    new = persist.read_grid_images(os.path.join(out, persist.GRID_IMAGES))
    assert sorted(old) == sorted(new) == ["base", "goal__seed0", "ground_truth",
                                          "layout_ids", "ldm_only__seed0"]
    for k in old:
        np.testing.assert_array_equal(old[k], new[k])
    with open(os.path.join(smoke["out"], "grid.png"), "rb") as f1, \
            open(os.path.join(out, "grid.png"), "rb") as f2:
        assert f1.read() == f2.read()
    md = [open(os.path.join(d, "RESULTS.md"), encoding="utf-8").read().splitlines()
          for d in (smoke["out"], out)]
    assert [x for x in md[0] if "--workdir" not in x] == [x for x in md[1] if "--workdir" not in x]


def test_trainable_set_arm_trains_every_unet_parameter_and_is_restored(smoke, tmp_path,
                                                                       capsys):
    from experiments.shapes_world import run

    again, out, workdir = _session(smoke, tmp_path, "unet",
                                   ["--arms", "goal_unet", "--attention_layouts", "0"])
    runs = {r["arm"]: r for r in again["runs"]}
    assert sorted(runs) == ["goal", "goal_unet", "ldm_only"]
    assert runs["goal_unet"]["overrides"]["train.trainable_patterns"] == ["."]
    assert all("train.trainable_patterns" not in runs[a]["overrides"] for a in ("ldm_only",
                                                                                "goal"))
    # Its checkpoint holds every U-Net tensor, the paper's arms' only fusers + attn1 + attn2.
    ckpt = runs["goal_unet"]["eval"]["checkpoint"]
    assert ckpt["replaced"] == ckpt["total"] > 0
    paper = next(r for r in smoke["results"]["runs"] if r["arm"] == "goal")["eval"]["checkpoint"]
    assert paper["total"] == ckpt["total"] and 0 < paper["replaced"] < ckpt["total"]
    # The same workdir evaluated again with scheduled sampling: its run.json holds the
    # patterns as a JSON list, the config a tuple; the run is reused, not refused or retrained.
    capsys.readouterr()
    argv = ["--world", smoke["argv"][1], "--workdir", workdir, "--out",
            str(tmp_path / "unet" / "scheduled"), "--size", "smoke", "--arms", "goal_unet",
            "--attention_layouts", "0", "--sample_beta", "0.3"]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training " not in printed and "evaluated goal_unet seed 0" in printed
    # A later session restores it (its tuple override compares equal to the JSON list).
    argv = ["--world", smoke["argv"][1], "--workdir", str(tmp_path / "unet2"), "--out", out,
            "--size", "smoke", "--arms", "goal_unet", "--attention_layouts", "0"]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "training " not in printed and "restored goal_unet seed 0" in printed


def test_grid_images_hold_the_grid_layouts(smoke):
    from experiments.shapes_world import persist, run

    r = smoke["results"]
    images = persist.read_grid_images(os.path.join(smoke["out"], persist.GRID_IMAGES))
    pick = run.grid_indices(r["eval"]["layouts"])
    assert list(images["layout_ids"]) == [r["eval"]["layouts"][i]["id"] for i in pick]
    res = r["world"]["resolution"]
    for key in ("ground_truth", "base", "ldm_only__seed0", "goal__seed0"):
        assert images[key].dtype == np.uint8 and images[key].shape == (len(pick), res, res, 3)
    # The stored rows are the run's own samples of those layouts.
    run_dir = next(x["run_dir"] for x in r["runs"] if x["arm"] == "goal")
    samples = np.load(os.path.join(run_dir, "samples.npz"))["images"]
    np.testing.assert_array_equal(images["goal__seed0"], samples[pick])


def test_other_arm_subset_keeps_the_old_arms(smoke, tmp_path, capsys):
    capsys.readouterr()
    again, out, workdir = _session(smoke, tmp_path, "subset", ["--arms", "goal"])
    printed = capsys.readouterr().out
    assert f"kept ldm_only seed 0 from {os.path.join(out, 'results.json')}" in printed
    assert "training " not in printed
    assert again["invocation"] == {"arms": ["goal"], "seeds": [0]}
    assert again["size"]["arms"] == ["ldm_only", "goal"] and sorted(again["arms"]) == \
        ["goal", "ldm_only"]
    assert [(r["arm"], r["seed"]) for r in again["runs"]] == [("ldm_only", 0), ("goal", 0)]
    for a, b in zip(smoke["results"]["runs"], again["runs"]):
        _same_run(a, b)
    assert again["commands"][0] == smoke["results"]["command"] and len(again["commands"]) == 2


def test_mismatching_old_run_is_dropped_with_its_reason(smoke, tmp_path, capsys):
    def edit(results):
        results["runs"][0]["overrides"]["train.optimizer.learning_rate"] = 0.5

    capsys.readouterr()
    again, out, _ = _session(smoke, tmp_path, "drop", ["--arms", "goal"], edit)
    printed = capsys.readouterr().out
    assert (f"dropped ldm_only seed 0 of {os.path.join(out, 'results.json')}: config overrides "
            "differ (train.optimizer.learning_rate: 0.5 -> 0.0001)") in printed
    assert [(r["arm"], r["seed"]) for r in again["runs"]] == [("goal", 0)]
    assert sorted(again["arms"]) == ["goal"]


def test_interrupted_session_keeps_the_runs_it_had_not_reached(smoke, tmp_path, monkeypatch):
    """A new session whose first run fails (here: seed 1 trains first and raises) before it
    reaches the restorable seed-0 runs still has them in results.json: nothing read from the
    old file is lost when an invocation stops early."""
    from experiments.shapes_world import run

    def fail(spec, size, seed, overrides, run_dir):
        raise RuntimeError(f"training {spec.name} seed {seed} stopped")

    monkeypatch.setattr(run, "train_run", fail)
    out = str(tmp_path / "stop" / "out")
    shutil.copytree(smoke["out"], out)
    argv = ["--world", smoke["argv"][1], "--workdir", str(tmp_path / "stop" / "work"), "--out",
            out, "--size", "smoke", "--seeds", "1", "0"]
    with pytest.raises(RuntimeError, match="training ldm_only seed 1 stopped"):
        run.main(argv)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        after = json.load(f)
    assert [(r["arm"], r["seed"]) for r in after["runs"]] == [("ldm_only", 0), ("goal", 0)]
    for a, b in zip(smoke["results"]["runs"], after["runs"]):
        _same_run(a, b)


def test_results_json_without_fingerprint_is_restored_by_path(smoke, tmp_path, capsys):
    """A results.json written before runs recorded their overrides and the world its
    fingerprint (the first full run's) is still restored: the overrides come from the arm's
    config with the run's seed, the world is matched by its path."""
    def edit(results):
        del results["world"]["fingerprint"], results["workdir"]
        for r in results["runs"]:
            del r["overrides"], r["config_string"]

    capsys.readouterr()
    again, _, workdir = _session(smoke, tmp_path, "legacy", (), edit)
    printed = capsys.readouterr().out
    assert "training " not in printed and not os.path.exists(os.path.join(workdir, "runs"))
    assert "world matched by path" in printed
    for a, b in zip(smoke["results"]["runs"], again["runs"]):
        _same_run(a, b)


def test_portable_overrides():
    from experiments.shapes_world import persist

    got = persist.portable({"a": "/w/world/pipeline", "b": "/tmp/work/tfds", "c": "/repo/x",
                            "d": "/elsewhere", "e": 3, "f": "/tmp/workdir2"},
                           "/w/world", "/tmp/work", "/repo")
    assert got == {"a": "<world>/pipeline", "b": "<workdir>/tfds", "c": "<repo>/x",
                   "d": "/elsewhere", "e": 3, "f": "/tmp/workdir2"}


# ----------------------------------------------------------------------------------------------
# Attention maps per phrase (attention.py).
# ----------------------------------------------------------------------------------------------


def test_in_box_fraction_known_answers():
    from experiments.shapes_world import attention
    from goal_jax import objectives

    mask = np.asarray(objectives.box_masks(np.asarray([0.0, 0.0, 0.5, 0.5], np.float32), 8, 8))
    assert mask.sum() == 16
    maps = np.stack([mask, 1.0 - mask, np.ones((8, 8)), 3.0 * mask + (1.0 - mask),
                     np.zeros((8, 8))])
    got = attention.in_box_fraction(maps, mask)
    np.testing.assert_allclose(got[:4], [1.0, 0.0, 0.25, 48 / 96])
    assert np.isnan(got[4])
    item = {"phrases": ["a", "b"], "boxes": [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]}
    inside = np.stack([mask, mask[::-1, ::-1]])[None]  # each map exactly its own box
    s = attention.summarize(inside, [item])
    assert s["in_box"] == 1.0 and s["chance"] == 0.25 and s["per_phrase"] == [[1.0, 1.0]]
    s = attention.summarize(np.ones((1, 2, 8, 8)), [item])
    assert s["in_box"] == 0.25 == s["chance"]


def test_attention_layouts_two_object_colour_and_shape():
    from experiments.shapes_world import attention

    items = [{"id": f"{c}{k}", "category": c, "phrases": ["p"] * n}
             for c, n in (("color", 2), ("shape", 2), ("spatial", 2)) for k in range(3)]
    items.append({"id": "color9", "category": "color", "phrases": ["p"]})
    got = attention.pick_layouts(items, [it["id"] for it in items if it["id"] != "shape0"], 4)
    assert [items[i]["id"] for i in got] == ["color0", "shape1", "color1", "shape2"]


def test_smoke_run_writes_attention_figure_and_numbers(smoke):
    from experiments.shapes_world import attention
    from goal_jax import objectives

    r = smoke["results"]
    att = r["attention"]
    assert att["t"] == 500 and att["draws"] == 4 and att["picture"] == "attention.png"
    assert att["layer"] == {"part": "up", "resolution": r["world"]["maa_resolution"]}
    assert att["layouts"] == ["eval-color-000", "eval-shape-000"]  # 1 layout per category
    assert [m["label"] for m in att["models"]] == ["base world", "ldm_only seed 0",
                                                  "goal seed 0"]
    g = r["world"]["maa_resolution"]
    layouts = {x["id"]: x for x in r["eval"]["layouts"]}
    for m in att["models"]:
        maps = np.asarray(m["maps"])
        assert maps.shape == (2, 2, g, g) and (maps >= 0).all() and maps.sum() > 0
        # The stored numbers are the in-box fractions of the stored maps.
        for li, lid in enumerate(att["layouts"]):
            boxes = np.asarray(layouts[lid]["boxes"], np.float32)
            np.testing.assert_allclose(m["per_phrase"][li], attention.in_box_fraction(
                maps[li], np.asarray(objectives.box_masks(boxes, g, g))), rtol=1e-12)
        assert 0.0 <= m["in_box"] <= 1.0 and 0.0 < m["chance"] < 1.0
        np.testing.assert_allclose(m["in_box"], np.mean(m["per_phrase"]))
    assert att["models"][1]["final"] == r["runs"][0]["train"]["final"]
    assert os.path.getsize(os.path.join(smoke["out"], "attention.png")) > 10_000
    with open(os.path.join(smoke["out"], "RESULTS.md"), encoding="utf-8") as f:
        md = f.read()
    for m in att["models"]:
        assert f"| {m['label']} | {100 * m['in_box']:.1f} | {100 * m['chance']:.1f} |" in md
    assert "![attention maps](attention.png)" in md


# ----------------------------------------------------------------------------------------------
# Shipping a GOAL arm (export.py) and the demo on it.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(smoke, tmp_path_factory):
    from experiments.shapes_world import export

    out = str(tmp_path_factory.mktemp("ship") / "goal")
    assert export.main(["--results", os.path.join(smoke["out"], "results.json"),
                        "--workdir", smoke["workdir"], "--out", out]) == 0
    with open(os.path.join(out, "goal.json"), encoding="utf-8") as f:
        return {"out": out, "record": json.load(f)}


def test_best_goal_arm_and_seed():
    from experiments.shapes_world import export, report

    def run(arm, seed, score):
        return {"arm": arm, "seed": seed, "eval": {"score": score, "oracle": 0.0}}

    results = {"arms": {"ldm_only": {"config": {"train.alpha": 0.0, "train.beta": 0.0}},
                        "goal": {"config": {"train.alpha": 0.01, "train.beta": 0.001}},
                        "no_dsalign": {"config": {"train.alpha": 0.0, "train.beta": 0.001}}},
               "runs": [run("ldm_only", 0, 0.9), run("goal", 0, 0.5), run("goal", 1, 0.7),
                        run("no_dsalign", 0, 0.4), run("no_dsalign", 1, 0.9),
                        run("no_dsalign", 2, 0.9)]}
    assert report.goal_family(results) == ["goal", "no_dsalign"]
    assert report.best_goal_arm(results) == "no_dsalign"  # mean 0.733 > 0.6; ldm_only is not GOAL
    assert report.best_seed(results, "no_dsalign") == 1  # tie 0.9: the lower seed
    assert export.choose_run(results) == ("no_dsalign", 1)
    assert export.choose_run(results, "goal") == ("goal", 1)
    with pytest.raises(ValueError, match="no evaluated run goal seed 5"):
        export.choose_run(results, "goal", 5)


def test_export_folder_holds_the_checkpoint_unet_and_base_parts(smoke, exported):
    from flax import traverse_util

    from goal_jax import checkpoints, train, weights

    rec, out = exported["record"], exported["out"]
    assert (rec["arm"], rec["seed"]) == ("goal", 0) and rec["chosen_by"].startswith("default")
    assert rec["checkpoint"]["step"] == 3 and rec["experiment_command"] == \
        smoke["results"]["command"]
    goal_run = next(x for x in smoke["results"]["runs"] if x["arm"] == "goal")
    assert rec["scores"]["run"]["oracle"] == goal_run["eval"]["oracle"]
    assert rec["overrides"] == goal_run["overrides"] and (rec["alpha"], rec["beta"]) == \
        (0.01, 0.001)
    base_dir = os.path.join(smoke["argv"][1], "pipeline")
    files = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out)
                   for f in fs)
    assert all(f.endswith((".json", ".safetensors", ".txt")) for f in files), files
    for f in files:  # every part but the U-Net weights and goal.json: the base's bytes
        assert not os.path.islink(os.path.join(out, f))
        if f in ("goal.json", "unet/diffusion_pytorch_model.safetensors"):
            continue
        with open(os.path.join(out, f), "rb") as a, open(os.path.join(base_dir, f), "rb") as b:
            assert a.read() == b.read(), f
    base = weights.load_pipeline(base_dir)
    shipped = weights.load_pipeline(out)
    manager = checkpoints.CheckpointManager(
        os.path.join(smoke["workdir"], "runs", "goal", "seed0", "checkpoints"), async_save=False)
    trained = traverse_util.flatten_dict(dict(manager.restore_params(manager.resolve_step(None))))
    manager.close()
    mask = train.trainable_mask(base.unet_params, train.PAPER_TRAINABLE)
    flat_base = traverse_util.flatten_dict(dict(base.unet_params))
    flat_ship = traverse_util.flatten_dict(dict(shipped.unet_params))
    assert flat_ship.keys() == flat_base.keys()
    assert {k for k in flat_base if mask["/".join(k)]} == set(trained)
    changed = 0
    for k, v in flat_ship.items():
        want = trained[k] if k in trained else flat_base[k]
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want), err_msg="/".join(k))
        changed += k in trained and not np.array_equal(np.asarray(v), np.asarray(flat_base[k]))
    assert changed > 0  # the fine-tuned leaves, not the base's


def test_export_loads_in_diffusers(exported):
    import diffusers
    from safetensors.numpy import load_file

    out = exported["out"]
    pipe = diffusers.StableDiffusionGLIGENPipeline.from_pretrained(
        out, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    state = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    torch_state = pipe.unet.state_dict()
    assert set(state) == set(torch_state)
    for k in state:
        np.testing.assert_array_equal(torch_state[k].numpy(), state[k], err_msg=k)
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    img = pipe(prompt="a red circle and a blue square",
               gligen_phrases=["a red circle", "a blue square"],
               gligen_boxes=[[0.08, 0.30, 0.42, 0.64], [0.58, 0.30, 0.92, 0.64]],
               num_inference_steps=2, height=size, width=size, output_type="np").images
    assert img.shape == (1, size, size, 3) and np.isfinite(img).all()


def test_export_refuses_an_existing_folder(smoke, exported, capsys):
    from experiments.shapes_world import export

    assert export.main(["--results", os.path.join(smoke["out"], "results.json"),
                        "--workdir", smoke["workdir"], "--out", exported["out"]]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_demo_on_the_shipped_goal_pipeline_does_not_train(exported, tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--workdir", str(work),
         "--goal", exported["out"], "--layouts", "2", "--steps", "2"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no fine-tuning" in result.stdout and "scripts/train.py" not in result.stdout
    assert not (work / "train").exists()
    assert f"--pretrained {exported['out']}" in result.stdout  # sample.py on the folder itself
    scores = json.loads((work / "scores.json").read_text())
    assert sorted(scores) == ["GOAL shipped", "base world"]
    assert len(list((work / "goal").glob("*_boxes.png"))) == 2
    assert (work / "demo.png").stat().st_size > 0
    assert "another base world" not in result.stderr  # exported from the shipped world


def test_demo_names_a_goal_pipeline_fine_tuned_from_another_base():
    import importlib.util

    from experiments.shapes_world import persist

    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    pipeline = os.path.join(REPO, "assets", "shapes_world", "pipeline")
    have = persist.world_fingerprint({"pipeline": pipeline, "clip": pipeline})["pipeline"]
    assert have == persist.hash_folder(pipeline)
    assert demo._other_base({"world_fingerprint": {"pipeline": have}}, pipeline) is None
    assert demo._other_base({"world_fingerprint": None}, pipeline) is None  # nothing to compare
    other = demo._other_base({"world_fingerprint": {"pipeline": "0" * 64}}, pipeline)
    assert other == (f"its base's pipeline files hash to {'0' * 12}, {pipeline}'s to "
                     f"{have[:12]}")


def test_scores_of_an_older_scorer_are_recomputed_from_the_samples(smoke, tmp_path, capsys):
    """An eval.json written before the graded score (verdicts only) is scored again from its
    stored samples: nothing is trained or sampled, and the scores equal the first scoring.
    (Edits the smoke workdir in place, so it runs last and puts every file back.)"""
    from experiments.shapes_world import run

    backup = tmp_path / "out"
    shutil.copytree(smoke["out"], backup)
    work = smoke["workdir"]
    paths = [os.path.join(x["run_dir"], "eval.json") for x in smoke["results"]["runs"]] + [
        os.path.join(work, "references", "base.json")]
    originals = {p: open(p, encoding="utf-8").read() for p in paths}
    try:
        for p, text in originals.items():
            ev = json.loads(text)
            old = {k: v for k, v in ev.items() if k not in ("scorer", "score")}
            old["categories"] = {c: {k: v for k, v in x.items() if k not in ("score", "boxes")}
                                 for c, x in ev["categories"].items()}
            with open(p, "w", encoding="utf-8") as f:
                json.dump(old, f)
        os.remove(os.path.join(smoke["out"], "results.json"))  # only the workdir counts
        assert run.main(smoke["argv"] + ["--attention_layouts", "0"]) == 0
        printed = capsys.readouterr().out
        assert "training " not in printed
        assert printed.count("rescored ") == len(paths)
        for p, text in originals.items():
            ev, new = json.loads(text), json.loads(open(p, encoding="utf-8").read())
            assert new["scorer"] == "oracle-graded-1"
            assert new["rescored_from"] == "oracle verdicts only"
            assert new["categories"] == ev["categories"] and new["score"] == ev["score"]
            assert new["wall_s"] == ev["wall_s"] and new["settings"] == ev["settings"]
    finally:
        for p, text in originals.items():
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        shutil.rmtree(smoke["out"])
        shutil.copytree(backup, smoke["out"])

"""Smoke test of the benchmark harness (benchmarks/run.py): the tiny size, the U-Net forward
bench, 1 warm-up and 2 timed steps, each framework in its own subprocess. Asserts the JSON lines
and the ratio arithmetic, never a time."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import run as bench_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = out / "RESULTS.md"
    results.write_text("# header kept\n\n<!-- cpu-tiny:begin -->\nold\n<!-- cpu-tiny:end -->\n"
                       "\ntail kept\n", encoding="utf-8")
    jsonl = out / "bench.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--size", "tiny",
           "--benches", "unet", "--batches", "1", "--warmup", "1", "--steps", "2",
           "--results", str(results), "--jsonl", str(jsonl)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=bench_run.worker_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return lines, jsonl.read_text(encoding="utf-8"), results.read_text(encoding="utf-8")


def test_json_lines_and_ratio(harness):
    lines, jsonl, _ = harness
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert [json.loads(x) for x in jsonl.splitlines()] == records
    meas = [r for r in records if r["kind"] == "measurement"]
    ratios = [r for r in records if r["kind"] == "ratio"]
    assert [r["framework"] for r in meas] == ["goal_jax", "pytorch"] and len(ratios) == 1
    for r in meas:
        assert (r["suite"], r["size"], r["bench"], r["batch"], r["warmup"], r["n"]) == \
            ("cpu", "tiny", "unet", 1, 1, 2)
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_rss_mib"] >= r["setup_rss_mib"] > 0
        assert r["threads"] == os.cpu_count()
    jax_rec, torch_rec = meas
    assert jax_rec["compile_s"] > 0 and torch_rec["compile_s"] == 0.0
    # Same weights and inputs on both sides: the outputs agree (fp32 parity of the U-Net).
    rel = abs(jax_rec["out_abs_mean"] - torch_rec["out_abs_mean"]) / torch_rec["out_abs_mean"]
    assert rel < 1e-4, rel
    r = ratios[0]
    assert (r["bench"], r["batch"], r["size"]) == ("unet", 1, "tiny")
    assert r["goal_jax_median_s"] == jax_rec["median_s"]
    assert r["pytorch_median_s"] == torch_rec["median_s"]
    assert r["time_ratio"] == pytest.approx(jax_rec["median_s"] / torch_rec["median_s"],
                                            rel=1e-12)
    assert r["speedup"] == pytest.approx(1.0 / r["time_ratio"], rel=1e-12)
    assert r["rss_ratio"] == pytest.approx(jax_rec["peak_rss_mib"] / torch_rec["peak_rss_mib"],
                                           rel=1e-12)


def test_results_section_rewritten(harness):
    lines, _, text = harness
    ratio = [json.loads(x) for x in lines if json.loads(x)["kind"] == "ratio"][0]
    assert text.startswith("# header kept\n") and text.rstrip().endswith("tail kept")
    assert "\nold\n" not in text and text.count("<!-- cpu-tiny:begin -->") == 1
    rows = [x for x in text.splitlines() if x.startswith("| unet | 1 |")]
    assert len(rows) == 2 and "| goal_jax |" in rows[0] and "| pytorch |" in rows[1]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[8]) == pytest.approx(ratio["time_ratio"], rel=1e-2)
    assert "Load average" in text and "torch.set_num_threads" in text


def test_rewrite_results_appends_and_replaces(tmp_path):
    path = str(tmp_path / "R.md")
    bench_run.rewrite_results(path, "cpu-small", "first\n")
    bench_run.rewrite_results(path, "memory", "mem\n")
    bench_run.rewrite_results(path, "cpu-small", "second\n")
    text = open(path, encoding="utf-8").read()
    assert text.count("<!-- cpu-small:begin -->") == 1 and "second\n" in text
    assert "first" not in text and "mem\n" in text
    assert text.index("cpu-small:begin") < text.index("memory:begin")


def test_ratio_record_arithmetic():
    j = {"suite": "cpu", "size": "small", "bench": "train", "batch": 4, "median_s": 0.5,
         "peak_rss_mib": 300.0}
    t = dict(j, median_s=2.0, peak_rss_mib=600.0)
    r = bench_run.ratio_record(j, t)
    assert (r["time_ratio"], r["speedup"], r["rss_ratio"]) == (0.25, 4.0, 0.5)


def test_stream_benchmark_smoke(tmp_path):
    """benchmarks/stream.py on 500 items (the 200k run is not part of the suite): write, build
    and stream one whole epoch; asserts the counts and the section, never a time."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# header kept\n\n<!-- stream:begin -->\nold\n<!-- stream:end -->\n"
                       "\ntail kept\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "benchmarks.stream", "--items", "500", "--unique", "40",
           "--workdir", str(tmp_path / "w"), "--train-steps", "0", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    write, build, stream = (json.loads(line) for line in proc.stdout.splitlines())
    assert (write["stage"], write["items"], write["unique_images"]) == ("write", 500, 40)
    assert (build["items_kept"], build["items_dropped"], build["file_format"]) == \
        (500, 0, "array_record")
    assert (stream["items_in_shard"], stream["batches"], stream["items_streamed"]) == \
        (500, 125, 500)
    assert stream["state_after"] == {"epoch": 1, "batch": 0}  # exactly one epoch was read
    assert stream["annotation_pass_items"] == 500
    assert set(stream["rss_mib_at"]) == {"1%", "10%", "50%", "100%"}
    assert stream["peak_rss_mib"] >= max(stream["rss_mib_at"].values()) > 0
    # every item has 1-4 real boxes; a few may be cropped away, never more than 4 per item
    assert 0 < stream["real_boxes_seen"] <= 4 * 124 * 4
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# header kept\n") and text.rstrip().endswith("tail kept")
    assert "\nold\n" not in text and "| build | goal2k.build_goal2k -> array_record |" in text
    assert "| stream | 500 items of the 500-item epoch, batch 4, 64x64" in text
    for stage in ("write", "build", "stream"):  # kept for a later --stages run
        assert json.loads((tmp_path / "w" / f"{stage}.json").read_text()) == \
            {"write": write, "build": build, "stream": stream}[stage]

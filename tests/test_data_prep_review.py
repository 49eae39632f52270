"""data_prep review: the static page (rendering, and driven in headless Chromium over the
DevTools protocol: real mouse clicks and typing, localStorage, reload, the downloaded decisions
file) and applying decisions into a goal2k-ready folder."""

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from data_prep import common, review
from goal_jax.data import format as fmt

ITEMS = [
    ("color_0000", "a red car & a <blue> bench", "color",
     [("a red car", [4, 8, 40, 30], 0.71), ("a <blue> bench", [50, 20, 90, 60], 0.52)], []),
    ("counting_0000", "two dogs and a cat", "counting",
     [("dogs", [1, 2, 30, 40], 0.9), ("dogs", [32, 2, 60, 40], 0.8)],
     [{"phrase": "a cat", "reason": "no box above the thresholds"}]),
    ("spatial_0000", "a cup above a bowl", "spatial",
     [("a cup", [10, 5, 50, 30], 0.6), ("a bowl", [10, 35, 50, 60], 0.4)], []),
    ("coco_5", "a dog under a tree", "spatial", [],
     [{"phrase": "a dog", "reason": "no box above the thresholds"},
      {"phrase": "a tree", "reason": "no box above the thresholds"}]),
]


def make_work(folder, items=ITEMS):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    for rid, caption, cat, anns, missing in items:
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", f"{rid}.png"))
        rec = fmt.Record(rid, f"images/{rid}.png", caption, [a[0] for a in anns],
                         [a[1] for a in anns], "xyxy_pixels", cat, "template")
        obj = rec.to_json()
        for ann, a in zip(obj["annotations"], anns):
            ann["score"] = a[2]
        obj.update(missing_phrases=missing, width=96, height=64)
        lines.append(obj)
    fmt.write_annotations(os.path.join(folder, "annotations.jsonl"), lines)


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_review_page_rendering(tmp_path):
    work = str(tmp_path / "work")
    make_work(work)
    path = review.write_page(work)
    assert path == os.path.join(work, "review.html")
    with open(path, encoding="utf-8") as f:
        page = f.read()
    parser = Collect()
    parser.feed(page)
    cards = [a for t, a in parser.tags if t == "article"]
    assert [c["data-id"] for c in cards] == [i[0] for i in ITEMS]
    rects = [a for t, a in parser.tags if t == "rect"]
    assert len(rects) == 6
    assert {k: rects[0][k] for k in ("x", "y", "width", "height")} == {
        "x": "4.0", "y": "8.0", "width": "36.0", "height": "22.0"}
    imgs = [a for t, a in parser.tags if t == "img"]
    assert imgs[0]["src"] == "images/color_0000.png" and imgs[0]["alt"] == "a red car & a <blue> bench"
    svgs = [a for t, a in parser.tags if t == "svg"]
    assert svgs[0]["viewbox"] == "0 0 96 64"
    text = "".join(parser.text)
    assert "a red car & a <blue> bench" in text  # escaped in the HTML, intact as text
    assert "&lt;blue&gt;" in page and "<blue>" not in page.replace("&lt;blue&gt;", "")
    assert "No box: a cat (no box above the thresholds)" in text
    assert "This item has no box and cannot be used." in text
    assert len([a for t, a in parser.tags if t == "textarea"]) == 4
    meta = json.loads(page.split('id="review-meta">')[1].split("</script>")[0])
    assert meta == {"dataset": review.dataset_key([{"id": i[0]} for i in ITEMS]),
                    "format": "goal_jax-review-decisions", "filename": "review_decisions.json",
                    "items": 4}
    # --embed puts the images in the page.
    embedded = review.write_page(work, out=str(tmp_path / "elsewhere.html"), embed=True)
    with open(embedded, encoding="utf-8") as f:
        assert f.read().count('src="data:image/png;base64,') == 4
    with pytest.raises(common.DataPrepError, match="needs --embed"):
        review.write_page(work, out=str(tmp_path / "elsewhere.html"))


def write_decisions(path, decisions):
    with open(path, "w") as f:
        json.dump({"format": "goal_jax-review-decisions", "version": 1, "dataset": "x",
                   "decisions": decisions}, f)


def test_apply_decisions_builds_goal2k_folder(tmp_path):
    from goal_jax.data import goal2k

    work, out = str(tmp_path / "work"), str(tmp_path / "final")
    make_work(work)
    dec = str(tmp_path / "d.json")
    write_decisions(dec, {"color_0000": {"decision": "accept", "notes": "good"},
                          "counting_0000": {"decision": "reject", "notes": "cat missing"},
                          "coco_5": {"decision": "accept", "notes": ""}})
    summary = review.apply_decisions(work, dec, out, show_progress=False)
    assert summary["accepted"] == ["color_0000"] and summary["rejected"] == ["counting_0000"]
    assert summary["undecided"] == ["spatial_0000"] and summary["no_boxes"] == ["coco_5"]
    assert (summary["train"], summary["val"]) == (1, 0)
    records, errors = fmt.read_annotations(os.path.join(out, "annotations.jsonl"))
    assert errors == [] and [r.id for r in records] == ["color_0000"]
    assert records[0].boxes == [[4, 8, 40, 30], [50, 20, 90, 60]]
    assert records[0].image == "images/color_0000.png"
    line = common.read_jsonl(os.path.join(out, "annotations.jsonl"))[0]
    assert line["review_notes"] == "good" and "missing_phrases" not in line
    with open(os.path.join(out, "images", "color_0000.png"), "rb") as a, \
            open(os.path.join(work, "images", "color_0000.png"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(out, "review_summary.json")) as f:
        assert json.load(f)["rejected"] == ["counting_0000"]

    # An existing folder needs --overwrite; undecided items can be kept; a val split.
    with pytest.raises(common.DataPrepError, match="exists; pass --overwrite"):
        review.apply_decisions(work, dec, out, show_progress=False)
    summary = review.apply_decisions(work, dec, out, include_undecided=True, val_fraction=0.5,
                                     overwrite=True, show_progress=False)
    assert (summary["train"], summary["val"]) == (1, 1)
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["color_0000.png", "spatial_0000.png"]
    good, build = goal2k.scan_source(out)  # what the goal2k builder reads
    assert build["items_kept"] == 2 and build["items_dropped"] == 0 and build["boxes_dropped"] == 0
    by_id = {g["record"].id: (split, g) for split, items in good.items() for g in items}
    assert sorted(by_id) == ["color_0000", "spatial_0000"]
    assert sorted(split for split, _ in by_id.values()) == ["train", "val"]
    np.testing.assert_allclose(by_id["color_0000"][1]["boxes"],
                               [[4 / 96, 8 / 64, 40 / 96, 30 / 64], [50 / 96, 20 / 64, 90 / 96, 60 / 64]],
                               rtol=1e-6)
    assert by_id["color_0000"][1]["phrases"] == ["a red car", "a <blue> bench"]

    # Bad decision files.
    write_decisions(dec, {"nope": {"decision": "accept"}})
    with pytest.raises(common.DataPrepError, match=r"names 1 items that are not in the annotations: \['nope'\]"):
        review.apply_decisions(work, dec, str(tmp_path / "f2"), show_progress=False)
    write_decisions(dec, {"coco_5": {"decision": "maybe"}})
    with pytest.raises(common.DataPrepError, match="item coco_5: decision must be 'accept', 'reject' or null"):
        review.apply_decisions(work, dec, str(tmp_path / "f2"), show_progress=False)
    with open(dec, "w") as f:
        json.dump({"decisions": {}}, f)
    with pytest.raises(common.DataPrepError, match="not a review decisions file"):
        review.apply_decisions(work, dec, str(tmp_path / "f2"), show_progress=False)


def test_apply_leaves_out_boxes_the_builder_would_drop(tmp_path):
    from goal_jax.data import goal2k

    work, out = str(tmp_path / "work"), str(tmp_path / "final")
    make_work(work, [
        ("a", "a cup and a bowl", "color",
         [("a cup", [10, 5, 50, 30], 0.6), ("a bowl", [20, 20, 20.5, 40], 0.5)], []),
        ("b", "a tiny cup", "color", [("a tiny cup", [3, 3, 3.4, 3.2], 0.9)], []),
        ("c", "a big bowl", "color", [("a big bowl", [0, 0, 98, 64], 0.9)], []),
    ])
    dec = str(tmp_path / "d.json")
    write_decisions(dec, {k: {"decision": "accept"} for k in "abc"})
    summary = review.apply_decisions(work, dec, out, show_progress=False)
    assert summary["accepted"] == ["a"] and summary["no_boxes"] == ["b", "c"]
    assert [(d["id"], d["index"], d["reason"].split(" (")[0]) for d in summary["dropped_boxes"]] == [
        ("a", 1, "degenerate"), ("b", 0, "degenerate"), ("c", 0, "out of bounds by 2 px")]
    records, _ = fmt.read_annotations(os.path.join(out, "annotations.jsonl"))
    assert [(r.id, r.phrases) for r in records] == [("a", ["a cup"])]
    good, build = goal2k.scan_source(out)
    assert build["items_kept"] == 1 and build["boxes_dropped"] == 0


# ----------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol (--remote-debugging-pipe: fds 3 and 4).
# ----------------------------------------------------------------------------------------------


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("Chromium is not installed: `make chromium` installs Debian's chromium")


class DevTools:
    """Minimal Chrome DevTools protocol client over --remote-debugging-pipe."""

    def __init__(self, user_data_dir, log_path):
        import fcntl

        pipe_r, self._cmd_w = os.pipe()
        self._out_r, pipe_w = os.pipe()
        # Copies numbered >= 10, so moving them to 3 and 4 in the child cannot clobber them.
        cmd_r = fcntl.fcntl(pipe_r, fcntl.F_DUPFD_CLOEXEC, 10)
        out_w = fcntl.fcntl(pipe_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(pipe_r)
        os.close(pipe_w)

        # Chromium reads commands on fd 3 and writes answers on fd 4; bash moves the pipe
        # ends there (no Python code runs between fork and exec).
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe", "--window-size=1200,900", "about:blank"]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-',
             find_chromium(), *args],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        os.close(cmd_r)
        os.close(out_w)
        self._next_id = 0
        self._results = {}
        self._events = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        self.session = None

    def _reader(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._out_r, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._results[msg["id"]] = msg
                        self._cond.notify_all()
                    else:
                        self._events.put(msg)

    def send(self, method, params=None, session=True, timeout=20.0):
        self._next_id += 1
        mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._results:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no answer to {method} (chromium rc={self.proc.poll()})")
                self._cond.wait(min(left, 0.2))
            result = self._results.pop(mid)
        if "error" in result:
            raise RuntimeError(f"{method}: {result['error']}")
        return result["result"]

    def attach(self):
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"],
                                                           "flatten": True}, session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def eval(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(expression):
                    return
            except RuntimeError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {expression}")

    def click(self, selector):
        box = self.eval(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        self._log.close()


def test_review_page_in_headless_chromium(tmp_path):
    work = str(tmp_path / "work")
    make_work(work)
    page = review.write_page(work)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    chrome = DevTools(str(tmp_path / "profile"), str(tmp_path / "chromium.log"))
    try:
        chrome.attach()
        chrome.send("Browser.setDownloadBehavior", {"behavior": "allow",
                                                    "downloadPath": str(downloads)}, session=False)
        chrome.send("Page.navigate", {"url": "file://" + page})
        chrome.wait_for("document.body && document.body.dataset.ready === 'true'")
        assert chrome.eval("document.querySelectorAll('.card').length") == 4
        assert chrome.eval("document.querySelectorAll('.card svg rect').length") == 6
        assert chrome.eval("document.getElementById('n-undecided').textContent") == "4"
        # The drawn box sits where the annotation says, scaled with the image.
        geo = chrome.eval("""(() => { const img = document.querySelector('#card-color_0000 img')
            .getBoundingClientRect(); const r = document.querySelector('#card-color_0000 rect')
            .getBoundingClientRect(); return [img.width, r.left - img.left, r.width]; })()""")
        scale = geo[0] / 96
        assert geo[1] == pytest.approx(4 * scale, abs=2) and geo[2] == pytest.approx(36 * scale, abs=3)

        chrome.click("#card-color_0000 button.accept")
        chrome.click("#card-counting_0000 button.reject")
        chrome.click("#card-color_0000 textarea")
        chrome.send("Input.insertText", {"text": "sharp image"})
        key = chrome.eval("window.goalReview.key")
        stored = json.loads(chrome.eval(f"localStorage.getItem({json.dumps(key)})"))
        assert stored["color_0000"]["decision"] == "accept"
        assert stored["color_0000"]["notes"] == "sharp image"
        assert stored["counting_0000"]["decision"] == "reject"
        assert chrome.eval("document.getElementById('n-accept').textContent") == "1"
        assert chrome.eval("document.getElementById('n-reject').textContent") == "1"
        assert chrome.eval("[...document.querySelector('#card-color_0000').classList].sort()") == [
            "accept", "card", "focus"]  # the first card has the keyboard focus
        assert chrome.eval("[...document.querySelector('#card-counting_0000').classList].sort()") == [
            "card", "reject"]

        # A reload keeps the decisions (localStorage) and shows them.
        chrome.eval("window.__before_reload = 1")
        chrome.send("Page.reload")
        chrome.wait_for("window.__before_reload === undefined && document.body.dataset.ready === 'true'")
        assert chrome.eval("document.querySelector('#card-color_0000 button.accept')"
                           ".getAttribute('aria-pressed')") == "true"
        assert chrome.eval("document.querySelector('#card-color_0000 textarea').value") == "sharp image"
        # Keyboard: the focused first card toggles with "a" (accept again = undecided), "r" rejects.
        chrome.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "j", "text": "j"})
        chrome.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "j", "text": "j"})
        chrome.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "a", "text": "a"})
        assert chrome.eval("document.getElementById('n-accept').textContent") == "2"

        chrome.click("#download")
        target = downloads / "review_decisions.json"
        deadline = time.monotonic() + 15
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.exists(), os.listdir(downloads)
        time.sleep(0.2)
    finally:
        chrome.close()
    saved = json.loads(target.read_text())
    assert saved["format"] == "goal_jax-review-decisions" and saved["version"] == 1
    assert {k: v["decision"] for k, v in saved["decisions"].items()} == {
        "color_0000": "accept", "counting_0000": "reject", "spatial_0000": "accept"}
    assert saved["decisions"]["color_0000"]["notes"] == "sharp image"
    # The downloaded file drives the final folder.
    summary = review.apply_decisions(work, str(target), str(tmp_path / "final"), show_progress=False)
    assert summary["accepted"] == ["color_0000", "spatial_0000"] and summary["train"] == 2
    line = common.read_jsonl(str(tmp_path / "final" / "annotations.jsonl"))[0]
    assert line["review_notes"] == "sharp image"

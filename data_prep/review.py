"""Human review of the annotated images, and the final goal2k-ready folder.

``page``: writes a static HTML page (``<work>/review.html``; annotate.py writes it too), one card
per item: the image with its boxes and phrases drawn (SVG over the image, colored per phrase,
with GroundingDINO's scores), the caption, the phrases that got no box, accept / reject buttons
and a notes field. Keys: ``a`` accept, ``r`` reject, ``j`` / ``k`` next / previous card.
Decisions are kept in the browser's localStorage (so a reload keeps them) and saved with
"Download decisions" as ``review_decisions.json``::

    {"format": "goal_jax-review-decisions", "version": 1, "dataset": "<key>",
     "saved": "<ISO time>", "decisions": {"<id>": {"decision": "accept" | "reject",
                                                   "notes": "...", "time": "<ISO time>"}}}

"Load decisions" merges such a file back into the page (to continue elsewhere).
Open the page from its folder (images are referenced relative to it), or write it with
``--embed`` to put the images inside the HTML.

``apply``: reads ``<work>/annotations.jsonl`` and the decisions file and writes ``--out``:
``images/`` (copies of the accepted images), ``annotations.jsonl`` (and
``annotations_val.jsonl`` with ``--val-fraction``) in goal_jax's data format, with the reviewer's
notes as ``review_notes``, and ``review_summary.json``. Items rejected, undecided (unless
``--include-undecided``) or without any box are left out and listed in the summary; boxes the
goal2k builder would drop (``goal_jax.data.format.clean_annotations``: empty phrase, outside
the image by >= 1 px, narrower or lower than 1 px, beyond 30) are left out and listed too. The folder
is what the goal2k builder reads (``goal_jax.data.goal2k.build_goal2k(out, data_dir)``, or
``--tfds-dir`` here).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import shutil
import sys

if __package__ in (None, ""):  # python data_prep/review.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import common  # noqa: E402
from data_prep.common import DataPrepError  # noqa: E402

DECISIONS_FORMAT = "goal_jax-review-decisions"
DECISIONS_FILE = "review_decisions.json"
PAGE = "review.html"
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
          "#bfef45", "#9a6324", "#469990")

CSS = """
body{font-family:system-ui,sans-serif;margin:0;background:#f3f3f3;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;
  display:flex;gap:12px;align-items:center;flex-wrap:wrap;z-index:2}
header h1{font-size:18px;margin:0 12px 0 0}
#counts span{margin-right:10px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px;padding:14px}
.card{background:#fff;border:3px solid #ddd;border-radius:8px;padding:10px}
.card.accept{border-color:#2e9b3a}.card.reject{border-color:#c62828;opacity:.75}
.card.focus{box-shadow:0 0 0 3px #4363d8}
.card.hidden{display:none}
.figure{position:relative;width:100%;line-height:0}
.figure img{width:100%;height:auto;display:block}
.figure svg{position:absolute;left:0;top:0;width:100%;height:100%}
.figure rect{fill:none;stroke-width:3;vector-effect:non-scaling-stroke}
.figure text{font-size:14px;paint-order:stroke;stroke:#fff;stroke-width:3px}
.id{font-family:monospace;color:#666;font-size:12px}
.caption{font-size:15px;margin:8px 0}
.phrases{margin:0;padding-left:0;list-style:none;font-size:13px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px}
.missing{color:#b00;font-size:13px;margin:6px 0}
.decision{display:flex;gap:8px;margin:8px 0}
.decision button{flex:1;padding:6px;font-size:14px;cursor:pointer;border:1px solid #999;
  border-radius:4px;background:#fafafa}
.decision button.accept[aria-pressed=true]{background:#2e9b3a;color:#fff}
.decision button.reject[aria-pressed=true]{background:#c62828;color:#fff}
textarea{width:100%;box-sizing:border-box;min-height:38px;font:inherit;font-size:13px}
"""

SCRIPT = r"""
(function () {
  const META = JSON.parse(document.getElementById('review-meta').textContent);
  const KEY = 'goal_jax-review:' + META.dataset;
  let state = {};
  try { state = JSON.parse(localStorage.getItem(KEY) || '{}') || {}; } catch (e) { state = {}; }
  const cards = Array.from(document.querySelectorAll('.card'));
  const byId = new Map(cards.map(c => [c.dataset.id, c]));
  let focus = 0;

  function save() { localStorage.setItem(KEY, JSON.stringify(state)); }
  function entry(id) { return state[id] || (state[id] = {decision: null, notes: ''}); }
  function show(card) {
    const e = state[card.dataset.id] || {};
    card.classList.toggle('accept', e.decision === 'accept');
    card.classList.toggle('reject', e.decision === 'reject');
    card.querySelector('button.accept').setAttribute('aria-pressed', String(e.decision === 'accept'));
    card.querySelector('button.reject').setAttribute('aria-pressed', String(e.decision === 'reject'));
    const notes = card.querySelector('textarea');
    if (document.activeElement !== notes) notes.value = e.notes || '';
  }
  function counts() {
    let a = 0, r = 0;
    for (const c of cards) {
      const d = (state[c.dataset.id] || {}).decision;
      if (d === 'accept') a++; else if (d === 'reject') r++;
    }
    document.getElementById('n-accept').textContent = a;
    document.getElementById('n-reject').textContent = r;
    document.getElementById('n-undecided').textContent = cards.length - a - r;
    filter();
  }
  function decide(id, decision) {
    const e = entry(id);
    e.decision = e.decision === decision ? null : decision;
    e.time = new Date().toISOString();
    save(); show(byId.get(id)); counts();
  }
  function filter() {
    const f = document.getElementById('filter').value;
    for (const c of cards) {
      const d = (state[c.dataset.id] || {}).decision || 'undecided';
      c.classList.toggle('hidden', f !== 'all' && f !== d);
    }
  }
  function decisions() {
    const out = {};
    for (const c of cards) {
      const e = state[c.dataset.id];
      if (e && (e.decision || e.notes)) out[c.dataset.id] = {decision: e.decision || null,
        notes: e.notes || '', time: e.time || null};
    }
    return {format: META.format, version: 1, dataset: META.dataset,
            saved: new Date().toISOString(), decisions: out};
  }
  function download() {
    const blob = new Blob([JSON.stringify(decisions(), null, 1)], {type: 'application/json'});
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = META.filename;
    document.body.appendChild(a); a.click(); a.remove();
    document.getElementById('status').textContent = 'saved ' + META.filename;
  }
  function load(file) {
    const reader = new FileReader();
    reader.onload = () => {
      try {
        const obj = JSON.parse(reader.result);
        if (obj.format !== META.format) throw new Error('not a review decisions file');
        let n = 0;
        for (const [id, e] of Object.entries(obj.decisions || {})) {
          if (byId.has(id)) { state[id] = e; n++; }
        }
        save(); cards.forEach(show); counts();
        document.getElementById('status').textContent = 'loaded ' + n + ' decisions';
      } catch (err) {
        document.getElementById('status').textContent = 'cannot load: ' + err.message;
      }
    };
    reader.readAsText(file);
  }
  function setFocus(i) {
    const visible = cards.filter(c => !c.classList.contains('hidden'));
    if (!visible.length) return;
    i = Math.max(0, Math.min(visible.length - 1, i));
    cards.forEach(c => c.classList.remove('focus'));
    visible[i].classList.add('focus');
    visible[i].scrollIntoView({block: 'nearest'});
    focus = i;
  }
  for (const card of cards) {
    const id = card.dataset.id;
    card.querySelector('button.accept').addEventListener('click', () => decide(id, 'accept'));
    card.querySelector('button.reject').addEventListener('click', () => decide(id, 'reject'));
    card.querySelector('textarea').addEventListener('input', ev => {
      const e = entry(id); e.notes = ev.target.value; e.time = new Date().toISOString(); save();
    });
    show(card);
  }
  document.getElementById('download').addEventListener('click', download);
  document.getElementById('load').addEventListener('change', ev => {
    if (ev.target.files.length) load(ev.target.files[0]);
  });
  document.getElementById('filter').addEventListener('change', () => { filter(); setFocus(0); });
  document.addEventListener('keydown', ev => {
    if (ev.target.tagName === 'TEXTAREA' || ev.target.tagName === 'INPUT' || ev.ctrlKey || ev.metaKey) return;
    const visible = cards.filter(c => !c.classList.contains('hidden'));
    const card = visible[focus];
    if (ev.key === 'j') setFocus(focus + 1);
    else if (ev.key === 'k') setFocus(focus - 1);
    else if (card && (ev.key === 'a' || ev.key === 'r')) {
      decide(card.dataset.id, ev.key === 'a' ? 'accept' : 'reject'); setFocus(focus + 1);
    }
  });
  counts(); setFocus(0);
  window.goalReview = {decisions, state: () => state, key: KEY};
  document.body.dataset.ready = 'true';
})();
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def dataset_key(records: list[dict]) -> str:
    """Short hash of the item ids: names the page's localStorage entry and its decisions."""
    ids = "\n".join(sorted(str(r.get("id")) for r in records))
    return hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16]


def _image_src(work: str, rel: str, embed: bool) -> str:
    if not embed:
        return "/".join(_esc(part) for part in rel.split("/"))
    path = os.path.join(work, rel)
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    mime = {"jpg": "jpeg"}.get(ext, ext)
    with open(path, "rb") as f:
        return f"data:image/{mime};base64," + base64.b64encode(f.read()).decode("ascii")


def _card(work: str, rec: dict, embed: bool) -> str:
    from PIL import Image

    rid = str(rec["id"])
    width, height = rec.get("width"), rec.get("height")
    if not width or not height:
        try:
            with Image.open(os.path.join(work, rec["image"])) as im:
                width, height = im.size
        except Exception:
            width, height = 512, 512
    norm = rec.get("box_format") == "xyxy_normalized"
    colors, shapes, items = {}, [], []
    for ann in rec.get("annotations", []):
        phrase = ann["phrase"]
        color = colors.setdefault(phrase, COLORS[len(colors) % len(COLORS)])
        x0, y0, x1, y1 = ann["box"]
        if norm:
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        score = ann.get("score")
        label = phrase + (f" {score:.2f}" if isinstance(score, (int, float)) else "")
        font = max(10, round(min(width, height) / 24))
        shapes.append(
            f'<rect class="box" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
            f'stroke="{color}"/><text x="{x0 + 3:.1f}" y="{y0 + font:.1f}" fill="{color}" '
            f'style="font-size:{font}px">{_esc(label)}</text>')
        items.append(f'<li class="phrase"><span class="swatch" style="background:{color}"></span>'
                     f'{_esc(phrase)} <small>{_esc(score) if score is not None else ""}</small></li>')
    missing = rec.get("missing_phrases") or []
    missing_html = ""
    if missing:
        missing_html = ('<p class="missing">No box: ' + "; ".join(
            f'{_esc(m.get("phrase", ""))} ({_esc(m.get("reason", ""))})' for m in missing) + "</p>")
    if not rec.get("annotations"):
        missing_html += '<p class="missing">This item has no box and cannot be used.</p>'
    return f"""<article class="card" data-id="{_esc(rid)}" id="card-{_esc(rid)}">
<div class="figure"><img src="{_image_src(work, rec['image'], embed)}" alt="{_esc(rec['caption'])}" width="{width}" height="{height}">
<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none">{''.join(shapes)}</svg></div>
<div class="id">{_esc(rid)} · {_esc(rec.get('category', ''))} · {_esc(rec.get('source', ''))}</div>
<p class="caption">{_esc(rec['caption'])}</p>
<ul class="phrases">{''.join(items)}</ul>{missing_html}
<div class="decision"><button type="button" class="accept" aria-pressed="false">Accept (a)</button>
<button type="button" class="reject" aria-pressed="false">Reject (r)</button></div>
<textarea class="notes" placeholder="notes"></textarea>
</article>"""


def render_page(work: str, records: list[dict], embed: bool = False, title: str = "") -> str:
    """The review page's HTML for annotation objects (annotations.jsonl lines)."""
    meta = {"dataset": dataset_key(records), "format": DECISIONS_FORMAT, "filename": DECISIONS_FILE,
            "items": len(records)}
    title = title or f"Review: {os.path.basename(os.path.abspath(work))}"
    cards = "\n".join(_card(work, r, embed) for r in records)
    meta_json = json.dumps(meta).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body>
<header><h1>{_esc(title)}</h1>
<div id="counts"><span>accepted <b id="n-accept">0</b></span><span>rejected <b id="n-reject">0</b></span>
<span>undecided <b id="n-undecided">{len(records)}</b></span><span>of {len(records)}</span></div>
<label>show <select id="filter"><option value="all">all</option><option value="undecided">undecided</option>
<option value="accept">accepted</option><option value="reject">rejected</option></select></label>
<button type="button" id="download">Download decisions</button>
<label>Load decisions <input type="file" id="load" accept=".json,application/json"></label>
<span id="status"></span></header>
<main>
{cards}
</main>
<script type="application/json" id="review-meta">{meta_json}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def read_items(work: str, annotations: str = "annotations.jsonl") -> list[dict]:
    """annotations.jsonl lines, each checked by goal_jax's format parser (errors name the item)."""
    from goal_jax.data import format as fmt

    path = os.path.join(work, annotations)
    lines = common.read_jsonl(path, "annotations file")
    seen = set()
    for n, obj in enumerate(lines, start=1):
        try:
            rec = fmt.parse_record(obj, n)
        except fmt.DataFormatError as e:
            raise DataPrepError(f"{path}: {e}") from None
        if rec.id in seen:
            raise DataPrepError(f"{path}: item {rec.id}: duplicate id")
        seen.add(rec.id)
        obj["id"] = rec.id
    return lines


def write_page(work: str, annotations: str = "annotations.jsonl", out: str | None = None,
               embed: bool = False, title: str = "") -> str:
    """Writes the review page (default ``<work>/review.html``); returns its path."""
    records = read_items(work, annotations)
    path = out or os.path.join(work, PAGE)
    if not embed and os.path.abspath(os.path.dirname(path)) != os.path.abspath(work):
        raise DataPrepError("a page outside the work folder needs --embed (images are relative paths)")
    common.write_bytes_atomic(path, render_page(work, records, embed, title).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------------
# Applying decisions.
# ----------------------------------------------------------------------------------------------


def read_decisions(path: str, known_ids: set[str] | None = None) -> dict[str, dict]:
    """A decisions file -> {id: {"decision": "accept"|"reject"|None, "notes": str}}.

    Raises:
      DataPrepError: not a decisions file, a bad decision value, or ids not in ``known_ids``.
    """
    if not os.path.isfile(path):
        raise DataPrepError(f"decisions file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataPrepError(f"decisions file {path}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or obj.get("format") != DECISIONS_FORMAT \
            or not isinstance(obj.get("decisions"), dict):
        raise DataPrepError(f"decisions file {path}: not a review decisions file "
                            f"(expected format {DECISIONS_FORMAT!r} with a 'decisions' object)")
    out = {}
    for rid, entry in obj["decisions"].items():
        if not isinstance(entry, dict):
            raise DataPrepError(f"decisions file {path}: item {rid}: expected an object, got {entry!r}")
        decision = entry.get("decision")
        if decision not in ("accept", "reject", None):
            raise DataPrepError(f"decisions file {path}: item {rid}: decision must be 'accept', "
                                f"'reject' or null, got {decision!r}")
        notes = entry.get("notes") or ""
        if not isinstance(notes, str):
            raise DataPrepError(f"decisions file {path}: item {rid}: notes must be text")
        out[rid] = {"decision": decision, "notes": notes}
    if known_ids is not None:
        unknown = sorted(set(out) - known_ids)
        if unknown:
            raise DataPrepError(f"decisions file {path} names {len(unknown)} items that are not in "
                                f"the annotations: {unknown[:10]}")
    return out


def apply_decisions(work: str, decisions_path: str, out: str, include_undecided: bool = False,
                    val_fraction: float = 0.0, overwrite: bool = False,
                    annotations: str = "annotations.jsonl", show_progress: bool = True) -> dict:
    """Builds the final folder (module docstring); returns the summary dict."""
    from PIL import Image

    from goal_jax.data import format as fmt

    if not 0.0 <= val_fraction < 1.0:
        raise DataPrepError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    items = read_items(work, annotations)
    decisions = read_decisions(decisions_path, {r["id"] for r in items})
    if os.path.abspath(out) == os.path.abspath(work):
        raise DataPrepError("--out must be a new folder, not the work folder")
    for name in (fmt.ANNOTATIONS_FILE, fmt.VAL_ANNOTATIONS_FILE):
        if os.path.exists(os.path.join(out, name)):
            if not overwrite:
                raise DataPrepError(f"{os.path.join(out, name)} exists; pass --overwrite to replace it")
            os.remove(os.path.join(out, name))
    if overwrite and os.path.isdir(os.path.join(out, "images")):
        shutil.rmtree(os.path.join(out, "images"))
    summary = {"items": len(items), "accepted": [], "rejected": [], "undecided": [],
               "no_boxes": [], "dropped_boxes": [], "train": 0, "val": 0}
    keep = []
    for rec in items:
        rid = rec["id"]
        decision = decisions.get(rid, {}).get("decision")
        if decision == "reject":
            summary["rejected"].append(rid)
            continue
        if decision is None and not include_undecided:
            summary["undecided"].append(rid)
            continue
        if not rec.get("annotations"):
            summary["no_boxes"].append(rid)
            continue
        # The builder's own box checks (goal_jax.data.format.clean_annotations): boxes it would
        # drop are left out here and listed, and an item left without a box is not copied.
        record = fmt.parse_record(rec, 0)
        path = os.path.join(work, record.image)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Exception as e:
            raise DataPrepError(f"item {rid}: cannot read image {path} ({type(e).__name__}: {e})") from None
        _, _, dropped, _ = fmt.clean_annotations(record, width, height)
        summary["dropped_boxes"] += [dict(d, id=rid) for d in dropped]
        if len(dropped) == len(record.boxes):
            summary["no_boxes"].append(rid)
            continue
        bad = {d["index"] for d in dropped}
        rec = dict(rec, annotations=[a for i, a in enumerate(rec["annotations"]) if i not in bad])
        summary["accepted" if decision == "accept" else "undecided"].append(rid)
        keep.append(rec)
    val_ids = set()
    if val_fraction > 0 and keep:
        ranked = sorted(keep, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        val_ids = {r["id"] for r in ranked[:max(1, round(val_fraction * len(keep)))]}
        if len(val_ids) == len(keep):
            val_ids.discard(ranked[-1]["id"])
    train, val = [], []
    bar = common.progress_bar(len(keep), "copy images", not show_progress)
    for rec in keep:
        src = os.path.join(work, rec["image"])
        if not os.path.isfile(src):
            raise DataPrepError(f"item {rec['id']}: image {src} not found")
        rel = f"images/{rec['id']}{os.path.splitext(rec['image'])[1] or '.png'}"
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        line = fmt.parse_record(rec, 0).to_json()
        line["image"] = rel
        line.pop("split", None)
        notes = decisions.get(rec["id"], {}).get("notes")
        if notes:
            line["review_notes"] = notes
        (val if rec["id"] in val_ids else train).append(line)
        bar.update(1)
    bar.close()
    fmt.write_annotations(os.path.join(out, fmt.ANNOTATIONS_FILE), train)
    if val:
        fmt.write_annotations(os.path.join(out, fmt.VAL_ANNOTATIONS_FILE), val)
    summary["train"], summary["val"] = len(train), len(val)
    summary["decisions_file"] = os.path.abspath(decisions_path)
    common.json_dump(summary, os.path.join(out, "review_summary.json"))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.review", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pg = sub.add_parser("page", help="write the review page")
    pg.add_argument("work", help="folder with annotations.jsonl and images/ (annotate.py's)")
    pg.add_argument("--out", default=None, help="page path (default: <work>/review.html)")
    pg.add_argument("--embed", action="store_true", help="put the images inside the HTML")
    pg.add_argument("--title", default="")
    ap = sub.add_parser("apply", help="apply decisions and write the final folder")
    ap.add_argument("work", help="folder with annotations.jsonl and images/")
    ap.add_argument("--decisions", required=True, help="review_decisions.json from the page")
    ap.add_argument("--out", required=True, help="final dataset folder (goal2k builder input)")
    ap.add_argument("--include-undecided", action="store_true",
                    help="keep items without a decision too (default: accepted only)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="fraction of kept items for annotations_val.jsonl (hash of the id)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing final folder's files")
    ap.add_argument("--tfds-dir", default=None,
                   help="also build the goal2k TFDS dataset into this data_dir")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "page":
            path = write_page(args.work, out=args.out, embed=args.embed, title=args.title)
            print(f"review page: {path}")
            return 0
        summary = apply_decisions(args.work, args.decisions, args.out, args.include_undecided,
                                  args.val_fraction, args.overwrite, show_progress=not args.quiet)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {summary['train']} train + {summary['val']} val items "
          f"({len(summary['accepted'])} accepted, {len(summary['rejected'])} rejected, "
          f"{len(summary['undecided'])} undecided{' kept' if args.include_undecided else ' left out'}, "
          f"{len(summary['no_boxes'])} without boxes, {len(summary['dropped_boxes'])} bad boxes "
          "left out)")
    if args.tfds_dir:
        from goal_jax.data import goal2k

        _, build = goal2k.build_goal2k(args.out, data_dir=args.tfds_dir)
        print(f"goal2k TFDS dataset built in {args.tfds_dir}: {build.get('items_kept')} items kept, "
              f"{build.get('items_dropped')} dropped, {build.get('boxes_dropped')} boxes dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

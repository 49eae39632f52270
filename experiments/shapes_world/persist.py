"""Results that survive across sessions: restoring finished runs from a previous results.json.

The workdir (checkpoints, samples, the fine-tuning set) is lost between sessions; only git,
and with it ``<out>/results.json`` and ``<out>/grid_images.npz``, is kept. :class:`Previous`
reads them and says, for each arm x seed of a new invocation, whether the old record is what
this invocation would compute:

* the same arm and seed, the same config string (``configs/goal.py:demo[,<ablation>]``) and
  the same config overrides (``arms.run_overrides``) once the machine-specific paths are
  written portably (:func:`portable`: ``<world>/...``, ``<workdir>/...``, ``<repo>/...``);
* the same evaluation settings (sampler, steps, CFG, grounding fraction, layout ids) and the
  same evaluation layouts (captions, boxes, seeds);
* the same fine-tuning set (its manifest's arguments and quotas);
* the same base world and oracle: :func:`world_fingerprint` (SHA-256 of every file of the
  world's ``pipeline/`` and ``clip/`` and of the oracle folder). A results.json written before
  fingerprints existed is matched by the world's path instead (said in the printed line).

A matching record is restored (its train + eval records copied, ``"restored_from"`` noted);
a mismatching one is dropped with a printed line naming it and why. Runs of the old file that
this invocation does not ask for are kept when they match (so several invocations with
different ``--arms`` into one ``--out`` accumulate one results.json).

``grid_images.npz`` (uint8, compressed) holds the images the picture grid shows (the first
``GRID_PER_CATEGORY`` layouts of each category) per row: ``ground_truth``, ``base`` and
``<arm>__seed<k>`` [n_grid, H, W, 3], plus ``layout_ids`` [n_grid] (str), so a restored row
is drawn without its samples.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

GRID_IMAGES = "grid_images.npz"
SEED_FIELDS = ("train.seed", "data.seed")
FINETUNE_FIELDS = ("items", "mix", "resolution", "seed", "split", "min_objects", "quotas")
LAYOUT_FIELDS = ("id", "category", "caption", "phrases", "boxes", "seed")


def hash_folder(folder: str) -> str | None:
    """SHA-256 (hex) over the sorted relative paths and contents of every file under
    ``folder``; None when the folder does not exist."""
    if not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(root, f), folder)
                   for root, _, names in os.walk(folder) for f in names)
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(folder, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def world_fingerprint(world: dict, oracle_dir: str | None = None) -> dict:
    """{"pipeline", "clip", "oracle"}: SHA-256 of each folder's files (``world`` from
    run.world_info; the oracle is goal_jax.evaluation.oracle's default folder unless
    ``oracle_dir``). About 0.2 s for the shipped world (27 MiB)."""
    from goal_jax.evaluation import oracle as oracle_lib

    return {"pipeline": hash_folder(world["pipeline"]), "clip": hash_folder(world["clip"]),
            "oracle": hash_folder(oracle_dir or oracle_lib.DEFAULT_DIR)}


def portable(overrides: dict, world_path: str, workdir: str, repo: str) -> dict:
    """``overrides`` with every string value under ``world_path`` / ``workdir`` / ``repo``
    rewritten as ``<world>/...`` / ``<workdir>/...`` / ``<repo>/...`` (the first that
    applies), so records made on other machines or in other workdirs compare equal; tuples
    become lists (their form in results.json)."""
    prefixes = [(os.path.abspath(p).rstrip("/"), tag) for p, tag in
                ((world_path, "<world>"), (workdir, "<workdir>"), (repo, "<repo>")) if p]
    out = {}
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):
            for prefix, tag in prefixes:
                if value == prefix or value.startswith(prefix + "/"):
                    value = tag + value[len(prefix):]
                    break
        out[key] = value
    return out


def grid_key(arm: str, seed: int) -> str:
    return f"{arm}__seed{seed}"


def read_grid_images(path: str) -> dict:
    """{row key: uint8 [n, H, W, 3], "layout_ids": [n] str} of a grid_images.npz ({} when
    absent)."""
    if not os.path.isfile(path):
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_grid_images(path: str, rows: dict, layout_ids: list[str]) -> str:
    """Writes ``rows`` {row key: uint8 [n, H, W, 3]} and ``layout_ids`` to ``path``
    (np.savez_compressed; atomic)."""
    arrays = {k: np.asarray(v, np.uint8) for k, v in rows.items()}
    arrays["layout_ids"] = np.asarray(layout_ids, dtype=str)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _diff(have: dict, want: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    shown = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class Previous:
    """The results.json (and grid_images.npz) already in ``out``, if any.

    ``self.results`` is None when there is none. :meth:`check` compares one old run with what
    this invocation would run; :meth:`common_reason` compares the parts shared by all runs
    (world, oracle, fine-tuning set, layouts) once."""

    def __init__(self, out: str, repo: str):
        self.out, self.repo = out, repo
        self.path = os.path.join(out, "results.json")
        self.results = None
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.results = json.load(f)
        self.images = read_grid_images(os.path.join(out, GRID_IMAGES))
        self._common = None

    def runs(self) -> list[dict]:
        return list(self.results["runs"]) if self.results else []

    def workdir(self) -> str | None:
        r = self.results
        if r is None:
            return None
        return r.get("workdir") or os.path.dirname(r["finetune_set"]["folder"])

    def overrides(self, run: dict) -> dict:
        """The portable overrides of an old run: its own ``overrides`` record, or (files
        written before runs recorded them) its arm's ``config`` (recorded for the first seed)
        with the seed fields set to the run's seed, made portable with the old paths."""
        if "overrides" in run:
            return run["overrides"]
        arm = self.results["arms"].get(run["arm"])
        if arm is None:
            return {}
        raw = dict(arm["config"], **{k: run["seed"] for k in SEED_FIELDS})
        return portable(raw, self.results["world"]["path"], self.workdir(), self.repo)

    def config_string(self, run: dict) -> str | None:
        if "config_string" in run:
            return run["config_string"]
        arm = self.results["arms"].get(run["arm"])
        return arm["config_string"] if arm else None

    def common_reason(self, world: dict, finetune: dict, layouts: list[dict]) -> str | None:
        """Why no old run can match (None when the shared parts do): another world or oracle,
        another fine-tuning set or other evaluation layouts. Also sets ``self.world_note``
        (how the world was matched)."""
        if self._common is not None:
            return self._common[0]
        old = self.results
        reason, self.world_note = None, ""
        old_fp = old["world"].get("fingerprint")
        if old_fp is not None:
            changed = [k for k in ("pipeline", "clip", "oracle")
                       if old_fp.get(k) != world["fingerprint"].get(k)]
            if changed:
                reason = f"the world's {'/'.join(changed)} files differ (fingerprint)"
        else:
            same = os.path.realpath(old["world"]["path"]) == os.path.realpath(world["path"])
            rel = os.path.relpath(world["path"], self.repo)
            if not same and not (not rel.startswith("..") and
                                 old["world"]["path"].rstrip("/").endswith("/" + rel)):
                reason = (f"another world ({old['world']['path']}; the old results.json has "
                          "no world fingerprint)")
            self.world_note = " (world matched by path: the old results.json has no fingerprint)"
        if reason is None:
            have = {k: old["finetune_set"].get(k) for k in FINETUNE_FIELDS}
            want = {k: finetune.get(k) for k in FINETUNE_FIELDS}
            if have != want:
                reason = f"another fine-tuning set ({_diff(have, want)})"
        if reason is None:
            have = [{k: x.get(k) for k in LAYOUT_FIELDS} for x in old["eval"]["layouts"]]
            want = [{k: x.get(k) for k in LAYOUT_FIELDS} for x in layouts]
            if have != want:
                reason = "other evaluation layouts"
        self._common = (reason,)
        return reason

    def check(self, run: dict, want: dict) -> str | None:
        """None when the old ``run`` is what ``want`` = {"arm", "seed", "config_string",
        "overrides" (portable), "settings" (evaluation)} describes, else the reason."""
        if not run.get("train") or not run.get("eval"):
            return "unfinished in the old results.json"
        if self.config_string(run) != want["config_string"]:
            return f"config string {self.config_string(run)!r} -> {want['config_string']!r}"
        have = self.overrides(run)
        if have != want["overrides"]:
            return f"config overrides differ ({_diff(have, want['overrides'])})"
        if run["eval"].get("settings") != want["settings"]:
            return "evaluation settings differ " + _diff(run["eval"].get("settings") or {},
                                                          want["settings"])
        if run["eval"].get("scorer") != want.get("scorer"):
            return (f"scored by {run['eval'].get('scorer')!r}, not {want.get('scorer')!r} (its "
                    "samples are not stored, so it cannot be rescored)")
        return None

    def reference(self, name: str, settings: dict) -> dict | None:
        """The old reference record ``name`` ("ground_truth" / "base") when its settings match
        and its grid images are stored, else None (the shared parts are checked by the
        caller)."""
        if not self.results:
            return None
        from experiments.shapes_world import evaluate as eval_lib

        ref = self.results.get("references", {}).get(name)
        if ref is None or ref.get("settings") != settings or name not in self.images or \
                ref.get("scorer") != eval_lib.SCORER:
            return None
        return ref

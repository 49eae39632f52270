"""Images for prompt records, from an image API or from goal_jax's own sampler.

Sources (``--source``):

* ``api``: an OpenAI-compatible image API, ``POST <base-url>/images/generations`` with
  ``{"model", "prompt", "n": 1, "size", "quality", "response_format": "b64_json"}`` (the paper
  used DALL-E 3; ``gpt-image-*`` models always answer base64 and get no ``response_format``).
  Base URL from ``--base-url`` or ``$OPENAI_BASE_URL`` (default OpenAI's, including ``/v1``),
  key from ``$OPENAI_API_KEY`` (``--api-key-env`` names another variable). The API takes no
  seed: the manifest records ``seed: null`` and the model's ``revised_prompt``.
* ``local``: ``goal_jax.sampling.GLIGENPipeline`` on a diffusers GLIGEN (or plain Stable
  Diffusion) pipeline folder, text only (an empty layout), seeded per item
  (``crc32("<seed>:<id>")``), ``--batch-size`` prompts per call, the batch sharded over the
  local accelerators (``--num-devices``, default all). goal_jax's sampler (and jax) is imported
  only when this source is used.

Run it again with the same arguments to resume: items whose manifest line exists and whose image
file is present are skipped. Each image is written atomically, then its manifest line is
appended, so an interruption loses at most the item in flight. Requests are retried with
exponential backoff (HTTP 408/409/429/5xx, connection errors; ``Retry-After`` honoured) and
spaced by the ``--rpm`` rate limit. An item the API refuses (other 4xx, e.g. a content filter)
is logged to ``failures.jsonl`` and retried on the next run; a wrong key (401/403) or spent
retries stop the run.

Output folder::

    images/<id>.png     RGB PNG (downscaled so the longer side is <= --max-side when given)
    manifest.jsonl      {"id", "prompt", "image", "source", "seed", "time", "width", "height",
                         "category", "phrases", "prompt_source", "elapsed_s", ...} per image
    failures.jsonl      {"id", "prompt", "error", "time"} per failed attempt
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import os
import sys
import time
import zlib
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # python data_prep/generate_images.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import common  # noqa: E402
from data_prep.common import DataPrepError, HTTPError  # noqa: E402

MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
IMAGES = "images"


@dataclasses.dataclass
class Generated:
    """One generated image (PIL RGB) and what to record with it."""

    image: Any
    seed: int | None
    extra: dict


class FatalSourceError(RuntimeError):
    """Stops the whole run (wrong key, network down, retries spent)."""


def item_seed(base_seed: int, item_id: str) -> int:
    """The seed of one item: ``crc32("<base_seed>:<id>")`` (independent of order and batch)."""
    return zlib.crc32(f"{base_seed}:{item_id}".encode("utf-8"))


def decode_image(data: bytes, what: str):
    """Bytes -> PIL RGB image; DataPrepError naming ``what`` when they do not decode."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types
        raise DataPrepError(f"{what}: image does not decode ({type(e).__name__}: {e})") from None
    return img.convert("RGB")


class APISource:
    """OpenAI-compatible ``/images/generations`` (one prompt per request)."""

    batch_size = 1

    def __init__(self, client: common.JSONClient, model: str = "dall-e-3",
                 size: str = "1024x1024", quality: str | None = "standard",
                 style: str | None = None):
        self.client, self.model, self.size, self.quality, self.style = client, model, size, quality, style
        self.name = f"api:{model}"

    def payload(self, prompt: str) -> dict:
        body = {"model": self.model, "prompt": prompt, "n": 1, "size": self.size}
        if self.quality:
            body["quality"] = self.quality
        if self.style:
            body["style"] = self.style
        if not self.model.startswith("gpt-image"):
            body["response_format"] = "b64_json"
        return body

    def generate(self, items: Sequence[dict], seeds: Sequence[int]) -> list:
        out = []
        for item in items:
            try:
                answer = self.client.post("images/generations", self.payload(item["prompt"]))
            except HTTPError as e:
                if e.status is None or e.status in common.FATAL_STATUS or e.status in common.RETRY_STATUS:
                    raise FatalSourceError(str(e)) from None
                out.append(DataPrepError(str(e)))
                continue
            try:
                entry = answer["data"][0]
                raw = base64.b64decode(entry["b64_json"], validate=True)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                out.append(DataPrepError(f"answer has no data[0].b64_json image ({type(e).__name__})"))
                continue
            try:
                image = decode_image(raw, f"item {item['id']}")
            except DataPrepError as e:
                out.append(e)
                continue
            extra = {"model": self.model, "size": self.size}
            if entry.get("revised_prompt"):
                extra["revised_prompt"] = entry["revised_prompt"]
            out.append(Generated(image, None, extra))
        return out


class LocalSource:
    """goal_jax's sampler, text only (no layout), on a diffusers pipeline folder.

    ``goal_jax.weights`` / ``goal_jax.sampling`` (and jax) are imported on first use.
    """

    def __init__(self, pipeline_dir: str, num_steps: int = 50, guidance_scale: float = 7.5,
                 sampler: str = "ddim", height: int | None = None, width: int | None = None,
                 batch_size: int = 4, negative_prompt: str = "", num_devices: int | None = None):
        if not os.path.isdir(pipeline_dir):
            raise DataPrepError(f"--pipeline folder not found: {pipeline_dir}")
        self.pipeline_dir = pipeline_dir
        self.settings = {"num_steps": num_steps, "guidance_scale": guidance_scale,
                         "sampler": sampler, "height": height, "width": width,
                         "negative_caption": negative_prompt}
        self.batch_size = max(1, int(batch_size))
        self.num_devices = num_devices
        self.name = f"local:{os.path.basename(os.path.normpath(pipeline_dir))}"
        self._sampler = None
        self._options = None

    def _load(self):
        import jax

        from goal_jax import sampling, weights

        pipeline = weights.load_pipeline(self.pipeline_dir)
        devices = jax.devices()[:self.num_devices] if self.num_devices else None
        self._sampler = sampling.GLIGENPipeline(pipeline, devices=devices)
        self._options = sampling.SampleOptions(**self.settings)
        from goal_jax.layout import Layout

        self._layout_cls = Layout

    def generate(self, items: Sequence[dict], seeds: Sequence[int]) -> list:
        from PIL import Image

        if self._sampler is None:
            self._load()
        out = self._sampler.sample([it["prompt"] for it in items],
                                   [self._layout_cls() for _ in items], list(seeds), self._options)
        settings = dict(self.settings, pipeline=self.pipeline_dir)
        return [Generated(Image.fromarray(img), seed, {"sampler_settings": settings})
                for img, seed in zip(out.images, out.seeds)]


def _resize(image, max_side: int | None):
    from PIL import Image

    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.LANCZOS)


def generate_all(records: Sequence[dict], source, out_dir: str, base_seed: int = 0,
                 max_side: int | None = None, limit: int | None = None,
                 on_item: Callable[[dict], None] | None = None, show_progress: bool = True
                 ) -> dict[str, int]:
    """Generates the images of ``records`` not yet in ``<out_dir>/manifest.jsonl``.

    Args:
      records: prompt records (``id``, ``prompt``, optional ``category``, ``phrases``, ``source``).
      source: APISource, LocalSource or any object with ``name``, ``batch_size`` and
        ``generate(items, seeds) -> [Generated | Exception]``.
      limit: generate at most this many new images (None = all).
      on_item: called with each manifest record after it is written.

    Returns:
      {"total", "skipped", "generated", "failed"}.

    Raises:
      FatalSourceError: the run cannot continue; what is done stays done.
    """
    manifest = common.Manifest(os.path.join(out_dir, MANIFEST), out_dir)
    todo = [r for r in records if not manifest.done(r["id"])]
    stats = {"total": len(records), "skipped": len(records) - len(todo), "generated": 0, "failed": 0}
    if limit is not None:
        todo = todo[:max(0, limit)]
    bar = common.progress_bar(len(todo), f"images ({source.name})", not show_progress)
    try:
        for start in range(0, len(todo), source.batch_size):
            batch = todo[start:start + source.batch_size]
            seeds = [item_seed(base_seed, r["id"]) for r in batch]
            t0 = time.perf_counter()
            results = source.generate(batch, seeds)
            elapsed = (time.perf_counter() - t0) / max(1, len(batch))
            for rec, res in zip(batch, results):
                bar.update(1)
                if isinstance(res, Exception):
                    common.append_jsonl(os.path.join(out_dir, FAILURES),
                                        {"id": rec["id"], "prompt": rec["prompt"], "error": str(res),
                                         "source": source.name, "time": common.utc_now()})
                    stats["failed"] += 1
                    continue
                image = _resize(res.image, max_side)
                rel = f"{IMAGES}/{rec['id']}.png"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                common.write_bytes_atomic(os.path.join(out_dir, rel), buf.getvalue())
                line = {"id": rec["id"], "prompt": rec["prompt"], "image": rel, "source": source.name,
                        "seed": res.seed, "time": common.utc_now(), "width": image.size[0],
                        "height": image.size[1], "elapsed_s": round(elapsed, 3),
                        "category": rec.get("category", ""), "phrases": rec.get("phrases"),
                        "prompt_source": rec.get("source", "")}
                line.update(res.extra)
                manifest.add(line)
                stats["generated"] += 1
                if on_item is not None:
                    on_item(line)
    finally:
        bar.close()
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.generate_images", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", action="append", required=True,
                   help="prompts JSONL (prompts.py / coco_captions.py); repeat for several files")
    p.add_argument("--out", required=True, help="output folder (images/, manifest.jsonl)")
    p.add_argument("--source", choices=("api", "local"), default="api")
    p.add_argument("--seed", type=int, default=0, help="base seed of the local source")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale images so the longer side is at most this (default: keep)")
    p.add_argument("--limit", type=int, default=None, help="at most this many new images this run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("api source")
    g.add_argument("--model", default="dall-e-3", help="image model (default: %(default)s)")
    g.add_argument("--size", default="1024x1024", help="image size (default: %(default)s)")
    g.add_argument("--quality", default="standard", help="quality ('' to omit; default: %(default)s)")
    g.add_argument("--style", default=None, help="style, e.g. natural or vivid (DALL-E 3)")
    common.add_endpoint_args(p, "image API")
    g = p.add_argument_group("local source")
    g.add_argument("--pipeline", default=None, help="diffusers GLIGEN / Stable Diffusion pipeline folder")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--sampler", default="ddim", help="ddim, dpm++2m or pndm")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--num-devices", type=int, default=None, help="devices to shard over (default: all)")
    return p


def make_source(args):
    if args.source == "api":
        _, key = common.endpoint_settings(args.base_url, args.api_key_env)
        if not key:
            raise DataPrepError(f"--source api needs an API key in ${args.api_key_env}")
        return APISource(common.client_from_args(args), args.model, args.size,
                         args.quality or None, args.style)
    if not args.pipeline:
        raise DataPrepError("--source local needs --pipeline <diffusers pipeline folder>")
    return LocalSource(args.pipeline, args.steps, args.guidance, args.sampler, args.height,
                       args.width, args.batch_size, args.negative_prompt, args.num_devices)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = common.read_prompt_files(args.prompts)
        source = make_source(args)
        stats = generate_all(records, source, args.out, args.seed, args.max_side, args.limit,
                             show_progress=not args.quiet)
    except (DataPrepError, FatalSourceError) as e:
        print(f"error: {e}\nWhat is done is kept: run the same command again to resume.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume.", file=sys.stderr)
        return 130
    print(f"images in {args.out}: {stats}")
    if stats["failed"]:
        print(f"{stats['failed']} items failed (see {os.path.join(args.out, FAILURES)}); "
              "run again to retry them", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

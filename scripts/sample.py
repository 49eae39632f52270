"""Sample images from captions and layouts with a GLIGEN pipeline or a GOAL checkpoint.

One caption with a layout (a JSON file or inline JSON)::

    python scripts/sample.py --pretrained /models/gligen-1-4-generation-text-box \\
        --caption "a red cat left of a blue dog" \\
        --layout '{"phrases": ["a red cat", "a blue dog"],
                   "boxes": [[0.05, 0.3, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]]}' \\
        --seed 7 --output_dir samples/

Many items from a JSONL file (one JSON object per line, see ``goal_jax/layout.py``)::

    python scripts/sample.py --pretrained ... --checkpoint workdir/checkpoints \\
        --jsonl prompts.jsonl --batch_size 8 --output_dir samples/

Each item ``<id>`` writes ``<id>.png`` (the image), ``<id>_boxes.png`` (the image with the
boxes and phrases drawn over it) and ``<id>.json`` (caption, layout, seed, every setting and
the checkpoint), the JSON last. ``<id>`` is the item's ``"id"``, else ``line<N>`` (JSONL line
number N), else ``sample``. An item whose three files exist is skipped (the run resumes; the
number skipped is printed); ``--overwrite`` samples them again. Items without a ``"seed"``
get ``--seed`` (single item) or ``--seed + N - 1`` (JSONL line N), so reruns agree.

Layouts are validated before any model is loaded; errors name the item (``--layout``,
``<file> line N``).

Checkpoints. ``--pretrained`` is always the diffusers GLIGEN pipeline folder (VAE, text
encoder, tokenizer, scheduler and the base U-Net). ``--checkpoint`` is a training checkpoint
directory written by ``goal_jax.checkpoints.CheckpointManager`` (``<dir>/<step>/state``; latest
step unless ``--checkpoint_step``); its state tree must hold the U-Net parameters (Flax names)
under one of ``["unet"]``, ``["params"]["unet"]`` or ``["params"]``: the full tree, or a
subset of its leaves, which replace the corresponding ``--pretrained`` U-Net parameters.
``goal_jax.train.TrainState`` checkpoints (``params`` = the trainable U-Net leaves) are the
``["params"]`` case. See :func:`load_checkpoint_unet`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make goal_jax importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from goal_jax import layout as layout_lib  # noqa: E402

SAMPLERS = ("ddim", "dpm++2m", "pndm")


# ----------------------------------------------------------------------------------------------
# Arguments and items.
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True,
                   help="diffusers StableDiffusionGLIGENPipeline folder")
    p.add_argument("--checkpoint", default=None,
                   help="training checkpoint directory (orbax); its U-Net replaces the base one")
    p.add_argument("--checkpoint_step", type=int, default=None,
                   help="checkpoint step (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--caption", default=None, help="one caption (with --layout)")
    src.add_argument("--jsonl", default=None,
                     help="JSONL file of {caption, phrases, boxes, seed?, id?} items")
    p.add_argument("--layout", default=None,
                   help="layout of --caption: a JSON file or inline JSON {phrases, boxes, ...}")
    p.add_argument("--plan", action="store_true",
                   help="plan --caption's layout with goal_jax.planner (the LLM set by "
                        "$GOAL_PLANNER_MODEL / $GOAL_PLANNER_LM, else the rule planner) when "
                        "--layout is not given")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--beta", type=float, default=0.3,
                   help="scheduled sampling: grounding on for the first beta*T steps")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative_caption", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4,
                   help="images per compiled call (rounded up to a multiple of the devices)")
    p.add_argument("--num_devices", type=int, default=None,
                   help="shard batches over the first N devices (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="sample items whose outputs already exist")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


@dataclasses.dataclass(frozen=True)
class Item:
    """One request with its output name and where it came from (for messages)."""

    name: str
    caption: str
    layout: layout_lib.Layout
    seed: int
    source: str


def collect_items(args) -> list[Item]:
    """The items of ``--caption/--layout`` or ``--jsonl``, validated (errors name the item)."""
    if args.jsonl is not None:
        if args.layout is not None:
            raise layout_lib.LayoutError("--layout goes with --caption; --jsonl items carry "
                                         "their own phrases and boxes")
        if not os.path.isfile(args.jsonl):
            raise layout_lib.LayoutError(f"--jsonl: no such file: {args.jsonl}")
        items = []
        for lineno, item in layout_lib.read_jsonl(args.jsonl):
            seed = item.seed if item.seed is not None else args.seed + lineno - 1
            items.append(Item(item.id or f"line{lineno:05d}", item.caption, item.layout,
                              _check_seed(seed, f"{args.jsonl} line {lineno}"),
                              f"{args.jsonl} line {lineno}"))
        names = [it.name for it in items]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise layout_lib.LayoutError(f"{args.jsonl}: ids {clash} are used by more than one "
                                         "item (ids and the default names line<N> clash)")
        return items
    if args.layout is None:
        from goal_jax import planner

        planned = planner.plan_layout(args.caption) if args.plan else layout_lib.Layout()
        item = layout_lib.LayoutItem(None, planned)
        name = "--caption"
    elif os.path.isfile(args.layout):
        name = args.layout
        with open(args.layout, encoding="utf-8") as f:
            item = layout_lib.parse_json(f.read(), name, require_caption=False)
    else:
        name = "--layout"
        item = layout_lib.parse_json(args.layout, name, require_caption=False)
    if item.caption is not None and item.caption != args.caption:
        raise layout_lib.LayoutError(
            f"{name}: has caption {item.caption!r} but --caption is {args.caption!r}; "
            "give the caption once")
    seed = item.seed if item.seed is not None else _check_seed(args.seed, "--seed")
    return [Item(item.id or "sample", args.caption, item.layout, seed, name)]


def _check_seed(seed: int, name: str) -> int:
    if not 0 <= seed < 2**32:
        raise layout_lib.LayoutError(f"{name}: seed {seed} is outside [0, 2**32)")
    return seed


def output_paths(output_dir: str, name: str) -> dict:
    return {"image": os.path.join(output_dir, f"{name}.png"),
            "boxes_image": os.path.join(output_dir, f"{name}_boxes.png"),
            "metadata": os.path.join(output_dir, f"{name}.json")}


def is_done(output_dir: str, name: str) -> bool:
    return all(os.path.isfile(p) for p in output_paths(output_dir, name).values())


# ----------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------


def load_checkpoint_unet(directory: str, base_params, step: int | None = None):
    """U-Net parameters from a training checkpoint, merged over ``base_params``.

    Reads ``<directory>/<step>/state`` with ``goal_jax.checkpoints.CheckpointManager``
    (latest step when ``step`` is None) as host arrays, takes the U-Net tree under
    ``["unet"]``, ``["params"]["unet"]`` or ``["params"]`` (the first present whose leaves are
    all U-Net parameters), checks every leaf's name and shape against ``base_params`` and
    replaces those leaves.

    Returns:
      (params, info): the merged tree, and {"step", "replaced" (leaf count), "total",
      "subtree"}.

    Raises:
      FileNotFoundError: no checkpoint directory / step.
      ValueError: no U-Net tree in the checkpoint, or names / shapes that do not match.
    """
    import jax
    from flax import traverse_util

    from goal_jax import checkpoints

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--checkpoint: no such directory: {directory}")
    manager = checkpoints.CheckpointManager(directory, async_save=False)
    try:
        tree = manager.restore_arrays(step)  # FileNotFoundError naming the directory / step
        step = manager.latest_step() if step is None else step
    finally:
        manager.close()
    base_flat = traverse_util.flatten_dict(_as_dict(base_params))
    candidates = []
    for path in (("unet",), ("params", "unet"), ("params",)):
        node = tree
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node:
            candidates.append((path, node))
    if not candidates:
        raise ValueError(f"checkpoint {directory} step {step}: its state has no U-Net parameters "
                         f"under 'unet', 'params/unet' or 'params'; top-level keys: "
                         f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
    errors = []
    for path, node in candidates:
        flat = traverse_util.flatten_dict(_as_dict(node))
        unknown = [k for k in flat if k not in base_flat]
        bad_shape = [f"{'/'.join(k)}: checkpoint {tuple(np.shape(v))}, U-Net "
                     f"{tuple(base_flat[k].shape)}" for k, v in flat.items()
                     if k in base_flat and tuple(np.shape(v)) != tuple(base_flat[k].shape)]
        if unknown or bad_shape:
            errors.append(f"under {'/'.join(path)}: {len(unknown)} names not in the U-Net "
                          f"(e.g. {['/'.join(k) for k in unknown[:3]]}), "
                          f"{len(bad_shape)} shape mismatches {bad_shape[:3]}")
            continue
        merged = dict(base_flat)
        for k, v in flat.items():
            merged[k] = jax.numpy.asarray(v, jax.numpy.float32)
        info = {"step": int(step), "replaced": len(flat), "total": len(base_flat),
                "subtree": "/".join(path)}
        return traverse_util.unflatten_dict(merged), info
    raise ValueError(f"checkpoint {directory} step {step} does not match the U-Net of "
                     f"--pretrained: " + "; ".join(errors))


def _as_dict(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return tree if isinstance(tree, dict) else dict(tree)


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------

_COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def draw_layout(image: np.ndarray, layout: layout_lib.Layout, min_size: int = 256):
    """uint8 [H,W,3] -> PIL image with each box outlined and its phrase written at its
    top-left corner (upscaled to at least ``min_size`` pixels so labels stay legible)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    scale = max(1, int(np.ceil(min_size / max(img.size))))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    width, height = img.size
    line = max(1, round(min(width, height) / 128))
    for i, (phrase, (x0, y0, x1, y1)) in enumerate(zip(layout.phrases, layout.boxes)):
        color = _COLORS[i % len(_COLORS)]
        box = [x0 * (width - 1), y0 * (height - 1), x1 * (width - 1), y1 * (height - 1)]
        draw.rectangle(box, outline=color, width=line)
        tx, ty = box[0] + line + 1, box[1] + line + 1
        left, top, right, bottom = draw.textbbox((tx, ty), phrase, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((tx, ty), phrase, fill=(0, 0, 0), font=font)
    return img


def write_outputs(output_dir: str, item: Item, image: np.ndarray, metadata: dict) -> dict:
    """Writes the PNG, the boxes PNG and (last) the metadata JSON; returns the paths."""
    from PIL import Image

    paths = output_paths(output_dir, item.name)
    Image.fromarray(image).save(paths["image"])
    draw_layout(image, item.layout).save(paths["boxes_image"])
    meta = dict(id=item.name, source=item.source, caption=item.caption,
                **item.layout.to_dict(), seed=item.seed,
                image=os.path.basename(paths["image"]),
                boxes_image=os.path.basename(paths["boxes_image"]), **metadata)
    tmp = paths["metadata"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, paths["metadata"])
    return paths


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the script with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Bad layouts and arguments print an error naming the item and return 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        items = collect_items(args)
    except layout_lib.LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from goal_jax import sampling, schedule, weights

    try:
        options = sampling.SampleOptions(
            sampler=args.sampler, num_steps=args.steps, guidance_scale=args.cfg, beta=args.beta,
            eta=args.eta, height=args.height, width=args.width,
            negative_caption=args.negative_caption)
        scheduler_config = weights.read_config(os.path.join(args.pretrained, "scheduler"),
                                               "scheduler_config.json")
        timesteps = schedule.make_sampler(options.sampler, scheduler_config, options.num_steps,
                                          eta=options.eta).timesteps
    except ValueError as e:  # includes weights.CheckpointError
        parser.error(str(e))
    n_ground = sampling.num_grounding_steps(options.beta, len(timesteps))

    os.makedirs(args.output_dir, exist_ok=True)
    todo = items if args.overwrite else [it for it in items if not is_done(args.output_dir,
                                                                            it.name)]
    skipped = len(items) - len(todo)
    print(f"{len(items)} item(s); skipping {skipped} whose outputs exist in {args.output_dir}; "
          f"sampling {len(todo)}")
    if not todo:
        return 0

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    pipe = weights.load_pipeline(args.pretrained, dtype=dtype)
    unet_params, checkpoint_info = None, None
    if args.checkpoint is not None:
        unet_params, checkpoint_info = load_checkpoint_unet(args.checkpoint, pipe.unet_params,
                                                            args.checkpoint_step)
        print(f"checkpoint {args.checkpoint} step {checkpoint_info['step']}: replaced "
              f"{checkpoint_info['replaced']} of {checkpoint_info['total']} U-Net tensors")
    devices = jax.devices()
    if args.num_devices is not None:
        if not 1 <= args.num_devices <= len(devices):
            parser.error(f"--num_devices must be in [1, {len(devices)}], got {args.num_devices}")
        devices = devices[:args.num_devices]
    batch_size = -(-args.batch_size // len(devices)) * len(devices)
    if batch_size != args.batch_size:
        print(f"batch size {args.batch_size} -> {batch_size} (a multiple of {len(devices)} "
              "devices)")
    sampler = sampling.GroundedSampler(pipe, unet_params=unet_params, devices=devices)
    height, width = sampler.image_size(options)
    metadata = {
        "settings": dict(options.to_dict(), height=height, width=width,
                         num_grounding_steps=n_ground, dtype=args.dtype,
                         batch_size=batch_size, num_devices=len(devices)),
        "pretrained": os.path.abspath(args.pretrained),
        "checkpoint": None if args.checkpoint is None else os.path.abspath(args.checkpoint),
        "checkpoint_info": checkpoint_info,
    }

    compile_s, run_s = 0.0, 0.0
    with tqdm(total=len(todo), unit="img", disable=args.no_progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            # Fill the last batch up to batch_size (one compiled program for the whole run).
            fill = batch + [batch[-1]] * (batch_size - len(batch))
            out = sampler.sample([it.caption for it in fill], [it.layout for it in fill],
                                 [it.seed for it in fill], options)
            compile_s += out.compile_s
            run_s += out.run_s
            for item, image in zip(batch, out.images):
                write_outputs(args.output_dir, item, image,
                              dict(metadata, written=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
            bar.update(len(batch))
    print(f"wrote {len(todo)} item(s) to {args.output_dir} (compile {compile_s:.1f} s, "
          f"sampling {run_s:.1f} s, {run_s / len(todo):.3f} s per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
``<file> line N``). A JSONL file with bad lines samples every good line, then lists every bad
line with its number and exits 2.

Checkpoints. ``--pretrained`` is the GLIGEN pipeline folder (VAE, text encoder, tokenizer,
scheduler and the base U-Net), in either form goal_jax reads (diffusers safetensors, or the
orbax folders of ``scripts/convert.py to-orbax``). ``--checkpoint`` is a training checkpoint
directory (``<workdir>/checkpoints``; latest step unless ``--checkpoint_step``): its trained
U-Net parameters replace those of the base U-Net (``goal_jax.weights.load_trained_unet``: the
parameters only, never the optimizer state; non-finite values are refused).

Several processes (one per host, ``--coordinator_address/--num_processes/--process_id`` or
``--distributed``, goal_jax.distributed): every process reads the same items and samples its
share (item k goes to process ``k % num_processes``) on its own devices, so each item is written
once, by one process; its JSON records ``process_index`` / ``process_count``. A rerun with
another number of processes skips what is written.

Exit codes: 0 done; 1 the sampler produced non-finite images (damaged or diverged weights);
2 bad arguments, layouts, folders or checkpoints (one line naming the item).
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

from goal_jax import distributed  # noqa: E402
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
    distributed.add_arguments(p)
    return p


@dataclasses.dataclass(frozen=True)
class Item:
    """One request with its output name and where it came from (for messages)."""

    name: str
    caption: str
    layout: layout_lib.Layout
    seed: int
    source: str


def read_jsonl_items(path: str, first_seed: int) -> tuple[list[Item], list[str]]:
    """(good items, one message per bad line) of a JSONL file. Every line is read: a bad line
    (malformed JSON, an invalid layout, a seed out of range, an id used before) is reported
    with its line number and the other lines are kept. Items without a seed get
    ``first_seed + N - 1`` (line N)."""
    items, errors, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:  # columns of this line, not of the file
                    raise layout_lib.LayoutError(f"{where}: malformed JSON: {e.msg} at column "
                                                 f"{min(e.pos + 1, len(line.rstrip()) + 1)}")
                item = layout_lib.parse_item(obj, where)
                name = item.id or f"line{lineno:05d}"
                if name in seen:
                    raise layout_lib.LayoutError(f"{where}: id {name!r} already used on line "
                                                 f"{seen[name]}")
                seed = item.seed if item.seed is not None else first_seed + lineno - 1
                items.append(Item(name, item.caption, item.layout, _check_seed(seed, where),
                                  where))
                seen[name] = lineno
            except layout_lib.LayoutError as e:
                errors.append(str(e))
    return items, errors


def collect_items(args) -> tuple[list[Item], list[str]]:
    """(items, errors) of ``--caption/--layout`` or ``--jsonl``, validated: a bad single item
    raises LayoutError; bad JSONL lines are listed in ``errors`` (the good ones are items)."""
    if args.jsonl is not None:
        if args.layout is not None:
            raise layout_lib.LayoutError("--layout goes with --caption; --jsonl items carry "
                                         "their own phrases and boxes")
        if not os.path.isfile(args.jsonl):
            raise layout_lib.LayoutError(f"--jsonl: no such file: {args.jsonl}")
        items, errors = read_jsonl_items(args.jsonl, args.seed)
        if not items:
            raise layout_lib.LayoutError("\n".join(errors) if errors else
                                         f"{args.jsonl}: no item (the file is empty)")
        return items, errors
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
    return [Item(item.id or "sample", args.caption, item.layout, seed, name)], []


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


class UsageError(ValueError):
    """A bad argument, folder or checkpoint: one line, exit 2."""


def check_arguments(args, items) -> tuple:
    """(options, number of grounding steps, output paths to do) after checking the settings,
    the pipeline folder and --output_dir; UsageError naming the argument otherwise."""
    from goal_jax import sampling, schedule, weights

    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        options = sampling.SampleOptions(
            sampler=args.sampler, num_steps=args.steps, guidance_scale=args.cfg, beta=args.beta,
            eta=args.eta, height=args.height, width=args.width,
            negative_caption=args.negative_caption)
        weights.check_pipeline_folder(args.pretrained)
        scheduler_config = weights.read_config(os.path.join(args.pretrained, "scheduler"),
                                               "scheduler_config.json")
        timesteps = schedule.make_scheduler(options.sampler, scheduler_config, options.num_steps,
                                          eta=options.eta).timesteps
        factor = _vae_factor(args.pretrained)
        for key in ("height", "width"):
            value = getattr(args, key)
            if value is not None and (value < factor or value % factor):
                raise ValueError(f"--{key} {value} must be a positive multiple of {factor} (the "
                                 f"VAE downsamples {factor}x)")
    except ValueError as e:  # includes weights.CheckpointError
        raise UsageError(str(e)) from e
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} exists and is not a folder")
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint: checkpoint folder not found: {args.checkpoint}")
    os.makedirs(args.output_dir, exist_ok=True)
    mine = [items[k] for k in distributed.my_share(len(items))]  # this process's items
    todo = mine if args.overwrite else [it for it in mine if not is_done(args.output_dir,
                                                                          it.name)]
    return options, sampling.num_grounding_steps(options.beta, len(timesteps)), todo


def _vae_factor(pipeline: str) -> int:
    """The VAE downsampling factor of a pipeline folder (image side / latent side)."""
    from goal_jax import weights
    from goal_jax.models import vae as vae_lib

    folder = os.path.join(pipeline, "vae")
    return vae_lib.AutoencoderKLConfig.from_dict(weights.read_config(folder),
                                                 source=folder).downsample_factor


def load_sampler(args):
    """(GLIGENPipeline, checkpoint info or None, batch size) from --pretrained, --checkpoint,
    --num_devices, --batch_size and --dtype; UsageError for a bad checkpoint or device count."""
    import jax
    import jax.numpy as jnp

    from goal_jax import sampling, weights

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    devices = jax.local_devices()  # this process's (each process samples its own items)
    if args.num_devices is not None:
        if not 1 <= args.num_devices <= len(devices):
            raise UsageError(f"--num_devices must be in [1, {len(devices)}], got "
                             f"{args.num_devices}")
        devices = devices[:args.num_devices]
    try:
        pipe = weights.load_pipeline(args.pretrained, dtype=dtype)
        unet_params, info = None, None
        if args.checkpoint is not None:
            unet_params, info = weights.load_trained_unet(args.checkpoint, pipe.unet_params,
                                                          args.checkpoint_step)
    except weights.CheckpointError as e:
        raise UsageError(str(e)) from e
    if info is not None:
        info = {k: v for k, v in info.items() if k != "metadata"}
        print(f"checkpoint {args.checkpoint} step {info['step']}: replaced {info['replaced']} "
              f"of {info['total']} U-Net tensors")
    batch_size = -(-args.batch_size // len(devices)) * len(devices)
    if batch_size != args.batch_size:
        print(f"batch size {args.batch_size} -> {batch_size} (a multiple of {len(devices)} "
              "devices)")
    sampler = sampling.GLIGENPipeline(pipe, unet_params=unet_params, devices=devices)
    return sampler, info, batch_size


def sample_items(sampler, todo, options, batch_size: int, output_dir: str, metadata: dict,
                 progress: bool) -> tuple[float, float]:
    """Samples ``todo`` in batches of ``batch_size`` and writes each item's files; returns
    (compile seconds, sampling seconds)."""
    from tqdm import tqdm

    compile_s, run_s = 0.0, 0.0
    with tqdm(total=len(todo), unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            # Fill the last batch up to batch_size (one compiled program for the whole run).
            fill = batch + [batch[-1]] * (batch_size - len(batch))
            out = sampler.sample([it.caption for it in fill], [it.layout for it in fill],
                                 [it.seed for it in fill], options)
            compile_s += out.compile_s
            run_s += out.run_s
            for item, image in zip(batch, out.images):
                write_outputs(output_dir, item, image,
                              dict(metadata, written=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
            bar.update(len(batch))
    return compile_s, run_s


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the script with ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (0 done, 1 non-finite images, 2 bad arguments / layouts / folders / checkpoints)."""
    from goal_jax import sampling

    args = build_parser().parse_args(argv)
    try:
        distributed.initialize_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    try:
        items, errors = collect_items(args)
        options, n_ground, todo = check_arguments(args, items)
    except (layout_lib.LayoutError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mine = len(distributed.my_share(len(items)))
    share = (f" (process {jax.process_index()} of {jax.process_count()}: {mine} of them)"
             if jax.process_count() > 1 else "")
    print(f"{len(items)} item(s){share}; skipping {mine - len(todo)} whose outputs exist in "
          f"{args.output_dir}; sampling {len(todo)}")
    try:
        if todo:
            sampler, info, batch_size = load_sampler(args)
            height, width = sampler.image_size(options)
            metadata = {
                "settings": dict(options.to_dict(), height=height, width=width,
                                 num_grounding_steps=n_ground, dtype=args.dtype,
                                 batch_size=batch_size, num_devices=sampler.mesh.size),
                "pretrained": os.path.abspath(args.pretrained),
                "checkpoint": None if args.checkpoint is None else os.path.abspath(
                    args.checkpoint),
                "checkpoint_info": info,
                "process_index": jax.process_index(), "process_count": jax.process_count(),
            }
            compile_s, run_s = sample_items(sampler, todo, options, batch_size, args.output_dir,
                                            metadata, not args.no_progress)
            print(f"wrote {len(todo)} item(s) to {args.output_dir} (compile {compile_s:.1f} s, "
                  f"sampling {run_s:.1f} s, {run_s / len(todo):.3f} s per image)")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except sampling.NonFiniteSampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if errors:
        print(f"error: {len(errors)} bad line(s) in {args.jsonl} were not sampled:\n  "
              + "\n  ".join(errors), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

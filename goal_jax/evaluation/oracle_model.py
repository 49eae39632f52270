"""The shapes-world oracle's pixel model: box crops, a small Flax CNN, its training data.

A box is looked at through a *crop*: the box widened by ``CROP_MARGIN`` of its width / height
on every side, resampled (bilinear, anisotropically) to ``CROP_SIZE`` x ``CROP_SIZE`` pixels,
so the box always fills the same central region whatever its size and aspect ratio (a square
drawn in a wide box is a wide rectangle, as the layout asks).

:class:`OracleCNN` maps a batch of crops ``float32 [N, CROP_SIZE, CROP_SIZE, 3]`` (0..1) to
four sets of logits: ``present`` [N, 2] (no object / an object), ``color`` [N, len(COLORS)],
``shape`` [N, len(SHAPES)], ``texture`` [N, len(TEXTURES)] (class orders: the shapes module's
``COLORS`` keys, ``SHAPES``, ``TEXTURES``).

Training data (:class:`CropSampler`) comes from ``shapes.render_item_objects``: object crops
(label: the drawn object) and background crops (label: no object), both under augmentations
that mimic imperfect generated images (box jitter and scale, blur, pixel noise, colour jitter,
down/up-sampling), plus "absent" crops of random smooth colour fields like the output of
random-weight decoders. Everything is seeded: same seed -> same batches.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from goal_jax.data import shapes

CROP_SIZE = 32
CROP_MARGIN = 0.2
WORK_RESOLUTION = 64  # images are looked at as 64x64 (the world's resolution)


def color_names() -> tuple[str, ...]:
    return tuple(shapes.COLORS)


def head_sizes() -> dict[str, int]:
    """Number of classes of each output head."""
    return {"present": 2, "color": len(shapes.COLORS), "shape": len(shapes.SHAPES),
            "texture": len(shapes.TEXTURES)}


class OracleCNN(nn.Module):
    """Crops float32 [N, S, S, 3] in [0, 1] -> dict of logits (see the module docstring)."""

    features: tuple[int, ...] = (16, 24, 32, 48)
    head_sizes: tuple[tuple[str, int], ...] = ()

    @nn.compact
    def __call__(self, x):
        x = x * 2.0 - 1.0
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3), name=f"conv_{i}_a")(x))
            if i > 0:  # one convolution at full resolution (the costly level), two below
                x = nn.relu(nn.Conv(f, (3, 3), name=f"conv_{i}_b")(x))
            if i < len(self.features) - 1:
                x = nn.max_pool(x, (2, 2), (2, 2))
        # Spatial layout matters for shapes: keep the final 4x4 grid, then a small dense layer.
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, name="hidden")(x))
        return {name: nn.Dense(n, name=f"head_{name}")(x) for name, n in self.head_sizes}


def make_model(features: tuple[int, ...] = (16, 24, 32, 48)) -> OracleCNN:
    return OracleCNN(features=tuple(features), head_sizes=tuple(head_sizes().items()))


# ----------------------------------------------------------------------------------------------
# Crops.
# ----------------------------------------------------------------------------------------------


def crop_region(box, margin: float = CROP_MARGIN) -> np.ndarray:
    """Box (x0, y0, x1, y1) in pixels -> the crop region in pixels (box widened by margin)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    mw, mh = margin * (x1 - x0), margin * (y1 - y0)
    return np.array([x0 - mw, y0 - mh, x1 + mw, y1 + mh])


def crop(image: np.ndarray, region, size: int = CROP_SIZE) -> np.ndarray:
    """Bilinear resample of ``region`` (x0, y0, x1, y1 in pixels; continuous coordinates,
    pixel i covers [i, i+1)) of ``image`` float [H, W, 3] to [size, size, 3]; outside the
    image the edge pixels are repeated."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = region
    xs = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size - 0.5
    ys = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size - 0.5
    xs, ys = np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1)
    xi, yi = np.minimum(np.floor(xs).astype(int), w - 2), np.minimum(np.floor(ys).astype(int), h - 2)
    fx, fy = (xs - xi)[None, :, None], (ys - yi)[:, None, None]
    a = image[yi][:, xi]
    b = image[yi][:, xi + 1]
    c = image[yi + 1][:, xi]
    d = image[yi + 1][:, xi + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def crops_for_boxes(image: np.ndarray, boxes_px) -> np.ndarray:
    """uint8/float image [H, W, 3] (0..255) and boxes [K, 4] (pixels) -> float32 crops
    [K, CROP_SIZE, CROP_SIZE, 3] in [0, 1]."""
    img = np.asarray(image, np.float32) / 255.0
    out = np.zeros((len(boxes_px), CROP_SIZE, CROP_SIZE, 3), np.float32)
    for k, box in enumerate(boxes_px):
        out[k] = crop(img, crop_region(box))
    return out


# ----------------------------------------------------------------------------------------------
# Training data.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (pixels are 0..255, lengths in pixels of the 64x64 image)."""

    box_shift: float = 0.08      # std of the box centre shift, in box sizes
    box_scale: float = 0.15      # std of log side scale
    blur_prob: float = 0.5
    blur_sigma: float = 0.9      # max Gaussian sigma
    noise_max: float = 10.0      # max per-pixel noise std
    color_gain: float = 0.05     # std of per-channel gain
    color_shift: float = 6.0     # std of per-channel offset
    resample_prob: float = 0.25  # down-sample 2x and back (JPEG/VAE-like smoothing)
    absent_fraction: float = 0.25
    field_fraction: float = 0.35  # of absent crops: random smooth colour fields


def augment_image(rng: np.random.Generator, img: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """float [H, W, 3] 0..255 -> augmented copy (blur, resample, colour jitter, noise)."""
    if rng.random() < cfg.blur_prob:
        img = ndimage.gaussian_filter(img, (rng.uniform(0.3, cfg.blur_sigma),) * 2 + (0,))
    if rng.random() < cfg.resample_prob:
        h, w = img.shape[:2]
        small = ndimage.zoom(img, (0.5, 0.5, 1), order=1, grid_mode=True, mode="nearest")
        img = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1], 1), order=1,
                           grid_mode=True, mode="nearest")
    img = img * (1 + rng.normal(0, cfg.color_gain, 3)) + rng.normal(0, cfg.color_shift, 3)
    img = img + rng.normal(0, rng.uniform(0, cfg.noise_max), img.shape)
    return np.clip(img, 0, 255)


def jitter_box(rng: np.random.Generator, box, cfg: AugmentConfig) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.normal(0, cfg.box_shift) * w
    cy = (y0 + y1) / 2 + rng.normal(0, cfg.box_shift) * h
    # Boxes shrink by up to 26 % or grow by up to 65 % (objects drawn smaller than their box).
    w *= np.exp(np.clip(rng.normal(0, cfg.box_scale), -0.3, 0.5))
    h *= np.exp(np.clip(rng.normal(0, cfg.box_scale), -0.3, 0.5))
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def random_field(rng: np.random.Generator, res: int = WORK_RESOLUTION) -> np.ndarray:
    """A random smooth colour field float [res, res, 3] 0..255 (coarse noise upsampled plus
    fine noise): what random-weight decoders draw; never an object."""
    cells = int(rng.choice([2, 4, 8, 16, 32, 64]))
    coarse = rng.uniform(0, 255, (cells, cells, 3))
    img = ndimage.zoom(coarse, (res / cells, res / cells, 1), order=1, mode="nearest")
    img = img + rng.normal(0, rng.uniform(0, 60), img.shape)
    return np.clip(img, 0, 255)


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(a) -> float:
    return (a[2] - a[0]) * (a[3] - a[1])


class CropSampler:
    """Batches of augmented labelled crops from a pool of rendered shapes items.

    ``batch(n)`` -> (crops float32 [n, S, S, 3], labels dict of int32 [n]: ``present`` (0/1),
    ``color`` / ``shape`` / ``texture`` (class index; -1 for absent crops, ignored in the loss)).
    """

    def __init__(self, seed: int, pool_items: int, cfg: AugmentConfig = AugmentConfig(),
                 res: int = WORK_RESOLUTION):
        self.rng = np.random.default_rng([seed, 17])
        self.cfg, self.res = cfg, res
        render_rng = np.random.default_rng([seed])
        cats = shapes.CATEGORY_CYCLE
        self.items = []
        for i in range(pool_items):
            img, _, objs = shapes.render_item_objects(render_rng, cats[i % len(cats)], res)
            self.items.append((img.astype(np.float32), objs))
        self.objects = [(i, j) for i, (_, objs) in enumerate(self.items) for j in range(len(objs))]
        self.color_index = {c: k for k, c in enumerate(shapes.COLORS)}
        self.shape_index = {s: k for k, s in enumerate(shapes.SHAPES)}
        self.texture_index = {t: k for k, t in enumerate(shapes.TEXTURES)}

    def _absent_box(self, objs):
        res = self.res
        for _ in range(30):
            w = self.rng.uniform(0.18, 0.45) * res
            h = self.rng.uniform(0.18, 0.45) * res
            x, y = self.rng.uniform(0, res - w), self.rng.uniform(0, res - h)
            box = np.array([x, y, x + w, y + h])
            if all(_overlap(box, o["box"]) < 0.12 * min(_area(box), _area(o["box"])) for o in objs):
                return box
        return None

    def batch(self, n: int):
        rng, cfg = self.rng, self.cfg
        crops = np.zeros((n, CROP_SIZE, CROP_SIZE, 3), np.float32)
        labels = {k: np.full(n, -1, np.int32) for k in ("present", "color", "shape", "texture")}
        for k in range(n):
            if rng.random() < cfg.absent_fraction:
                labels["present"][k] = 0
                box = None
                if rng.random() >= cfg.field_fraction:
                    img, objs = self.items[int(rng.integers(len(self.items)))]
                    box = self._absent_box(objs)
                if box is None:
                    img = random_field(rng, self.res)
                    w, h = rng.uniform(0.18, 0.45, 2) * self.res
                    x, y = rng.uniform(0, self.res - w), rng.uniform(0, self.res - h)
                    box = np.array([x, y, x + w, y + h])
            else:
                i, j = self.objects[int(rng.integers(len(self.objects)))]
                img, objs = self.items[i]
                o = objs[j]
                box = jitter_box(rng, o["box"], cfg)
                labels["present"][k] = 1
                labels["color"][k] = self.color_index[o["color"]]
                labels["shape"][k] = self.shape_index[o["shape"]]
                labels["texture"][k] = self.texture_index[o["texture"]]
            # Augment only a window around the crop (the same as augmenting the whole image,
            # up to the blur's reach at the window's edge; 4x cheaper).
            region = crop_region(box)
            wx0, wy0 = max(0, int(region[0]) - 4), max(0, int(region[1]) - 4)
            wx1 = min(img.shape[1], int(np.ceil(region[2])) + 4)
            wy1 = min(img.shape[0], int(np.ceil(region[3])) + 4)
            window = augment_image(rng, img[wy0:wy1, wx0:wx1], cfg)
            crops[k] = crop(window / 255.0, region - np.array([wx0, wy0, wx0, wy0]))
        return crops, labels


# ----------------------------------------------------------------------------------------------
# Training, saving, loading.
# ----------------------------------------------------------------------------------------------

WEIGHTS_FILE = "oracle.safetensors"
CONFIG_FILE = "oracle.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The oracle CNN's training run (steps of ``batch_size`` crops, AdamW, cosine decay)."""

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100    # at most 10 % of the steps
    seed: int = 0              # init + crop sampling; the training pool renders seed [seed]
    pool_items: int = 3000     # rendered items the crops are cut from
    features: tuple[int, ...] = (16, 24, 32, 48)


def count_params(params) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def train(cfg: TrainConfig, log=print):
    """Trains the CNN on crops from ``CropSampler(cfg.seed, cfg.pool_items)``.

    Returns:
      (model, params, info): info has the final running losses / accuracies, the parameter
      count and the wall time (s). Prints progress (loss, accuracies, ETA) every 100 steps.
    """
    import time

    import jax
    import optax

    model = make_model(cfg.features)
    sampler = CropSampler(cfg.seed, cfg.pool_items)
    params = model.init(jax.random.PRNGKey(cfg.seed),
                        jnp.zeros((1, CROP_SIZE, CROP_SIZE, 3)))["params"]
    if cfg.steps < 1:
        raise ValueError(f"oracle training needs steps >= 1, got {cfg.steps}")
    warmup = min(cfg.warmup_steps, cfg.steps // 10)  # short (smoke) runs warm up for 10 %
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                                  cfg.steps, cfg.learning_rate * 0.02)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    def loss_fn(p, x, labels):
        logits = model.apply({"params": p}, x)
        total, metrics = 0.0, {}
        for name, lg in logits.items():
            y = labels[name]
            valid = (y >= 0).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
            n = jnp.maximum(valid.sum(), 1.0)
            total = total + (ce * valid).sum() / n
            metrics[f"acc_{name}"] = ((jnp.argmax(lg, -1) == y) * valid).sum() / n
        metrics["loss"] = total
        return total, metrics

    @jax.jit
    def step(p, s, x, labels):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, labels)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, metrics

    start, running = time.time(), None
    for i in range(1, cfg.steps + 1):
        x, labels = sampler.batch(cfg.batch_size)
        params, opt_state, metrics = step(params, opt_state, x, labels)
        metrics = {k: float(v) for k, v in metrics.items()}
        running = metrics if running is None else {k: 0.95 * running[k] + 0.05 * v
                                                   for k, v in metrics.items()}
        if i % 100 == 0 or i == cfg.steps:
            el = time.time() - start
            eta = el / i * (cfg.steps - i)
            log(f"step {i}/{cfg.steps} loss {running['loss']:.3f} "
                + " ".join(f"{k[4:]} {v:.3f}" for k, v in running.items() if k.startswith("acc_"))
                + f" | {el:.0f} s elapsed, ETA {eta:.0f} s", flush=True)
    info = {"final_running": {k: round(v, 4) for k, v in running.items()},
            "num_params": count_params(params), "train_seconds": round(time.time() - start, 1)}
    return model, params, info


def save(folder: str, params, config: dict) -> None:
    """Writes ``oracle.safetensors`` (float32 leaves named ``a/b/c``) and ``oracle.json``."""
    import json
    import os

    from flax import traverse_util
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    flat = {"/".join(k): np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(params).items()}
    save_file(flat, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def load(folder: str):
    """-> (model, params, config) from a folder written by :func:`save`.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: weights that do not match the model the config describes.
    """
    import json
    import os

    import jax
    from flax import traverse_util
    from safetensors.numpy import load_file

    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"oracle folder {folder}: no {name} (train one with "
                                    "`python -m goal_jax.evaluation.oracle train --out DIR`)")
    with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    model = make_model(tuple(config["model"]["features"]))
    heads = config["model"]["classes"]
    expected = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
                "texture": list(shapes.TEXTURES)}
    for k, v in expected.items():
        if heads.get(k) != v:
            raise ValueError(f"oracle folder {folder}: trained for {k} classes {heads.get(k)}, "
                             f"the shapes module has {v}; retrain the oracle")
    ref = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, CROP_SIZE, CROP_SIZE, 3))))["params"]
    ref_flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(ref).items()}
    flat = load_file(os.path.join(folder, WEIGHTS_FILE))
    if set(flat) != set(ref_flat) or any(flat[k].shape != ref_flat[k].shape for k in flat):
        raise ValueError(f"oracle folder {folder}: {WEIGHTS_FILE} does not match the model of "
                         f"{CONFIG_FILE} (features {config['model']['features']})")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return model, params, config

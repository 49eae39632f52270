"""The tf.data training input pipeline over a built goal2k dataset.

Order of operations, per host:
  1. The split's encoded images (PNG bytes, not decoded) and annotations are read into host
     memory once, and caption / phrases are tokenized once (both the original and the
     left<->right swapped text, see step 4), so tokenization never runs per step.
  2. Epoch order, the same on every host: a permutation of the N items from
     ``np.random.default_rng([seed, epoch, 0])`` (identity when ``shuffle=False``), cut into
     global batches of G = batch_size x process_count items (the last ``N % G`` items of every
     epoch are skipped: batches never straddle epochs). Host p takes rows
     ``[p * batch_size, (p + 1) * batch_size)`` of every global batch, so the hosts read
     disjoint items that together cover the epoch once, and the global batch of a step does not
     depend on the number of hosts (2 hosts x 2 devices train exactly as 1 host x 4 devices, and
     a checkpoint resumes exactly on another host count). The same generator draws, per epoch
     position, the flip coin and the random-crop fractions.
  3. Decode, resize the shorter side to ``resolution`` (bilinear, antialiased), crop a
     ``resolution``² window (random or center), boxes transformed with it (boxes.py).
  4. Optional horizontal flip (p = 0.5) of image and boxes; the caption and phrases of a
     flipped item are the left<->right swapped texts, so "a cat to the left of a dog" stays
     true. Only whole words "left"/"right" are swapped.
  5. Boxes whose (clipped) normalized area is below ``min_box_size`` or with zero side are
     dropped after cropping: box, mask and token mask zeroed, phrase ids set to the padding
     row (the tokenized empty string).
  6. Batch (drop_remainder), prefetch; numpy batches.

Resume: the iterator state is a deterministic (epoch, global batch) counter, not a tf.data
checkpoint: ``set_state`` rebuilds the generator at that epoch and position (items before it
are skipped without decoding) and yields exactly the batch that would have come next. The
state is a small JSON-able dict, the same on every host; it also records seed, global batch
size, dataset size and the augmentation switches to refuse a state from a different setup.
``last_ids`` holds the item ids of the batch ``next()`` returned last.

Batch (dict of numpy arrays, B = batch_size, N = max_boxes, H = W = resolution):
  images              float32 [B, H, W, 3] in [-1, 1]
  input_ids           int32   [B, 77]
  phrase_input_ids    int32   [B, N, 77]
  boxes               float32 [B, N, 4] xyxy in [0, 1] (0 for padding)
  masks               float32 [B, N] (1 = real box)
  phrase_token_masks  float32 [B, N, 77] (1 where caption token j belongs to phrase i)
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from goal_jax import text as text_lib
from goal_jax.data import boxes as box_lib
from goal_jax.data import goal2k

MAX_LENGTH = text_lib.MAX_LENGTH
BATCH_KEYS = ("images", "input_ids", "phrase_input_ids", "boxes", "masks", "phrase_token_masks")


def _hide_accelerators_from_tf() -> None:
    """tf.data runs on the host CPU; keep TF off the GPUs/TPUs that JAX uses."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass


def _keep_largest(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    """Indices (in original order) of the ``max_boxes`` largest boxes."""
    if len(boxes) <= max_boxes:
        return np.arange(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-area, kind="stable")[:max_boxes]
    return np.sort(order)


class ShardData:
    """One host's items in memory: encoded images, boxes, tokenized texts (plain and flipped).

    Attributes (M = number of items, N = max_boxes, V = 2 text variants: 0 plain, 1 swapped):
      images: list[bytes]; boxes float32 [M, N, 4]; box_mask bool [M, N];
      input_ids int32 [M, V, 77]; phrase_ids int32 [M, V, N, 77];
      token_masks bool [M, V, N, 77]; empty_ids int32 [77] (the padding phrase row); ids list[str].
    """

    def __init__(self, examples: list[dict[str, Any]], tokenizer, max_boxes: int, flip: bool):
        m = len(examples)
        variants = 2 if flip else 1
        self.ids = [e["id"] for e in examples]
        self.images = [e["image"] for e in examples]
        self.boxes = np.zeros((m, max_boxes, 4), np.float32)
        self.box_mask = np.zeros((m, max_boxes), bool)
        self.input_ids = np.zeros((m, variants, MAX_LENGTH), np.int32)
        self.phrase_ids = np.zeros((m, variants, max_boxes, MAX_LENGTH), np.int32)
        self.token_masks = np.zeros((m, variants, max_boxes, MAX_LENGTH), bool)
        self.empty_ids = text_lib.tokenize(tokenizer, [""])[0]
        self.phrase_ids[:] = self.empty_ids
        captions, phrase_lists = [], []
        for k, e in enumerate(examples):
            keep = _keep_largest(e["boxes"], max_boxes)
            n = len(keep)
            self.boxes[k, :n] = e["boxes"][keep]
            self.box_mask[k, :n] = True
            phrases = [e["phrases"][i] for i in keep]
            captions.append(e["caption"])
            phrase_lists.append(phrases)
        for v in range(variants):
            swap = box_lib.swap_left_right if v == 1 else (lambda s: s)
            caps = [swap(c) for c in captions]
            self.input_ids[:, v] = text_lib.tokenize(tokenizer, caps)
            flat = [swap(p) for ps in phrase_lists for p in ps]
            flat_ids = text_lib.tokenize(tokenizer, flat) if flat else np.zeros((0, MAX_LENGTH), np.int32)
            at = 0
            for k, ps in enumerate(phrase_lists):
                ps = [swap(p) for p in ps]
                self.phrase_ids[k, v, : len(ps)] = flat_ids[at: at + len(ps)]
                at += len(ps)
                spans = text_lib.phrase_token_spans(tokenizer, caps[k], ps)
                self.token_masks[k, v] = text_lib.phrase_token_mask(spans, max_boxes)

    def __len__(self) -> int:
        return len(self.images)


def read_shard(data_dir: str, split: str, process_index: int, process_count: int) -> list[dict[str, Any]]:
    """Reads this host's contiguous share of a built goal2k split (images left encoded)."""
    builder = goal2k.Goal2k(data_dir=os.path.expanduser(data_dir))
    if not builder.is_prepared():
        raise ValueError(f"no prepared goal2k dataset in {data_dir} (expected {builder.data_dir}); "
                         "build it with goal2k.build_goal2k(source_folder, data_dir) or pass source_dir=")
    if split not in builder.info.splits:
        raise ValueError(f"goal2k dataset in {data_dir} has no split {split!r} "
                         f"(it has {sorted(builder.info.splits)})")
    shard = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=shard, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    out = []
    for ex in tfds.as_numpy(ds):
        out.append({
            "id": ex["id"].decode(),
            "image": bytes(ex["image"]),
            "caption": ex["caption"].decode(),
            "phrases": [p.decode() for p in ex["phrases"]],
            "boxes": np.asarray(ex["boxes"], np.float32).reshape(-1, 4),
        })
    return out


class TrainIterator:
    """Infinite iterator of fixed-shape numpy batches with an exact-resume state.

    ``next(it)`` -> batch dict (module docstring) of this host's ``batch_size`` rows of the
    global batch; ``last_ids`` -> the item ids of that batch. ``get_state()`` -> dict
    (JSON-able) naming the next batch; ``set_state(state)`` (dict, or its JSON as str/bytes)
    continues from it.
    """

    def __init__(self, data: ShardData, *, batch_size: int, resolution: int, seed: int, flip: bool,
                 random_crop: bool, shuffle: bool, min_box_size: float, process_index: int,
                 process_count: int, prefetch: int = 2):
        if len(data) < batch_size * process_count:
            raise ValueError(f"the dataset has {len(data)} items, fewer than the global batch "
                             f"{batch_size * process_count} (batch_size={batch_size} x "
                             f"{process_count} processes)")
        self._data = data
        self.batch_size = batch_size
        self.resolution = resolution
        self.seed = seed
        self.flip = flip
        self.random_crop = random_crop
        self.shuffle = shuffle
        self.min_box_size = float(min_box_size)
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch = prefetch
        self.global_batch_size = batch_size * process_count
        self.batches_per_epoch = len(data) // self.global_batch_size
        self._epoch, self._batch = 0, 0
        self._it: Iterator | None = None
        self.last_ids: list[str] = []

    def box_masks(self) -> tuple[np.ndarray, list[str]]:
        """This host's box masks [M, N] (real boxes packed first, after keeping the
        ``max_boxes`` largest) and the item ids."""
        return self._data.box_mask, list(self._data.ids)

    def phrase_token_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """This host's phrase token ids [M, V * N, 77] (the V text variants side by side, items
        in the order of :meth:`box_masks`) and their box masks [M, V * N]."""
        m, v, n, length = self._data.phrase_ids.shape
        ids = self._data.phrase_ids.reshape(m, v * n, length)
        return ids, np.tile(self._data.box_mask, (1, v))

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """{"epoch", "batch" (next global batch within the epoch), and the setup it belongs to}
        (process_index / process_count / batch_size are information: the position is global)."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "batch_size": self.batch_size,
                "num_examples": len(self._data),
                "process_index": self.process_index, "process_count": self.process_count,
                "flip": self.flip, "random_crop": self.random_crop, "shuffle": self.shuffle}

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Continues at ``state``'s position; a state saved with another number of hosts (same
        global batch) resumes exactly too."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        state = dict(state)
        if "global_batch_size" not in state and "batch_size" in state:  # before it was stored
            state["global_batch_size"] = state["batch_size"] * state.get("process_count", 1)
        mine = self.get_state()
        for key in ("seed", "global_batch_size", "num_examples", "flip", "random_crop",
                    "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"iterator state has {key}={state[key]!r} but this iterator has "
                                 f"{key}={mine[key]!r}; it belongs to a different data setup")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"iterator state epoch={epoch}, batch={batch} out of range "
                             f"({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._batch = epoch, batch
        self._it = None

    # ---------------------------------------------------------------- data
    def _epoch_plan(self, epoch: int):
        """(order, flips, crop_u) of one epoch, the same on every host; deterministic in
        (seed, epoch). (The 0 keeps the order single-host runs had before it was shared.)"""
        n = len(self._data)
        rng = np.random.default_rng([self.seed, epoch, 0])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        flips = (rng.random(n) < 0.5) if self.flip else np.zeros(n, bool)
        crop_u = rng.random((n, 2)).astype(np.float32)
        return order, flips, crop_u

    def positions(self, batch: int) -> range:
        """This host's epoch positions in global batch ``batch`` (module docstring, step 2)."""
        start = batch * self.global_batch_size + self.process_index * self.batch_size
        return range(start, start + self.batch_size)

    def _generator(self, start_epoch: int, start_batch: int):
        d = self._data
        epoch, first = start_epoch, start_batch
        while True:
            order, flips, crop_u = self._epoch_plan(epoch)
            for b in range(first, self.batches_per_epoch):
                for p in self.positions(b):
                    k, f = order[p], bool(flips[p])
                    v = 1 if f else 0
                    yield (d.images[k], crop_u[p], f, d.boxes[k], d.box_mask[k],
                           d.input_ids[k, v], d.phrase_ids[k, v], d.token_masks[k, v], d.ids[k])
            epoch, first = epoch + 1, 0

    def _preprocess(self, image, crop_u, flip, boxes, box_mask, input_ids, phrase_ids, token_masks,
                    item_id):
        res = self.resolution
        img = tf.io.decode_image(image, channels=3, expand_animations=False)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        new_h, new_w = box_lib.resized_shape(h, w, res)
        img = tf.image.resize(img, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
        top, left = box_lib.crop_offsets(new_h, new_w, res, crop_u if self.random_crop else None)
        img = img[top: top + res, left: left + res, :]
        boxes = box_lib.crop_boxes(boxes, new_h, new_w, top, left, res)
        img = tf.cond(flip, lambda: img[:, ::-1, :], lambda: img)
        boxes = tf.cond(flip, lambda: box_lib.flip_boxes(boxes), lambda: boxes)
        img = tf.clip_by_value(img / 127.5 - 1.0, -1.0, 1.0)
        keep = box_mask & box_lib.box_keep(boxes, self.min_box_size)
        keepf = tf.cast(keep, tf.float32)
        return {
            "images": tf.ensure_shape(img, [res, res, 3]),
            "input_ids": input_ids,
            "phrase_input_ids": tf.where(keep[:, None], phrase_ids, self._data.empty_ids[None, :]),
            "boxes": boxes * keepf[:, None],
            "masks": keepf,
            "phrase_token_masks": tf.cast(token_masks, tf.float32) * keepf[:, None],
            "ids": item_id,
        }

    def _build(self) -> Iterator:
        n_boxes = self._data.boxes.shape[1]
        signature = (
            tf.TensorSpec((), tf.string), tf.TensorSpec((2,), tf.float32), tf.TensorSpec((), tf.bool),
            tf.TensorSpec((n_boxes, 4), tf.float32), tf.TensorSpec((n_boxes,), tf.bool),
            tf.TensorSpec((MAX_LENGTH,), tf.int32), tf.TensorSpec((n_boxes, MAX_LENGTH), tf.int32),
            tf.TensorSpec((n_boxes, MAX_LENGTH), tf.bool), tf.TensorSpec((), tf.string))
        start_epoch, start_batch = self._epoch, self._batch
        ds = tf.data.Dataset.from_generator(lambda: self._generator(start_epoch, start_batch),
                                            output_signature=signature)
        ds = ds.map(self._preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=True)
        ds = ds.prefetch(self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
        return iter(tfds.as_numpy(ds))

    def close(self) -> None:
        """Releases the tf.data iterator (avoids TF's shutdown warning about live generators);
        the next ``next()`` rebuilds it at the current state."""
        self._it = None

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        batch = next(self._it)
        self.last_ids = [i.decode() for i in batch.pop("ids")]
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return batch


def _wait_for_build(data_dir: str, timeout_s: float = 3600.0, poll_s: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not goal2k.Goal2k(data_dir=os.path.expanduser(data_dir)).is_prepared():
        if time.monotonic() > deadline:
            raise TimeoutError(f"goal2k dataset in {data_dir} not built by process 0 within {timeout_s:.0f} s")
        time.sleep(poll_s)


def make_train_iterator(data_dir: str, tokenizer, batch_size: int, resolution: int, *,
                        max_boxes: int = 30, seed: int = 0, flip: bool = True,
                        random_crop: bool = True, min_box_size: float = 0.001, split: str = "train",
                        source_dir: str | None = None, shuffle: bool = True,
                        process_index: int | None = None, process_count: int | None = None,
                        prefetch: int = 2) -> TrainIterator:
    """The training iterator over goal2k in ``data_dir`` (built from ``source_dir`` first if given).

    Args:
      data_dir: TFDS data dir holding the built ``goal2k`` dataset.
      tokenizer: a CLIP tokenizer (text.load_tokenizer) or a tokenizer folder path.
      batch_size: per-host batch size B (the global batch is B x process_count).
      resolution: output side H = W in pixels.
      max_boxes: N; items with more boxes keep the N largest.
      seed: data order, flips and crops are a function of (seed, epoch) only.
      flip: random horizontal flip (p = 0.5) with left/right swapped in the texts.
      random_crop: random crop window after resizing (else center crop).
      min_box_size: minimum normalized box area (w * h in [0, 1]) kept after cropping.
      split: "train" or "val".
      source_dir: a format-1 folder to build into ``data_dir`` first (reused if built); with
        several processes, process 0 builds and the others wait for it (shared data_dir).
      shuffle: per-epoch shuffling (False: dataset order).
      process_index, process_count: this host's rows of each global batch; default
        jax.process_index() / jax.process_count().
    """
    if batch_size < 1 or resolution < 8 or max_boxes < 1:
        raise ValueError(f"make_train_iterator: need batch_size >= 1, resolution >= 8, max_boxes >= 1; "
                         f"got {batch_size}, {resolution}, {max_boxes}")
    if not 0.0 <= min_box_size < 1.0:
        raise ValueError(f"make_train_iterator: min_box_size is a normalized area in [0, 1), got {min_box_size}")
    _hide_accelerators_from_tf()
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = text_lib.load_tokenizer(os.fspath(tokenizer))
    if source_dir is not None:
        if process_index == 0:
            goal2k.build_goal2k(source_dir, data_dir)
        else:  # the other hosts wait for host 0's build (TFDS renames the folder when complete)
            _wait_for_build(data_dir)
    examples = read_shard(data_dir, split, 0, 1)  # every host: the order is global (step 2)
    data = ShardData(examples, tokenizer, max_boxes, flip)
    return TrainIterator(data, batch_size=batch_size, resolution=resolution, seed=seed, flip=flip,
                         random_crop=random_crop, shuffle=shuffle, min_box_size=min_box_size,
                         process_index=process_index, process_count=process_count, prefetch=prefetch)

"""The streaming training input pipeline: grain over the ArrayRecord files of a built goal2k.

Nothing is read ahead of need: host memory holds the batches in flight (``prefetch`` of them),
not the data set. Order of operations, per process (host):
  1. Source: ``goal2k.data_source(data_dir, split)``, random access to the split's records
     (``tfds`` ArrayRecord source; the image stays encoded until step 4).
  2. Epoch order, the same on every host: a permutation of the N records, a new one every
     epoch, from grain's ``index_shuffle`` seeded with ``np.random.SeedSequence([seed,
     epoch])`` (so no two (seed, epoch) pairs share an order; the records' order when
     ``shuffle=False``). It is cut into global batches of G = batch_size x process_count
     positions; the last ``N % G`` positions of every epoch are skipped (drop_remainder:
     batches never straddle epochs).
  3. Host rows: host p reads rows ``[p * batch_size, (p + 1) * batch_size)`` of every global
     batch, i.e. epoch positions ``b * G + p * batch_size + j``. The hosts read disjoint records
     that together cover the epoch once, and the global batch of a step does not depend on the
     number of hosts (2 hosts x 2 devices train exactly as 1 host x 4 devices; a checkpoint
     resumes exactly on another host count). Each host reads only its own rows.
  4. Per item, at global epoch position q of epoch e: a generator
     ``np.random.default_rng([seed, e, q])`` draws the flip coin and the random-crop fractions
     (the same for an item whatever the number of hosts). The ``max_boxes`` largest boxes are
     kept (original order). Decode, resize the shorter side to ``resolution`` (bilinear, antialiased), crop a
     ``resolution``² window (random or center), boxes transformed with it (boxes.py).
  5. Optional horizontal flip (p = 0.5) of image and boxes; a flipped item's caption and
     phrases are the left<->right swapped texts, so "a cat to the left of a dog" stays true.
     Only whole words "left"/"right" are swapped. Caption and phrases are tokenized per item.
  6. Boxes whose (clipped) normalized area is below ``min_box_size`` or with zero side are
     dropped after cropping: box, mask and token mask zeroed, phrase ids set to the padding
     row (the tokenized empty string).
  7. Batch (this host's batch_size rows of a global batch), without end; ``prefetch`` batches
     are computed ahead by ``prefetch`` threads (grain ``ReadOptions``). So the source is read
     for at most ``(batches returned + prefetch) * batch_size`` items.

A record that cannot be turned into an item (a missing field, an image that does not decode,
phrases and boxes of different counts, no box) raises ValueError naming its id; nothing is
skipped.

Resume: every batch is a pure function of the setup and its position in the stream (grain's
``next_index`` = ``epoch * batches_per_epoch + batch``), so ``set_state`` moves there without
reading the items before it and yields exactly the batch that would have come next. The state
is a small JSON-able dict, the same on every host; it also records seed, global batch size,
data set size and the augmentation switches to refuse a state from a different setup (a state
of another number of hosts with the same global batch resumes exactly). ``last_ids`` holds the
item ids of the batch ``next()`` returned last.

Batch (dict of numpy arrays, B = batch_size, N = max_boxes, H = W = resolution):
  images              float32 [B, H, W, 3] in [-1, 1]
  input_ids           int32   [B, 77]
  phrase_input_ids    int32   [B, N, 77]
  boxes               float32 [B, N, 4] xyxy in [0, 1] (0 for padding)
  masks               float32 [B, N] (1 = real box)
  phrase_token_masks  float32 [B, N, 77] (1 where caption token j belongs to phrase i)
"""

from __future__ import annotations

import functools
import json
import os
import threading
from typing import Any, Iterator, Sequence

import grain
import numpy as np
import tensorflow as tf

from goal_jax import text as text_lib
from goal_jax.data import boxes as box_lib
from goal_jax.data import goal2k

MAX_LENGTH = text_lib.MAX_LENGTH
BATCH_KEYS = ("images", "input_ids", "phrase_input_ids", "boxes", "masks", "phrase_token_masks")
PIPELINE = "grain-2"  # the state's "pipeline": the item order it belongs to (2: global)


def _configure_tf() -> None:
    """TF runs only the per-item image ops here: on the host CPU (off the GPUs/TPUs that JAX
    uses), one thread per op (grain's threads run the items in parallel; TF's own pools only
    added CPU time: 3.7 -> 2.8 ms per 64x64 item measured here). No effect once TF has
    started (TF keeps its first settings)."""
    for configure in (lambda: tf.config.set_visible_devices([], "GPU"),
                      lambda: tf.config.set_visible_devices([], "TPU"),
                      lambda: tf.config.threading.set_intra_op_parallelism_threads(1),
                      lambda: tf.config.threading.set_inter_op_parallelism_threads(1)):
        try:
            configure()
        except (RuntimeError, ValueError):  # already initialised, or no such device type
            pass


def _keep_largest(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    """Indices (in original order) of the ``max_boxes`` largest boxes."""
    if len(boxes) <= max_boxes:
        return np.arange(len(boxes))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-area, kind="stable")[:max_boxes]
    return np.sort(order)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


FIELDS = ("id", "image", "caption", "phrases", "boxes")  # the record fields the pipeline reads


def _annotations(record: dict, max_boxes: int) -> tuple[str, str, list[str], np.ndarray]:
    """(id, caption, phrases [n], boxes float32 [n, 4]) of a record, the ``max_boxes`` largest
    boxes kept (n <= max_boxes). Raises ValueError naming the item when a field is missing,
    phrases and boxes disagree or there is no box."""
    item_id = _text(record.get("id", "<no id>"))
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise ValueError(f"goal2k item {item_id!r} lacks the field(s) {missing}")
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    phrases = [_text(p) for p in record["phrases"]]
    if len(phrases) != len(boxes):
        raise ValueError(f"goal2k item {item_id!r}: {len(phrases)} phrases but "
                         f"{len(boxes)} boxes")
    if not len(boxes):
        raise ValueError(f"goal2k item {item_id!r}: no box")
    keep = _keep_largest(boxes, max_boxes)
    return item_id, _text(record["caption"]), [phrases[i] for i in keep], boxes[keep]


class ItemTransform:
    """One record at one stream position -> one item of the batch (unbatched shapes).

    ``item((epoch, position, record))``: ``record`` as ``goal2k.data_source`` returns it at
    global ``position`` of ``epoch`` (module docstring, step 4). Thread-safe (grain calls it from its
    prefetch threads): the tokenizer runs under a lock, the TF image ops do not need one.
    """

    def __init__(self, tokenizer, *, resolution: int, max_boxes: int, seed: int, flip: bool,
                 random_crop: bool, min_box_size: float):
        self.tokenizer = tokenizer
        self.resolution, self.max_boxes = resolution, max_boxes
        self.seed, self.flip, self.random_crop = seed, flip, random_crop
        self.min_box_size = float(min_box_size)
        self._lock = threading.Lock()
        self.empty_ids = text_lib.tokenize(tokenizer, [""])[0]
        self._augment = tf.function(self._augment_tf, input_signature=(
            tf.TensorSpec((), tf.string), tf.TensorSpec((2,), tf.float32),
            tf.TensorSpec((), tf.bool), tf.TensorSpec((max_boxes, 4), tf.float32),
            tf.TensorSpec((max_boxes,), tf.bool)))

    def texts(self, caption: str, phrases: list[str], flipped: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int32 [77], phrase ids int32 [N, 77] (padding rows = the empty string),
        token masks bool [N, 77]) of the plain or the left/right swapped texts."""
        if flipped:
            caption = box_lib.swap_left_right(caption)
            phrases = [box_lib.swap_left_right(p) for p in phrases]
        phrase_ids = np.tile(self.empty_ids, (self.max_boxes, 1))
        with self._lock:
            ids = text_lib.tokenize(self.tokenizer, [caption, *phrases])
            spans = text_lib.phrase_token_spans(self.tokenizer, caption, phrases)
        phrase_ids[: len(phrases)] = ids[1:]
        return ids[0], phrase_ids, text_lib.phrase_token_mask(spans, self.max_boxes)

    def _augment_tf(self, image, crop_u, flip, boxes, box_mask):
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
        return tf.ensure_shape(img, [res, res, 3]), boxes * tf.cast(keep, tf.float32)[:, None], keep

    def __call__(self, located: tuple[int, int, dict]) -> dict[str, np.ndarray]:
        epoch, position, record = located
        item_id, caption, phrases, boxes = _annotations(record, self.max_boxes)
        rng = np.random.default_rng([self.seed, epoch, position])
        flipped = self.flip and bool(rng.random() < 0.5)
        crop_u = rng.random(2).astype(np.float32)
        n = len(boxes)
        padded = np.zeros((self.max_boxes, 4), np.float32)
        padded[:n] = boxes
        box_mask = np.arange(self.max_boxes) < n
        input_ids, phrase_ids, token_masks = self.texts(caption, phrases, flipped)
        try:
            image, boxes, keep = self._augment(record["image"], crop_u, flipped, padded, box_mask)
        except tf.errors.OpError as e:
            raise ValueError(f"goal2k item {item_id!r}: the image cannot be decoded "
                             f"({e.message})") from e
        keep = keep.numpy()
        return {
            "images": image.numpy(),
            "input_ids": input_ids,
            "phrase_input_ids": np.where(keep[:, None], phrase_ids, self.empty_ids[None, :]),
            "boxes": boxes.numpy(),
            "masks": keep.astype(np.float32),
            "phrase_token_masks": (token_masks & keep[:, None]).astype(np.float32),
            "ids": np.asarray(item_id),
        }


@functools.lru_cache(maxsize=16)
def epoch_seed(seed: int, epoch: int) -> int:
    """The 32-bit shuffle seed of ``epoch`` (grain's ``index_shuffle`` takes 32 bits), from
    numpy's SeedSequence of (seed, epoch): distinct pairs give independent orders (not
    ``seed + epoch``, which gives run 1's epoch 0 the order of run 0's epoch 1)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


class EpochOrder:
    """The global epoch order (module docstring, steps 2-3): ``record(epoch, position)`` -> the
    record index at ``position`` of ``epoch`` (O(1) memory: grain's ``index_shuffle``)."""

    def __init__(self, num_records: int, seed: int, shuffle: bool):
        self.num_records, self.seed, self.shuffle = num_records, seed, shuffle

    def record(self, epoch: int, position: int) -> int:
        if not self.shuffle:
            return position
        return int(grain.experimental.index_shuffle(
            position, max_index=self.num_records - 1, seed=epoch_seed(self.seed, epoch),
            rounds=4))


class TrainIterator:
    """Infinite iterator of fixed-shape numpy batches with an exact-resume state.

    ``source``: a random-access sequence of goal2k records (``goal2k.data_source``).
    ``next(it)`` -> batch dict (module docstring) of this host's ``batch_size`` rows of the
    global batch; ``last_ids`` -> the item ids of that batch. ``get_state()`` -> dict
    (JSON-able) naming the next batch; ``set_state(state)`` (dict, or its JSON as str/bytes)
    continues from it.
    """

    def __init__(self, source: Sequence[dict], tokenizer, *, batch_size: int, resolution: int,
                 max_boxes: int, seed: int, flip: bool, random_crop: bool, shuffle: bool,
                 min_box_size: float, process_index: int, process_count: int,
                 prefetch: int = 2):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.source = source
        self.batch_size = batch_size
        self.global_batch_size = batch_size * process_count
        if len(source) < self.global_batch_size:
            raise ValueError(f"the dataset has {len(source)} items, fewer than the global batch "
                             f"{self.global_batch_size} (batch_size={batch_size} x "
                             f"{process_count} processes)")
        self.seed, self.flip, self.random_crop, self.shuffle = seed, flip, random_crop, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.prefetch = prefetch
        self.batches_per_epoch = len(source) // self.global_batch_size
        self.order = EpochOrder(len(source), seed, shuffle)
        self.transform = ItemTransform(
            tokenizer, resolution=resolution, max_boxes=max_boxes, seed=seed, flip=flip,
            random_crop=random_crop, min_box_size=min_box_size)
        rows_per_epoch = self.batches_per_epoch * batch_size  # this host's rows of one epoch
        self._dataset = (grain.MapDataset.range(rows_per_epoch).repeat()
                         .map_with_index(self._locate)
                         .map(self.transform)
                         .batch(batch_size, drop_remainder=True))
        self._position = 0  # batches returned since epoch 0, batch 0
        self._it: Any = None
        self.last_ids: list[str] = []

    def positions(self, batch: int) -> range:
        """This host's epoch positions in global batch ``batch`` (module docstring, step 3)."""
        start = batch * self.global_batch_size + self.process_index * self.batch_size
        return range(start, start + self.batch_size)

    def _locate(self, index: int, row: int) -> tuple[int, int, dict]:
        """(epoch, global position, record) of this host's ``index``-th row of the stream
        (``row`` = ``index`` within its epoch)."""
        epoch = index // (self.batches_per_epoch * self.batch_size)
        batch, j = divmod(row, self.batch_size)
        position = self.positions(batch)[j]
        return epoch, position, self.source[self.order.record(epoch, position)]

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """{"epoch", "batch" (next global batch within the epoch), and the setup it belongs to}
        (process_index / process_count / batch_size are information: the position is global)."""
        epoch, batch = divmod(self._position, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch, "pipeline": PIPELINE, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "batch_size": self.batch_size,
                "num_examples": len(self.source),
                "process_index": self.process_index, "process_count": self.process_count,
                "flip": self.flip, "random_crop": self.random_crop, "shuffle": self.shuffle}

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Continues at ``state``'s position; a state saved with another number of hosts (same
        global batch) resumes exactly too."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("pipeline") != PIPELINE:
            raise ValueError(
                f"iterator state has pipeline={state.get('pipeline')!r}, this iterator is "
                f"{PIPELINE!r}: the state was written by another input pipeline (no 'pipeline' "
                "key: the earlier in-memory tf.data one; 'grain-1': the per-host shards), whose "
                "item order differs, so the run cannot continue exactly from it; start the run "
                "afresh")
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
        self.close()
        self._position = epoch * self.batches_per_epoch + batch

    # ---------------------------------------------------------------- data
    def _build(self):
        it = iter(self._dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=self.prefetch, prefetch_buffer_size=self.prefetch)))
        if self._position:
            it.set_state({"next_index": self._position})
        return it

    def annotation_chunks(self, chunk_size: int = 1024
                          ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]]:
        """Every item of the split (each host sees any of them over the epochs), ``chunk_size``
        at a time, annotations only (images not decoded):
        ``(box_masks bool [C, N], phrase_ids int32 [C, V * N, 77], phrase_masks bool
        [C, V * N], ids [C])``, boxes packed first after keeping the ``max_boxes`` largest, the
        V text variants (plain, and left/right swapped when ``flip``) side by side. For the
        training program's check of trimmed encodings; it reads every record."""
        n_boxes = self.transform.max_boxes
        swaps = (lambda s: s, box_lib.swap_left_right) if self.flip else (lambda s: s,)
        for start in range(0, len(self.source), chunk_size):
            stop = min(start + chunk_size, len(self.source))
            items = [_annotations(self.source[i], n_boxes) for i in range(start, stop)]
            masks = np.zeros((len(items), n_boxes), bool)
            ids = np.tile(self.transform.empty_ids, (len(items), len(swaps) * n_boxes, 1))
            for k, (_, _, phrases, _) in enumerate(items):
                masks[k, : len(phrases)] = True
            flat = [p for _, _, phrases, _ in items for p in phrases]
            for v, swap in enumerate(swaps):  # one tokenizer call per chunk and variant
                flat_ids = text_lib.tokenize(self.transform.tokenizer, [swap(p) for p in flat])
                ids[:, v * n_boxes: (v + 1) * n_boxes][np.nonzero(masks)] = flat_ids
            yield masks, ids, np.tile(masks, (1, len(swaps))), [item[0] for item in items]

    def close(self) -> None:
        """Stops grain's prefetch threads; the next ``next()`` restarts at the current state."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        batch = next(self._it)
        self.last_ids = [str(i) for i in batch.pop("ids")]
        self._position += 1
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
      data_dir: TFDS data dir holding the built ``goal2k`` dataset (ArrayRecord, version 1.1.0).
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
      prefetch: batches computed ahead, each by its own thread (0: in the caller's thread).
    """
    if batch_size < 1 or resolution < 8 or max_boxes < 1:
        raise ValueError(f"make_train_iterator: need batch_size >= 1, resolution >= 8, max_boxes >= 1; "
                         f"got {batch_size}, {resolution}, {max_boxes}")
    if not 0.0 <= min_box_size < 1.0:
        raise ValueError(f"make_train_iterator: min_box_size is a normalized area in [0, 1), got {min_box_size}")
    _configure_tf()
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
    return TrainIterator(goal2k.data_source(data_dir, split), tokenizer, batch_size=batch_size,
                         resolution=resolution, max_boxes=max_boxes, seed=seed, flip=flip,
                         random_crop=random_crop, shuffle=shuffle, min_box_size=min_box_size,
                         process_index=process_index, process_count=process_count,
                         prefetch=prefetch)

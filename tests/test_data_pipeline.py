"""tf.data input pipeline: fixed shapes, determinism, exact resume, flip semantics, sharding."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from goal_jax import text
from goal_jax.data import format as fmt
from goal_jax.data import goal2k, pipeline, shapes

EXPECTED = {
    "images": (np.float32, (4, 32, 32, 3)),
    "input_ids": (np.int32, (4, 77)),
    "phrase_input_ids": (np.int32, (4, 6, 77)),
    "boxes": (np.float32, (4, 6, 4)),
    "masks": (np.float32, (4, 6)),
    "phrase_token_masks": (np.float32, (4, 6, 77)),
}


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    shapes.write_shapes_dataset(str(root / "src"), num_items=18, resolution=64, seed=1)
    goal2k.build_goal2k(str(root / "src"), str(root / "tfds"))
    return str(root / "tfds")


def _make(data_dir, tokenizer_dir, **kw):
    args = dict(batch_size=4, resolution=32, max_boxes=6, seed=7, flip=True, random_crop=True,
                process_index=0, process_count=1)
    args.update(kw)
    return pipeline.make_train_iterator(data_dir, tokenizer_dir, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.BATCH_KEYS)


def test_shapes_dtypes_and_values(shapes_data, tokenizer_dir):
    it = _make(shapes_data, tokenizer_dir)
    assert it.batches_per_epoch == 4  # 18 // 4, the last 2 items of each epoch are skipped
    batches = _take(it, 9)  # crosses two epoch boundaries
    assert it.get_state()["epoch"] == 2 and it.get_state()["batch"] == 1
    tok = text.load_tokenizer(tokenizer_dir)
    empty = text.tokenize(tok, [""])[0]
    for b in batches:
        assert sorted(b) == sorted(EXPECTED)
        for k, (dtype, shape) in EXPECTED.items():
            assert b[k].dtype == dtype and b[k].shape == shape, k
        assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
        assert set(np.unique(b["masks"])) <= {0.0, 1.0}
        assert (b["masks"].sum(1) >= 1).all()
        real = b["masks"] > 0
        w = b["boxes"][..., 2] - b["boxes"][..., 0]
        h = b["boxes"][..., 3] - b["boxes"][..., 1]
        assert (w[real] > 0).all() and (h[real] > 0).all()
        assert (b["boxes"][~real] == 0).all() and (b["phrase_token_masks"][~real] == 0).all()
        assert (b["phrase_input_ids"][~real] == empty).all()
        assert (b["boxes"] >= 0).all() and (b["boxes"] <= 1).all()
        # every real phrase of a shapes caption is found in the caption
        assert (b["phrase_token_masks"].sum(-1)[real] >= 1).all()


def test_same_seed_same_batches_and_exact_resume(shapes_data, tokenizer_dir):
    a = _take(_make(shapes_data, tokenizer_dir), 7)
    b = _take(_make(shapes_data, tokenizer_dir), 7)
    assert _equal(a, b)
    c = _take(_make(shapes_data, tokenizer_dir, seed=8), 7)
    assert not _equal(a, c)

    it = _make(shapes_data, tokenizer_dir)
    _take(it, 3)
    state = json.dumps(it.get_state())           # what a checkpoint would store
    expected = _take(it, 6)                       # continues over the epoch boundary
    resumed = _make(shapes_data, tokenizer_dir)
    resumed.set_state(state)
    assert _equal(_take(resumed, 6), expected)
    assert resumed.get_state() == it.get_state()

    other = _make(shapes_data, tokenizer_dir, seed=8)
    with pytest.raises(ValueError, match="iterator state has seed=7 but this iterator has seed=8"):
        other.set_state(state)


def test_no_shuffle_no_augment_matches_dataset_order(shapes_data, tokenizer_dir):
    it = _make(shapes_data, tokenizer_dir, shuffle=False, flip=False, random_crop=False)
    first = next(it)
    src = os.path.join(os.path.dirname(shapes_data), "src")
    records, _ = fmt.read_annotations(os.path.join(src, fmt.ANNOTATIONS_FILE))
    tok = text.load_tokenizer(tokenizer_dir)
    np.testing.assert_array_equal(first["input_ids"], text.tokenize(tok, [r.caption for r in records[:4]]))
    for i, r in enumerate(records[:4]):
        n = len(r.boxes)
        # 64 px square -> resized to 32, no crop offset: boxes are pixels / 64.
        np.testing.assert_allclose(first["boxes"][i, :n], np.float32(r.boxes) / 64, atol=1e-6)
        assert first["masks"][i].tolist() == [1.0] * n + [0.0] * (6 - n)


def test_flip_swaps_left_right_and_crop_drops_boxes(tmp_path, tokenizer_dir):
    src = tmp_path / "lr"
    (src / "img").mkdir(parents=True)
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    caption = "a red square to the left of a blue square and a dog"
    with open(src / fmt.ANNOTATIONS_FILE, "w") as f:
        for i in range(4):
            Image.fromarray(pixels).save(src / "img" / f"{i}.png")
            f.write(json.dumps({
                "id": f"lr{i}", "image": f"img/{i}.png", "caption": caption, "box_format": "xyxy_pixels",
                "annotations": [{"phrase": "a red square", "box": [0, 0, 32, 32]},
                                {"phrase": "a blue square", "box": [32, 0, 64, 32]},
                                {"phrase": "a dog", "box": [0, 0, 12, 32]}]}) + "\n")
    it = pipeline.make_train_iterator(str(tmp_path / "tfds"), tokenizer_dir, batch_size=4, resolution=32,
                                      max_boxes=4, seed=0, flip=True, random_crop=False,
                                      source_dir=str(src), process_index=0, process_count=1)
    tok = text.load_tokenizer(tokenizer_dir)
    plain_ids, flipped_ids = text.tokenize(tok, [caption, caption.replace("left", "right")])
    seen = set()
    for b in _take(it, 3):
        for i in range(4):
            flipped = np.array_equal(b["input_ids"][i], flipped_ids)
            assert flipped or np.array_equal(b["input_ids"][i], plain_ids)
            seen.add(flipped)
            red_box, blue_box = ([0.5, 0, 1, 1], [0, 0, 0.5, 1]) if flipped else ([0, 0, 0.5, 1], [0.5, 0, 1, 1])
            np.testing.assert_allclose(b["boxes"][i, :2], [red_box, blue_box], atol=1e-6)
            # the "a dog" box lies left of the center crop window (x 16..48 of 64): dropped
            assert b["masks"][i].tolist() == [1.0, 1.0, 0.0, 0.0]
            assert b["phrase_token_masks"][i, 2].sum() == 0
            left, right = b["images"][i, :, :16], b["images"][i, :, 16:]
            red, blue = np.float32([1, -1, -1]), np.float32([-1, -1, 1])
            np.testing.assert_allclose(left, np.broadcast_to(blue if flipped else red, left.shape), atol=1e-6)
            np.testing.assert_allclose(right, np.broadcast_to(red if flipped else blue, right.shape), atol=1e-6)
            # phrase token masks point at "red square" / "blue square" in either caption
            tokens = b["input_ids"][i][b["phrase_token_masks"][i, 0] > 0]
            assert tokens.tolist() == text.tokenize(tok, ["a red square"])[0][1:4].tolist()
    assert seen == {True, False}


def test_host_sharding_is_disjoint_and_complete(shapes_data, tokenizer_dir):
    parts = [pipeline.read_shard(shapes_data, "train", i, 2) for i in range(2)]
    ids = [[e["id"] for e in p] for p in parts]
    assert len(ids[0]) == len(ids[1]) == 9
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == [f"shapes-train-{i:06d}" for i in range(18)]
    # the iterator reads the whole split: host 1 of 2 takes rows [B, 2B) of every global batch
    it = _make(shapes_data, tokenizer_dir, process_index=1, process_count=2)
    assert len(it._data) == 18 and it.get_state()["process_index"] == 1
    assert list(it.positions(1)) == list(range(3 * it.batch_size, 4 * it.batch_size))
    with pytest.raises(ValueError, match="no split 'val'"):
        pipeline.read_shard(shapes_data, "val", 0, 1)
    with pytest.raises(ValueError, match="no prepared goal2k dataset in /nonexistent"):
        pipeline.read_shard("/nonexistent", "train", 0, 1)

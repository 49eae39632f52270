"""Streaming input pipeline (grain over goal2k's ArrayRecord files): fixed shapes, determinism,
exact resume, flip semantics, global order across processes, bounded reads, bad items named."""

import json
import os
import shutil
import threading

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




class CountingSource:
    """A goal2k source that records which record indices were read (thread-safe)."""

    def __init__(self, source):
        self.source, self.reads, self._lock = source, [], threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        with self._lock:
            self.reads.append(int(index))
        return self.source[index]


def _iterator(source, tokenizer_dir, **kw):
    args = dict(batch_size=4, resolution=32, max_boxes=6, seed=7, flip=True, random_crop=True,
                shuffle=True, min_box_size=0.001, process_index=0, process_count=1, prefetch=2)
    args.update(kw)
    return pipeline.TrainIterator(source, text.load_tokenizer(tokenizer_dir), **args)


def test_exact_resume_at_epoch_starts_and_far_positions(shapes_data, tokenizer_dir):
    """Resuming anywhere (epoch start, mid-epoch, several epochs on) gives the batches of an
    uninterrupted run; the number of prefetch threads does not change them."""
    straight = _take(_make(shapes_data, tokenizer_dir, prefetch=0), 22)  # 5.5 epochs of 4
    assert _equal(straight, _take(_make(shapes_data, tokenizer_dir, prefetch=3), 22))
    for epoch, batch in ((1, 0), (2, 3), (5, 1)):
        it = _make(shapes_data, tokenizer_dir)
        it.set_state(dict(_make(shapes_data, tokenizer_dir).get_state(), epoch=epoch,
                          batch=batch))
        at = epoch * 4 + batch
        assert _equal(_take(it, 22 - at), straight[at:]), (epoch, batch)
    # each epoch reorders the items: the first batches of epochs 0 and 1 differ
    assert not np.array_equal(straight[0]["input_ids"], straight[4]["input_ids"])


def test_state_from_another_setup_or_pipeline_is_refused(shapes_data, tokenizer_dir):
    it = _make(shapes_data, tokenizer_dir)
    state = it.get_state()
    assert state["pipeline"] == pipeline.PIPELINE == "grain-2" and state["num_examples"] == 18
    old = {k: v for k, v in state.items() if k != "pipeline"}  # the in-memory pipeline's state
    with pytest.raises(ValueError, match="iterator state has pipeline=None, this iterator is "
                       "'grain-2': the state was written by another input pipeline"):
        it.set_state(old)
    with pytest.raises(ValueError, match="iterator state has pipeline='grain-1'"):
        it.set_state(dict(state, pipeline="grain-1"))  # the per-host shards of branch stream
    with pytest.raises(ValueError, match="iterator state has global_batch_size=8 but this "
                       "iterator has global_batch_size=4"):
        it.set_state(dict(state, global_batch_size=8, process_count=2))
    with pytest.raises(ValueError, match=r"epoch=0, batch=4 out of range \(4 batches per epoch\)"):
        it.set_state(dict(state, batch=4))


def test_epoch_seeds_do_not_collide_across_seeds():
    """seed + epoch would give seed 1's epoch 0 the order of seed 0's epoch 1."""
    seeds = {pipeline.epoch_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400
    orders = [[pipeline.EpochOrder(50, s, True).record(e, q) for q in range(50)]
              for s, e in ((0, 1), (1, 0))]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(50))  # permutations
    assert orders[0] != orders[1]
    assert [pipeline.EpochOrder(50, 0, False).record(3, q) for q in range(50)] == list(range(50))


def test_processes_read_their_rows_of_the_global_batch(shapes_data, tokenizer_dir):
    """process_count=3 simulated in one process: 18 items, batch 3 per process, global batch 9,
    2 global batches per epoch. Step k's rows of hosts 0, 1, 2 stacked are exactly the 1-host
    batch k (batch 9): images, flips and crops included; each host reads only its own rows
    (prefetch 0: the source reads are the items of the batches returned), the hosts' reads of
    an epoch are disjoint and cover 18 // 9 * 9 = 18 items, and a 1-host state resumes on 3."""
    source = goal2k.data_source(shapes_data, "train")
    ids = [source[i]["id"].decode() for i in range(len(source))]
    one = _iterator(source, tokenizer_dir, batch_size=9, prefetch=0)
    assert one.batches_per_epoch == 2
    reference, reference_ids = [], []
    for _ in range(4):  # two epochs
        reference.append(next(one))
        reference_ids.append(one.last_ids)
    reads = []
    for p in range(3):
        counting = CountingSource(source)
        it = _iterator(counting, tokenizer_dir, batch_size=3, process_index=p, process_count=3,
                       prefetch=0)
        assert it.batches_per_epoch == 2 and it.get_state()["global_batch_size"] == 9
        rows = []
        for k in range(4):
            rows.append(next(it))
            assert it.last_ids == reference_ids[k][3 * p: 3 * p + 3], (p, k)
            assert [ids[i] for i in counting.reads] == [n for ks in reference_ids[:k + 1]
                                                         for n in ks[3 * p: 3 * p + 3]]
            for key in pipeline.BATCH_KEYS:
                np.testing.assert_array_equal(rows[k][key], reference[k][key][3 * p: 3 * p + 3])
        reads.append(counting.reads)
    for epoch in range(2):
        every = [i for r in reads for i in r[6 * epoch: 6 * epoch + 6]]
        assert sorted(every) == list(range(18)), epoch  # disjoint, together each item once
    assert reference_ids[0] + reference_ids[1] != reference_ids[2] + reference_ids[3]
    # a 1-host state after one batch: host 2 of 3 continues with its rows of global batch 1
    resumed = _iterator(source, tokenizer_dir, batch_size=3, process_index=2, process_count=3,
                        prefetch=0)
    resumed.set_state(json.dumps(dict(_iterator(source, tokenizer_dir, batch_size=9).get_state(),
                                      batch=1)))
    later = next(resumed)
    assert resumed.last_ids == reference_ids[1][6:9]
    np.testing.assert_array_equal(later["images"], reference[1]["images"][6:9])


def test_reads_are_bounded_by_the_prefetch(shapes_data, tokenizer_dir):
    """Nothing is read when the iterator is made; afterwards the source has been read for at
    most (batches returned + prefetch) * batch_size items, never the whole shard ahead."""
    counting = CountingSource(goal2k.data_source(shapes_data, "train"))
    it = _iterator(counting, tokenizer_dir, prefetch=2)
    assert counting.reads == []
    for k in range(1, 10):
        next(it)
        assert k * 4 <= len(counting.reads) <= (k + 2) * 4, (k, len(counting.reads))
    it.close()
    fresh = CountingSource(counting.source)
    it = _iterator(fresh, tokenizer_dir, prefetch=2)
    it.set_state(dict(it.get_state(), epoch=40, batch=1))  # a jump reads nothing before it
    next(it)
    assert 4 <= len(fresh.reads) <= 3 * 4


def test_annotation_chunks_cover_every_item(shapes_data, tokenizer_dir):
    it = _make(shapes_data, tokenizer_dir, process_index=1, process_count=2)
    chunks = list(it.annotation_chunks(chunk_size=4))
    assert [len(c[3]) for c in chunks] == [4, 4, 4, 4, 2]  # any host may read any of the 18
    names = [n for c in chunks for n in c[3]]
    assert names == [f"shapes-train-{i:06d}" for i in range(18)]
    src = os.path.join(os.path.dirname(shapes_data), "src")
    records = {r.id: r for r in fmt.read_annotations(os.path.join(src, fmt.ANNOTATIONS_FILE))[0]}
    tok = text.load_tokenizer(tokenizer_dir)
    masks, ids, id_masks, first = chunks[0]
    assert masks.shape == (4, 6) and ids.shape == (4, 12, 77) and id_masks.shape == (4, 12)
    for k, name in enumerate(first):
        phrases = records[name].phrases
        n = len(phrases)
        assert masks[k].tolist() == [True] * n + [False] * (6 - n)
        np.testing.assert_array_equal(ids[k, :n], text.tokenize(tok, phrases))  # plain texts
        np.testing.assert_array_equal(ids[k, 6: 6 + n],  # the left/right swapped texts
                                      text.tokenize(tok, [p.replace("left", "right") for p in
                                                          phrases]))
        np.testing.assert_array_equal(id_masks[k], np.tile(masks[k], 2))


def test_bad_items_are_named(shapes_data, tokenizer_dir):
    source = goal2k.data_source(shapes_data, "train")
    good = [dict(source[i]) for i in range(8)]
    broken = [dict(good[0], id=b"bad-image", image=b"not a png"), *good[1:4]]
    it = _iterator(broken, tokenizer_dir, shuffle=False, prefetch=0)
    with pytest.raises(ValueError, match="goal2k item 'bad-image': the image cannot be decoded"):
        next(it)
    mismatched = [*good[:2], dict(good[2], id=b"two-phrases", phrases=[b"a", b"b"],
                                  boxes=np.float32([[0, 0, 0.5, 0.5]])), good[3]]
    it = _iterator(mismatched, tokenizer_dir, shuffle=False, prefetch=2)
    with pytest.raises(ValueError, match="^goal2k item 'two-phrases': 2 phrases but 1 boxes"):
        next(it)
    with pytest.raises(ValueError, match="goal2k item 'two-phrases': 2 phrases but 1 boxes"):
        list(_iterator(mismatched, tokenizer_dir).annotation_chunks())
    no_boxes = [{k: v for k, v in good[0].items() if k != "boxes"}, *good[1:4]]
    with pytest.raises(ValueError, match=r"goal2k item 'shapes-train-000000' lacks the "
                       r"field\(s\) \['boxes'\]"):
        next(_iterator(no_boxes, tokenizer_dir, shuffle=False, prefetch=0))


def test_missing_old_or_unsplit_dataset_says_how_to_rebuild(shapes_data, tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="no split 'val'"):
        _make(shapes_data, tokenizer_dir, split="val")
    with pytest.raises(ValueError, match="no prepared goal2k dataset in /nonexistent"):
        _make("/nonexistent", tokenizer_dir)
    # a data dir holding only a version 1.0.0 build (TFRecord files of the in-memory pipeline)
    old = tmp_path / "goal2k" / "default" / "1.0.0"
    shutil.copytree(os.path.join(shapes_data, "goal2k", "default", str(goal2k.Goal2k.VERSION)),
                    old)
    with pytest.raises(ValueError, match=rf"{tmp_path} holds goal2k version 1.0.0 only, in "
                       rf"{old} \(built from .*src\): TFRecord files of the earlier in-memory "
                       r"pipeline\. .* Rebuild it from its source folder with "
                       r"goal2k.build_goal2k\(source_folder, data_dir\), or set config field "
                       "data.source"):
        _make(str(tmp_path), tokenizer_dir)

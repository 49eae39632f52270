"""Box transforms under resize, crop and flip; left/right swap; box cleaning rules."""

import numpy as np
import pytest

from goal_jax.data import boxes as B
from goal_jax.data import format as fmt


def test_resize_and_crop_offsets():
    assert [int(v) for v in B.resized_shape(100, 200, 50)] == [50, 100]
    assert [int(v) for v in B.resized_shape(300, 100, 64)] == [192, 64]
    assert [int(v) for v in B.resized_shape(65, 64, 64)] == [65, 64]
    assert [int(v) for v in B.crop_offsets(50, 100, 50)] == [0, 25]           # center
    assert [int(v) for v in B.crop_offsets(192, 64, 64)] == [64, 0]
    assert [int(v) for v in B.crop_offsets(50, 100, 50, np.float32([0.0, 0.0]))] == [0, 0]
    assert [int(v) for v in B.crop_offsets(50, 100, 50, np.float32([0.5, 0.999]))] == [0, 50]
    assert [int(v) for v in B.crop_offsets(192, 64, 64, np.float32([0.5, 0.3]))] == [64, 0]


def test_crop_boxes_known_answers():
    # 200x100 (w x h) image -> resized 100x50 -> center crop 50x50 at left=25.
    boxes = np.float32([[0.25, 0.0, 0.75, 1.0],    # exactly the crop window
                        [0.0, 0.5, 0.5, 1.0],      # half cut by the left edge
                        [0.0, 0.0, 0.2, 0.2],      # wholly outside -> zero width
                        [0.5, 0.2, 0.6, 0.4]])
    out = B.crop_boxes(boxes, 50, 100, 0, 25, 50).numpy()
    np.testing.assert_allclose(out, [[0, 0, 1, 1], [0, 0.5, 0.5, 1], [0, 0, 0, 0.2],
                                     [0.5, 0.2, 0.7, 0.4]], atol=1e-6)
    keep = B.box_keep(out, 0.01).numpy()
    assert keep.tolist() == [True, True, False, True]
    assert B.box_keep(np.float32([[0, 0, 0.1, 0.05]]), 0.01).numpy().tolist() == [False]  # area 0.005
    # Tall 64x192 image, random crop at top=32 of a 64x192 (no resize at resolution 64).
    out = B.crop_boxes(np.float32([[0.25, 0.25, 0.75, 0.5]]), 192, 64, 32, 0, 64).numpy()
    np.testing.assert_allclose(out, [[0.25, 0.25, 0.75, 1.0]], atol=1e-6)


def test_flip_boxes():
    out = B.flip_boxes(np.float32([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0]])).numpy()
    np.testing.assert_allclose(out, [[0.7, 0.2, 0.9, 0.4], [0, 0, 1, 1]], atol=1e-6)
    twice = B.flip_boxes(B.flip_boxes(np.float32([[0.1, 0.2, 0.3, 0.4]]))).numpy()
    np.testing.assert_allclose(twice, [[0.1, 0.2, 0.3, 0.4]], atol=1e-6)


def test_swap_left_right():
    assert B.swap_left_right("a cat to the left of a dog") == "a cat to the right of a dog"
    assert B.swap_left_right("Right of the LEFT box, left") == "Left of the RIGHT box, right"
    assert B.swap_left_right("bright leftover rightward") == "bright leftover rightward"
    assert B.swap_left_right("left-handed") == "right-handed"


def test_clean_annotations_rules():
    rec = fmt.Record(id="r1", image="x.png", caption="c", box_format="xyxy_normalized",
                     phrases=["a", "b", "", "c", "d"],
                     boxes=[[0.0, 0.0, 0.5, 0.5], [-0.005, 0.1, 1.005, 0.9], [0, 0, 1, 1],
                            [0.2, 0.2, 0.2, 0.4], [0.5, 0.5, 1.2, 0.9]])
    phrases, boxes, dropped, clamped = fmt.clean_annotations(rec, width=100, height=50)
    assert phrases == ["a", "b"]
    np.testing.assert_allclose(boxes, [[0, 0, 0.5, 0.5], [0, 0.1, 1, 0.9]], atol=1e-9)
    assert [(d["index"], d["reason"].split(" (")[0].split(" by ")[0]) for d in dropped] == [
        (2, "empty phrase"), (3, "degenerate"), (4, "out of bounds")]
    assert clamped == [{"index": 1, "box": [-0.005, 0.1, 1.005, 0.9]}]
    # Keep the 2 largest of 3, in original order.
    rec = fmt.Record(id="r2", image="x.png", caption="c", box_format="xyxy_pixels",
                     phrases=["s", "l", "m"], boxes=[[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 5, 5]])
    phrases, _, dropped, _ = fmt.clean_annotations(rec, 10, 10, max_boxes=2)
    assert phrases == ["l", "m"] and dropped[0]["index"] == 0
    with pytest.raises(fmt.DataFormatError, match="item r2: image size must be positive"):
        fmt.clean_annotations(rec, 0, 10)

"""Box and caption transforms that follow the image augmentations of the input pipeline.

Boxes are ``[..., 4]`` xyxy = (x0, y0, x1, y1) = (left, top, right, bottom) as fractions of
the image width / height. The image is resized so its shorter side equals ``resolution``
(aspect kept), a ``resolution`` x ``resolution`` window at (top, left) is cropped, then the
crop may be mirrored left-right. The tensor functions take tf tensors or numpy arrays (float32)
and return tf tensors; :func:`swap_left_right` is plain Python.
"""

from __future__ import annotations

import re

import tensorflow as tf


def resized_shape(height, width, resolution: int):
    """Size after scaling the shorter side to ``resolution``: -> (new_h, new_w) int32 scalars,
    both >= resolution (the longer side is ``round(long * resolution / short)``)."""
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    scale = resolution / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), resolution)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), resolution)
    return new_h, new_w


def crop_offsets(new_h, new_w, resolution: int, u=None):
    """Top-left corner of the crop window -> (top, left) int32.

    ``u`` None: center crop ((new - resolution) // 2). Else ``u`` = (u_y, u_x) in [0, 1)
    picks uniformly among the ``new - resolution + 1`` possible offsets: floor(u * (n + 1)).
    """
    span_h, span_w = new_h - resolution, new_w - resolution
    if u is None:
        return span_h // 2, span_w // 2
    u = tf.cast(u, tf.float32)
    top = tf.cast(tf.floor(u[0] * tf.cast(span_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[1] * tf.cast(span_w + 1, tf.float32)), tf.int32)
    return tf.clip_by_value(top, 0, span_h), tf.clip_by_value(left, 0, span_w)


def crop_boxes(boxes, new_h, new_w, top, left, resolution: int):
    """Normalized boxes of the full image -> normalized boxes of the crop, clipped to [0, 1].

    In resized pixels a box is ``x * new_w``, ``y * new_h``; the crop subtracts (left, top) and
    divides by ``resolution``. Boxes wholly outside the crop end with zero width or height.
    """
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    new_h, new_w = tf.cast(new_h, tf.float32), tf.cast(new_w, tf.float32)
    top, left = tf.cast(top, tf.float32), tf.cast(left, tf.float32)
    x0 = (boxes[..., 0] * new_w - left) / resolution
    y0 = (boxes[..., 1] * new_h - top) / resolution
    x1 = (boxes[..., 2] * new_w - left) / resolution
    y1 = (boxes[..., 3] * new_h - top) / resolution
    return tf.clip_by_value(tf.stack([x0, y0, x1, y1], axis=-1), 0.0, 1.0)


def flip_boxes(boxes):
    """Left-right mirror: (x0, y0, x1, y1) -> (1 - x1, y0, 1 - x0, y1)."""
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    return tf.stack([1.0 - boxes[..., 2], boxes[..., 1], 1.0 - boxes[..., 0], boxes[..., 3]], axis=-1)


def box_keep(boxes, min_box_size: float):
    """bool [...]: box has positive width and height and area (normalized) >= min_box_size."""
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return (w > 0) & (h > 0) & (w * h >= min_box_size)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swaps the whole words "left" <-> "right" (any case; the case pattern is kept), so a
    spatial caption stays true for the mirrored image: "a cat to the left of a dog" ->
    "a cat to the right of a dog". "leftover" or "bright" are untouched."""

    def repl(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(repl, text)

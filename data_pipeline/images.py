"""Encoded image files → square uint8 RGB: the one way file images are turned into pixels.

Used when the image store is built (data_pipeline/store.py) and inside the exported
model (`image_bytes` signature), so training, evaluation and serving see the same
pixels. The rules, and why:
- Decoding: PNG, JPEG, BMP, GIF (first frame), TensorFlow's decoders everywhere.
- Channels: grayscale is repeated to RGB (ImageNet backbones expect 3 channels);
  transparent pixels are composited on white (the usual background of cut-out photos);
  palette images are expanded by the decoder.
- Shape: the whole image is kept: scaled (antialiased bilinear) so its longer side
  fits the storage size, then padded to a square. Cropping would cut off what sits near
  the edges (a defect, a label) and stretching would distort shapes.
- Padding: the mean colour of the image's own border, so an object on white stays on
  white (black bars beside it would be edges the backbone never saw in ImageNet) and a
  photo's bars take its edges' tone.
"""

import tensorflow as tf

BACKGROUND = 255.0  # transparent pixels become white


def decode_rgb(encoded):
    """One encoded image (tf.string scalar) → uint8 [height, width, 3]."""
    image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
    image.set_shape([None, None, None])
    x = tf.cast(image, tf.float32)
    channels = tf.shape(x)[-1]

    def composite(color, alpha):
        alpha = alpha / 255.0
        return color * alpha + BACKGROUND * (1.0 - alpha)

    def gray():
        return tf.repeat(x[..., :1], 3, axis=-1)

    def gray_alpha():
        return tf.repeat(composite(x[..., :1], x[..., 1:2]), 3, axis=-1)

    def rgb_alpha():
        return composite(x[..., :3], x[..., 3:4])

    x = tf.case(
        [(tf.equal(channels, 1), gray), (tf.equal(channels, 2), gray_alpha), (tf.equal(channels, 4), rgb_alpha)],
        default=lambda: x[..., :3],
    )
    return tf.cast(tf.round(x), tf.uint8)


def fit_square(image, size):
    """uint8 [h, w, 3] → uint8 [size, size, 3]: longer side scaled to `size`, the rest
    padded with the mean colour of the image's border."""
    x = tf.cast(image, tf.float32)
    height, width = tf.shape(x)[0], tf.shape(x)[1]
    scale = size / tf.cast(tf.maximum(height, width), tf.float32)
    new_height = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
    new_width = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
    x = tf.image.resize(x, tf.stack([new_height, new_width]), antialias=True)
    border = tf.reduce_mean(tf.concat([x[0], x[-1], x[:, 0], x[:, -1]], axis=0), axis=0)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    x = tf.pad(x - border, [[top, size - new_height - top], [left, size - new_width - left], [0, 0]]) + border
    x = tf.ensure_shape(x, [size, size, 3])
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 255.0)), tf.uint8)


def decode_square(encoded, size):
    """Encoded image bytes → uint8 [size, size, 3] (`decode_rgb` then `fit_square`)."""
    return fit_square(decode_rgb(encoded), size)


def decode_batch(encoded, size):
    """tf.string [batch] → uint8 [batch, size, size, 3]; images may differ in size."""
    return tf.map_fn(lambda e: decode_square(e, size), encoded,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))

"""Flax linen modules: CLIP, VAE, GLIGEN U-Net. No I/O, no torch, no TensorFlow."""

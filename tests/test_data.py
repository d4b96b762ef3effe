"""Samples to tensors (data.py): label masking on hand-written sequences, padding, truncation, the pixels'
normalisation, and the batch order across processes and micro-steps. CPU, no network."""

import numpy as np
import pytest
import torch

import data
import shapes
from tokenizer import EOC, EOT, IMAGE, get_tokenizer

tok = get_tokenizer("bytes")


def collated(*args, **kwargs):
    """data.collate's Batch as (images, idx, targets); a batch of pixels never carries features too."""
    b = data.collate(*args, **kwargs)
    assert b.vision_features is None
    return b.images, b.idx, b.targets


# --- labels, padding, truncation

def test_label_masking_by_hand():
    img = np.zeros((64, 64, 3), np.uint8)
    samples = [
        (f"pre{IMAGE}ab{EOC}xy{IMAGE}c{EOC}{EOT}", [img, img]),
        (f"{IMAGE}z{EOC}{EOT}", [img]),
    ]
    images, idx, targets = collated(samples, tok, block_size=64, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    I, E, T, _ = 257, 258, 256, -1
    p, r, e, a, b, x, y, c, z = (ord(ch) for ch in "preabxycz")
    assert idx.tolist() == [
        [p, r, e, I, a, b, E, x, y, I, c, E, T],
        [I, z, E, T, T, T, T, T, T, T, T, T, T],  # right-padded with <|endoftext|>
    ]
    assert targets.tolist() == [
        # text before the first <image>, <image> tokens, text between an EOC and the next
        # <image>, and the final <|endoftext|> are never targets; <|endofchunk|> is.
        [_, _, _, a, b, E, _, _, _, c, E, _, _],
        [z, E, _, _, _, _, _, _, _, _, _, _, _],
    ]
    assert images.shape == (3, 1, 3, 64, 64) and images.dtype == torch.float32


def test_collate_without_images():
    images, idx, targets = collated([(f"hello{EOT}", [])], tok, block_size=16)
    assert images is None and idx.shape == (1, 6) and (targets == -1).all()


def test_truncation_keeps_images_and_tokens_consistent():
    imgs = [np.full((64, 64, 3), 50 * k, np.uint8) for k in range(4)]  # image k has pixel value 50k
    text = f"{IMAGE}aaaa{EOC}{IMAGE}bbbb{EOC}{IMAGE}cccc{EOC}{EOT}"  # chunks of 6 tokens
    for block_size, n_kept in [(3, 1), (6, 1), (7, 2), (8, 2), (13, 3), (100, 3)]:
        samples = [(text, imgs[:3]), (f"{IMAGE}d{EOC}{EOT}", imgs[3:])]
        images, idx, targets = collated(samples, tok, block_size, (0, 0, 0), (1, 1, 1))
        assert idx.shape[1] <= block_size
        assert images.shape[0] == (idx == tok.image_id).sum() == n_kept + 1
        # the surviving images, in row-major order of their <image> tokens
        assert images[:, 0, 0, 0, 0].tolist() == pytest.approx([50 * k / 255 for k in range(n_kept)] + [150 / 255])
        assert (targets != tok.image_id).all()
    # and on random shapes sequences
    for i in range(30):
        samples = [shapes.shapes_sample("train", 1, 10 * i + j) for j in range(3)]
        images, idx, targets = collated(samples, tok, block_size=40 + 7 * i)
        n = 0 if images is None else images.shape[0]
        assert n == (idx == tok.image_id).sum()


def test_collate_normalises_pixels():
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 1] = 255
    images, _, _ = collated([(f"{IMAGE}a{EOC}{EOT}", [img])], tok, 16, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert images[0, 0, :, 0, 0].tolist() == [-1.0, 2.0, -1.0]


# --- distributed order

def test_batch_indices_cover_each_step_once():
    for world_size, grad_accum in [(1, 1), (1, 4), (2, 2), (4, 1), (3, 2)]:
        B, G = 3, 3 * world_size * grad_accum
        for step in [0, 5]:
            seen = [i for r in range(world_size) for m in range(grad_accum)
                    for i in data.batch_indices(step, m, grad_accum, r, world_size, B)]
            assert sorted(seen) == list(range(step * G, (step + 1) * G))


def test_shapes_batches_same_samples_whatever_world_size():
    def micro_batches(world_size, grad_accum):  # one optimizer step, as all ranks together see it
        out = []
        for r in range(world_size):
            for m in range(grad_accum):
                b = data.ShapesData("train", 0, tok, 1024).batch(2, m, grad_accum, r, world_size, 3)
                out.append((b.images.numpy().tobytes(), b.idx.tolist(), b.targets.tolist()))
        return out
    one = micro_batches(world_size=1, grad_accum=2)
    assert one == micro_batches(world_size=2, grad_accum=1)  # the same micro-batches, in the same order
    assert one != micro_batches(world_size=1, grad_accum=1)  # (a different global batch size: other samples)


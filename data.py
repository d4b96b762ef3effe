"""
Data for Flamingo: samples to tensors, and the sources train.py reads batches from.

A *sample* is (text, images): `text` is markup, a string in which "<image>" marks where an image sits and
"<|endofchunk|>" ends the text that belongs to it, or the ids of such markup already tokenized (web text may hold
the characters "<image>", which must stay text: shards.py); `images` is a list of uint8 arrays in the order of the
<image> markers, each an image (H, W, 3) or a video's frames (F, H, W, 3).

1. Labels: which tokens are predicted: the text of each image's chunk, as OpenFlamingo's training code masks
   them; never padding, <image> tokens, text before the first image or between chunks.
2. Images: decoding files as CLIP preprocesses them, and the one normalisation of pixels for the tower.
3. Batches: collate() turns samples into a Batch; batch_indices() deals a global batch out to processes and
   micro-steps, so that its content depends only on the step.
4. The shapes world as a source. Every source has batch(step, micro_step, grad_accum, rank, world_size,
   batch_size) -> Batch, so that train.py's loop reads them all alike: ShapesData here, folders.FolderData
   (dataset folders: your own data) and shards.ShardStream (tar shards: LAION and MMC4).
"""

from dataclasses import dataclass

import numpy as np
import torch

import shapes
import shapes_video
import video

# -----------------------------------------------------------------------------
# 1. Labels


def chunk_mask(idx, image_id, eoc_id):
    """
    (B, T) bool: True where a token belongs to the text of a chunk, i.e. comes after an <image>
    and no later than the <|endofchunk|> that closes it (the EOC itself included). False for
    <image> tokens, tokens before the first <image> and text between an EOC and the next <image>
    (so the <|endoftext|> after the last EOC is False: a document's end is not predicted).
    """
    B, T = idx.shape
    pos = torch.arange(T).expand(B, T)                                     # (B, T)
    last_image = torch.where(idx == image_id, pos, -1).cummax(1).values   # (B, T) last <image> at or before t
    last_eoc = torch.where(idx == eoc_id, pos, -1).cummax(1).values       # (B, T) last EOC at or before t
    last_eoc_before = torch.cat([torch.full((B, 1), -1), last_eoc[:, :-1]], 1)  # strictly before t
    return (idx != image_id) & (last_image > last_eoc_before)


# -----------------------------------------------------------------------------
# 2. Images

# CLIP's pixel statistics (open_clip's OPENAI_DATASET_MEAN / _STD); a tower's own are VisionEncoder.mean / .std
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(pixels, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 images (a list of (H, W, 3) arrays, or one (N, H, W, 3) array) -> (N, 3, H, W) float32 in [0, 1],
    normalised by the tower's per-channel mean and std, as CLIP's preprocessing does."""
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def load_image(data, size):
    """Encoded image bytes -> uint8 (size, size, 3) RGB, as CLIP preprocesses (square_crop). ValueError when PIL
    cannot decode the bytes."""
    import io
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")  # decodes: a broken or truncated file fails here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad bytes
        raise ValueError(f"cannot decode image ({type(e).__name__})") from None
    return square_crop(img, size)


def square_crop(img, size):
    """A PIL RGB image -> uint8 (size, size, 3), as CLIP preprocesses: the shorter side resized to `size` (bicubic),
    then the centre cropped."""
    from PIL import Image
    w, h = img.size
    w, h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    img = img.resize((w, h), Image.BICUBIC)
    x, y = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)))


def load_image_file(path, size):
    """load_image() on the bytes of the file at `path` (OSError when it cannot be read); a video file (by its
    extension, video.is_video): its frames (F, size, size, 3), read by video.py at 1 FPS, at most 8, each one treated
    as load_image treats an image (ValueError when it cannot be read)."""
    if video.is_video(path):
        return np.stack([square_crop(frame, size) for frame in video.read_frames(path)])
    with open(path, "rb") as f:
        return load_image(f.read(), size)


def decode_error(path):
    """None when the image (or video) file at `path` decodes, else why not ("cannot be decoded (OSError)")."""
    from PIL import Image
    try:
        if video.is_video(path):
            video.read_frames(path)
            return None
        with Image.open(path) as im:
            im.load()  # decodes the whole file: a truncated or broken one fails here, not mid-run
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, VideoError, ...
        return f"cannot be decoded ({type(e).__name__})"
    return None


# -----------------------------------------------------------------------------
# 3. Batches


@dataclass
class Batch:
    """One micro-batch as Flamingo.forward reads it: idx (B, T) token ids, targets (B, T) (the next token, or -1:
    no loss), and the batch's N media items in the order of their <image> tokens, row by row: images
    (N, F, 3, H, W) normalised pixels (a list of N (F_i, 3, H, W) when images and videos mix), or instead
    vision_features (N, F, S, D), the frozen tower's cached output for them (FeatureCache). Both None: no image."""
    idx: torch.Tensor
    targets: torch.Tensor
    images: torch.Tensor | list | None = None
    vision_features: torch.Tensor | None = None

    def to(self, device):
        def move(t):
            if isinstance(t, list):
                return [move(x) for x in t]
            return None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.idx), move(self.targets), move(self.images), move(self.vision_features))


def collate(samples, tokenizer, block_size, image_mean=CLIP_MEAN, image_std=CLIP_STD, features=None):
    """
    samples: list of (text markup or its ids, list of uint8 images (H, W, 3) or videos (F, H, W, 3)) -> Batch:
      images  (N, F, 3, H, W) float32, normalised, the N media items of the batch in the order of their
              <image> tokens, row by row (F = 1 for images); a list of (F_i, 3, H, W) where frame counts
              differ (no padding frames); None when N == 0
      idx     (B, T) long, T = the longest row (<= block_size), right-padded with <|endoftext|>
      targets (B, T) long, targets[b, t] = idx[b, t+1] where that token is chunk text, else -1
    Rows longer than block_size are cut, and with them the images whose <image> token was cut.
    features: a FeatureCache, when the samples' images are paths of images whose tower output it holds: the
    Batch then carries vision_features (N, 1, S, D) instead of pixels.
    """
    rows, images = [], []
    for text, imgs in samples:
        ids = tokenizer.encode_markup(text) if isinstance(text, str) else list(text)  # markup, or ids already
        assert ids.count(tokenizer.image_id) == len(imgs), f"{ids.count(tokenizer.image_id)} <image> tokens, {len(imgs)} images"
        ids = ids[:block_size]
        rows.append(ids)
        images += imgs[:ids.count(tokenizer.image_id)]  # the images whose <image> token survived
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), tokenizer.eot_id, dtype=torch.long)  # (B, T)
    is_real = torch.zeros(len(rows), T, dtype=torch.bool)                  # (B, T) False on padding
    for b, r in enumerate(rows):
        idx[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        is_real[b, :len(r)] = True
    is_target = chunk_mask(idx, tokenizer.image_id, tokenizer.eoc_id) & is_real
    targets = torch.full_like(idx, -1)
    targets[:, :-1] = torch.where(is_target[:, 1:], idx[:, 1:], -1)
    if not images:
        return Batch(idx, targets)
    if features is not None:
        return Batch(idx, targets, vision_features=features.lookup(images))
    counts = [1 if np.ndim(x) == 3 else len(x) for x in images]
    frames = normalize([f for x in images for f in (x[None] if np.ndim(x) == 3 else x)], image_mean, image_std)
    if len(set(counts)) == 1:
        return Batch(idx, targets, images=frames.view(len(images), counts[0], *frames.shape[1:]))  # (N, F, 3, H, W)
    return Batch(idx, targets, images=list(frames.split(counts)))  # N items (F_i, 3, H, W)


def batch_indices(step, micro_step, grad_accum, rank, world_size, batch_size):
    """
    The global sample indices of one micro-batch. Optimizer step `step` consumes the G
    samples step*G .. step*G + G-1, G = batch_size * grad_accum * world_size; rank r takes the
    r-th contiguous block of grad_accum * batch_size, one batch_size slice per micro-step.
    So 1 process with grad_accum=2 sees exactly the samples of 2 processes with grad_accum=1.
    """
    G = batch_size * grad_accum * world_size
    start = step * G + (rank * grad_accum + micro_step) * batch_size
    return range(start, start + batch_size)


def trim_dangling_images(tok, ids):
    """ids cut at a token budget, less any <image> at the end that has no text after it (only EOC / EOT)."""
    while tok.image_id in ids:
        last = len(ids) - 1 - ids[::-1].index(tok.image_id)
        if any(t not in (tok.eoc_id, tok.eot_id) for t in ids[last + 1:]):
            break
        ids = ids[:last]
    return ids


# -----------------------------------------------------------------------------
# 4. The shapes world as a source


class ShapesData:
    """The shapes world as a source: batch() draws the rows batch_indices names, each a pure function of (split,
    seed, row): one sample a row, or with pack=True samples packed to block_size tokens (shapes.packed_sample).
    video=True: the moving-shapes world's clips instead (shapes_video.py). opts go to the sample function (kind,
    qtype, ...)."""

    def __init__(self, split, seed, tokenizer, block_size, mean=CLIP_MEAN, std=CLIP_STD, pack=False, video=False,
                 **opts):
        self.split, self.seed, self.tok, self.block_size, self.pack, self.opts = split, seed, tokenizer, block_size, pack, opts
        self.mean, self.std = mean, std
        self.sample = shapes_video.video_sample if video else shapes.shapes_sample

    def batch(self, step, micro_step, grad_accum, rank, world_size, batch_size):
        indices = batch_indices(step, micro_step, grad_accum, rank, world_size, batch_size)
        if self.pack:
            samples = [shapes.packed_sample(self.split, self.seed, i, self.tok, self.block_size, sample=self.sample,
                                            **self.opts) for i in indices]
        else:
            samples = [self.sample(self.split, self.seed, i, **self.opts) for i in indices]
        return collate(samples, self.tok, self.block_size, self.mean, self.std)

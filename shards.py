"""
Real data in tar shards, in the webdataset layout: LAION-style image-text pairs (as img2dataset writes them) and
MMC4-style interleaved documents, the two kinds OpenFlamingo trains on.

Large datasets come as tar shards of a few thousand samples each: the members of one sample sit next to each other
and share a key, the path up to the first dot of the file name (000123.jpg, 000123.txt). A shard is read in one
streaming pass, each (rank, DataLoader worker) its own shards. A bad sample or shard is skipped and counted in a
Counter {reason: count}, never raised: a week-long run must not die on the one broken JPEG in a billion.

Samples here are (ids, images), not markup: encode_markup() would turn an "<image>" that a web page wrote into its
alt-text into the special token, and the images would no longer match the markers. So web text is encoded with
tokenizer.encode() (always plain text) and the special ids go where the format puts them.
"""

import base64
import glob
import os
import tarfile
from collections import Counter

import numpy as np
import torch

import files
from data import CLIP_MEAN, CLIP_STD, collate, load_image, trim_dangling_images

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class _Header(tarfile.TarInfo):
    """tarfile's header reader, but a header cut short (a file truncated inside one of its 512-byte blocks, or
    ending without tar's end-of-archive blocks) is an error: tarfile takes it for the archive's end, in silence."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError("truncated")
        return super().frombuf(buf, encoding, errors)


def tar_groups(path, skipped):
    """The members of the tar shard at `path` grouped by key, as webdataset groups consecutive members -> yields
    (key, {extension: bytes}), e.g. ("000123", {"jpg": ..., "txt": ...}); the extension is all after the first
    dot ("0.jpg" in "doc.0.jpg"). A shard that breaks off (truncated in a header or a member, not a tar, missing)
    is counted in `skipped`, with how many samples came out of it before the break; the sample being read at the
    break is lost with the rest (it may lack a member)."""
    key, group, n = None, {}, 0
    try:
        with tarfile.open(path, "r|*", tarinfo=_Header) as tar:  # stream mode: no index, no seeking, any compression
            for m in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the shard
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                k, _, ext = base.partition(".")
                if os.path.join(folder, k) != key and group:
                    yield key, group
                    group, n = {}, n + 1
                key = os.path.join(folder, k)
                group[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:  # OSError: a missing file, a bad gzip stream
        truncated = "truncated" in str(e) or "unexpected end" in str(e)
        skipped[f"shard truncated after {n} samples: {os.path.basename(path)}" if truncated else "bad shard"] += 1
        return
    if group:
        yield key, group


def read_pairs(paths, skipped, image_size=224):
    """Image-text pairs from tar shards as img2dataset writes them for LAION (key.jpg, key.txt, key.json)
    -> yields (key, caption, image): the caption is key.txt, else the "caption" field of key.json; image uint8
    (image_size, image_size, 3). Counted in `skipped`: no image, no caption, bad image, bad json, bad caption."""
    for path in paths:
        for key, group in tar_groups(path, skipped):
            img = next((group[e] for e in group if e.lower() in IMAGE_EXTS), None)
            try:
                d = {"caption": group["txt"].decode()} if "txt" in group else files.loads(group.get("json", b"{}"))
                caption = d.get("caption") if isinstance(d, dict) else None
                caption = caption.strip() if isinstance(caption, str) else ""
            except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
                skipped["bad caption" if "txt" in group else "bad json"] += 1
                continue
            if img is None or not caption:
                skipped["no image" if img is None else "no caption"] += 1
                continue
            try:
                yield key, caption, load_image(img, image_size)
            except ValueError:
                skipped["bad image"] += 1


def pair_to_ids(tokenizer, caption):
    """A pair's ids in OpenFlamingo's LAION format, <image>caption<|endofchunk|><|endoftext|>. The caption is
    plain text: a literal "<image>" in it stays text, so the ids hold exactly one <image> id."""
    return [tokenizer.image_id] + tokenizer.encode(caption) + [tokenizer.eoc_id, tokenizer.eot_id]


def doc_image(info, key, group):
    """The bytes of a document's image: inline (image_base64), else the group's member image_name, else None."""
    if info.get("image_base64"):
        return base64.b64decode(info["image_base64"])
    k, _, ext = os.path.basename(info.get("image_name", "")).partition(".")
    return group.get(ext) if k == os.path.basename(key) else None


def read_docs(paths, skipped, image_size=224, sim_threshold=0.24, max_images=6):
    """
    MMC4-style interleaved documents from tar shards. Each key.json is one document:
      {"text_list": [sentence, ...], "image_info": [{"image_name": "key.0.jpg", "matched_text_index": i,
       "matched_sim": s, "image_base64": "..." (optional)}, ...]}
    An image is inline (image_base64) or the member image_name, which must share the document's key (doc7.json,
    doc7.0.jpg, ...: tar_groups groups by key). As OpenFlamingo: images with matched_sim < sim_threshold are
    dropped, one image per sentence, at most max_images. Yields (key, sentences, images), images
    {sentence index: uint8 (S, S, 3)} in sentence order, S = image_size. Counted in `skipped`: images below
    sim_threshold, bad or missing images, bad json, bad documents, documents left with no image.
    """
    for path in paths:
        for key, group in tar_groups(path, skipped):
            try:
                doc = files.loads(group["json"])
            except (KeyError, ValueError):  # no key.json, or not JSON
                skipped["bad json"] += 1
                continue
            images = {}
            try:
                sentences = doc["text_list"]
                if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences):
                    raise TypeError("text_list is not a list of strings")
                # in sentence order, so that max_images keeps the first images of the text (OpenFlamingo keeps
                # image_info's order, for this cut and for its list of images, and it can differ from the text's)
                infos = sorted((i for i in doc["image_info"] if i["matched_sim"] >= sim_threshold),
                               key=lambda i: i["matched_text_index"])
                skipped["image below sim_threshold"] += len(doc["image_info"]) - len(infos)
                for info in infos:
                    t = info["matched_text_index"]
                    if len(images) == max_images or t in images or not 0 <= t < len(sentences):
                        continue
                    raw = doc_image(info, key, group)
                    if raw is None:
                        skipped["missing image"] += 1
                        continue
                    try:
                        images[t] = load_image(raw, image_size)
                    except ValueError:  # binascii.Error (bad base64) is one too
                        skipped["bad image"] += 1
            except (KeyError, TypeError, ValueError, AttributeError):
                skipped["bad document"] += 1
                continue
            if not images:
                skipped["document with no image"] += 1
                continue
            yield key, sentences, images


def doc_to_ids(tokenizer, sentences, images, max_tokens=256):
    """A document -> (ids, list of images), as OpenFlamingo builds it: the sentences joined by spaces, each
    image's <image> right before its sentence, <|endofchunk|> closing each chunk (an <image> and the text up to
    the next <image>), <|endoftext|> last, then cut to max_tokens. An <image> that the cut leaves with no text
    goes too: one image per <image> id left, maybe none. (OpenFlamingo also drops half of the single-image
    documents at random; we keep them.)"""
    tok, ids, kept = tokenizer, [], []
    for i, s in enumerate(sentences):
        if i in images:
            ids += ([tok.eoc_id] if kept else []) + [tok.image_id]
            kept.append(images[i])
        elif ids:
            s = " " + s
        ids += tok.encode(s)
    ids = trim_dangling_images(tok, (ids + [tok.eoc_id, tok.eot_id])[:max_tokens])
    return ids, kept[:ids.count(tok.image_id)]


def split_shards(paths, rank=0, world_size=1, worker_id=0, num_workers=1):
    """The shards of one reader: reader r = rank * num_workers + worker_id of R = world_size * num_workers reads
    shards r, r + R, r + 2R, ... of the sorted paths, so one pass of all readers reads each shard exactly once.
    Fewer shards than readers is a ValueError, not readers that silently get nothing (a rank with no data
    would stall the others in DDP's all-reduce). Candid: readers may still get unequal numbers of samples;
    a training loop must stop by step count, not at the end of a reader."""
    R, r = world_size * num_workers, rank * num_workers + worker_id
    if len(paths) < R:
        raise ValueError(f"{len(paths)} shards for {R} readers ({world_size} ranks x {num_workers} "
                         "DataLoader workers): give at least one shard per reader, or use fewer workers")
    return sorted(paths)[r::R]


class ShardDataset(torch.utils.data.IterableDataset):
    """
    Samples (ids, images) from tar shards: kind "pairs" (read_pairs, pair_to_ids) or "docs" (read_docs,
    doc_to_ids; a document with no image left within max_tokens is skipped). Each (rank, DataLoader worker)
    reads its own shards (split_shards, get_worker_info()): over all ranks every sample comes once an epoch.
    Use DataLoader(ds, batch_size=None, num_workers=n). Candid: workers are processes whose `skipped` counts
    the main process never sees, so each reader logs its summary() when its shards end.
    """

    def __init__(self, paths, kind, tokenizer, rank=0, world_size=1, image_size=224,
                 max_tokens=256, sim_threshold=0.24, max_images=6, log=print):
        assert kind in ("pairs", "docs"), f"unknown kind {kind!r}; known: 'pairs', 'docs'"
        self.paths, self.kind, self.tok, self.rank, self.world_size = list(paths), kind, tokenizer, rank, world_size
        self.image_size, self.max_tokens, self.log = image_size, max_tokens, log
        self.doc_opts = dict(sim_threshold=sim_threshold, max_images=max_images)
        self.skipped, self.n = Counter(), 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        paths = split_shards(self.paths, self.rank, self.world_size, worker, workers)
        if self.kind == "pairs":
            for _, caption, image in read_pairs(paths, self.skipped, self.image_size):
                self.n += 1
                yield pair_to_ids(self.tok, caption), [image]
        else:
            for _, sentences, images in read_docs(paths, self.skipped, self.image_size, **self.doc_opts):
                ids, ims = doc_to_ids(self.tok, sentences, images, self.max_tokens)
                if not ims:
                    self.skipped["no image within max_tokens"] += 1
                    continue
                self.n += 1
                yield ids, ims
        self.log(f"rank {self.rank} worker {worker}, {len(paths)} shards: {self.summary()}")

    def summary(self):
        """'1200 samples; skipped: 3 bad image, 1 bad shard' (counts since this object was made)."""
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()) if n) or "nothing"
        return f"{self.n} samples; skipped: {skips}"


def pack(samples, block_size, open_rows=8):
    """Samples (ids, images) -> rows (ids, images) of at most block_size tokens, each sample whole in one row:
    OpenFlamingo pads each caption to its batch's longest and each document to 256 tokens; we fill rows instead.
    First fit over a few open rows: a sample goes into the first open row with room for it, else into a new one;
    when more than open_rows are open, the oldest goes out (open_rows=1: each row closed as soon as a sample does
    not fit). A sample alone longer than block_size makes a row of its own, which collate() cuts."""
    rows = []  # the open rows: [ids, images]
    for sample_ids, sample_images in samples:
        row = next((r for r in rows if len(r[0]) + len(sample_ids) <= block_size), None)
        if row is None:
            row = [[], []]
            rows.append(row)
        row[0] += sample_ids
        row[1] += sample_images
        if len(rows) > open_rows:
            yield tuple(rows.pop(0))
    for row in rows:
        yield tuple(row)


def as_is(sample):
    return sample


class ShardStream:
    """
    Training rows from tar shards for train.py: "pairs" or "docs" (ShardDataset) read by a DataLoader with
    num_workers processes, packed into rows of block_size tokens as they come (a sample that does not fit
    starts the next row), endlessly: when this rank's shards end, the next epoch reads them again. Each rank
    reads its own shards (split_shards), so unlike the shapes world and folders the rows depend on the number
    of processes. Samples pass through a shuffle buffer (as webdataset's .shuffle(n)): each comes out at a random
    place among the next `shuffle` ones, drawn with a generator seeded by (seed, rank). A resumed run skips the
    rows the first run consumed, reading them again (exact, since the DataLoader returns its workers' samples in
    a fixed order and the buffer is seeded, but it costs the time to decode them).
    """

    def __init__(self, kind, pattern, tokenizer, block_size, image_size=224, rank=0, world_size=1, num_workers=0,
                 shuffle=0, seed=0, log=print, mean=CLIP_MEAN, std=CLIP_STD, **reader_opts):
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise ValueError(f"no shard matches {pattern!r}")
        self.tok, self.block_size, self.num_workers, self.log = tokenizer, block_size, num_workers, log
        self.mean, self.std = mean, std
        self.dataset = ShardDataset(paths, kind, tokenizer, rank, world_size, image_size, max_tokens=block_size,
                                    log=log, **reader_opts)
        split_shards(paths, rank, world_size, 0, max(1, num_workers))  # too few shards: an error now, not mid-run
        self.shuffle, self.rng = shuffle, np.random.default_rng([seed, rank])
        self.stream = self.rows()

    def shuffled(self):
        """The samples through the shuffle buffer: a full buffer gives out a random one of its samples."""
        buffer = []
        for sample in self.samples():
            buffer.append(sample)
            if len(buffer) > self.shuffle:
                yield buffer.pop(int(self.rng.integers(len(buffer))))

    def samples(self):
        while True:
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                 collate_fn=as_is)  # not default_convert: images stay uint8 arrays
            n = 0
            for sample in loader:
                n += 1
                yield sample
            if n == 0:
                raise ValueError(f"{self.dataset.kind} shards: an epoch gave no usable sample (see the log above)")

    def rows(self):
        yield from pack(self.shuffled(), self.block_size)

    def skip(self, n):
        """Consume n rows (a resumed run: the rows its first run had trained on)."""
        for _ in range(n):
            next(self.stream)

    def batch(self, step, micro_step, grad_accum, rank, world_size, batch_size):
        """The next batch_size rows of this rank's stream (collate), whatever the step: a source like the others,
        but one whose rows come in the order the shards are read."""
        return collate([next(self.stream) for _ in range(batch_size)], self.tok, self.block_size, self.mean, self.std)

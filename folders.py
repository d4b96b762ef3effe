"""
Dataset folders: your own data, in the format eval.py reads too. A folder holds train.jsonl (training data, and
the pool of demonstrations for eval) and test.jsonl (and optionally val.jsonl), one JSON object per line, image
paths relative to the folder:

    {"image": "a.jpg", "captions": ["a red circle", ...]}                  a caption line
    {"image": "a.jpg", "question": "what color?", "answers": ["red"]}      a question line
    {"chunks": [{"text": "..."}, {"image": "a.jpg"}, {"text": "..."}]}    an interleaved document (training only)

A caption or question line may have "video": "clips/0001.mp4" instead of "image": a media item of its frames (at
1 FPS, at most 8: video.py), in the same place of the prompt.

1. read_folder: the lines, each bad one a counted skip with its file and line number.
2. FolderData: training rows from them, in OpenFlamingo's prompt formats, a source for train.py (data.Batch).
3. FeatureCache: the frozen tower's output for a folder's images (and videos' frames), computed once, kept on disk.
"""

import json
import os
from collections import Counter

import numpy as np
import torch

import files
import video
from data import CLIP_MEAN, CLIP_STD, batch_indices, collate, decode_error, load_image_file, normalize, \
    trim_dangling_images
from tokenizer import CAPTION, VQA

# -----------------------------------------------------------------------------
# 1. Reading a folder


def folder_image(folder, name, check=False):
    """The absolute path of image (or video) `name` of a dataset folder; ValueError when it is absolute, leaves the folder
    (by "..", or by a symbolic link whose target is outside it), is missing, or (check=True) cannot be decoded."""
    if not isinstance(name, str) or not name:
        raise ValueError("no image path")
    what = "video" if video.is_video(name) else "image"
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
        raise ValueError(f"{what} path {name!r} leaves the folder")
    path = os.path.join(os.path.abspath(folder), os.path.normpath(name))
    if not os.path.isfile(path):
        raise ValueError(f"{what} {name!r} not found")
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:  # a link (of the file or a folder on its way)
        raise ValueError(f"{what} {name!r} links to a file outside the folder")
    why = check and decode_error(path)
    if why:
        raise ValueError(f"{what} {name!r} {why}")
    return path


def texts(value, field):
    """A non-empty list of non-empty strings from a string or a list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise ValueError(f"{field!r} must be a string or a list of strings")
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise ValueError(f"empty {field!r}")
    return items


def doc_chunks(folder, chunks, check):
    """A document's "chunks" list -> [("image", path) or ("text", str)], in its order. Empty texts are dropped;
    a document must have an image with some text after it (else it teaches nothing: labels start at an image)."""
    if not isinstance(chunks, list) or not chunks:
        raise ValueError("'chunks' must be a non-empty list")
    items = []
    for k, c in enumerate(chunks):
        if isinstance(c, dict) and "image" in c:
            items.append(("image", folder_image(folder, c["image"], check)))
        elif isinstance(c, dict) and isinstance(c.get("text"), str):
            if c["text"].strip():
                items.append(("text", c["text"].strip()))
        else:
            raise ValueError(f"chunk {k} is not {{\"image\": ...}} or {{\"text\": ...}}")
    kinds = [k for k, _ in items]
    if "image" not in kinds or "text" not in kinds[kinds.index("image"):]:
        raise ValueError("no image followed by text")
    return items


LINE_KINDS = {"question": "vqa", "captions": "captions", "chunks": "docs"}  # the field that tells a line's kind


def read_folder(folder, split="train", kind=None, log=print, check_images=False):
    """
    The examples of `folder/{split}.jsonl`, one JSON object per line, image paths relative to the folder:
      captions  {"image": "a.jpg", "captions": ["a red circle", ...]}      (a single string is accepted)
      vqa       {"image": "a.jpg", "question": "what color?", "answers": ["red", ...]}   ("video": "a.mp4" as well)
      docs      {"chunks": [{"text": "..."}, {"image": "a.jpg"}, {"text": "..."}, ...]}   (training only)
    -> a list of dicts: id ("{split}:{line}" unless the line has an "id"), kind, line, and image (absolute path) with
    captions, or question and answers, or chunks (doc_chunks). `kind` (or a tuple of kinds) keeps those lines
    and skips the others. A bad line (not JSON, a missing or empty field, an image path that leaves the folder,
    a missing image, or with check_images an undecodable one) is skipped and reported with its file and line
    number; no usable line at all is an error.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or LINE_KINDS.values())
    path = os.path.join(folder, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a dataset folder holds train.jsonl and test.jsonl (README)")
    from tqdm import tqdm
    examples, skipped = [], 0
    with open(path, "rb") as f:
        lines = f.read().splitlines()  # bytes: a line that is not UTF-8 is one bad line, not a crash
    # decoding every image is the long part of a large folder: a progress bar then
    for n, line in enumerate(tqdm(lines, desc=f"{path}: images", disable=not check_images or len(lines) < 500), 1):
        if not line.strip():
            continue
        try:
            try:
                d = files.loads(line.decode("utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e.msg})") from None  # (nested too deep: ValueError as it is)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            line_kind = next((k for field, k in LINE_KINDS.items() if field in d), None)
            if line_kind not in kinds:
                raise ValueError(f"not a {' or '.join(kinds)} line (fields: {sorted(d)})")
            ex = {"id": d.get("id", f"{split}:{n}"), "kind": line_kind, "line": n}
            if line_kind == "docs":
                ex["chunks"] = doc_chunks(folder, d["chunks"], check_images)
            else:  # an image, or a video (its path, as an image's: data.load_image_file reads either)
                ex["image"] = folder_image(folder, d.get("image", d.get("video")), check_images)
            if line_kind == "vqa":
                ex["question"] = texts(d["question"], "question")[0]
                ex["answers"] = texts(d.get("answers", d.get("answer")), "answers")
            elif line_kind == "captions":
                ex["captions"] = texts(d["captions"], "captions")
            examples.append(ex)
        except (ValueError, TypeError) as e:
            skipped += 1
            log(f"{path}:{n}: skipped: {e}")
    if skipped:
        log(f"{path}: {len(examples)} examples, {skipped} lines skipped")
    if not examples:
        raise ValueError(f"{path}: no usable {' or '.join(kinds)} example ({skipped} lines skipped)")
    return examples


# -----------------------------------------------------------------------------
# 2. Training rows


class FolderData:
    """
    Training rows from dataset folders (read_folder), in the prompt format eval.py uses. Each example becomes a
    unit of ids and image paths: a caption line one CAPTION chunk (one of its captions), a question line one
    VQA chunk (one of its answers), a document its chunks as OpenFlamingo joins MMC4's (each <image> opens a
    chunk, <|endofchunk|> closes it, texts that follow each other joined by a space, <|endoftext|> last).
    A row packs units of one folder while they fit in block_size tokens, then <|endoftext|>: consecutive
    caption or question chunks make a few-shot sequence, as eval's prompts are (demonstrations, then query).

    The rows are a pure function of (seed, row index): epoch e shuffles the examples (and draws each one's
    caption or answer) with seed (seed, e) and packs them greedily, so each example is used once per epoch and
    a resumed or re-sharded run sees the same rows (batch_indices gives rows to ranks, as for the shapes world).
    Over-long units are cut (documents, at a chunk's end where possible) or skipped (a caption or question
    that does not fit in a row), counted; an image that cannot be read at batch time (deleted or changed
    since the start) drops its unit from that row, counted and logged.
    """

    def __init__(self, folder, split, tokenizer, block_size, image_size, seed=0, log=print, check_images=True,
                 mean=CLIP_MEAN, std=CLIP_STD):
        self.tok, self.block_size, self.image_size, self.seed, self.log = tokenizer, block_size, image_size, seed, log
        self.mean, self.std = mean, std
        self.features = None  # a FeatureCache of this folder's images: rows then carry paths, batches features
        self.units = []  # per example: its options, each (ids, image paths): one per caption or answer
        self.skipped = Counter()
        for ex in read_folder(folder, split, log=log, check_images=check_images):
            options = [u for u in self.example_units(ex) if u is not None]
            if not options:
                self.skipped["longer than block_size"] += 1
                log(f"{os.path.join(folder, split)}.jsonl:{ex['line']}: skipped: longer than block_size ({block_size})")
                continue
            self.units.append(options)
        if not self.units:
            raise ValueError(f"{folder}/{split}.jsonl: no example fits in block_size {block_size}")
        self.epochs = []  # the rows of each epoch computed so far

    def example_units(self, ex):
        tok, room = self.tok, self.block_size - 1  # 1 for the row's <|endoftext|>
        if ex["kind"] == "captions":
            units = [(tok.encode_template(CAPTION, caption=c), [ex["image"]]) for c in ex["captions"]]
        elif ex["kind"] == "vqa":
            units = [(tok.encode_template(VQA, question=ex["question"], answer=a), [ex["image"]])
                     for a in ex["answers"]]
        else:  # a document
            ids, images, text_last = [], [], False
            for what, x in ex["chunks"]:
                if what == "image":
                    ids += ([tok.eoc_id] if images and text_last else []) + [tok.image_id]
                    images.append(x)
                else:
                    ids += tok.encode((" " if text_last else "") + x)
                text_last = what == "text"
            ids = ids + [tok.eoc_id, tok.eot_id]
            if len(ids) > room:
                self.skipped["document cut to block_size"] += 1
                ids = trim_dangling_images(tok, ids[:room])
            units = [(ids, images[:ids.count(tok.image_id)])] if tok.image_id in ids else []
        return [u if len(u[0]) <= room else None for u in units]

    def epoch_rows(self, epoch):
        """The rows of one epoch: lists of (example, option) packed greedily in a seeded order."""
        rng = np.random.default_rng([self.seed, epoch])
        rows, row, n = [], [], 0
        for e in rng.permutation(len(self.units)):
            o = int(rng.integers(len(self.units[e])))
            length = len(self.units[e][o][0])
            if row and n + length > self.block_size - 1:
                rows.append(row)
                row, n = [], 0
            row.append((int(e), o))
            n += length
        return rows + [row]

    def row(self, index, tries=100):
        """Row `index` of the endless stream of epochs -> (ids, list of uint8 images). A row whose every image
        fails (deleted since the start) is replaced by the next one: a row with no target would give a NaN loss."""
        for i in range(index, index + tries):
            ids, images = self.row_as_is(i)
            if ids:
                return ids + [self.tok.eot_id], images
        raise RuntimeError(f"rows {index}..{index + tries - 1}: no image could be read (see the log)")

    def row_as_is(self, index):
        epoch = 0
        while True:
            if epoch == len(self.epochs):
                self.epochs.append(self.epoch_rows(epoch))
            if index < len(self.epochs[epoch]):
                break
            index -= len(self.epochs[epoch])
            epoch += 1
        ids, images = [], []
        for e, o in self.epochs[epoch][index]:
            unit_ids, paths = self.units[e][o]
            if self.features is not None:  # the images' cached features are looked up by path in batch()
                ids, images = ids + unit_ids, images + paths
                continue
            try:
                unit_images = [load_image_file(p, self.image_size) for p in paths]
            except (OSError, ValueError) as err:
                self.skipped["image unreadable at batch time"] += 1
                self.log(f"skipped an example of row {index} of epoch {epoch}: {err}")
                continue
            ids += unit_ids
            images += unit_images
        return ids, images

    def batch(self, step, micro_step, grad_accum, rank, world_size, batch_size):
        """One micro-batch (collate): the rows batch_indices names."""
        indices = batch_indices(step, micro_step, grad_accum, rank, world_size, batch_size)
        return collate([self.row(i) for i in indices], self.tok, self.block_size, self.mean, self.std, self.features)

    def drop_images(self, bad):
        """Drop the examples that use an image of `bad` ({path: why}), counted and logged. Under DDP each rank
        decodes a share of the images (check_images=False here) and all drop what any rank found (train.py)."""
        keep = [options for options in self.units if not any(p in bad for _, paths in options for p in paths)]
        for p in sorted({p for options in self.units for _, paths in options for p in paths if p in bad}):
            self.log(f"{p}: skipped: {bad[p]}")
        self.skipped["image cannot be decoded"] += len(self.units) - len(keep)
        if not keep:
            raise ValueError("no example with an image that can be decoded")
        self.units = keep

    def image_paths(self):
        return sorted({p for options in self.units for _, paths in options for p in paths})

    def summary(self):
        """'420 examples; skipped: 2 longer than block_size' (the lines read_folder skipped are logged there)."""
        skips = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()) if n) or "nothing"
        return f"{len(self.units)} examples; skipped: {skips}"


def undecodable(readers, rank=0, world_size=1, progress=False):
    """{path: why} for the images of FolderData `readers` (None skipped) that this rank checks: every
    world_size-th of them, sorted, from the rank-th on."""
    from tqdm import tqdm
    paths = sorted({p for r in readers if r for p in r.image_paths()})[rank::world_size]
    return {p: why for p in tqdm(paths, "checking images", disable=not progress or len(paths) < 500)
            if (why := decode_error(p))}


def open_folder(folder, tokenizer, block_size, image_size, seed=0, log=print, mean=CLIP_MEAN, std=CLIP_STD,
                rank=0, world_size=1, all_gather=None):
    """A folder's (training rows, validation rows, the validation split's name): its val.jsonl, else test.jsonl,
    else none (None, None). Every image is decoded here, once, so that a bad one is dropped now (logged) and a
    folder with nothing usable is an error now (ValueError), not mid-run. Under DDP (all_gather: torch.distributed's
    all_gather_object) each rank decodes a share of the images and all drop what any rank could not decode."""
    val_split = next((s for s in ("val", "test") if os.path.isfile(os.path.join(folder, f"{s}.jsonl"))), None)
    rows = [FolderData(folder, split, tokenizer, block_size, image_size, seed, log, check_images=all_gather is None,
                       mean=mean, std=std) if split else None for split in ("train", val_split)]
    if all_gather is not None:
        found = [None] * world_size
        all_gather(found, undecodable(rows, rank, world_size, progress=rank == 0))
        for r in filter(None, rows):
            r.drop_images({p: why for d in found for p, why in d.items()})
    return rows[0], rows[1], val_split


# -----------------------------------------------------------------------------
# 3. The feature cache


class FeatureCache:
    """
    The frozen vision tower's output for a set of image (and video) files, computed once and kept on disk, so that
    later epochs, and later runs, skip the tower (with a frozen tower and no augmentation its output never changes).
    `path` is an .npy file read as a memmap, (frames, S, D): one row per image, F rows per video (its frames in
    order), next to `path`.json naming the files, their frame counts and the tower (`key`); a cache that does not
    match is computed again. Written atomically (a .part file, then a rename). encode: a function (n, 3, H, W)
    normalised pixels -> (n, S, D) features.
    """

    def __init__(self, path, image_paths, encode, image_size, key, mean=CLIP_MEAN, std=CLIP_STD, batch_size=32,
                 dtype=np.float32, log=print):
        from tqdm import tqdm
        paths = sorted(set(image_paths))
        if not paths:
            raise ValueError("no images to compute features of")
        if os.path.exists(path) and os.path.exists(path + ".json"):
            with open(path + ".json", "rb") as f:
                try:
                    meta = files.loads(f.read())
                except ValueError:  # torn or not ours: computed again
                    meta = None
            if isinstance(meta, dict) and meta.get("key") == key and meta.get("images") == paths:
                self.array = np.load(path, mmap_mode="r")
                self.set_index(paths, meta["frames"])
                log(f"vision features of {len(paths)} images: {path} (cached)")
                return
        # each file's frames first (a video's from its headers: video.read_frames(count_only=True)), so that the
        # array has its final size from the start
        frames = [video.read_frames(p, count_only=True) if video.is_video(p) else 1 for p in paths]
        out, row = None, 0
        for i in tqdm(range(0, len(paths), batch_size), desc="vision features (once)"):
            media = [load_image_file(p, image_size) for p in paths[i:i + batch_size]]      # (H, W, 3) or (F, H, W, 3)
            x = normalize([f for m in media for f in (m[None] if m.ndim == 3 else m)], mean, std)  # (n, 3, H, W)
            with torch.no_grad():
                feats = encode(x).float().cpu().numpy()                                          # (n, S, D)
            if out is None:
                out = np.lib.format.open_memmap(path + ".part", mode="w+", dtype=dtype,
                                                shape=(sum(frames), *feats.shape[1:]))
                if hasattr(os, "posix_fallocate"):  # the disk space now: a full disk is an OSError here, not a
                    with open(path + ".part", "r+b") as f:  # SIGBUS when a page of the (sparse) map is written
                        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path + ".part"))
            out[row:row + len(feats)] = feats
            row += len(feats)
        out.flush()
        del out
        os.replace(path + ".part", path)
        with open(path + ".json.part", "w") as f:
            json.dump({"key": key, "images": paths, "frames": frames}, f)
        os.replace(path + ".json.part", path + ".json")
        self.array = np.load(path, mmap_mode="r")
        self.set_index(paths, frames)
        log(f"vision features of {len(paths)} images: {path} ({self.array.nbytes / 1e6:.0f} MB)")

    def set_index(self, paths, frames):
        starts = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(int).tolist()
        self.index = {p: (s, f) for p, s, f in zip(paths, starts, frames)}  # path -> (first row, frames)

    def lookup(self, paths):
        """Files' paths -> their features: (N, F, S, D) float32, or a list of (F_i, S, D) where frame counts differ."""
        feats = [torch.from_numpy(np.ascontiguousarray(self.array[s:s + f])).float()
                 for s, f in (self.index[p] for p in paths)]
        return torch.stack(feats) if len({len(x) for x in feats}) == 1 else feats


def share_feature_cache(readers, path, encode, image_size, key, mean=CLIP_MEAN, std=CLIP_STD, dtype=np.float32,
                        master=True, barrier=None, log=print):
    """One FeatureCache (its arguments as above) for the images of every FolderData of `readers`, which then give
    features instead of pixels. Under DDP the master computes it (in `dtype`) while the others wait at `barrier`,
    then they read the master's file (its key matches)."""
    args = (path, [p for r in readers for p in r.image_paths()], encode, image_size, key, mean, std)
    cache = FeatureCache(*args, dtype=dtype, log=log) if master else None
    if barrier is not None:
        barrier()
    cache = cache or FeatureCache(*args, log=log)
    for r in readers:
        r.features = cache


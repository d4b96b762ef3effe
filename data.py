"""
Data for Flamingo: tokenizers, the shapes world, batching and label masking.

Read top to bottom:
1. Tokenizers. tiktoken for everything. The LM's own vocabulary comes first; the two
   Flamingo tokens <image> and <|endofchunk|> are appended after it (DESIGN.md section 5).
2. The shapes world (DESIGN.md section 6): 64x64 images of 1-3 colored shapes with
   captions, questions and task-by-example sequences. Needs no network; it is the default.
3. Sequences to tensors: tokenise, truncate, mask the labels (DESIGN.md section 7) and
   split a global batch deterministically over ranks and micro-steps.
4. Files: a resumable, atomic downloader, and datasets kept in a folder (train.jsonl / test.jsonl).
5. Real data in tar shards (webdataset layout): LAION-style image-text pairs and MMC4-style documents,
   split over ranks and DataLoader workers, bad samples and shards skipped and counted.

A *sample* is (text, images): `text` is markup, a string in which "<image>" marks where an
image sits and "<|endofchunk|>" ends the text that belongs to it; `images` is a list of
uint8 arrays (H, W, 3), in the order of the <image> markers. Real data (section 5) comes as (ids, images)
instead: web text may contain the characters "<image>", which must stay text.
"""

import base64
import functools
import io
import json
import os
import re
import tarfile
import unicodedata
from collections import Counter

import numpy as np
import tiktoken
import torch

# -----------------------------------------------------------------------------
# 1. Tokenizers

IMAGE, EOC, EOT = "<image>", "<|endofchunk|>", "<|endoftext|>"

# CLIP's pixel statistics (open_clip's OPENAI_DATASET_MEAN / _STD), for collate()
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Tokenizer:
    """
    A tiktoken Encoding plus the two Flamingo tokens, appended after the LM's vocabulary:
    image_id = lm_vocab_size, eoc_id = lm_vocab_size + 1, n_vocab = lm_vocab_size + 2.
    encode() is for plain text and never yields a special id: a caption that contains the
    characters "<image>" stays text. encode_markup() is the one explicit way to get them.
    """

    def __init__(self, name, base, lm_vocab_size=None, new_tokens=(IMAGE, EOC), hf=None):
        lm_vocab_size = base.n_vocab if lm_vocab_size is None else lm_vocab_size
        assert lm_vocab_size >= base.n_vocab, f"lm_vocab_size {lm_vocab_size} < tokenizer's {base.n_vocab}"
        self.name = name
        self.eot_id = base.eot_token
        # the new tokens follow the LM's vocabulary in the order given: ours (<image>, <|endofchunk|>), or
        # OpenFlamingo's (<|endofchunk|>, <image>, <PAD>) = 50277, 50278, 50279 after GPT-NeoX's 50277
        self.new_tokens = tuple(new_tokens)
        self.image_id = lm_vocab_size + self.new_tokens.index(IMAGE)
        self.eoc_id = lm_vocab_size + self.new_tokens.index(EOC)
        self.n_vocab = lm_vocab_size + len(self.new_tokens)
        self.hf = hf  # a converted Hugging Face tokenizer's extras (HFExtras), or None
        # ids in [base.n_vocab, lm_vocab_size) are embedding rows with no token (padded LMs)
        self.base_n_vocab = base.n_vocab
        # the tiktoken README's way to extend an encoding with new special tokens
        self.enc = tiktoken.Encoding(
            name=f"{base.name}_flamingo",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **{t: lm_vocab_size + i for i, t in enumerate(self.new_tokens)}},
        )

    def encode(self, text):
        """Plain text -> ids. Special-token strings in `text` are encoded as ordinary text."""
        if self.hf is None:
            return self.enc.encode_ordinary(text)
        return self.hf.encode(text, self.enc.encode_ordinary)

    def encode_markup(self, text):
        """Markup -> ids: "<image>", "<|endofchunk|>" and "<|endoftext|>" become their special ids."""
        if self.hf is None:
            return self.enc.encode(text, allowed_special={IMAGE, EOC, EOT}, disallowed_special=())
        ids, specials = [], {IMAGE: self.image_id, EOC: self.eoc_id, EOT: self.eot_id}
        for i, piece in enumerate(re.split(f"({re.escape(IMAGE)}|{re.escape(EOC)}|{re.escape(EOT)})", text)):
            ids += [specials[piece]] if i % 2 else self.encode(piece)
        return ids

    def decode(self, ids):
        """ids -> str; special ids render as their markup. Ids with no token (padding rows) are dropped."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i < self.base_n_vocab or i >= self.n_vocab - len(self.new_tokens)]
        if self.hf is not None:
            return self.hf.decode(ids, self.enc.decode_bytes)
        return self.enc.decode(ids, errors="replace")


def bytes_encoding():
    """256 byte tokens, no merges: id i is byte i; <|endoftext|> = 256. Offline, tiny vocabulary."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]{1,64}",  # pieces of up to 64 characters; with no merges the split is irrelevant
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


def gpt2_encoding():
    """GPT-2's BPE. tiktoken downloads it once and caches it (TIKTOKEN_CACHE_DIR)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, a timeout, a bad cache file...
        raise RuntimeError(
            "could not load the 'gpt2' tokenizer: tiktoken tried to download vocab.bpe and "
            "encoder.json from openaipublic.blob.core.windows.net and failed "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Either set TIKTOKEN_CACHE_DIR to a "
            "directory holding tiktoken's cached files (copied from a machine where "
            "tiktoken.get_encoding('gpt2') ran once), or use the tokenizer 'bytes'."
        ) from None


GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(word_counts, max_merges):
    """Byte-pair encoding (Sennrich et al. 2016) learned from {word bytes: count}: repeatedly merge the most
    frequent adjacent pair. Returns tiktoken's mergeable_ranks: the 256 bytes, then each merge in order."""
    ranks = {bytes([i]): i for i in range(256)}
    words = {tuple(bytes([b]) for b in w): c for w, c in word_counts.items()}
    for _ in range(max_merges):
        pairs = {}
        for parts, c in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken by the bytes: deterministic
        ranks[a + b] = len(ranks)
        new = {}
        for parts, c in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return ranks


def shapes_encoding():
    """A small BPE learned offline from the shapes world's own text, so that every word of its vocabulary
    ("circle", " answer", "Question", ...) is one token: sequences 3-4x shorter than bytes, and each
    answer a single choice. Byte fallback keeps any other text encodable. <|endoftext|> follows the merges."""
    import regex
    counts = {}
    for i in range(2000):  # a fixed mix: the merges must not change when KIND_MIX does (they do if the scene rules do)
        text = shapes_sample("train", 0, i, mix=TOKENIZER_MIX)[0].replace(IMAGE, " ").replace(EOC, " ").replace(EOT, " ")
        for w in regex.findall(GPT2_SPLIT, text):
            counts[w.encode()] = counts.get(w.encode(), 0) + 1
    ranks = train_bpe(counts, max_merges=1000)
    return tiktoken.Encoding(name="shapes", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


class HFExtras:
    """What a Hugging Face tokenizer.json does beyond its BPE, done around the tiktoken Encoding:
    - its normalizer (NFC for GPT-NeoX), applied first;
    - its added tokens, found in the text before anything else, longest first (GPT-NeoX adds runs of 2 to 24
      spaces as tokens 50254-50276: "a" + 5 spaces + "b" is "a", a 4-space token, " b" there, not BPE's
      split); special ones (<|endoftext|>) stay text in encode(), as for every tokenizer here;
    - ids: tiktoken merges the pair whose joined bytes has the lowest rank, so its ranks must follow the
      merge order; where the file's ids do not, ranks are the merge order and `to_id` maps them back."""

    def __init__(self, nfc, added, special, to_id):
        self.nfc, self.added, self.to_id = nfc, added, to_id
        self.names = {i: t for t, i in {**added, **special}.items()}  # ids decode() writes out whole
        self.from_id = None if to_id is None else {i: r for r, i in enumerate(to_id)}
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    def encode(self, text, encode_ordinary):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = self.split.split(text) if self.split else [text]
        ids = []
        for i, piece in enumerate(pieces):  # odd pieces are added tokens
            if i % 2:
                ids.append(self.added[piece])
            elif piece:
                ranks = encode_ordinary(piece)
                ids += ranks if self.to_id is None else [self.to_id[r] if r < len(self.to_id) else r for r in ranks]
        return ids

    def decode(self, ids, decode_bytes):
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self.names:  # an added, special or new token ends a run of BPE ids
                out.append(decode_bytes([self.from_id.get(j, j) if self.from_id else j for j in run])
                           .decode("utf-8", errors="replace"))
                run = []
                if i is not None:
                    out.append(self.names[i])
            else:
                run.append(i)
        return "".join(out)


def byte_level_alphabet():
    """GPT-2's map from bytes to the printable characters byte-level BPE files store tokens in
    (printable Latin-1 bytes stand for themselves; the rest are shifted to 256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return {c: b for b, c in chars.items()}


def hf_bpe_tokenizer(path, lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
    """A Hugging Face byte-level BPE tokenizer.json (GPT-NeoX, GPT-2, Llama-3, Qwen2, SmolLM2) -> Tokenizer
    on a tiktoken Encoding, giving the ids the `tokenizers` library gives (tests/test_tokenizer.py)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise NotImplementedError(f"{path}: only byte-level BPE tokenizers are supported")
    if norm is not None and norm.get("type") != "NFC":
        raise NotImplementedError(f"{path}: normalizer {norm.get('type')!r} (only NFC or none)")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_SPLIT
    elif kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex") \
            and steps[0].get("behavior") == "Isolated" and not steps[1].get("add_prefix_space"):
        pattern = steps[0]["pattern"]["Regex"]  # Llama-3, Qwen2: their own split, then bytes
    else:
        raise NotImplementedError(f"{path}: pre-tokenizer {kinds} (ByteLevel, or Split + ByteLevel)")
    to_byte = byte_level_alphabet()
    as_bytes = lambda tok: bytes(to_byte[c] for c in tok)
    vocab = {as_bytes(t): i for t, i in model["vocab"].items()}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    merged = [as_bytes(a) + as_bytes(b) for a, b in merges]
    # every token BPE can produce: the 256 bytes, then each merge's result, in merge order (first time made)
    order = [bytes([b]) for b in range(256)]
    order += list(dict.fromkeys(t for t in merged if len(t) > 1))
    ids = [vocab[t] for t in order]
    if all(a < b for a, b in zip(ids[256:], ids[257:])) and max(ids[:256]) < min(ids[256:], default=1 << 30):
        ranks, to_id = {t: vocab[t] for t in order}, None  # the file's ids already follow the merges
    else:
        ranks, to_id = {t: r for r, t in enumerate(order)}, ids
    added, special = {}, {}
    for a in spec.get("added_tokens", []):
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise NotImplementedError(f"{path}: added token {a['content']!r} with lstrip/rstrip/single_word")
        (special if a.get("special") else added)[a["content"]] = a["id"]
    # the special tokens keep their own ids; <|endoftext|> (or the first special) is the end-of-text token
    eot = special.get(EOT, next(iter(special.values()), None))
    n = max([*vocab.values(), *added.values(), *special.values()]) + 1
    base = tiktoken.Encoding(name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf", pat_str=pattern,
                             mergeable_ranks=ranks, special_tokens={EOT: eot if to_id is None else len(order)})
    hf = HFExtras(norm is not None, added, special, to_id)
    tok = Tokenizer(path, base, n if lm_vocab_size is None else lm_vocab_size, new_tokens, hf)
    tok.eot_id, tok.base_n_vocab = eot, n
    hf.names.update({tok.n_vocab - len(new_tokens) + i: t for i, t in enumerate(new_tokens)})
    return tok


@functools.lru_cache(maxsize=None)
def get_tokenizer(name="bytes", lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
    """The tokenizer called `name` ("bytes", "shapes", "gpt2", or a Hugging Face tokenizer.json or a directory
    holding one), with the new tokens (<image>, <|endofchunk|>) appended after `lm_vocab_size` (default: the
    base vocabulary size; larger for LMs with padded embeddings)."""
    if name == "bytes":
        base = bytes_encoding()
    elif name == "shapes":
        base = shapes_encoding()
    elif name == "gpt2":
        base = gpt2_encoding()
    elif os.path.exists(name):
        return hf_bpe_tokenizer(name, lm_vocab_size, new_tokens)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; known: 'bytes', 'shapes', 'gpt2', or a tokenizer.json path")
    return Tokenizer(name, base, lm_vocab_size, new_tokens)


# -----------------------------------------------------------------------------
# 2. The shapes world (DESIGN.md section 6)
#
# Geometry, so that anyone can draw the same images: a 64x64 canvas in pixel-corner
# coordinates (pixel (y, x) covers [y, y+1) x [x, x+1)). The 3x3 grid has cells of about
# 21 px; the object of cell (row, col) is centred at cx = 32 + 21*(col-1) + jx,
# cy = 32 + 21*(row-1) + jy, i.e. at 11, 32 or 53 (within half a pixel of the centres of
# cells with boundaries 0, 21, 42, 64), with integer jitter jx, jy in [-2, 2]. An object of
# size s covers the s x s box [c - s/2, c + s/2): even large objects never leave the canvas.
# Objects are flat colors; only the background is noisy.

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (230, 210, 40), "purple": (150, 60, 200), "white": (235, 235, 235),
}
SIZES = {"small": 10, "large": 18}  # px across
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = (  # how a caption says where an object is, by cell
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
TASK_KINDS = ("color", "shape", "size", "position")
IMAGE_SIZE, MAX_BACKGROUND, NOISE, JITTER = 64, 60, 8, 2
N_OBJECTS_P = (0.5, 0.25, 0.25)  # P(1, 2, 3 objects); half single-object scenes helped learning (DESIGN 6)
TOKENIZER_MIX = {"caption": 0.2, "question": 0.4, "task": 0.3, "interleaved": 0.1}  # the shapes BPE's corpus
KIND_MIX = {"caption": 0.2, "question": 0.4, "task": 0.3, "interleaved": 0.1}  # default mix of shapes_sample


def shape_mask(shape, s):
    """Boolean (s, s) mask of a shape s px across, tested at pixel centres."""
    u = np.arange(s) + 0.5 - s / 2  # pixel centres relative to the box centre, -s/2..s/2
    y, x = u[:, None], u[None, :]   # (s, 1), (1, s): y grows downwards
    if shape == "circle":
        return x**2 + y**2 <= (s / 2) ** 2
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "triangle":  # apex at the top centre, base the full bottom edge; each row as wide as the triangle at its lower edge
        return np.abs(x) <= (y + 0.5 + s / 2) / 2
    if shape == "cross":  # a plus sign; arm width an even number near s/3 (6 for 18, 4 for 10), so it stays symmetric
        w = 2 * round(s / 6)
        return (np.abs(x) <= w / 2) | (np.abs(y) <= w / 2)
    raise ValueError(shape)


MASKS = {(shape, size): shape_mask(shape, s) for shape in SHAPES for size, s in SIZES.items()}


def random_scene(rng, n_objects=None, n_objects_p=N_OBJECTS_P):
    """A scene: a dict with the background gray level and a list of objects in reading order
    (row-major by cell), each a dict(shape, color, size, cell, cx, cy). All shapes differ, all colors differ."""
    n = n_objects or 1 + int(rng.choice(len(n_objects_p), p=n_objects_p))
    cells = np.sort(rng.permutation(9)[:n])
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:n]]
    sizes = [list(SIZES)[i] for i in rng.integers(0, len(SIZES), n)]
    jitter = rng.integers(-JITTER, JITTER + 1, (n, 2))  # (n, 2) x and y
    objects = []
    for cell, shape, color, size, (jx, jy) in zip(cells.tolist(), shapes, colors, sizes, jitter.tolist()):
        objects.append(dict(shape=shape, color=color, size=size, cell=cell,
                            cx=32 + 21 * (cell % 3 - 1) + jx, cy=32 + 21 * (cell // 3 - 1) + jy))
    return dict(background=int(rng.integers(0, MAX_BACKGROUND + 1)), objects=objects)


def render(scene, rng):
    """The scene as a uint8 image (64, 64, 3); the background noise comes from `rng`.
    60-80 us per image on a 2-core CPU (numpy 2.4; `python data.py` measures it)."""
    noise = rng.integers(0, 2 * NOISE + 1, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # 0..16
    gray = (noise.astype(np.int16) + (scene["background"] - NOISE)).clip(0, 255).astype(np.uint8)
    img = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3), the same noise in all channels: it stays gray
    for o in scene["objects"]:
        s = SIZES[o["size"]]
        y0, x0 = o["cy"] - s // 2, o["cx"] - s // 2
        img[y0:y0 + s, x0:x0 + s][MASKS[o["shape"], o["size"]]] = COLORS[o["color"]]
    return img


def blank_image(rng=None, level=None):
    """A background with no objects (noise included, as in real scenes): the 'blank image' baseline."""
    rng = np.random.default_rng(0) if rng is None else rng
    level = int(rng.integers(0, MAX_BACKGROUND + 1)) if level is None else level
    return render(dict(background=level, objects=[]), rng)


# Text. These are the exact strings eval.py builds (DESIGN.md section 8).

def caption(scene):
    """'a large red circle at the top left and a small blue cross in the center.'
    Objects in reading order, joined as 'a X', 'a X and a Y', 'a X, a Y and a Z'."""
    parts = [f"a {o['size']} {o['color']} {o['shape']} {POSITION_PHRASES[o['cell']]}" for o in scene["objects"]]
    text = parts[-1] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def question(scene, qtype, rng):
    """A (question, answer) pair about the scene, of type qtype (one of QUESTION_TYPES)."""
    objects = scene["objects"]
    o = objects[rng.integers(len(objects))]
    if qtype == "color":
        return f"what color is the {o['shape']}?", o["color"]
    if qtype == "shape":
        return f"what shape is the {o['color']} object?", o["shape"]
    if qtype == "count":
        return "how many objects are there?", str(len(objects))
    if qtype == "position":
        return f"where is the {o['color']} {o['shape']}?", POSITIONS[o["cell"]]
    if qtype == "exists":
        # yes half of the time; the no cases are near misses: a present color with another
        # shape, or a present shape with an absent color (sure to be absent: each color
        # appears at most once in a scene)
        if rng.random() < 0.5:
            return f"is there a {o['color']} {o['shape']}?", "yes"
        if rng.random() < 0.5:
            shape = rng.choice([s for s in SHAPES if s != o["shape"]])
            return f"is there a {o['color']} {shape}?", "no"
        color = rng.choice([c for c in COLORS if c not in {p["color"] for p in objects}])
        return f"is there a {color} {o['shape']}?", "no"
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def task_answer(scene, kind):
    """The answer of a task-by-example chunk about a single-object scene: its color, shape, size or position."""
    (o,) = scene["objects"]
    return POSITIONS[o["cell"]] if kind == "position" else o[kind]


def caption_chunk(text=None):
    """'<image>Output:{text}<|endofchunk|>'; with text=None the prompt '<image>Output:' to be completed."""
    return f"{IMAGE}Output:" + ("" if text is None else text + EOC)


def question_chunk(q, a=None):
    """'<image>Question:{q} Short answer:{a}<|endofchunk|>'; with a=None the prompt to be completed."""
    return f"{IMAGE}Question:{q} Short answer:" + ("" if a is None else a + EOC)


# Sequences. Each starts with <image> and ends with <|endofchunk|><|endoftext|>.

SPLITS = {"train": 0, "val": 2**31, "test": 2**31 + 2**30}  # disjoint ranges of the sample key
SPLIT_SIZE = {"train": 2**31, "val": 2**30, "test": 2**30}


def sample_rng(split, seed, index):
    """The generator of sample `index` of `split`: a pure function of (split, seed, index)."""
    assert 0 <= index < SPLIT_SIZE[split] and 0 <= seed < 2**32, (split, seed, index)
    return np.random.default_rng([seed, SPLITS[split] + index])  # two 32-bit words: no key aliases another


def scene_chunk(rng, kind, qtype=None):
    """One image-text chunk about a fresh scene: its caption, or a question (of type qtype, random if None)."""
    scene = random_scene(rng)
    if kind == "caption":
        text = caption_chunk(caption(scene))
    else:
        text = question_chunk(*question(scene, qtype or str(rng.choice(QUESTION_TYPES)), rng))
    return text, render(scene, rng)


def shapes_sample(split, seed, index, kind=None, mix=KIND_MIX, qtype=None, task_kind=None, n_chunks=None):
    """
    Sample `index` of `split`: (text, images). kind:
      "caption"     one image and its caption (an image-text pair, as in LAION)
      "question"    one image, one question of type qtype (random if None) and its answer
      "task"        task-by-example: n_chunks (2..8) single-object images, each followed by
                    'Output:' and its color, shape, size or position; one kind (task_kind)
                    per sequence, told by nothing but the examples
      "interleaved" n_chunks (2..4) caption or question chunks in a row, as in an MMC4 document
      None          a kind drawn from `mix`
    qtype, task_kind and n_chunks fix what is otherwise random (for eval and tests).
    """
    rng = sample_rng(split, seed, index)
    if kind is None:
        kind = str(rng.choice(list(mix), p=np.array(list(mix.values())) / sum(mix.values())))
    chunks = []  # (text, image)
    if kind in ("caption", "question"):
        chunks.append(scene_chunk(rng, kind, qtype))
    elif kind == "task":
        task_kind = task_kind or str(rng.choice(TASK_KINDS))
        for _ in range(n_chunks or rng.integers(2, 9)):
            scene = random_scene(rng, n_objects=1)
            chunks.append((caption_chunk(task_answer(scene, task_kind)), render(scene, rng)))
    elif kind == "interleaved":
        for _ in range(n_chunks or rng.integers(2, 5)):
            chunks.append(scene_chunk(rng, str(rng.choice(["caption", "question"]))))
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {list(KIND_MIX)}")
    return "".join(t for t, _ in chunks) + EOT, [img for _, img in chunks]


# -----------------------------------------------------------------------------
# 3. Batching and labels (DESIGN.md section 7)

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


def collate(samples, tokenizer, block_size, image_mean=CLIP_MEAN, image_std=CLIP_STD, stack=None):
    """
    samples: list of (text markup or its ids, list of uint8 (H, W, 3) images) -> (images, idx, targets):
      images  (N, 1, 3, H, W) float32, normalised, the N images of the batch in the order of
              their <image> tokens, row by row (F = 1 frame each); None when N == 0
      idx     (B, T) long, T = the longest row (<= block_size), right-padded with <|endoftext|>
      targets (B, T) long, targets[b, t] = idx[b, t+1] where that token is chunk text, else -1
    Rows longer than block_size are cut, and with them the images whose <image> token was cut.
    stack: a function from the list of kept images to the images tensor, for images that are not pixels
    (FeatureCache.lookup: image paths -> the tower's cached features (N, 1, S, D)).
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
        return None, idx, targets
    if stack is not None:
        return stack(images), idx, targets
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W) in [0, 1]
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).unsqueeze(1), idx, targets  # (N, 1, 3, H, W)


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


MAX_PER_ROW = 16  # samples one packed row may hold


def packed_sample(split, seed, row, tokenizer, block_size, kind=None, **opts):
    """Row `row` of a packed batch: consecutive samples row*16, row*16 + 1, ... joined while they fit in
    block_size tokens (at least one, cut if it alone is too long). Packing wastes no compute on padding,
    as nanoGPT packs documents; each sample begins with <image>, so cross-attention never mixes samples
    (xattn.py), and <|endoftext|> separates them for self-attention. A pure function of (split, seed, row)."""
    text, images, n = "", [], 0
    for j in range(MAX_PER_ROW):
        t, ims = shapes_sample(split, seed, row * MAX_PER_ROW + j, kind, **opts)
        length = len(tokenizer.encode_markup(t))
        if j > 0 and n + length > block_size:
            break
        text, images, n = text + t, images + ims, n + length
    return text, images


def get_batch(split, seed, step, micro_step, grad_accum, rank, world_size, batch_size,
              tokenizer, block_size, mean=CLIP_MEAN, std=CLIP_STD, kind=None, pack=False, **opts):
    """One micro-batch of the shapes world, (images, idx, targets) as collate() returns them, on the CPU.
    Its content depends only on (split, seed, global index); opts go to shapes_sample(). With pack=True
    the global index is that of a row of samples packed to block_size tokens (packed_sample)."""
    indices = batch_indices(step, micro_step, grad_accum, rank, world_size, batch_size)
    if pack:
        samples = [packed_sample(split, seed, i, tokenizer, block_size, kind, **opts) for i in indices]
    else:
        samples = [shapes_sample(split, seed, i, kind, **opts) for i in indices]
    return collate(samples, tokenizer, block_size, mean, std)



# -----------------------------------------------------------------------------
# 4. Files: downloads, and datasets kept in a folder

class DownloadError(RuntimeError):
    pass


def download(url, path, size=None, sha256=None, retries=3, timeout=30, progress=True):
    """Fetch `url` into `path` with a progress bar, and return path.

    Resumable: bytes arrive in path + ".part"; a retry, or a later call after an interrupted run, asks the
    server for the rest (an HTTP Range request) and starts over only if the server ignores it. Atomic: the
    file takes its name only when it is complete and verified (its announced length, and `size` / `sha256`
    when given), so a partial file is never taken for a whole one. An existing `path` is trusted (and
    checked against `size` when given). Raises DownloadError, saying what it tried, after `retries` failures.
    progress=False: no bar of its own (many small files under one bar: coco_folder).
    """
    import hashlib
    import time
    import requests
    from tqdm import tqdm
    if os.path.exists(path) and (size is None or os.path.getsize(path) == size):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part, error = path + ".part", None
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with requests.get(url, headers={"Range": f"bytes={have}-"} if have else {}, stream=True,
                              timeout=timeout) as r:
                if r.status_code == 416:  # nothing left to send: the .part file is already whole
                    break
                r.raise_for_status()
                if r.status_code != 206:  # the server sent the whole file
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(path),
                             disable=not progress) as bar:
                    for block in r.iter_content(1 << 16):
                        f.write(block)
                        bar.update(len(block))
            if total is not None and os.path.getsize(part) != total:
                raise OSError(f"the connection closed after {os.path.getsize(part)} of {total} bytes")
            break
        except (requests.RequestException, OSError) as e:
            error = e
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise DownloadError(f"could not download {url}: {e}") from None  # not there: no point retrying
            if attempt + 1 < retries:
                time.sleep(0.5 * 2 ** attempt)
    else:
        raise DownloadError(f"could not download {url} ({retries} tries): {error}")
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        raise DownloadError(f"{url}: {got} bytes, expected {size}; the partial file was removed")
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            os.remove(part)
            raise DownloadError(f"{url}: sha256 {h.hexdigest()}, expected {sha256}; the file was removed")
    os.replace(part, path)
    return path


# The prompt strings of DESIGN section 8, one chunk each: eval.py builds its prompts from them, and folder
# training (FolderData) its sequences, so a model fine-tuned on a folder is evaluated on the format it learned.
CAPTION = "<image>Output:{caption}<|endofchunk|>"
VQA = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"


def encode_template(tok, template, **fields):
    """A template's ids: its markup (<image>, <|endofchunk|>) becomes special tokens; the fields (a caption, a
    question) are plain text, so a literal "<image>" in a caption stays text."""
    ids = []
    for piece in re.split(r"(\{\w+\})", template):
        if piece.startswith("{"):
            ids += tok.encode(fields[piece[1:-1]])
        elif piece:
            ids += tok.encode_markup(piece)
    return ids


COCO_KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
COCO_IMAGES = "http://images.cocodataset.org"  # + /train2014/COCO_train2014_000000000009.jpg, one file each


def coco_folder(root, max_images=5000, max_test=500, karpathy_url=COCO_KARPATHY, images_url=COCO_IMAGES,
                workers=8, log=print):
    """
    python data.py coco: COCO captions as a dataset folder (the format read_folder reads and FolderData trains
    on). Downloads Karpathy's split file (caption_datasets.zip: every COCO image's five captions and
    its split), then the first max_images images of its train + restval split and the first max_test of its
    test split, one file each from COCO's server (workers at a time), and writes train.jsonl / test.jsonl
    with their captions. Every file is resumable and atomic (download()); a run stopped half-way picks up
    where it was. An image that fails to download or to decode is skipped, counted and named in the log.
    Also leaves dataset_coco.json, so that eval.py --task=coco runs on the same directory (the test images not
    fetched are skipped there). Returns {split: examples written}.
    """
    import zipfile
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    os.makedirs(root, exist_ok=True)
    split_file = os.path.join(root, "dataset_coco.json")
    if not os.path.exists(split_file):
        archive = download(karpathy_url, os.path.join(root, "caption_datasets.zip"))
        with zipfile.ZipFile(archive) as z:
            name = next((n for n in z.namelist() if n.endswith("dataset_coco.json")), None)
            if name is None:
                raise DownloadError(f"{archive} holds no dataset_coco.json: remove it and run again")
            with z.open(name) as src, open(split_file + ".part", "wb") as dst:
                dst.write(src.read())
        os.replace(split_file + ".part", split_file)
    with open(split_file, encoding="utf-8") as f:
        images = json.load(f)["images"]
    chosen = {"train": [im for im in images if im["split"] in ("train", "restval")][:max_images],
              "test": [im for im in images if im["split"] == "test"][:max_test]}

    def fetch(im):  # -> the folder's line, or a str: why it was skipped
        rel = f"{im['filepath']}/{im['filename']}"
        try:
            download(f"{images_url}/{rel}", os.path.join(root, rel), retries=3, progress=False)
            folder_image(root, rel, check=True)
        except (DownloadError, ValueError) as e:
            if os.path.exists(os.path.join(root, rel)):
                os.remove(os.path.join(root, rel))  # undecodable: fetched again by the next run
            return f"{rel}: {e}"
        return {"image": rel, "captions": [c["raw"].strip() for c in im["sentences"]], "id": im["cocoid"]}

    written = {}
    for split, ims in chosen.items():
        lines, failed = [], []
        with ThreadPoolExecutor(workers) as pool:
            for out in tqdm(pool.map(fetch, ims), total=len(ims), desc=f"COCO {split} images"):
                (failed if isinstance(out, str) else lines).append(out)
        for why in failed:
            log(f"skipped: {why}")
        if ims and not lines:
            raise DownloadError(f"none of the {len(ims)} {split} images could be fetched from {images_url} "
                                f"({failed[0]})")
        with open(os.path.join(root, f"{split}.jsonl.part"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(os.path.join(root, f"{split}.jsonl.part"), os.path.join(root, f"{split}.jsonl"))
        log(f"{root}/{split}.jsonl: {len(lines)} images with their captions" +
            (f", {len(failed)} skipped" if failed else ""))
        written[split] = len(lines)
    return written


def folder_image(folder, name, check=False):
    """The absolute path of image `name` of a dataset folder; ValueError when it is absolute, leaves the folder,
    is missing, or (check=True) cannot be decoded."""
    if not isinstance(name, str) or not name:
        raise ValueError("no image path")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
        raise ValueError(f"image path {name!r} leaves the folder")
    path = os.path.join(os.path.abspath(folder), os.path.normpath(name))
    if not os.path.isfile(path):
        raise ValueError(f"image {name!r} not found")
    why = check and decode_error(path)
    if why:
        raise ValueError(f"image {name!r} {why}")
    return path


def decode_error(path):
    """None when the image file at `path` decodes, else why not ("cannot be decoded (OSError)")."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: a truncated or broken one fails here, not mid-run
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
        return f"cannot be decoded ({type(e).__name__})"
    return None


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
      vqa       {"image": "a.jpg", "question": "what color?", "answers": ["red", ...]}
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
                d = json.loads(line.decode("utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            line_kind = next((k for field, k in LINE_KINDS.items() if field in d), None)
            if line_kind not in kinds:
                raise ValueError(f"not a {' or '.join(kinds)} line (fields: {sorted(d)})")
            ex = {"id": d.get("id", f"{split}:{n}"), "kind": line_kind, "line": n}
            if line_kind == "docs":
                ex["chunks"] = doc_chunks(folder, d["chunks"], check_images)
            else:
                ex["image"] = folder_image(folder, d.get("image"), check_images)
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


def write_shapes_folder(root, kind="vqa", n_train=200, n_test=200, task_kind=None, seed=0):
    """A dataset folder (the format read_folder reads) drawn from the shapes world, for trying eval.py's
    --task=vqa / --task=captions and folder training offline. kind "vqa": a question per image, of type
    `task_kind` (one of QUESTION_TYPES; None: a random type each; "size": "what size is the {shape}?" about
    single-object images, a question the shapes world never asks); "captions": the task-by-example answer of
    `task_kind` (color, shape, size, position; None: color) of single-object images. Scenes come from
    generators seeded apart from the training, validation and test splits."""
    from PIL import Image
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rng = np.random.default_rng([seed, 77, 0 if split == "train" else 1])
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                scene = random_scene(rng, n_objects=None if kind == "vqa" and task_kind != "size" else 1)
                name = f"images/{split}{i:05d}.png"
                Image.fromarray(render(scene, rng)).save(os.path.join(root, name))
                if kind == "vqa" and task_kind == "size":
                    q, a = f"what size is the {scene['objects'][0]['shape']}?", scene["objects"][0]["size"]
                elif kind == "vqa":
                    q, a = question(scene, task_kind or str(rng.choice(QUESTION_TYPES)), rng)
                if kind == "vqa":
                    line = {"image": name, "question": q, "answers": [a]}
                else:
                    line = {"image": name, "captions": [task_answer(scene, task_kind or "color")]}
                f.write(json.dumps(line) + "\n")
    return root


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

    def __init__(self, folder, split, tokenizer, block_size, image_size, seed=0, log=print, check_images=True):
        self.tok, self.block_size, self.image_size, self.seed, self.log = tokenizer, block_size, image_size, seed, log
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
            units = [(encode_template(tok, CAPTION, caption=c), [ex["image"]]) for c in ex["captions"]]
        elif ex["kind"] == "vqa":
            units = [(encode_template(tok, VQA, question=ex["question"], answer=a), [ex["image"]])
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
            if self.features is not None:  # the images' cached features are looked up by path in get_batch
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

    def get_batch(self, step, micro_step, grad_accum, rank, world_size, batch_size, mean=CLIP_MEAN, std=CLIP_STD):
        """One micro-batch, (images, idx, targets) as collate() returns them: the rows batch_indices names."""
        indices = batch_indices(step, micro_step, grad_accum, rank, world_size, batch_size)
        return collate([self.row(i) for i in indices], self.tok, self.block_size, mean, std,
                       stack=None if self.features is None else self.features.lookup)

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


class FeatureCache:
    """
    The frozen vision tower's output for a set of image files, computed once and kept on disk, so that later
    epochs, and later runs, skip the tower (with a frozen tower and no augmentation its output never changes).
    `path` is an .npy file read as a memmap, (n_images, S, D), next to `path`.json naming the images and the
    tower (`key`); a cache that does not match both is computed again. Written atomically (a .part file, then
    a rename). encode: a function (n, 3, H, W) normalised pixels -> (n, S, D) features.
    """

    def __init__(self, path, image_paths, encode, image_size, key, mean=CLIP_MEAN, std=CLIP_STD, batch_size=32,
                 dtype=np.float32, log=print):
        from tqdm import tqdm
        self.index = {p: i for i, p in enumerate(sorted(set(image_paths)))}
        meta = {"key": key, "images": list(self.index)}
        if os.path.exists(path) and os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                if json.load(f) == meta:
                    self.array = np.load(path, mmap_mode="r")
                    log(f"vision features of {len(self.index)} images: {path} (cached)")
                    return
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        paths, out = list(self.index), None
        if not paths:
            raise ValueError("no images to compute features of")
        for i in tqdm(range(0, len(paths), batch_size), desc="vision features (once)"):
            pixels = [load_image_file(p, image_size) for p in paths[i:i + batch_size]]
            x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - m) / s  # (n, 3, H, W)
            with torch.no_grad():
                feats = encode(x).float().cpu().numpy()                                          # (n, S, D)
            if out is None:
                out = np.lib.format.open_memmap(path + ".part", mode="w+", dtype=dtype,
                                                shape=(len(paths), *feats.shape[1:]))
            out[i:i + len(feats)] = feats
        out.flush()
        del out
        os.replace(path + ".part", path)
        with open(path + ".json.part", "w") as f:
            json.dump(meta, f)
        os.replace(path + ".json.part", path + ".json")
        self.array = np.load(path, mmap_mode="r")
        log(f"vision features of {len(paths)} images: {path} ({self.array.nbytes / 1e6:.0f} MB)")

    def lookup(self, paths):
        """Image paths -> their features, (N, 1, S, D) float32 (one frame each)."""
        rows = [self.index[p] for p in paths]
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])).float().unsqueeze(1)


# -----------------------------------------------------------------------------
# 5. Real data: tar shards (webdataset layout)
#
# Large datasets come as tar shards of a few thousand samples each: the members of one sample sit next to
# each other and share a key, the path up to the first dot of the file name (000123.jpg, 000123.txt). A
# shard is read in one streaming pass. A bad sample or shard is skipped and counted in a Counter
# {reason: count}, never raised: a week-long run must not die on the one broken JPEG in a billion.
#
# Samples here are (ids, images), not markup: encode_markup() would turn an "<image>" that a web page wrote
# into its alt-text into the special token, and the images would no longer match the markers. So web text
# is encoded with tokenizer.encode() (always plain text) and the special ids go where the format puts them.

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def tar_groups(path, skipped):
    """The members of the tar shard at `path` grouped by key, as webdataset groups consecutive members -> yields
    (key, {extension: bytes}), e.g. ("000123", {"jpg": ..., "txt": ...}); the extension is all after the first
    dot ("0.jpg" in "doc.0.jpg"). A shard that breaks off (truncated, not a tar, missing) counts once as
    skipped["bad shard"]; its groups before the break were yielded. Candid: a file cut inside a 512-byte
    header looks to tarfile like a shard that ends there: not counted, its last group comes out incomplete."""
    key, group = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:  # stream mode: no index, no seeking, any compression
            for m in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the shard
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                k, _, ext = base.partition(".")
                if os.path.join(folder, k) != key and group:
                    yield key, group
                    group = {}
                key = os.path.join(folder, k)
                group[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError):  # OSError: a missing file, a bad gzip stream
        skipped["bad shard"] += 1
        return
    if group:
        yield key, group


def load_image_file(path, size):
    """load_image() on the bytes of the file at `path` (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        return load_image(f.read(), size)


def load_image(data, size):
    """Encoded image bytes -> uint8 (size, size, 3) RGB, as CLIP preprocesses: the shorter side resized to
    `size` (bicubic), then the centre cropped. ValueError when PIL cannot decode the bytes."""
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")  # decodes: a broken or truncated file fails here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad bytes
        raise ValueError(f"cannot decode image ({type(e).__name__})") from None
    w, h = img.size
    w, h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    img = img.resize((w, h), Image.BICUBIC)
    x, y = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)))


def read_pairs(paths, skipped, image_size=224):
    """Image-text pairs from tar shards as img2dataset writes them for LAION (key.jpg, key.txt, key.json)
    -> yields (key, caption, image): the caption is key.txt, else the "caption" field of key.json; image uint8
    (image_size, image_size, 3). Counted in `skipped`: no image, no caption, bad image, bad json, bad caption."""
    for path in paths:
        for key, group in tar_groups(path, skipped):
            img = next((group[e] for e in group if e.lower() in IMAGE_EXTS), None)
            try:
                d = {"caption": group["txt"].decode()} if "txt" in group else json.loads(group.get("json", b"{}"))
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
                doc = json.loads(group["json"])
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


def trim_dangling_images(tok, ids):
    """ids cut at a token budget, less any <image> at the end that has no text after it (only EOC / EOT)."""
    while tok.image_id in ids:
        last = len(ids) - 1 - ids[::-1].index(tok.image_id)
        if any(t not in (tok.eoc_id, tok.eot_id) for t in ids[last + 1:]):
            break
        ids = ids[:last]
    return ids


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
                 shuffle=0, seed=0, log=print, **reader_opts):
        import glob
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise ValueError(f"no shard matches {pattern!r}")
        self.tok, self.block_size, self.num_workers, self.log = tokenizer, block_size, num_workers, log
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
        ids, images = [], []
        for sample_ids, sample_images in self.shuffled():
            if ids and len(ids) + len(sample_ids) > self.block_size:
                yield ids, images
                ids, images = [], []
            ids, images = ids + sample_ids, images + sample_images  # one alone too long: collate() cuts it

    def skip(self, n):
        """Consume n rows (a resumed run: the rows its first run had trained on)."""
        for _ in range(n):
            next(self.stream)

    def get_batch(self, batch_size, mean=CLIP_MEAN, std=CLIP_STD):
        """The next batch_size rows, (images, idx, targets) as collate() returns them."""
        return collate([next(self.stream) for _ in range(batch_size)], self.tok, self.block_size, mean, std)


if __name__ == "__main__":  # python data.py: a few samples and the render speed
    import sys
    if sys.argv[1:2] == ["coco"]:  # python data.py coco [--data_dir=data/coco] [--max_images=5000] [--max_test=500]
        from configurator import configure
        opts = dict(data_dir="data/coco", max_images=5000, max_test=500, karpathy_url=COCO_KARPATHY,
                    images_url=COCO_IMAGES, workers=8)
        configure(opts, sys.argv[2:])
        try:
            coco_folder(opts.pop("data_dir"), **opts)
        except DownloadError as e:
            sys.exit(f"error: {e}\nOffline? On a machine with network, fetch {opts['karpathy_url']} and the images "
                     f"({opts['images_url']}/train2014/..., or the train2014 / val2014 zips of cocodataset.org), "
                     "put them in the data directory (caption_datasets.zip, train2014/, val2014/) and run this again: "
                     "files already there are not fetched again.")
        sys.exit()
    if sys.argv[1:2] == ["folder"]:  # python data.py folder OUT [vqa|captions] [question type|task kind] [n_train]
        write_shapes_folder(sys.argv[2], *sys.argv[3:4], **dict(zip(["task_kind"], sys.argv[4:5])),
                            **{"n_train": int(n) for n in sys.argv[5:6]})
        print(f"wrote {sys.argv[2]}/train.jsonl, test.jsonl and images/")
        sys.exit()
    import timeit
    for i in range(4):
        text, images = shapes_sample("train", 0, i)
        print(f"{len(images)} images | {text}")
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(1000)]
    t = timeit.timeit(lambda: [render(s, rng) for s in scenes], number=5) / 5000
    t2 = timeit.timeit(lambda: shapes_sample("train", 0, 0, "caption"), number=2000) / 2000
    print(f"render: {t * 1e6:.0f} us per image; a caption sample (scene, render, text): {t2 * 1e6:.0f} us")

"""
The shapes world, the offline default: 64 x 64 images of 1 to 3 colored shapes on a noisy dark background, with
text that can only be right if the model looks. Every sample is a pure function of (split, seed, index), and the
train, validation and test splits draw from disjoint ranges of keys.

1. Scenes and their pixels. The rules, so that anyone can draw images of their own: the 64 x 64 canvas holds a
   3 x 3 grid of cells; each object sits in its own cell, all shapes and all colors of a scene differ.
2. Text: captions, five kinds of questions, and task-by-example chunks whose answer's kind (color, shape, size or
   position) is told by nothing but the examples: in-context learning in miniature. The prompt formats are
   OpenFlamingo's (tokenizer.CAPTION, tokenizer.VQA), byte for byte, so a model is evaluated on the format it
   learned.
3. Samples as markup ("<image>Output:a small red circle at the top.<|endofchunk|><|endoftext|>" and its images),
   single pairs as in LAION, interleaved chunks as in MMC4; and rows packed from them.
4. Dataset folders drawn from the world (the format folders.read_folder reads), and the world's own BPE tokenizer.

    python shapes.py                          # a few samples, and the time to draw one
    python shapes.py folder DIR [vqa|captions] [question type | task kind] [n_train]
    python shapes.py tokenizer                # learn the shapes BPE again into config/tokenizer/shapes.tiktoken
"""

import os

import numpy as np

from tokenizer import CAPTION, EOC, EOT, GPT2_SPLIT, IMAGE, SHAPES_RANKS, VQA, train_bpe, write_ranks

# -----------------------------------------------------------------------------
# 1. Scenes
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
N_OBJECTS_P = (0.5, 0.25, 0.25)  # P(1, 2, 3 objects): half the scenes hold one object (docs/shapes.md)
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
    """The scene as a uint8 image (64, 64, 3); the background noise comes from `rng` (`python shapes.py` times it)."""
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


# -----------------------------------------------------------------------------
# 2. Text
#
# The chunks are OpenFlamingo's prompt formats (tokenizer.CAPTION, tokenizer.VQA), the strings eval.py builds.

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
    return CAPTION.format(caption=text) if text is not None else CAPTION.split("{caption}")[0]


def question_chunk(q, a=None):
    """'<image>Question:{q} Short answer:{a}<|endofchunk|>'; with a=None the prompt to be completed."""
    return VQA.format(question=q, answer=a) if a is not None else VQA.split("{answer}")[0].format(question=q)


# -----------------------------------------------------------------------------
# 3. Samples. Each starts with <image> and ends with <|endofchunk|><|endoftext|>.

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


MAX_PER_ROW = 16  # samples one packed row may hold


def packed_sample(split, seed, row, tokenizer, block_size, kind=None, sample=None, **opts):
    """Row `row` of a packed batch: consecutive samples row*16, row*16 + 1, ... joined while they fit in
    block_size tokens (at least one, cut if it alone is too long). Packing wastes no compute on padding,
    as nanoGPT packs documents; each sample begins with <image>, so cross-attention never mixes samples
    (xattn.py), and <|endoftext|> separates them for self-attention. A pure function of (split, seed, row).
    sample: the function drawing the samples (shapes_sample; shapes_video.video_sample for clips)."""
    text, images, n = "", [], 0
    for j in range(MAX_PER_ROW):
        t, ims = (sample or shapes_sample)(split, seed, row * MAX_PER_ROW + j, kind, **opts)
        length = len(tokenizer.encode_markup(t))
        if j > 0 and n + length > block_size:
            break
        text, images, n = text + t, images + ims, n + length
    return text, images


# -----------------------------------------------------------------------------
# 4. Folders and the tokenizer


def write_folder(root, kind="vqa", n_train=200, n_test=200, task_kind=None, seed=0):
    """A dataset folder (the format read_folder reads) drawn from the shapes world, for trying eval.py's
    --task=vqa / --task=captions and folder training offline. kind "vqa": a question per image, of type
    `task_kind` (one of QUESTION_TYPES; None: a random type each; "size": "what size is the {shape}?" about
    single-object images, a question the shapes world never asks); "captions": the task-by-example answer of
    `task_kind` (color, shape, size, position; None: color) of single-object images. Scenes come from
    generators seeded apart from the training, validation and test splits."""
    import json
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


def tokenizer_word_counts(n=2000):
    """{word bytes: count} of the text of n training samples (GPT-2's split into words; markup as spaces): the
    corpus the shapes BPE is learned from. A fixed mix (TOKENIZER_MIX), so that changing KIND_MIX changes nothing
    here (the scene rules do)."""
    import regex
    counts = {}
    for i in range(n):
        text = shapes_sample("train", 0, i, mix=TOKENIZER_MIX)[0].replace(IMAGE, " ").replace(EOC, " ").replace(EOT, " ")
        for w in regex.findall(GPT2_SPLIT, text):
            counts[w.encode()] = counts.get(w.encode(), 0) + 1
    return counts


def learn_tokenizer(max_merges=1000):
    """The shapes BPE's mergeable_ranks, learned from the world's text (tokenizer.shapes_encoding reads the file)."""
    return train_bpe(tokenizer_word_counts(), max_merges)


if __name__ == "__main__":
    import sys
    import timeit
    if sys.argv[1:2] == ["folder"]:  # python shapes.py folder OUT [vqa|captions] [question type|task kind] [n_train]
        write_folder(sys.argv[2], *sys.argv[3:4], **dict(zip(["task_kind"], sys.argv[4:5])),
                     **{"n_train": int(n) for n in sys.argv[5:6]})
        print(f"wrote {sys.argv[2]}/train.jsonl, test.jsonl and images/")
        sys.exit()
    if sys.argv[1:2] == ["tokenizer"]:  # every shapes checkpoint reads these ids: remake only on purpose
        write_ranks(learn_tokenizer(), SHAPES_RANKS)
        print(f"wrote {SHAPES_RANKS}")
        sys.exit()
    for i in range(4):
        text, images = shapes_sample("train", 0, i)
        print(f"{len(images)} images | {text}")
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(1000)]
    t = timeit.timeit(lambda: [render(s, rng) for s in scenes], number=5) / 5000
    t2 = timeit.timeit(lambda: shapes_sample("train", 0, 0, "caption"), number=2000) / 2000
    print(f"render: {t * 1e6:.0f} us per image; a caption sample (scene, render, text): {t2 * 1e6:.0f} us")

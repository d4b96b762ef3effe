"""
The moving-shapes world: clips of the shapes world (shapes.py's canvas, shapes, colors and sizes) in which objects
move, appear or vanish, with questions that no single frame answers. It is to videos what shapes.py is to images: an
offline world where a model can only be right if it looks, here at time. Every clip is a pure function of
(split, seed, index), and the splits draw from shapes.py's disjoint ranges of keys.

The rules, so that anyone can render clips of their own:
- A clip is FRAMES (4) frames of 64 x 64 pixels, one a second; the background is one gray level, with fresh noise in
  each frame (shapes.render's). Objects are flat colors; all shapes and all colors of a clip differ.
- A "motion" clip holds one object that moves STEP (5) px a frame in a straight line, left, right, up or down, its
  centre starting anywhere in [24, 40] on both axes (so where it starts says nothing of where it goes, and it never
  leaves the canvas), and at most one still object in a corner cell that its path never touches.
- A "count" clip holds 1 to 3 objects in distinct cells of shapes.py's 3 x 3 grid, each there in every frame, or
  appearing at frame k (absent before), or vanishing at frame k (absent from then on), k in 1 .. FRAMES - 1.
- Questions (OpenFlamingo's VQA format, as shapes.py's): "which way does the red circle move?" (left, right, up or
  down; chance 25%), "how many objects are there at the end?" (the last frame's count) and, of a count clip where one
  object appears, "which shape appears?"; captions: "a red circle moving left." No first frame answers them.
- Task-by-example sequences: 2 to 6 motion clips, each followed by "Output:" and the mover's direction, color or
  shape, one of the three per sequence, told by nothing but the examples: in-context learning over clips.

    python shapes_video.py                    # a few samples
    python shapes_video.py folder DIR [n_train] [n_test]   # a dataset folder of mp4 clips (video.py reads them)
"""

import os

import numpy as np

import shapes
from tokenizer import EOT

FRAMES, STEP, START = 4, 5, (24, 40)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION_TYPES = ("direction", "count", "appears")
TASK_KINDS = ("direction", "color", "shape")
KIND_MIX = {"direction": 0.6, "count": 0.15, "appears": 0.05, "caption": 0.05, "task": 0.15}


def draw(img, shape, size, color, cx, cy):
    """Draw one object centred at (cx, cy) on img (64, 64, 3), in place (clipped at the canvas' edges)."""
    s = shapes.SIZES[size]
    mask = shapes.MASKS[shape, size]
    y0, x0 = cy - s // 2, cx - s // 2
    ys, xs = slice(max(y0, 0), min(y0 + s, 64)), slice(max(x0, 0), min(x0 + s, 64))
    img[ys, xs][mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]] = shapes.COLORS[color]


def render_clip(clip, rng):
    """A clip -> uint8 frames (FRAMES, 64, 64, 3). clip["objects"]: dicts with shape, color, size and per frame
    its centre (x, y), or None where it is absent."""
    frames = []
    for f in range(FRAMES):
        img = shapes.render(dict(background=clip["background"], objects=[]), rng)  # the noisy background
        for o in clip["objects"]:
            if o["at"][f] is not None:
                draw(img, o["shape"], o["size"], o["color"], *o["at"][f])
        frames.append(img)
    return np.stack(frames)


def looks(rng, n):
    """n (shape, color, size) triples, shapes and colors all different."""
    shape_list = [shapes.SHAPES[i] for i in rng.permutation(len(shapes.SHAPES))[:n]]
    colors = [list(shapes.COLORS)[i] for i in rng.permutation(len(shapes.COLORS))[:n]]
    sizes = [list(shapes.SIZES)[i] for i in rng.integers(0, len(shapes.SIZES), n)]
    return list(zip(shape_list, colors, sizes))


def motion_clip(rng):
    """One object moving one way (and maybe a still one in a corner, clear of its path): (clip, its direction)."""
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTIONS[direction]
    x, y = (int(v) for v in rng.integers(START[0], START[1] + 1, 2))
    (shape, color, size), still = looks(rng, 2)
    objects = [dict(shape=shape, color=color, size=size, at=[(x + dx * STEP * f, y + dy * STEP * f)
                                                            for f in range(FRAMES)])]
    if rng.random() < 0.5:  # a still object in a corner whose box never meets the mover's
        half = (shapes.SIZES[size] + shapes.SIZES[still[2]]) / 2
        corners = [(cx, cy) for cx in (11, 53) for cy in (11, 53)
                   if all(abs(cx - px) > half or abs(cy - py) > half for px, py in objects[0]["at"])]
        if corners:
            cx, cy = corners[rng.integers(len(corners))]
            objects.append(dict(shape=still[0], color=still[1], size=still[2], at=[(cx, cy)] * FRAMES))
    return dict(background=int(rng.integers(0, shapes.MAX_BACKGROUND + 1)), objects=objects), direction


def count_clip(rng, appearing=False):
    """1 to 3 objects in grid cells, each there throughout, appearing or vanishing: (clip, the count at the end). With
    appearing=True, exactly one appears and the others stay: (clip, the shape that appears)."""
    n = 1 + int(rng.integers(3))
    cells = rng.permutation(9)[:n]
    objects = []
    for j, ((shape, color, size), cell) in enumerate(zip(looks(rng, n), cells.tolist())):
        centre = (32 + 21 * (cell % 3 - 1), 32 + 21 * (cell // 3 - 1))
        k, kind = 1 + int(rng.integers(FRAMES - 1)), rng.integers(3)  # 0: always there, 1: appears, 2: vanishes
        if appearing:
            kind = 1 if j == n - 1 else 0
        at = [None if (kind == 1 and f < k) or (kind == 2 and f >= k) else centre for f in range(FRAMES)]
        objects.append(dict(shape=shape, color=color, size=size, at=at))
    end = sum(o["at"][-1] is not None for o in objects)
    clip = dict(background=int(rng.integers(0, shapes.MAX_BACKGROUND + 1)), objects=objects)
    return (clip, objects[-1]["shape"]) if appearing else (clip, end)


def video_sample(split, seed, index, kind=None, mix=KIND_MIX, task_kind=None, n_chunks=None):
    """Sample `index` of `split`: (text markup, its clips' frames, each (FRAMES, 64, 64, 3)). kind: "direction",
    "count" or "appears" (a question and its answer), "caption" (the motion, in words), "task" (task-by-example:
    n_chunks motion clips, 2..6 if None, and the mover's task_kind, one of TASK_KINDS, random if None), or None:
    drawn from `mix`."""
    rng = shapes.sample_rng(split, seed, index)
    if kind is None:
        kind = str(rng.choice(list(mix), p=np.array(list(mix.values())) / sum(mix.values())))
    if kind == "task":
        task_kind, text, clips = task_kind or str(rng.choice(TASK_KINDS)), "", []
        for _ in range(n_chunks or int(rng.integers(2, 7))):
            clip, direction = motion_clip(rng)
            o = clip["objects"][0]
            text += shapes.caption_chunk(direction if task_kind == "direction" else o[task_kind])
            clips.append(render_clip(clip, rng))
        return text + EOT, clips
    if kind == "appears":
        clip, shape = count_clip(rng, appearing=True)
        text = shapes.question_chunk("which shape appears?", shape)
    elif kind == "count":
        clip, end = count_clip(rng)
        text = shapes.question_chunk("how many objects are there at the end?", str(end))
    elif kind in ("direction", "caption"):
        clip, direction = motion_clip(rng)
        o = clip["objects"][0]
        text = (shapes.question_chunk(f"which way does the {o['color']} {o['shape']} move?", direction)
                if kind == "direction" else shapes.caption_chunk(f"a {o['color']} {o['shape']} moving {direction}."))
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {list(KIND_MIX)}")
    return text + EOT, [render_clip(clip, rng)]


def first_frame_only(frames):
    """The baseline that cannot see time: every frame replaced by the first."""
    return np.repeat(frames[:1], len(frames), axis=0)


# -----------------------------------------------------------------------------
# Folders: mp4 clips and their lines, as folders.read_folder reads them


def write_clip(path, frames, fps=1):
    """Frames (F, H, W, 3) as an H.264 mp4 at `fps` frames a second (yuv444p: no chroma halving, colors stay put)."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_folder(root, n_train=200, n_test=200, seed=0):
    """A dataset folder of motion questions: clips/{split}_{i}.mp4 and lines {"video": ..., "question": ...,
    "answers": [...]} in train.jsonl and test.jsonl."""
    import json
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                rng = shapes.sample_rng(split, seed, i)
                clip, direction = motion_clip(rng)
                o = clip["objects"][0]
                name = f"clips/{split}_{i:05d}.mp4"
                write_clip(os.path.join(root, name), render_clip(clip, rng))
                f.write(json.dumps({"video": name, "question": f"which way does the {o['color']} {o['shape']} move?",
                                    "answers": [direction]}) + "\n")
    return root


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["folder"]:
        root = sys.argv[2]
        n = [int(a) for a in sys.argv[3:5]]
        write_folder(root, *n)
        print(f"wrote {root}")
    else:
        for i in range(4):
            text, (frames,) = video_sample("train", 0, i)
            print(repr(text), frames.shape)

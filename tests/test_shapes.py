"""The shapes world (shapes.py): deterministic samples, disjoint splits, the rules of its scenes and pixels, and the
exact strings of its text. CPU, no network."""

import os

import numpy as np
import pytest

import folders
import shapes
from tokenizer import EOC, EOT, IMAGE


def test_shapes_deterministic():
    for kind in [None, "caption", "question", "task", "interleaved"]:
        t1, im1 = shapes.shapes_sample("train", 7, 123, kind)
        t2, im2 = shapes.shapes_sample("train", 7, 123, kind)
        assert t1 == t2 and len(im1) == len(im2)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(im1, im2))
        t3, im3 = shapes.shapes_sample("train", 7, 124, kind)
        assert im1[0].tobytes() != im3[0].tobytes()
    assert shapes.shapes_sample("train", 8, 123)[1][0].tobytes() != shapes.shapes_sample("train", 7, 123)[1][0].tobytes()


def test_splits_are_disjoint():
    ranges = sorted((shapes.SPLITS[s], shapes.SPLITS[s] + shapes.SPLIT_SIZE[s]) for s in shapes.SPLITS)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][1] <= 2**32  # keys stay one 32-bit word
    with pytest.raises(AssertionError):
        shapes.sample_rng("val", 0, shapes.SPLIT_SIZE["val"])
    first = {s: {shapes.shapes_sample(s, 0, i, "caption")[1][0].tobytes() for i in range(20)} for s in shapes.SPLITS}
    assert not (first["train"] & first["val"]) and not (first["train"] & first["test"]) and not (first["val"] & first["test"])


def test_scene_rules_and_pixels():
    rng = np.random.default_rng(0)
    counts = np.zeros(4, int)
    for _ in range(300):
        scene = shapes.random_scene(rng)
        objs = scene["objects"]
        counts[len(objs)] += 1
        assert 1 <= len(objs) <= 3 and 0 <= scene["background"] <= 60
        for key in ["shape", "color", "cell"]:
            assert len({o[key] for o in objs}) == len(objs)
        assert [o["cell"] for o in objs] == sorted(o["cell"] for o in objs)  # reading order
        img = shapes.render(scene, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        off = np.ones((64, 64), bool)  # pixels outside every object's box
        for o in objs:
            cx0, cy0 = 32 + 21 * (o["cell"] % 3 - 1), 32 + 21 * (o["cell"] // 3 - 1)  # the cell centre
            assert abs(o["cx"] - cx0) <= 2 and abs(o["cy"] - cy0) <= 2
            color = shapes.COLORS[o["color"]]
            for y, x in [(o["cy"], o["cx"]), (o["cy"] - 1, o["cx"] - 1)]:  # the pixels around the centre
                assert tuple(img[y, x]) == color
            h = shapes.SIZES[o["size"]] // 2
            off[o["cy"] - h:o["cy"] + h, o["cx"] - h:o["cx"] + h] = False
        bg = img[off].astype(int)  # (n, 3)
        assert (bg == bg[:, :1]).all()  # gray
        assert (np.abs(bg - scene["background"]) <= 8).all() and bg.max() <= 68
    assert counts[1] > counts[2] > 0 and counts[3] > 0


def test_masks():
    for (shape, size), m in shapes.MASKS.items():
        s = shapes.SIZES[size]
        assert m.shape == (s, s)
        assert (m == m[:, ::-1]).all()  # left-right symmetric
        assert m[s // 2].all() or shape == "triangle"  # the middle row spans the full width
        assert m[:, s // 2].all()  # and so does the middle column
    assert shapes.MASKS["triangle", "large"][0].sum() <= 2 and shapes.MASKS["triangle", "large"][-1].all()  # point up
    assert shapes.MASKS["cross", "large"][0].sum() == 6 and not shapes.MASKS["cross", "large"][0, 0]


def test_blank_image():
    img = shapes.blank_image(np.random.default_rng(3), level=30)
    assert img.shape == (64, 64, 3) and img.min() >= 22 and img.max() <= 38 and (img == img[..., :1]).all()


def hand_scene(*objs):
    """objs: (size, color, shape, cell); centred in their cells, no jitter."""
    return dict(background=20, objects=[
        dict(size=sz, color=c, shape=sh, cell=cell, cx=32 + 21 * (cell % 3 - 1), cy=32 + 21 * (cell // 3 - 1))
        for sz, c, sh, cell in objs])


def test_caption_strings():
    one = hand_scene(("small", "white", "triangle", 8))
    two = hand_scene(("large", "red", "circle", 0), ("small", "blue", "cross", 4))
    three = hand_scene(("small", "green", "square", 1), ("large", "yellow", "cross", 3), ("small", "purple", "circle", 5))
    assert shapes.caption(one) == "a small white triangle at the bottom right."
    assert shapes.caption_chunk(shapes.caption(two)) == \
        "<image>Output:a large red circle at the top left and a small blue cross in the center.<|endofchunk|>"
    assert shapes.caption(three) == \
        "a small green square at the top, a large yellow cross on the left and a small purple circle on the right."
    assert shapes.caption_chunk() == "<image>Output:"
    assert [shapes.POSITION_PHRASES[k] for k in (2, 6, 7)] == ["at the top right", "at the bottom left", "at the bottom"]


def test_question_strings():
    rng = np.random.default_rng(0)
    scene = hand_scene(("large", "red", "circle", 0))
    qa = {t: shapes.question(scene, t, rng) for t in ["color", "shape", "count", "position"]}
    assert qa == {
        "color": ("what color is the circle?", "red"),
        "shape": ("what shape is the red object?", "circle"),
        "count": ("how many objects are there?", "1"),
        "position": ("where is the red circle?", "top left"),
    }
    assert shapes.question_chunk(*qa["color"]) == "<image>Question:what color is the circle? Short answer:red<|endofchunk|>"
    assert shapes.question_chunk("how many objects are there?") == "<image>Question:how many objects are there? Short answer:"
    three = hand_scene(("small", "green", "square", 1), ("large", "yellow", "cross", 3), ("small", "purple", "circle", 8))
    assert shapes.question(three, "count", rng)[1] == "3"


def test_exists_questions_are_right_and_balanced():
    rng = np.random.default_rng(1)
    answers = []
    for _ in range(400):
        scene = shapes.random_scene(rng)
        q, a = shapes.question(scene, "exists", rng)
        color, shape = q.removeprefix("is there a ").removesuffix("?").split(" ")
        present = any(o["color"] == color and o["shape"] == shape for o in scene["objects"])
        assert a == ("yes" if present else "no")
        if a == "no":  # a near miss: the color or the shape is in the image
            assert any(o["color"] == color or o["shape"] == shape for o in scene["objects"])
        answers.append(a)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_sequence_formats():
    answers = {"color": set(shapes.COLORS), "shape": set(shapes.SHAPES), "size": set(shapes.SIZES), "position": set(shapes.POSITIONS)}
    for i in range(40):
        text, images = shapes.shapes_sample("val", 0, i)
        assert text.startswith(IMAGE) and text.endswith(EOC + EOT) and text.count(IMAGE) == len(images)
        text, images = shapes.shapes_sample("val", 0, i, "task")
        outs = [chunk.removeprefix("Output:") for chunk in text.removesuffix(EOC + EOT).split(EOC + IMAGE)]
        outs[0] = outs[0].removeprefix(IMAGE + "Output:")
        assert 2 <= len(outs) <= 8 and len(images) == len(outs)
        assert any(set(outs) <= v for v in answers.values())  # one kind of answer per sequence
        text, images = shapes.shapes_sample("val", 0, i, "interleaved")
        assert 2 <= len(images) <= 4 and text.count(IMAGE) == len(images)
    text, _ = shapes.shapes_sample("val", 0, 0, "question", qtype="count")
    assert "how many objects are there?" in text
    text, images = shapes.shapes_sample("val", 0, 0, "task", task_kind="size", n_chunks=5)
    assert len(images) == 5 and text.count("Output:small") + text.count("Output:large") == 5



def test_shapes_tokenizer_file_is_what_the_world_teaches():
    """config/tokenizer/shapes.tiktoken is the BPE that train_bpe learns from the world's text (shapes.learn_tokenizer): a
    change in how that text is drawn fails here, where it would otherwise only re-number, silently, the tokens of
    every shapes checkpoint. Remaking the file (`python shapes.py tokenizer`) makes those checkpoints unreadable."""
    from tokenizer import SHAPES_RANKS, read_ranks
    assert shapes.learn_tokenizer() == read_ranks(SHAPES_RANKS)


def test_shapes_folder_reads_back(tmp_path):
    root = shapes.write_folder(str(tmp_path / "v"), "vqa", n_train=5, n_test=3)
    test = folders.read_folder(root, "test", "vqa", log=lambda m: None)
    assert len(test) == 3 and all(os.path.isfile(e["image"]) and e["question"] and e["answers"] for e in test)
    root = shapes.write_folder(str(tmp_path / "c"), "captions", n_train=4, n_test=2, task_kind="shape")
    assert all(e["captions"][0] in shapes.SHAPES for e in folders.read_folder(root, "train", "captions", log=lambda m: None))

"""Tests for data.py: tokenizers, the shapes world, label masking and the distributed batch order. CPU, no network."""

import hashlib
import os

import numpy as np
import pytest
import torch

import data
from data import EOC, EOT, IMAGE

tok = data.get_tokenizer("bytes")


# --- tokenizers

def test_bytes_tokenizer_ids():
    assert (tok.eot_id, tok.image_id, tok.eoc_id, tok.n_vocab) == (256, 257, 258, 259)
    assert tok.encode("ab\n") == [97, 98, 10]
    padded = data.get_tokenizer("bytes", lm_vocab_size=300)  # an LM whose embedding has spare rows
    assert (padded.eot_id, padded.image_id, padded.eoc_id, padded.n_vocab) == (256, 300, 301, 302)
    assert padded.decode([97, 280, 300, 301]) == "a<image><|endofchunk|>"  # 280 is a row with no token
    with pytest.raises(AssertionError):
        data.get_tokenizer("bytes", lm_vocab_size=100)


def test_plain_text_never_becomes_special():
    text = f"a caption that says {IMAGE}, {EOC} and {EOT} in it; café, 日本語, 🙂"
    ids = tok.encode(text)
    assert max(ids) < 256  # bytes only
    assert tok.decode(ids) == text
    assert bytes(ids) == text.encode("utf-8")


def test_encode_markup():
    ids = tok.encode_markup(f"{IMAGE}hi{EOC}{EOT}")
    assert ids == [257, ord("h"), ord("i"), 258, 256]
    assert tok.decode(ids) == f"{IMAGE}hi{EOC}{EOT}"
    text = f"{IMAGE}Output:ünïcode ✓{EOC}"
    assert tok.decode(tok.encode_markup(text)) == text


def test_gpt2_offline_error_is_clear(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR.*'bytes'"):
        data.gpt2_encoding()


def test_shapes_tokenizer_is_pinned():
    """The shapes BPE is learned from the shapes world's text each time it is built. One more random draw in
    how that text is made changes its merges, and every shapes checkpoint and stand-in LM would then read other
    token ids: no error, wrong answers (29% for 79% on the vqa folder, seen once). So its tokens are pinned."""
    enc = data.shapes_encoding()
    tokens = b"\0".join(enc.decode_single_token_bytes(i) for i in range(enc.n_vocab))
    assert enc.n_vocab == 400
    assert hashlib.sha256(tokens).hexdigest() == "5b94ce44ad7816a4114efa315245f6034ecc1be5c42e78b63eb082364d8ffee7"


# --- labels, padding, truncation

def test_label_masking_by_hand():
    img = np.zeros((64, 64, 3), np.uint8)
    samples = [
        (f"pre{IMAGE}ab{EOC}xy{IMAGE}c{EOC}{EOT}", [img, img]),
        (f"{IMAGE}z{EOC}{EOT}", [img]),
    ]
    images, idx, targets = data.collate(samples, tok, block_size=64, image_mean=(0, 0, 0), image_std=(1, 1, 1))
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
    images, idx, targets = data.collate([(f"hello{EOT}", [])], tok, block_size=16)
    assert images is None and idx.shape == (1, 6) and (targets == -1).all()


def test_truncation_keeps_images_and_tokens_consistent():
    imgs = [np.full((64, 64, 3), 50 * k, np.uint8) for k in range(4)]  # image k has pixel value 50k
    text = f"{IMAGE}aaaa{EOC}{IMAGE}bbbb{EOC}{IMAGE}cccc{EOC}{EOT}"  # chunks of 6 tokens
    for block_size, n_kept in [(3, 1), (6, 1), (7, 2), (8, 2), (13, 3), (100, 3)]:
        samples = [(text, imgs[:3]), (f"{IMAGE}d{EOC}{EOT}", imgs[3:])]
        images, idx, targets = data.collate(samples, tok, block_size, (0, 0, 0), (1, 1, 1))
        assert idx.shape[1] <= block_size
        assert images.shape[0] == (idx == tok.image_id).sum() == n_kept + 1
        # the surviving images, in row-major order of their <image> tokens
        assert images[:, 0, 0, 0, 0].tolist() == pytest.approx([50 * k / 255 for k in range(n_kept)] + [150 / 255])
        assert (targets != tok.image_id).all()
    # and on random shapes sequences
    for i in range(30):
        samples = [data.shapes_sample("train", 1, 10 * i + j) for j in range(3)]
        images, idx, targets = data.collate(samples, tok, block_size=40 + 7 * i)
        n = 0 if images is None else images.shape[0]
        assert n == (idx == tok.image_id).sum()


def test_collate_normalises_pixels():
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 1] = 255
    images, _, _ = data.collate([(f"{IMAGE}a{EOC}{EOT}", [img])], tok, 16, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert images[0, 0, :, 0, 0].tolist() == [-1.0, 2.0, -1.0]


# --- the shapes world

def test_shapes_deterministic():
    for kind in [None, "caption", "question", "task", "interleaved"]:
        t1, im1 = data.shapes_sample("train", 7, 123, kind)
        t2, im2 = data.shapes_sample("train", 7, 123, kind)
        assert t1 == t2 and len(im1) == len(im2)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(im1, im2))
        t3, im3 = data.shapes_sample("train", 7, 124, kind)
        assert im1[0].tobytes() != im3[0].tobytes()
    assert data.shapes_sample("train", 8, 123)[1][0].tobytes() != data.shapes_sample("train", 7, 123)[1][0].tobytes()


def test_splits_are_disjoint():
    ranges = sorted((data.SPLITS[s], data.SPLITS[s] + data.SPLIT_SIZE[s]) for s in data.SPLITS)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    assert ranges[-1][1] <= 2**32  # keys stay one 32-bit word
    with pytest.raises(AssertionError):
        data.sample_rng("val", 0, data.SPLIT_SIZE["val"])
    first = {s: {data.shapes_sample(s, 0, i, "caption")[1][0].tobytes() for i in range(20)} for s in data.SPLITS}
    assert not (first["train"] & first["val"]) and not (first["train"] & first["test"]) and not (first["val"] & first["test"])


def test_scene_rules_and_pixels():
    rng = np.random.default_rng(0)
    counts = np.zeros(4, int)
    for _ in range(300):
        scene = data.random_scene(rng)
        objs = scene["objects"]
        counts[len(objs)] += 1
        assert 1 <= len(objs) <= 3 and 0 <= scene["background"] <= 60
        for key in ["shape", "color", "cell"]:
            assert len({o[key] for o in objs}) == len(objs)
        assert [o["cell"] for o in objs] == sorted(o["cell"] for o in objs)  # reading order
        img = data.render(scene, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        off = np.ones((64, 64), bool)  # pixels outside every object's box
        for o in objs:
            cx0, cy0 = 32 + 21 * (o["cell"] % 3 - 1), 32 + 21 * (o["cell"] // 3 - 1)  # the cell centre
            assert abs(o["cx"] - cx0) <= 2 and abs(o["cy"] - cy0) <= 2
            color = data.COLORS[o["color"]]
            for y, x in [(o["cy"], o["cx"]), (o["cy"] - 1, o["cx"] - 1)]:  # the pixels around the centre
                assert tuple(img[y, x]) == color
            h = data.SIZES[o["size"]] // 2
            off[o["cy"] - h:o["cy"] + h, o["cx"] - h:o["cx"] + h] = False
        bg = img[off].astype(int)  # (n, 3)
        assert (bg == bg[:, :1]).all()  # gray
        assert (np.abs(bg - scene["background"]) <= 8).all() and bg.max() <= 68
    assert counts[1] > counts[2] > 0 and counts[3] > 0


def test_masks():
    for (shape, size), m in data.MASKS.items():
        s = data.SIZES[size]
        assert m.shape == (s, s)
        assert (m == m[:, ::-1]).all()  # left-right symmetric
        assert m[s // 2].all() or shape == "triangle"  # the middle row spans the full width
        assert m[:, s // 2].all()  # and so does the middle column
    assert data.MASKS["triangle", "large"][0].sum() <= 2 and data.MASKS["triangle", "large"][-1].all()  # point up
    assert data.MASKS["cross", "large"][0].sum() == 6 and not data.MASKS["cross", "large"][0, 0]


def test_blank_image():
    img = data.blank_image(np.random.default_rng(3), level=30)
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
    assert data.caption(one) == "a small white triangle at the bottom right."
    assert data.caption_chunk(data.caption(two)) == \
        "<image>Output:a large red circle at the top left and a small blue cross in the center.<|endofchunk|>"
    assert data.caption(three) == \
        "a small green square at the top, a large yellow cross on the left and a small purple circle on the right."
    assert data.caption_chunk() == "<image>Output:"
    assert [data.POSITION_PHRASES[k] for k in (2, 6, 7)] == ["at the top right", "at the bottom left", "at the bottom"]


def test_question_strings():
    rng = np.random.default_rng(0)
    scene = hand_scene(("large", "red", "circle", 0))
    qa = {t: data.question(scene, t, rng) for t in ["color", "shape", "count", "position"]}
    assert qa == {
        "color": ("what color is the circle?", "red"),
        "shape": ("what shape is the red object?", "circle"),
        "count": ("how many objects are there?", "1"),
        "position": ("where is the red circle?", "top left"),
    }
    assert data.question_chunk(*qa["color"]) == "<image>Question:what color is the circle? Short answer:red<|endofchunk|>"
    assert data.question_chunk("how many objects are there?") == "<image>Question:how many objects are there? Short answer:"
    three = hand_scene(("small", "green", "square", 1), ("large", "yellow", "cross", 3), ("small", "purple", "circle", 8))
    assert data.question(three, "count", rng)[1] == "3"


def test_exists_questions_are_right_and_balanced():
    rng = np.random.default_rng(1)
    answers = []
    for _ in range(400):
        scene = data.random_scene(rng)
        q, a = data.question(scene, "exists", rng)
        color, shape = q.removeprefix("is there a ").removesuffix("?").split(" ")
        present = any(o["color"] == color and o["shape"] == shape for o in scene["objects"])
        assert a == ("yes" if present else "no")
        if a == "no":  # a near miss: the color or the shape is in the image
            assert any(o["color"] == color or o["shape"] == shape for o in scene["objects"])
        answers.append(a)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_sequence_formats():
    answers = {"color": set(data.COLORS), "shape": set(data.SHAPES), "size": set(data.SIZES), "position": set(data.POSITIONS)}
    for i in range(40):
        text, images = data.shapes_sample("val", 0, i)
        assert text.startswith(IMAGE) and text.endswith(EOC + EOT) and text.count(IMAGE) == len(images)
        text, images = data.shapes_sample("val", 0, i, "task")
        outs = [chunk.removeprefix("Output:") for chunk in text.removesuffix(EOC + EOT).split(EOC + IMAGE)]
        outs[0] = outs[0].removeprefix(IMAGE + "Output:")
        assert 2 <= len(outs) <= 8 and len(images) == len(outs)
        assert any(set(outs) <= v for v in answers.values())  # one kind of answer per sequence
        text, images = data.shapes_sample("val", 0, i, "interleaved")
        assert 2 <= len(images) <= 4 and text.count(IMAGE) == len(images)
    text, _ = data.shapes_sample("val", 0, 0, "question", qtype="count")
    assert "how many objects are there?" in text
    text, images = data.shapes_sample("val", 0, 0, "task", task_kind="size", n_chunks=5)
    assert len(images) == 5 and text.count("Output:small") + text.count("Output:large") == 5


# --- distributed order

def test_batch_indices_cover_each_step_once():
    for world_size, grad_accum in [(1, 1), (1, 4), (2, 2), (4, 1), (3, 2)]:
        B, G = 3, 3 * world_size * grad_accum
        for step in [0, 5]:
            seen = [i for r in range(world_size) for m in range(grad_accum)
                    for i in data.batch_indices(step, m, grad_accum, r, world_size, B)]
            assert sorted(seen) == list(range(step * G, (step + 1) * G))


def test_get_batch_same_samples_whatever_world_size():
    def micro_batches(world_size, grad_accum):  # one optimizer step, as all ranks together see it
        out = []
        for r in range(world_size):
            for m in range(grad_accum):
                images, idx, targets = data.get_batch("train", 0, 2, m, grad_accum, r, world_size, 3, tok, 1024)
                out.append((images.numpy().tobytes(), idx.tolist(), targets.tolist()))
        return out
    one = micro_batches(world_size=1, grad_accum=2)
    assert one == micro_batches(world_size=2, grad_accum=1)  # the same micro-batches, in the same order
    assert one != micro_batches(world_size=1, grad_accum=1)  # (a different global batch size: other samples)


def test_shapes_tokenizer_words_and_markup():
    tok = data.get_tokenizer("shapes")
    assert (tok.eot_id, tok.image_id, tok.eoc_id) == (tok.base_n_vocab - 1, tok.base_n_vocab, tok.base_n_vocab + 1)
    # every single-word answer of the shapes world is one token, so an answer is one choice
    words = list(data.COLORS) + list(data.SHAPES) + list(data.SIZES) + ["top", "left", "center", "yes", "no", "1", "2", "3"]
    assert [w for w in words if len(tok.encode(w)) != 1] == []
    # the same text is 3x shorter than in bytes, and round-trips; literal markup in plain text stays text
    text, _ = data.shapes_sample("train", 0, 0, kind="caption")
    assert 3 * len(tok.encode_markup(text)) < len(data.get_tokenizer("bytes").encode_markup(text))
    for s in ["a caption with <image> and <|endofchunk|> inside", "ünïcödé ✓ text", ""]:
        ids = tok.encode(s)
        assert tok.image_id not in ids and tok.eoc_id not in ids and tok.eot_id not in ids
        assert tok.decode(ids) == s
    assert tok.encode_markup("<image>Output:red<|endofchunk|>")[0] == tok.image_id
    # learned deterministically: two builds give the same merges
    assert data.shapes_encoding()._mergeable_ranks == tok.enc._mergeable_ranks


# -----------------------------------------------------------------------------
# data.download against a local HTTP server: resume, atomicity, verification, a clear error when unreachable

def serve_files(files, cut=None, cut_at=None):
    """A server on 127.0.0.1 for {path: bytes} that honours Range requests (404 for other paths); its first
    response for path `cut` breaks off after cut_at bytes. Returns (base url, requests seen as a list of
    (path, Range header), shutdown)."""
    import http.server
    import threading
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            seen.append((self.path, rng))
            if self.path not in files:
                self.send_error(404)
                return
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            body = files[self.path][start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == cut and sum(p == cut for p, _ in seen) == 1:
                self.wfile.write(body[:cut_at])  # then the connection drops
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", seen, server.shutdown


def serve(payload, cut_first_at=None):
    """One file at /file.bin (serve_files) -> (its url, requests seen, shutdown)."""
    base, seen, stop = serve_files({"/file.bin": payload}, None if cut_first_at is None else "/file.bin", cut_first_at)
    return f"{base}/file.bin", seen, stop


def test_download_resumes_an_interrupted_transfer(tmp_path):
    import hashlib
    payload = bytes(range(256)) * 4000  # ~1 MB
    url, seen, stop = serve(payload, cut_first_at=300_000)
    try:
        path = str(tmp_path / "sub" / "file.bin")
        data.download(url, path, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), retries=3)
        assert open(path, "rb").read() == payload and not os.path.exists(path + ".part")
        assert seen[0][1] is None and len(seen) == 2  # the retry asked only for the rest, from what had arrived
        assert 0 < int(seen[1][1][len("bytes="):-1]) <= 300_000
        data.download(url, path, size=len(payload))  # already there: no request
        assert len(seen) == 2
    finally:
        stop()


def test_download_never_leaves_a_partial_file_under_the_real_name(tmp_path):
    payload = b"x" * 10_000
    url, seen, stop = serve(payload)
    try:
        path = str(tmp_path / "f.bin")
        with pytest.raises(data.DownloadError, match="sha256"):
            data.download(url, path, sha256="0" * 64)
        assert not os.path.exists(path) and not os.path.exists(path + ".part")
    finally:
        stop()


def free_port():
    """A local port that nothing listens on: a download from it fails at once, as offline."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_download_unreachable_fails_fast_and_clearly(tmp_path):
    import time
    port = free_port()
    t0 = time.time()
    with pytest.raises(data.DownloadError, match=f"127.0.0.1:{port}.*3 tries"):
        data.download(f"http://127.0.0.1:{port}/x.zip", str(tmp_path / "x.zip"))
    assert time.time() - t0 < 10 and not os.path.exists(tmp_path / "x.zip")

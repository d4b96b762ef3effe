"""The moving-shapes world (shapes_video.py): clips that follow its rules (checked on the pixels), answers that no
first frame gives away, batches of clips (and of clips and images mixed), its mp4 folders read back by video.py, and
train.py / eval.py on it end to end (tiny, a few steps)."""

import json
import subprocess
import sys

import numpy as np
import torch

import batching
import data
import shapes
import shapes_video as sv
import video
from test_train import ENV, ROOT, SMALL, make_assets, run_train
from tokenizer import get_tokenizer


def centre(frame, color, tolerance=0):
    """The centre (x, y) of the pixels of one object's color in a frame, or None where it is absent."""
    ys, xs = np.nonzero((np.abs(frame.astype(int) - shapes.COLORS[color]) <= tolerance).all(-1))
    return None if len(xs) == 0 else (xs.mean(), ys.mean())


def test_clips_follow_the_rules():
    for i in range(60):
        text, (frames,) = sv.video_sample("test", 0, i, kind="direction")
        assert frames.shape == (sv.FRAMES, 64, 64, 3) and frames.dtype == np.uint8
        words = text.split("which way does the ")[1].split(" move?")[0].split()
        answer = text.split("Short answer:")[1].split("<|endofchunk|>")[0]
        path = [centre(f, words[0]) for f in frames]
        (x0, y0), (x1, y1) = path[0], path[-1]
        assert {"left": x1 < x0, "right": x1 > x0, "up": y1 < y0, "down": y1 > y0}[answer]
        text, (frames,) = sv.video_sample("test", 0, i, kind="count")
        end = int(text.split("Short answer:")[1][0])
        assert end == sum(centre(frames[-1], c) is not None for c in shapes.COLORS)
        clip, shape = sv.count_clip(shapes.sample_rng("test", 0, i), appearing=True)
        [new] = [o for o in clip["objects"] if o["at"][0] is None]  # one object appears; the others stay
        assert new["shape"] == shape and new["at"][-1] is not None
        assert all(None not in o["at"] for o in clip["objects"] if o is not new)
        text, clips = sv.video_sample("test", 0, i, kind="task", task_kind="color", n_chunks=3)
        answers = [c.split("Output:")[1] for c in text.split("<|endofchunk|>")[:-1]]
        assert len(clips) == 3 and all(centre(f[0], a) is not None for f, a in zip(clips, answers))
    assert np.array_equal(sv.video_sample("train", 3, 7)[1][0], sv.video_sample("train", 3, 7)[1][0])


def test_the_first_frame_gives_no_direction_away():
    """Where the mover starts is drawn the same way whichever way it goes: over many clips, each direction's first
    frames span the same range of positions."""
    starts = {d: [] for d in sv.DIRECTIONS}
    for i in range(400):
        clip, direction = sv.motion_clip(shapes.sample_rng("train", 1, i))
        starts[direction].append(clip["objects"][0]["at"][0])
    for d, xy in starts.items():
        xy = np.array(xy)
        assert xy.min() >= sv.START[0] and xy.max() <= sv.START[1] and abs(xy.mean() - 32) < 1.5, d
    first = sv.first_frame_only(sv.video_sample("test", 0, 0)[1][0])
    assert all(np.array_equal(f, first[0]) for f in first)


def test_batches_of_clips_and_images():
    tok = get_tokenizer("shapes")
    clips = [sv.video_sample("train", 0, i, kind="direction") for i in range(3)]
    b = data.collate(clips, tok, 128)
    assert b.images.shape == (3, sv.FRAMES, 3, 64, 64)
    mixed = data.collate(clips[:2] + [shapes.shapes_sample("train", 0, 0, kind="question")], tok, 128)
    assert [tuple(x.shape) for x in mixed.images] == [(4, 3, 64, 64)] * 2 + [(1, 3, 64, 64)]  # no padding frames
    packed = data.ShapesData("train", 0, tok, 128, pack=True, video=True).batch(0, 0, 1, 0, 1, 2)
    n = int((packed.idx == tok.image_id).sum())
    assert n > 2 and packed.images.shape == (n, sv.FRAMES, 3, 64, 64)
    # eval's loader: renders of the tower's size (an int for open_clip's ResNets) are normalised as training's are
    clip, image = clips[0][1][0], shapes.shapes_sample("train", 0, 0, kind="question")[1][0]
    loader = batching.PromptImages([0], [[clip, image]], None, data.CLIP_MEAN, data.CLIP_STD, 64)
    items = loader[0][1]
    assert [tuple(x.shape) for x in items] == [(4, 3, 64, 64), (1, 3, 64, 64)]
    assert torch.equal(items[0], b.images[0]) and torch.equal(items[1], mixed.images[2])


def test_folder_of_mp4_clips(tmp_path):
    root = sv.write_folder(str(tmp_path / "moving"), n_train=3, n_test=2)
    lines = [json.loads(line) for line in open(tmp_path / "moving" / "test.jsonl")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        frames = np.stack([np.asarray(f) for f in video.read_frames(f"{root}/{line['video']}")])
        rng = shapes.sample_rng("test", 0, i)
        clip, direction = sv.motion_clip(rng)
        assert line["answers"] == [direction] and frames.shape == (sv.FRAMES, 64, 64, 3)
        rendered = sv.render_clip(clip, rng)
        assert np.abs(frames.astype(int) - rendered).mean() < 8  # H.264 at crf 10, 4:4:4: within the noise's +-8
        color = clip["objects"][0]["color"]
        for f, g in zip(frames, rendered):  # the mover where it was drawn, to a pixel
            assert np.allclose(centre(f, color, tolerance=40), centre(g, color), atol=1.0)


def test_train_and_evaluate_on_clips(tmp_path):
    assets = make_assets(str(tmp_path))
    out = str(tmp_path / "out")
    records = run_train(out, *SMALL, *assets, "--dataset=shapes_video", "--max_num_frames=4", "--max_iters=2",
                        "--eval_interval=2", "--eval_iters=1", "--tokenizer=bytes")
    assert records and all(np.isfinite(r.get("loss", 0)) for r in records)
    p = subprocess.run([sys.executable, "eval.py", f"--init_from={out}", "--task=shapes_video", "--num_samples=4",
                        f"--results={tmp_path / 'r.json'}", "--num_workers=0", "--max_new_tokens=3", "--shots=0,1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert {(r["subtask"], r["shots"]) for r in records} == {
        *((q + b, 0) for q in ("direction", "count", "appears") for b in ("", "_blank")),
        *((t, k) for t in ("task", "task_blank") for k in (0, 1))}


def test_a_folder_of_clips_trains_and_evaluates(tmp_path):
    """A dataset folder whose lines have "video" (shapes_video.write_folder's mp4 clips): train.py reads it with the
    frozen tower's features cached (one row per frame) or not, to the same loss; an unreadable clip is a counted skip;
    eval.py --task=vqa answers its test questions."""
    assets = make_assets(str(tmp_path))
    root = sv.write_folder(str(tmp_path / "moving"), n_train=6, n_test=3)
    (tmp_path / "moving" / "clips" / "train_00005.mp4").write_bytes(b"not a video")
    losses = []
    for cache in (True, False):
        out = str(tmp_path / f"out-{cache}")
        records = run_train(out, *SMALL, *assets, "--dataset=folder", f"--data_dir={root}", "--max_num_frames=4",
                            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--tokenizer=bytes",
                            f"--cache_vision_features={cache}", "--batch_size=2")
        losses.append([r["loss"] for r in records if "loss" in r])
        stdout = open(f"{out}/stdout.txt").read()
        assert "skipped: video 'clips/train_00005.mp4' cannot be decoded (VideoError)" in stdout, stdout[-2000:]
    assert np.allclose(losses[0], losses[1], rtol=1e-4), losses
    p = subprocess.run([sys.executable, "eval.py", f"--init_from={tmp_path / 'out-True'}", "--task=vqa",
                        f"--data_dir={root}", "--shots=0,2", f"--results={tmp_path / 'r.json'}", "--num_workers=0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for r in json.loads((tmp_path / "r.json").read_text()):  # a prompt with the unreadable clip: a counted skip
        assert r["n"] + sum(r["skipped"].values()) == 3 and set(r["skipped"]) <= {"unreadable image (VideoError)"}

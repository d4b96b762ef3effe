"""Reading videos (video.py): clips encoded here with PyAV in mp4 (H.264), webm (VP9), avi (MPEG-4 part 2) and mkv,
each frame a flat gray whose level tells its index; frames sampled at 1 FPS (the paper's rate), at another rate, and
spread evenly over a clip longer than max_frames; unreadable files are a VideoError naming them."""

import os

import av
import numpy as np
import pytest

import video

CODECS = {"mp4": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4", "mkv": "libx264"}


def write_video(path, n_frames, rate, codec, size=32, level=lambda i: 20 * i + 10, frames=None):
    """n_frames frames at `rate` frames per second, frame i a flat gray of level(i); or the given frames (F, H, W, 3)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size if frames is None else frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames if frames is None else len(frames)):
            pixels = np.full((size, size, 3), level(i), np.uint8) if frames is None else frames[i]
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def indices(frames):
    """Each frame's index, read back from its gray level (lossy codecs: to the nearest)."""
    return [round((np.asarray(f, dtype=np.float64).mean() - 10) / 20) for f in frames]


def test_frame_times():
    assert video.frame_times(2.5) == [0, 1, 2]                         # 1 FPS, the clip's first 3 seconds
    assert video.frame_times(2.5, fps=2) == [0, 0.5, 1, 1.5, 2]
    assert video.frame_times(0.2) == [0]                               # a clip shorter than a second: one frame
    assert video.frame_times(20, max_frames=4) == [2.5, 7.5, 12.5, 17.5]  # longer: spread evenly over all of it
    with pytest.raises(ValueError):
        video.frame_times(3, fps=0)


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_read_frames(tmp_path, ext):
    path = write_video(tmp_path / f"clip.{ext}", 10, 4, CODECS[ext])  # 10 frames at 4 FPS: 2.5 s
    assert indices(video.read_frames(path)) == [0, 4, 8]              # at 0, 1, 2 s
    assert indices(video.read_frames(path, fps=2)) == [0, 2, 4, 6, 8]
    assert indices(video.read_frames(path, max_frames=2)) == [2, 7]   # at 0.625 and 1.875 s
    frames = video.read_frames(path)
    assert frames[0].mode == "RGB" and frames[0].size == (32, 32)


def test_unreadable_videos_are_errors_naming_them(tmp_path):
    good = write_video(tmp_path / "clip.mp4", 4, 2, "libx264")
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[:300])
    for name, reason in [("missing.mp4", "not found"), ("text.mp4", "cannot read"), ("cut.mp4", "cannot read")]:
        with pytest.raises(video.VideoError, match=reason) as e:
            video.read_frames(tmp_path / name)
        assert name in str(e.value)


# -----------------------------------------------------------------------------
# sample.py --video


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """test_sample's checkpoint (an image model: one time embedding), and the same model with 4 time embeddings, drawn
    at random (a model that can read clips of up to 4 frames, and more by interpolation); a clip; an image."""
    import dataclasses

    import torch

    import test_sample
    from model import Flamingo
    out, pngs, _ = test_sample.files.__wrapped__(tmp_path_factory)
    model, ckpt = Flamingo.from_checkpoint(out, verbose=False)
    videos = Flamingo(model.lm, model.vision, dataclasses.replace(model.config, max_num_frames=4), verbose=False)
    trained = model.trained_state_dict()
    trained["perceiver.frame_embs"] = torch.randn(4, model.vision.width, generator=torch.Generator().manual_seed(0))
    videos.load_trained(trained)
    root = tmp_path_factory.mktemp("video")
    videos.save_checkpoint(str(root / "ckpt.pt"), config=ckpt["config"])
    clip = write_video(root / "clip.mp4", 12, 4, "libx264", size=64, level=lambda i: 15 * i + 40)  # 3 s: 3 frames
    return out, str(root), str(clip), pngs[0]


def expected(out, media, prompt, max_new_tokens):
    """What sample.py should print, computed in-process: media is [("video" or "image", path)], in order."""
    import torch
    from PIL import Image

    from model import Flamingo
    from tokenizer import get_tokenizer
    torch.set_num_threads(1)
    model, ckpt = Flamingo.from_checkpoint(out, verbose=False)
    model.eval()
    tok = get_tokenizer(ckpt["config"]["tokenizer"], lm_vocab_size=model.lm.config.vocab_size)
    items = [torch.stack([model.vision.preprocess(f) for f in (video.read_frames(p) if kind == "video"
                                                                else [Image.open(p)])]) for kind, p in media]
    ids = tok.encode_markup(prompt)
    new = model.generate(items, [ids], max_new_tokens, temperature=0)[0]
    return tok.decode(new)


def test_sample_a_video_and_an_image_in_one_prompt(checkpoints):
    from test_sample import run_sample
    _, videos, clip, png = checkpoints
    prompt = "<image>Output:red<|endofchunk|><image>Output:"
    rc, stdout, err = run_sample(f"--init_from={videos}", "--video", clip, f"--image={png}", f"--prompt={prompt}",
                                 "--max_new_tokens=5")
    assert rc == 0, err
    text = expected(videos, [("video", clip), ("image", png)], prompt, 5)
    assert text and stdout.endswith(text + "\n"), (stdout[-200:], text)
    rc, stdout, err = run_sample(f"--init_from={videos}", f"--video={clip}", "--max_new_tokens=5")  # alone: a caption
    assert rc == 0 and stdout.endswith(expected(videos, [("video", clip)], "<image>Output:", 5) + "\n"), err


def test_sample_refuses_what_cannot_work(checkpoints, tmp_path):
    from test_sample import assert_clean_failure, run_sample
    images_only, videos, clip, png = checkpoints
    assert_clean_failure(*run_sample(f"--init_from={images_only}", "--video", clip), "cannot tell frames apart in time")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00 ftypisom" + b"\x01" * 100)
    assert_clean_failure(*run_sample(f"--init_from={videos}", "--video", str(tmp_path / "bad.mp4")),
                         "cannot read video", "bad.mp4")
    assert_clean_failure(*run_sample(f"--init_from={videos}", "--video", str(tmp_path / "none.mp4")), "not found")


# -----------------------------------------------------------------------------
# eval.py --task=msvdqa / msrvttqa, on fixtures in the layouts their authors publish


def video_qa_fixture(root, task):
    """MSVD-QA: youtube_mapping.txt, YouTubeClips/<YouTube name>.avi; MSRVTT-QA: TrainValVideo/ and TestVideo/
    video<N>.mp4; both {train,val,test}_qa.json. One test question's clip is missing."""
    import json

    import shapes
    import shapes_video as sv
    root.mkdir()
    splits = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 13)}
    if task == "msvdqa":
        (root / "YouTubeClips").mkdir()
        (root / "youtube_mapping.txt").write_text("".join(f"yt{i}_{i}_{i + 5} vid{i + 1}\n" for i in range(13)))
        clip_path = lambda i: root / "YouTubeClips" / f"yt{i}_{i}_{i + 5}.avi"  # noqa: E731
    else:
        for d in ("TrainValVideo", "TestVideo"):
            (root / d).mkdir()
        clip_path = lambda i: root / ("TestVideo" if i >= 8 else "TrainValVideo") / f"video{i}.mp4"  # noqa: E731
    for split, ids in splits.items():
        qa = []
        for i in ids:
            clip, direction = sv.motion_clip(shapes.sample_rng("train", 5, i))
            o = clip["objects"][0]
            if i != 12:  # the last test question's clip is missing
                frames = sv.render_clip(clip, shapes.sample_rng("train", 5, i))
                if task == "msvdqa":  # MSVD's clips are AVI files
                    write_video(clip_path(i), 0, 1, "mpeg4", frames=frames)
                else:
                    sv.write_clip(clip_path(i), frames)
            qa.append({"answer": direction, "id": 100 + i, "question": f"which way does the {o['color']} "
                       f"{o['shape']} move", "video_id": i + 1 if task == "msvdqa" else i})
        (root / f"{split}_qa.json").write_text(json.dumps(qa))
    return root


@pytest.mark.parametrize("task", ["msvdqa", "msrvttqa"])
def test_video_qa_benchmarks(checkpoints, tmp_path, task):
    import json
    import subprocess
    import sys

    from benchmarks import read_task
    from test_sample import ENV, ROOT
    root = video_qa_fixture(tmp_path / task, task)
    train, test, kind = read_task(task, str(root))
    assert kind == "vqa" and len(train) == 6 and len(test) == 5 and test[0]["answers"] in (["left"], ["right"],
                                                                                           ["up"], ["down"])
    assert all(os.path.isfile(e["image"]) for e in train + test[:4]) and not os.path.exists(test[4]["image"])
    _, videos, _, _ = checkpoints
    p = subprocess.run([sys.executable, "eval.py", f"--init_from={videos}", f"--task={task}", f"--data_dir={root}",
                        "--shots=0,2", f"--results={tmp_path / 'r.json'}", "--num_workers=0", "--batch_size=2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["shots"] for r in records] == [0, 2]
    for r in records:  # the missing clip: a counted skip; one answer a question: exact match, no VQA accuracy
        assert r["n"] == 4 and r["skipped"] == {"unreadable image (VideoError)": 1}, r
        assert "exact_match" in r and "vqa_accuracy" not in r and len(r["predictions"]) == 4

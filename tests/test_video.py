"""Reading videos (video.py): clips encoded here with PyAV in mp4 (H.264), webm (VP9), avi (MPEG-4 part 2) and mkv,
each frame a flat gray whose level tells its index; frames sampled at 1 FPS (the paper's rate), at another rate, and
spread evenly over a clip longer than max_frames; unreadable files are a VideoError naming them."""

import av
import numpy as np
import pytest

import video

CODECS = {"mp4": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4", "mkv": "libx264"}


def write_video(path, n_frames, rate, codec, size=32, level=lambda i: 20 * i + 10):
    """n_frames frames at `rate` frames per second, frame i a flat gray of level(i)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level(i), np.uint8), format="rgb24")
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

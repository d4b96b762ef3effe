"""sample.py as a user runs it (a subprocess, CPU, no network): clear errors without a traceback, and the last
line of output is the greedy continuation, computed here in-process from the same checkpoint."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import shapes
from tokenizer import get_tokenizer
from test_train import ENV, ROOT, SMALL, make_assets, run_train

TWO_SHOT = "<image>Output:red<|endofchunk|><image>Output:"


def run_sample(*args):
    p = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint from 2 iterations of train.py, two shapes-world PNGs and a PNG that is not one."""
    root = tmp_path_factory.mktemp("sample")
    out = str(root / "out")
    run_train(out, *SMALL, *make_assets(str(root)), "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    rng = np.random.default_rng(0)
    pngs = []
    for name in ("a.png", "b.png"):
        pngs.append(str(root / name))
        Image.fromarray(shapes.render(shapes.random_scene(rng), rng)).save(pngs[-1])
    garbage = root / "x.png"
    garbage.write_bytes(b"\x89PNG not really" * 20)
    return out, pngs, str(garbage)


def expected_continuation(out, pngs, prompt, max_new_tokens):
    """Greedy decoding in-process, the way sample.py does it."""
    import open_clip
    from model import Flamingo
    torch.set_num_threads(1)
    model, ckpt = Flamingo.from_checkpoint(out, verbose=False)
    model.eval()
    tok = get_tokenizer(ckpt["config"]["tokenizer"], lm_vocab_size=model.lm.config.vocab_size)
    pre = open_clip.image_transform(model.vision.image_size, is_train=False, mean=model.vision.mean,
                                    std=model.vision.std)
    images = torch.stack([pre(Image.open(p).convert("RGB")) for p in pngs])[:, None]  # (N, 1, 3, H, W)
    idx = torch.tensor([tok.encode_markup(prompt)])
    new = model.generate(images, idx, max_new_tokens, temperature=0.0)[0, idx.shape[1]:].tolist()
    if model.eoc_token_id in new:
        new = new[:new.index(model.eoc_token_id)]
    return tok.decode(new)


def assert_clean_failure(rc, stdout, stderr, *needles):
    assert rc != 0
    assert "Traceback" not in stdout + stderr, stderr
    for n in needles:
        assert n in stderr, stderr


def test_no_checkpoint_says_how_to_train_one(tmp_path):
    rc, out, err = run_sample(f"--init_from={tmp_path}", "--image", "whatever.png")
    assert_clean_failure(rc, out, err, "python train.py config/train_shapes.py", f"--out_dir={tmp_path}")


def test_missing_image(files, tmp_path):
    out, _, _ = files
    missing = str(tmp_path / "nope.png")
    assert_clean_failure(*run_sample(f"--init_from={out}", "--image", missing), "not found", missing)


def test_unreadable_image(files):
    out, _, garbage = files
    assert_clean_failure(*run_sample(f"--init_from={out}", "--image", garbage), "cannot read image", garbage)


def test_images_and_markers_must_match(files):
    out, pngs, _ = files
    rc, stdout, err = run_sample(f"--init_from={out}", "--image", pngs[0], f"--prompt={TWO_SHOT}")
    assert_clean_failure(rc, stdout, err, "2 <image> markers", "1 images")


def test_caption_is_the_last_line(files):
    out, pngs, _ = files
    rc, stdout, err = run_sample(f"--init_from={out}", "--image", pngs[0], "--max_new_tokens=5")
    assert rc == 0, err
    text = expected_continuation(out, pngs[:1], "<image>Output:", 5)
    assert text and stdout.endswith(text + "\n"), (stdout[-200:], text)


def test_two_images_few_shot(files):
    out, pngs, _ = files
    rc, stdout, err = run_sample(f"--init_from={out}/ckpt.pt", "--image", pngs[0], f"--image={pngs[1]}",
                                 f"--prompt={TWO_SHOT}", "--max_new_tokens=5")
    assert rc == 0, err
    text = expected_continuation(out, pngs, TWO_SHOT, 5)
    assert text and stdout.endswith(text + "\n"), (stdout[-200:], text)

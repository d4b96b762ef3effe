"""Training on folders of one's own (folders.FolderData, train.py's dataset "folder" and fine-tuning init_from):

- each line kind (caption, question, document) becomes eval's prompt chunk, with the labels of data.chunk_mask;
- rows: each example once per epoch, within block_size, the same rows from a fresh reader;
- bad lines and files: counted skips with file and line number; nothing usable stops the run at the start;
- mixing folders by loss weight (a weight of 0 leaves the run of the other folder alone, bit for bit);
- fine-tuning from a checkpoint changes the trained parts only (and the LM's top layers with train_lm_layers).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import folders
import shapes
from model import Flamingo
from tokenizer import CAPTION, get_tokenizer
from test_train import ENV, ROOT, SMALL, make_assets, run_train  # noqa: F401 (ENV: the subprocess environment)


def png(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def write(root, lines, split="train"):
    with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
        f.write("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("bytes")


def test_each_line_kind_becomes_evals_chunk_with_its_labels(tmp_path, tok):
    for i in range(3):
        png(str(tmp_path / f"{i}.png"), i)
    root = write(tmp_path, [
        {"image": "0.png", "captions": ["a <image> sign"]},              # a literal <image> stays text
        {"image": "1.png", "question": "what?", "answers": ["red"]},
        {"chunks": [{"text": "Intro."}, {"image": "1.png"}, {"text": "One"}, {"text": "two."},
                    {"image": "2.png"}, {"image": "0.png"}, {"text": "Three."}]},
    ])
    fd = folders.FolderData(root, "train", tok, block_size=256, image_size=32, log=lambda m: None)
    (cap,), (vqa,), (doc,) = fd.units
    I, E = tok.image_id, tok.eoc_id
    assert cap[0] == [I] + tok.encode("Output:a <image> sign") + [E] and len(cap[1]) == 1
    assert cap[0] == tok.encode_template(CAPTION, caption="a <image> sign")
    assert vqa[0] == [I] + tok.encode("Question:what? Short answer:red") + [E]
    # a document: text before the first image is context; texts in a row joined by a space; each <image> after
    # text opens a new chunk; two images in a row share the text that follows (the second one is attended)
    assert doc[0] == (tok.encode("Intro.") + [I] + tok.encode("One two.") + [E, I, I] + tok.encode("Three.")
                      + [E, tok.eot_id])
    assert [os.path.basename(p) for p in doc[1]] == ["1.png", "2.png", "0.png"]
    # the labels: every token of a chunk's text and its <|endofchunk|>, nothing before the first <image>
    blank = np.zeros((32, 32, 3), np.uint8)
    b = data.collate([(doc[0], [blank] * 3), (cap[0] + vqa[0] + [tok.eot_id], [blank] * 2)], tok, 256)
    labelled = [[int(t) for t in row if t >= 0] for row in b.targets]
    assert labelled[0] == tok.encode("One two.") + [E] + tok.encode("Three.") + [E]
    assert labelled[1] == cap[0][1:] + vqa[0][1:]  # a row of two chunks: all but each <image>
    assert b.images.shape == (5, 1, 3, 32, 32)


def test_rows_use_each_example_once_per_epoch_and_fit(tmp_path, tok):
    root = shapes.write_folder(str(tmp_path / "f"), "vqa", n_train=40, n_test=2)
    a = folders.FolderData(root, "train", tok, block_size=200, image_size=64, seed=3, log=lambda m: None)
    b = folders.FolderData(root, "train", tok, block_size=200, image_size=64, seed=3, log=lambda m: None)
    for epoch in (0, 1):
        rows = a.epoch_rows(epoch)
        assert sorted(e for row in rows for e, _ in row) == list(range(40))
        assert all(sum(len(a.units[e][o][0]) for e, o in row) <= 199 for row in rows)
        assert len(rows) > 3  # packed: several examples a row, several rows
    assert a.epoch_rows(0) != a.epoch_rows(1)
    n0 = len(a.epoch_rows(0))
    ids, images = a.row(n0)  # the first row of epoch 1: the same from a reader that never saw epoch 0
    assert (ids, [x.tobytes() for x in images]) == (lambda r: (r[0], [x.tobytes() for x in r[1]]))(b.row(n0))
    assert ids[-1] == tok.eot_id and ids.count(tok.image_id) == len(images) == len(a.epoch_rows(1)[0])
    assert images[0].shape == (64, 64, 3)


def test_bad_lines_and_files_are_counted_skips(tmp_path, tok):
    png(str(tmp_path / "ok.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    png(str(tmp_path.parent / "outside.png"))
    good = {"image": "ok.png", "captions": ["fine"]}
    root = write(tmp_path, [
        good, "{not json", {"image": "ok.png"}, {"image": "ok.png", "captions": ["  "]},
        {"image": "missing.png", "captions": ["x"]}, {"image": "broken.png", "captions": ["x"]},
        {"image": "../outside.png", "captions": ["x"]}, {"image": str(tmp_path / "ok.png"), "captions": ["x"]},
        {"chunks": [{"text": "no image"}]}, {"chunks": [{"image": "ok.png"}, {"video": "v.mp4"}]},
        {"image": "ok.png", "captions": ["far too long " * 40]},
    ])
    with open(os.path.join(root, "train.jsonl"), "ab") as f:
        f.write(b'{"image": "ok.png", "captions": ["\xff\xfe not UTF-8"]}\n')  # line 12
    logged = []
    fd = folders.FolderData(root, "train", tok, block_size=128, image_size=32, log=logged.append)
    assert len(fd.units) == 1 and fd.skipped == {"longer than block_size": 1}
    text = "\n".join(logged)
    for n, why in [(2, "not JSON"), (3, "not a vqa or captions or docs line"), (4, "empty 'captions'"),
                   (5, "not found"), (6, "cannot be decoded"), (7, "leaves the folder"), (8, "leaves the folder"),
                   (9, "no image followed by text"), (10, "chunk 1 is not"), (12, "can't decode byte 0xff")]:
        line = next(m for m in logged if f"train.jsonl:{n}: skipped: " in m)
        assert why in line, (n, why, line)
    assert "train.jsonl: 2 examples, 10 lines skipped" in text and "train.jsonl:11: skipped: longer than" in text
    write(tmp_path, ["{not json", {"image": "missing.png", "captions": ["x"]}])
    with pytest.raises(ValueError, match="no usable"):
        folders.FolderData(root, "train", tok, block_size=128, image_size=32, log=lambda m: None)


def test_an_image_gone_at_batch_time_drops_its_example(tmp_path, tok):
    for i in range(4):
        png(str(tmp_path / f"{i}.png"), i)
    root = write(tmp_path, [{"image": f"{i}.png", "captions": [f"c{i}"]} for i in range(4)])
    logged = []
    fd = folders.FolderData(root, "train", tok, block_size=256, image_size=32, log=logged.append)
    os.remove(tmp_path / "2.png")
    ids, images = fd.row(0)  # all four fit in one row: three are left
    assert len(images) == ids.count(tok.image_id) == 3 and fd.skipped["image unreadable at batch time"] == 1
    assert "2.png" in logged[-1]
    for i in (0, 1, 3):
        os.remove(tmp_path / f"{i}.png")
    with pytest.raises(RuntimeError, match="no image could be read"):  # a clear error, not a NaN loss
        fd.row(0, tries=5)


# -----------------------------------------------------------------------------
# train.py on folders: a tiny random model (test_train.make_assets), a few steps

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    assets = make_assets(str(root / "assets"))
    a = shapes.write_folder(str(root / "a"), "vqa", n_train=24, n_test=8, task_kind="exists")
    b = shapes.write_folder(str(root / "b"), "captions", n_train=24, n_test=8, task_kind="shape")
    return root, assets, a, b


FOLDER = ["--dataset=folder", "--max_iters=3", "--eval_interval=3", "--tokenizer=bytes"]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_mixing_folders_by_loss_weight(setup):
    root, assets, a, b = setup
    run_train(str(root / "one"), *SMALL, *assets, *FOLDER, f"--data_dir={a}")
    run_train(str(root / "zero"), *SMALL, *assets, *FOLDER, f"--data_dir={a},shapes,{b}",
              "--data_weights=(1.0, 0.0, 0.0)")  # "shapes": the shapes world as one source of the mix
    log = run_train(str(root / "half"), *SMALL, *assets, *FOLDER, f"--data_dir={a},{b}", "--data_weights=1.0,0.5")
    one, zero, half = weights(root / "one"), weights(root / "zero"), weights(root / "half")
    assert all(torch.equal(one[k], zero[k]) for k in one)  # the other sources, weighted 0, changed nothing
    assert not all(torch.equal(one[k], half[k]) for k in one)
    assert [r["iter"] for r in log if "val_loss" in r] == [0, 3]  # validation on each folder's test.jsonl


def test_nothing_usable_stops_at_the_start(setup, tmp_path):
    import subprocess
    import sys
    _, assets, _, _ = setup
    write(tmp_path, ["{not json", {"image": "../x.png", "captions": ["x"]}])
    p = subprocess.run([sys.executable, "train.py", *SMALL, *assets, *FOLDER, f"--data_dir={tmp_path}",
                        f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "train.jsonl:1: skipped: not JSON" in p.stdout and "no usable" in p.stderr


@pytest.fixture(scope="module")
def base(setup):
    """A checkpoint to fine-tune: 2 steps on the shapes world."""
    root, assets, _, _ = setup
    run_train(str(root / "base"), *SMALL, *assets, "--max_iters=2", "--eval_interval=2")
    return str(root / "base")


def test_finetuning_from_a_checkpoint_changes_only_trained_parts(setup, base):
    root, assets, a, b = setup
    base, _ = Flamingo.from_checkpoint(base, verbose=False)
    run_train(str(root / "ft"), *SMALL, *FOLDER, f"--data_dir={b}", f"--init_from={root / 'base'}",
              "--train_lm_layers=1")
    ft, ckpt = Flamingo.from_checkpoint(str(root / "ft"), verbose=False)
    assert ckpt["config"]["tokenizer"] == "bytes" and ft.config.train_lm_layers == 1
    before, after = dict(base.named_parameters()), dict(ft.named_parameters())
    top = f"lm.transformer.h.{base.lm.config.n_layer - 1}."
    trained = {k for k in after if k.startswith(("perceiver.", "xattn.", "new_", top))}
    assert set(ckpt["model"]) == trained  # the checkpoint holds exactly the trained parts
    for k in after:
        assert torch.equal(before[k], after[k]) != (k in trained), k  # trained parts moved, nothing else did


def test_finetune_config_dry_run(base):
    """config/finetune_folder.py's dry run counts the checkpoint's model, plus the LM layers it would train."""
    from test_dry_run import dry_run
    model, _ = Flamingo.from_checkpoint(base, verbose=False)
    trained, frozen = model.parameter_counts()["total"]
    record, _, _ = dry_run("config/finetune_folder.py", f"--init_from={base}")
    assert (record["total_params"], record["trained_params"]) == (trained + frozen, trained)
    record, _, _ = dry_run("config/finetune_folder.py", f"--init_from={base}", "--train_lm_layers=1")
    layer = sum(p.numel() for p in model.lm.transformer.h[-1].parameters())
    assert (record["total_params"], record["trained_params"]) == (trained + frozen, trained + layer)


def test_cached_vision_features_train_the_same(setup):
    """cache_vision_features=True: the tower runs once per image (a memmap in out_dir, reused by a later run of the
    same tower), and training reads its output: the same weights as with pixels, to float rounding."""
    import subprocess
    import sys
    root, assets, a, _ = setup
    run_train(str(root / "pixels"), *SMALL, *assets, *FOLDER, f"--data_dir={a}")
    out = root / "cached"
    cmd = [sys.executable, "train.py", *SMALL, *assets, *FOLDER, f"--data_dir={a}", f"--out_dir={out}",
           "--cache_vision_features=True"]
    first = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "vision features of 32 images" in first.stdout and "(cached)" not in first.stdout  # 24 train + 8 test
    pixels, cached = weights(root / "pixels"), weights(out)
    for k in pixels:
        torch.testing.assert_close(cached[k], pixels[k], rtol=1e-4, atol=1e-6)
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "vision features of 32 images" in again.stdout and "(cached)" in again.stdout
    other = subprocess.run(cmd + ["--clip_pretrained=None"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)  # another tower (random weights): computed again
    assert other.returncode == 0 and "(cached)" not in other.stdout


def test_folder_rows_do_not_depend_on_the_number_of_processes(setup, tmp_path):
    """2 DDP processes x accumulation 1 follow 1 process x accumulation 2 on a folder: the same rows each step,
    also when an image cannot be decoded (under DDP each rank checks half of the images; all drop the bad one)."""
    import shutil
    root, assets, a, _ = setup
    a = shutil.copytree(a, tmp_path / "a")
    bad = json.loads(open(a / "train.jsonl").readline())["image"]
    (a / bad).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    logs = {n: run_train(str(tmp_path / str(n)), *SMALL, *assets, *FOLDER, f"--data_dir={a}",
                         f"--gradient_accumulation_steps={3 - n}", nproc=n) for n in (1, 2)}
    got, want = ([r["loss"] for r in logs[n] if "loss" in r] for n in (2, 1))
    assert len(got) == len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    for n in (1, 2):
        printed = open(tmp_path / str(n) / "stdout.txt").read()
        assert f"{bad}' cannot be decoded" in printed or f"{bad}: skipped: cannot be decoded" in printed, printed
        assert "train 23 examples" in printed, printed

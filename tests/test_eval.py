"""eval.py: the task readers on tiny fixtures written here, prompt construction, RICES, the shared-context
classifier, the protocol called from Python as the command line runs it, and the command line end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import folders
import shapes
from tokenizer import get_tokenizer
from test_train import ENV, ROOT, SMALL, make_assets, run_train

# -----------------------------------------------------------------------------
# Task readers, on fixtures in the published layouts

def png(path, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(shapes.render(shapes.random_scene(rng), rng)).save(path)


def test_read_karpathy_coco(tmp_path):
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
               "split": split, "sentences": [{"raw": f"caption {i} a "}, {"raw": f"second {i}"}]}
              for i, split in enumerate(["train", "test", "val", "restval", "test"])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    train, test, kind = ev.read_task("coco", str(tmp_path))
    assert kind == "captions" and [e["id"] for e in train] == [0] and [e["id"] for e in test] == [1, 4]
    assert test[0]["captions"] == ["caption 1 a", "second 1"]
    assert test[0]["image"] == os.path.join(str(tmp_path), "val2014", "COCO_val2014_000000000001.jpg")


def test_read_vqav2(tmp_path):
    for s, base in (("train", 0), ("val", 100)):
        qs = [{"image_id": base + i, "question": f"q{base + i}?", "question_id": 10 * (base + i)} for i in range(3)]
        anns = [{"question_id": 10 * (base + i), "image_id": base + i,
                 "answers": [{"answer": f"a{base + i}", "answer_id": j + 1} for j in range(10)]} for i in range(3)]
        (tmp_path / f"v2_OpenEnded_mscoco_{s}2014_questions.json").write_text(json.dumps({"questions": qs}))
        (tmp_path / "sub").mkdir(exist_ok=True)  # annotations may sit one folder down, as archives unpack
        (tmp_path / "sub" / f"v2_mscoco_{s}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    train, test, kind = ev.read_task("vqav2", str(tmp_path))
    assert kind == "vqa" and len(train) == 3 and len(test) == 3
    assert test[1] == {"id": 1010, "image": os.path.join(str(tmp_path), "val2014", "COCO_val2014_000000000101.jpg"),
                       "question": "q101?", "answers": ["a101"] * 10}


def test_read_hateful_memes(tmp_path):
    rows = lambda ids: "\n".join(json.dumps({"id": i, "img": f"img/{i}.png", "label": i % 2, "text": f"t {i}"})  # noqa
                                 for i in ids)
    (tmp_path / "train.jsonl").write_text(rows([1, 2, 3]))
    (tmp_path / "dev_seen.jsonl").write_text(rows([4, 5]))
    train, test, kind = ev.read_task("hateful_memes", str(tmp_path))
    assert kind == "classification" and [e["label"] for e in test] == [0, 1] and test[0]["text"] == "t 4"
    (tmp_path / "test_seen.jsonl").write_text(rows([7]))
    assert [e["id"] for e in ev.read_task("hateful_memes", str(tmp_path))[1]] == [7]


def test_missing_benchmark_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python download.py okvqa"):
        ev.read_task("okvqa", str(tmp_path))


def custom_folder(root, n_train=6, n_test=4):
    """A folder in the documented format, with bad lines planted in train.jsonl."""
    lines = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            png(os.path.join(root, "img", f"{split}{i}.png"), seed=i + (100 if split == "test" else 0))
            lines[split].append(json.dumps({"image": f"img/{split}{i}.png", "question": f"what is {split} {i}?",
                                            "answers": [f"{split}{i}"]}))
    lines["train"] += ["not json", json.dumps({"image": "../escape.png", "question": "q", "answers": ["a"]}),
                       json.dumps({"image": "/abs.png", "question": "q", "answers": ["a"]}),
                       json.dumps({"image": "img/missing.png", "question": "q", "answers": ["a"]}),
                       json.dumps({"image": "img/train0.png", "question": "q", "answers": ["  "]}),
                       json.dumps({"image": "img/train0.png", "captions": ["a caption"]})]
    for split in lines:
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            f.write("\n".join(lines[split]) + "\n")
    return root


def test_read_folder_counts_bad_lines(tmp_path):
    root = custom_folder(str(tmp_path))
    logged = []
    train = folders.read_folder(root, "train", "vqa", log=logged.append)
    assert len(train) == 6 and train[0]["image"] == os.path.join(root, "img", "train0.png")
    skips = [m for m in logged if ": skipped:" in m]
    assert len(skips) == 6 and all("train.jsonl:" in m for m in skips)
    for why in ("not JSON", "leaves the folder", "not found", "empty 'answers'", "not a vqa line"):
        assert any(why in m for m in skips), why
    assert any("6 lines skipped" in m for m in logged)
    with pytest.raises(ValueError, match="no usable"):
        folders.read_folder(root, "test", "captions", log=lambda m: None)  # only vqa lines there


# -----------------------------------------------------------------------------
# Prompts

@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("bytes")


def test_prompts_demonstrations_then_query_without_its_answer(tok):
    demos = [{"image": "d1.png", "question": "what color?", "answers": ["red", "crimson"]},
             {"image": "d2.png", "question": "is it <image> big?", "answers": ["yes"]}]
    query = {"image": "q.png", "question": "how many?", "answers": ["SECRET"]}
    ids, images = ev.build_prompt("vqa", tok, demos, query)
    assert tok.decode(ids) == ("<image>Question:what color? Short answer:red<|endofchunk|>"
                               "<image>Question:is it <image> big? Short answer:yes<|endofchunk|>"
                               "<image>Question:how many? Short answer:")
    assert images == ["d1.png", "d2.png", "q.png"]
    assert ids.count(tok.image_id) == 3  # the literal "<image>" in a question stays text
    assert "SECRET" not in tok.decode(ids)
    ids0, images0 = ev.build_prompt("vqa", tok, demos, query, zero_shot=True)
    assert ids0.count(tok.image_id) == 1 and images0 == ["q.png"]
    assert tok.decode(ids0).startswith("Question:what color? Short answer:red<|endofchunk|>Question:is it")

    cap = ev.build_prompt("captions", tok, [{"image": "a", "captions": ["a dog", "b"]}],
                          {"image": "b", "captions": ["SECRET"]})[0]
    assert tok.decode(cap) == "<image>Output:a dog<|endofchunk|><image>Output:"
    hm = ev.build_prompt("classification", tok, [{"image": "a", "text": "hi", "label": 1}],
                         {"image": "b", "text": "there", "label": 0})[0]
    assert tok.decode(hm) == ("<image>is an image with: 'hi' written on it. Is it hateful? Answer:yes<|endofchunk|>"
                              "<image>is an image with: 'there' written on it. Is it hateful? Answer:")


def test_rices_most_similar_last():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [0.6, 0.4], [-1, 0]]), dim=-1)
    query = torch.tensor([1.0, 0.0])
    assert ev.rices_demos(train, query, 3) == [3, 2, 0]


# -----------------------------------------------------------------------------
# With a model: a checkpoint from one step of train.py

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = str(root / "out")
    run_train(out, *SMALL, *make_assets(str(root)), "--max_iters=1", "--eval_interval=1", "--eval_iters=1")
    return out


def test_class_scores_reuse_the_context_exactly(ckpt, tok):
    from model import Flamingo
    torch.manual_seed(0)
    model, _ = Flamingo.from_checkpoint(ckpt, verbose=False)
    model.eval()
    with torch.no_grad():
        for p in model.xattn.parameters():  # open the gates and perturb the blocks: images must matter
            p.add_(0.3 * torch.randn_like(p))
    tok = get_tokenizer("bytes", lm_vocab_size=model.lm.config.vocab_size)
    size = model.vision.image_size
    images = torch.randn(2, 1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
    ids = tok.encode_markup("<image>is it? Answer:yes<|endofchunk|><image>is it? Answer:")
    names = ["no", "yes", "maybe not"]
    got = ev.class_scores(model, tok, [ids], images, names)[0]
    for name, score in zip(names, got):  # the reference: one full forward per class name
        full = torch.tensor([ids + tok.encode(name)])
        with torch.no_grad():
            logp = model(images, full)[0][0].float().log_softmax(-1)
        n = len(tok.encode(name))
        want = torch.stack([logp[len(ids) - 1 + t, full[0, len(ids) + t]] for t in range(n)]).mean().item()
        assert score == pytest.approx(want, abs=1e-5)


def run_eval(*args):
    p = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_command_line_on_a_custom_folder(ckpt, tmp_path):
    root = custom_folder(str(tmp_path / "folder"))
    res = str(tmp_path / "r.json")
    p = run_eval(f"--init_from={ckpt}", "--task=vqa", f"--data_dir={root}", "--shots=0,2", "--num_trials=2",
                 "--max_new_tokens=3", "--num_beams=2", f"--results={res}")
    records = json.load(open(res))
    assert [(r["shots"], r["seed"]) for r in records] == [(0, 42), (0, 43), (2, 42), (2, 43)]
    for r in records:
        assert r["task"] == "vqa" and r["n"] == 4 and r["checkpoint"] == os.path.abspath(ckpt)
        # one answer a question: exact match only (VQA accuracy needs several human answers: with one it is 0)
        assert 0 <= r["exact_match"] <= 100 and "vqa_accuracy" not in r
    assert "exact_match" in p.stdout and "lines skipped" in p.stdout


def test_vqa_accuracy_where_there_are_several_answers(ckpt, tmp_path):
    """VQA accuracy is reported where the questions have several human answers (VQAv2's 10), and equals the exact
    match when they all agree; with one answer a question only the exact match is (MSVD-QA, the folder above)."""
    from model import load_model
    root = custom_folder(str(tmp_path / "folder"))
    lines = [json.loads(line) for line in open(os.path.join(root, "test.jsonl")) if line.strip()]
    with open(os.path.join(root, "test.jsonl"), "w") as f:
        f.writelines(json.dumps({**d, "answers": d["answers"] * 10}) + "\n" for d in lines)
    torch.set_num_threads(1)
    model, name = load_model(ckpt)
    tok = get_tokenizer(name, lm_vocab_size=model.lm.config.vocab_size)
    train, test, kind = ev.read_task("vqa", root)
    out = ev.run_trial(model.eval(), tok, kind, train, test, 2, 42, max_new_tokens=3, num_beams=1, num_workers=0)
    assert out["vqa_accuracy"] == out["exact_match"]


def test_protocol_from_python_is_the_command_line(ckpt, tmp_path):
    """`import eval` and its functions, given the settings the command line takes, give its very records: nothing is
    read from the module's settings (they are the command line's defaults only)."""
    from model import load_model
    root = custom_folder(str(tmp_path / "folder"))
    res = str(tmp_path / "r.json")
    run_eval(f"--init_from={ckpt}", "--task=vqa", f"--data_dir={root}", "--shots=2", "--num_samples=3",
             "--query_set_size=4", "--max_new_tokens=3", "--num_beams=2", f"--results={res}")
    want = json.load(open(res))[0]
    torch.set_num_threads(1)
    model, name = load_model(ckpt)
    tok = get_tokenizer(name, lm_vocab_size=model.lm.config.vocab_size)
    train, test, kind = ev.read_task("vqa", root)
    got = ev.run_trial(model.eval(), tok, kind, train, test, 2, 42, num_samples=3, query_set_size=4, max_new_tokens=3,
                       num_beams=2)
    assert got == {k: want[k] for k in got} and got["n"] == 3
    shapes_records = ev.run_shapes(model, tok, [1], 42, 4, max_new_tokens=4)
    assert [r["subtask"] for r in shapes_records] == ["question", "question_blank", "caption", "caption_blank",
                                                      "task", "task_blank"]


def test_command_line_rices_caches_features(ckpt, tmp_path):
    root = custom_folder(str(tmp_path / "folder"))
    cache = str(tmp_path / "cache")
    args = [f"--init_from={ckpt}", "--task=vqa", f"--data_dir={root}", "--shots=2", "--rices=True",
            f"--rices_cache={cache}", "--max_new_tokens=2", "--num_beams=1"]
    run_eval(*args)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)
    feats = torch.load(os.path.join(cache, [f for f in files if "train" in f][0]), weights_only=True)
    assert feats.shape[0] == 6 and torch.allclose(feats.norm(dim=-1), torch.ones(6))
    stamp = {f: os.path.getmtime(os.path.join(cache, f)) for f in files}
    run_eval(*args)  # the second run reads the cache
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == stamp


def test_rices_skips_unreadable_images(ckpt, tmp_path):
    from model import Flamingo
    model, _ = Flamingo.from_checkpoint(ckpt, verbose=False)
    model.eval()
    examples = []
    for i in range(3):
        png(str(tmp_path / f"{i}.png"), seed=i)
        examples.append({"image": str(tmp_path / f"{i}.png")})
    (tmp_path / "1.png").write_bytes(b"not a png at all")  # the second one is corrupt
    feats = ev.image_features(model, examples, str(tmp_path / "cache"), "t", model_id=ckpt)
    assert feats.shape[0] == 3 and feats[1].abs().sum() == 0 and feats[0].norm() > 0.99
    assert 1 not in ev.rices_demos(feats, feats[0], 2)  # the zero row is never a demonstration


def test_hateful_memes_bad_line_is_skipped(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 1, "text": "a"}\nnot json\n')
    (tmp_path / "dev_seen.jsonl").write_text('{"id": 2, "img": "img/2.png", "label": 0, "text": "b"}\n')
    train, test, _ = ev.read_task("hateful_memes", str(tmp_path))
    assert len(train) == 1 and len(test) == 1 and "train.jsonl:2: skipped" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Batches and processes: the same records at any batch size, on any number of processes

@pytest.fixture(scope="module")
def open_ckpt(ckpt):
    """The checkpoint with its gated blocks perturbed, gates open: the images change the answers, so that a prompt
    answered with another prompt's images (a batching mistake) would show. Saved next to ckpt.pt (its paths are
    relative to that folder)."""
    c = torch.load(os.path.join(ckpt, "ckpt.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in c["model"].items():
        if k.startswith("xattn."):
            v.add_(0.3 * torch.randn(v.shape, generator=g))
    path = os.path.join(ckpt, "open.pt")
    torch.save(c, path)
    return path


@pytest.fixture(scope="module")
def open_model(open_ckpt):
    from model import load_model
    torch.set_num_threads(1)
    model, name = load_model(open_ckpt)
    return model.eval(), get_tokenizer(name, lm_vocab_size=model.lm.config.vocab_size)


@pytest.fixture(scope="module")
def shapes_folders(tmp_path_factory):
    """Small folders drawn from the shapes world: questions, captions (the color of each object), and the
    questions as a classification task (HatefulMemes' examples: text and a label)."""
    root = tmp_path_factory.mktemp("folders")
    vqa = shapes.write_folder(str(root / "vqa"), "vqa", n_train=8, n_test=10)
    captions = shapes.write_folder(str(root / "captions"), "captions", n_train=8, n_test=10)
    memes = [[{"id": e["id"], "image": e["image"], "text": e["question"], "label": i % 2}
              for i, e in enumerate(folders.read_folder(vqa, split, "vqa"))] for split in ("train", "test")]
    return {"vqa": (*ev.read_task("vqa", vqa)[:2], vqa), "captions": (*ev.read_task("captions", captions)[:2], captions),
            "classification": (*memes, None)}


@pytest.mark.parametrize("kind,k", [("captions", 2), ("vqa", 0), ("vqa", 2), ("classification", 2)])
def test_run_trial_same_records_at_batch_1_and_8(open_model, shapes_folders, kind, k):
    """Prompts of different lengths answered 8 at a time (left-padded; images decoded by 2 DataLoader workers) get
    the answers they get one at a time: captions with 3 beams, questions, and the classification scores."""
    model, tok = open_model
    train, test, _ = shapes_folders[kind]
    run = lambda b, w: ev.run_trial(model, tok, kind, train, test, k, 42, query_set_size=6, max_new_tokens=4,  # noqa
                                    num_beams=3, batch_size=b, num_workers=w)
    one, eight = run(1, 0), run(8, 2)
    assert one == eight and one["n"] == 10 and len(one["predictions"]) == 10
    if kind != "classification":
        assert len({p for _, p in one["predictions"]}) > 1  # the answers differ: the model reads its prompts
        return
    assert one["roc_auc"] is not None  # and the scores themselves: 3 prompts of different lengths, at once and alone
    ids = [tok.encode_markup("<image>is it" + " so" * i + "? Answer:") for i in range(3)]
    x = torch.randn(3, 1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # shapes-vit: 64 x 64
    together = ev.class_scores(model, tok, ids, x, ev.CLASS_NAMES)
    alone = [ev.class_scores(model, tok, [p], x[i:i + 1], ev.CLASS_NAMES)[0] for i, p in enumerate(ids)]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert abs(together[0][1] - together[2][1]) > 1e-3


def test_unreadable_image_in_a_batch_is_a_counted_skip(open_model, shapes_folders, tmp_path):
    """One corrupt test image skips its own prompt, counted; the rest of its batch is answered as before."""
    import shutil
    model, tok = open_model
    root = shutil.copytree(shapes_folders["vqa"][2], str(tmp_path / "vqa"))
    train, test, _ = ev.read_task("vqa", root)
    run = lambda test, b: ev.run_trial(model, tok, "vqa", train, test, 2, 42, query_set_size=6,  # noqa: E731
                                       max_new_tokens=4, num_beams=1, batch_size=b, num_workers=2)
    before = run(test, 1)
    with open(test[3]["image"], "wb") as f:
        f.write(b"not a png at all")
    after = run(test, 8)
    assert after["n"] == 9 and after["skipped"] == {"unreadable image (UnidentifiedImageError)": 1}
    assert after["predictions"] == [p for p in before["predictions"] if p[0] != test[3]["id"]]


def test_shapes_world_same_at_batch_1_and_8(open_model, monkeypatch):
    model, tok = open_model
    answers = []
    real = ev.shapes_answers
    monkeypatch.setattr(ev, "shapes_answers", lambda *a, **kw: answers.append(real(*a, **kw)) or answers[-1])
    one = ev.run_shapes(model, tok, [2], 42, 6, max_new_tokens=4, batch_size=1, num_workers=0)
    first, answers[:] = list(answers), []
    eight = ev.run_shapes(model, tok, [2], 42, 6, max_new_tokens=4, batch_size=8, num_workers=2)
    assert one == eight and answers == first and len(first) == 6
    assert len({a for run in first for a in run}) > 1


def test_torchrun_two_processes_at_batch_8_is_one_at_batch_1(open_ckpt, shapes_folders, tmp_path):
    """eval.py under torchrun (2 processes, gloo, CPU): the test prompts split over the processes, the answers
    gathered, rank 0 writing --results: the records of 1 process at batch 1, predictions and metrics alike."""
    root = shapes_folders["vqa"][2]
    args = [f"--init_from={open_ckpt}", "--task=vqa", f"--data_dir={root}", "--shots=0,2", "--num_samples=7",
            "--query_set_size=6", "--max_new_tokens=4", "--num_beams=3"]
    run_eval(*args, "--batch_size=1", "--num_workers=0", f"--results={tmp_path / 'one.json'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py", *args,
           "--batch_size=8", f"--results={tmp_path / 'two.json'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert one == two and len(one) == 2 and all(r["n"] == 7 and len(r["predictions"]) == 7 for r in one)
    assert p.stdout.count("records in") == 1  # one voice, rank 0's


def test_killed_eval_leaves_no_lock_in_its_dataloader_workers(open_ckpt, shapes_folders, tmp_path):
    """The DataLoader's workers are forks of eval.py, with its descriptors: they must not keep the --results lock
    alive once eval.py is killed (they outlive it by up to seconds), or the rerun would be refused."""
    import signal
    import time
    import files
    res = str(tmp_path / "r.json")
    p = subprocess.Popen([sys.executable, "eval.py", f"--init_from={open_ckpt}", "--task=vqa",
                          f"--data_dir={shapes_folders['vqa'][2]}", "--shots=0", "--num_trials=50", "--max_new_tokens=2",
                          "--num_beams=1", "--num_workers=2", f"--results={res}"], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(res) and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        time.sleep(0.2)  # into a later trial: its workers are alive
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    files.lock(res + ".lock", "--results")  # free at once (FileError if a worker still held it)

"""eval.py: the metrics against the reference code and hand-worked cases, the task readers on tiny fixtures
written here, prompt construction, RICES, the shared-context classifier, and the command line end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
from test_train import ENV, ROOT, SMALL, make_assets, run_train

# -----------------------------------------------------------------------------
# Metrics

GTS = {1: ["a red circle on the left", "a circle that is red", "red circle left side"],
       2: ["two dogs play in the park", "dogs playing on grass", "two brown dogs in a park"],
       3: ["a man rides a bike down the street", "a person riding a bicycle", "man on a bike in the city"]}
RES = {1: "a red circle on the left side", 2: "a dog in a park", 3: "a man riding a bike"}


def test_cider_fixed_value():
    # computed with pycocoevalcap 1.2: Cider().compute_score(GTS, {k: [v]}) -> 2.483275550997218 (x 100 here)
    assert ev.cider(GTS, RES) == pytest.approx(248.3275550997218, abs=1e-9)


def test_cider_matches_pycocoevalcap_on_random_corpora():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rng = np.random.default_rng(0)
    words = "a the red dog cat man on in of park street big small two is".split()
    for trial in range(5):
        n = int(rng.integers(1, 12))
        sent = lambda: " ".join(rng.choice(words, int(rng.integers(1, 12))))  # noqa: E731
        gts = {i: [sent() for _ in range(int(rng.integers(1, 6)))] for i in range(n)}
        res = {i: sent() for i in range(n)}
        ref, _ = Cider().compute_score(gts, {i: [c] for i, c in res.items()})
        assert ev.cider(gts, res) == pytest.approx(100 * ref, rel=1e-12, abs=1e-12)


def test_cider_identical_captions_and_errors():
    assert ev.cider({0: ["a b c d"], 1: ["e f g h"]}, {0: "a b c d", 1: "e f g h"}) > 0
    with pytest.raises(ValueError):
        ev.cider({0: []}, {0: "a"})


def test_ptb_tokenize():
    assert ev.ptb_tokenize("A man's dog, running...  Don't stop!") == "a man 's dog running do n't stop"
    assert ev.ptb_tokenize("3.5 t-shirts; (big)") == "3.5 t-shirts big"


@pytest.mark.parametrize("pred, answers, expected", [
    ("2", ["2"] * 10, 1.0),
    ("two", ["2"] * 10, 0.0),               # all answers the same: nothing is normalized (the official quirk)
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # 3 left-outs see 2 matches (2/3), 7 see 3 (1)
    ("Red.", ["red"] * 2 + ["blue"] * 8, 0.6),  # 2 x 1/3 + 8 x 2/3, over 10
    ("two", ["2"] * 4 + ["3"] * 6, 1.0),    # number words become digits
    ("the dog", ["a dog"] * 5 + ["dog"] * 5, 1.0),  # articles dropped
    ("don't know", ["dont know"] * 3 + ["no"] * 7, 0.9),  # contractions get their apostrophe
    ("t shirt", ["t-shirt"] * 5 + ["shirt"] * 5, 1.0),  # a hyphen inside a word becomes a space
    ("tshirt", ["t-shirt"] * 5 + ["shirt"] * 5, 0.0),
    ("1000", ["1,000"] * 4 + ["many"] * 6, 1.0),  # a comma between digits is removed
    ("red", ["red"], 0.0),                   # one reference: no other answer can agree
])
def test_vqa_accuracy(pred, answers, expected):
    assert ev.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_normalize():
    assert ev.vqa_normalize("The two dogs, eating!") == "2 dogs eating"
    assert ev.vqa_normalize("It's a cat.") == "it's cat"
    assert ev.vqa_normalize("3.5") == "3.5"


def test_roc_auc():
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert ev.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert ev.roc_auc([0, 1, 1], [0.9, 0.1, 0.2]) == 0.0
    with pytest.raises(ValueError):
        ev.roc_auc([1, 1], [0.2, 0.3])


def test_exact_match():
    assert ev.exact_match(" Red ", ["blue", "red"]) == 1.0
    assert ev.exact_match("red circle", ["red"]) == 0.0


# -----------------------------------------------------------------------------
# Task readers, on fixtures in the published layouts

def png(path, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(data.render(data.random_scene(rng), rng)).save(path)


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
    with pytest.raises(FileNotFoundError, match="--download"):
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
    train = data.read_folder(root, "train", "vqa", log=logged.append)
    assert len(train) == 6 and train[0]["image"] == os.path.join(root, "img", "train0.png")
    skips = [m for m in logged if ": skipped:" in m]
    assert len(skips) == 6 and all("train.jsonl:" in m for m in skips)
    for why in ("not JSON", "leaves the folder", "not found", "empty 'answers'", "not a vqa line"):
        assert any(why in m for m in skips), why
    assert any("6 lines skipped" in m for m in logged)
    with pytest.raises(ValueError, match="no usable"):
        data.read_folder(root, "test", "captions", log=lambda m: None)  # only vqa lines there


# -----------------------------------------------------------------------------
# Prompts

@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer("bytes")


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
    tok = data.get_tokenizer("bytes", lm_vocab_size=model.lm.config.vocab_size)
    size = model.vision.image_size
    images = torch.randn(2, 1, 3, *(size if isinstance(size, (tuple, list)) else (size, size)))
    ids = tok.encode_markup("<image>is it? Answer:yes<|endofchunk|><image>is it? Answer:")
    names = ["no", "yes", "maybe not"]
    got = ev.class_scores(model, tok, ids, images, names)
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
        assert 0 <= r["exact_match"] <= 100 and 0 <= r["vqa_accuracy"] <= 100
    assert "exact_match" in p.stdout and "lines skipped" in p.stdout


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


def test_shapes_folder_reads_back(tmp_path):
    root = data.write_shapes_folder(str(tmp_path / "v"), "vqa", n_train=5, n_test=3)
    test = data.read_folder(root, "test", "vqa", log=lambda m: None)
    assert len(test) == 3 and all(os.path.isfile(e["image"]) and e["question"] and e["answers"] for e in test)
    root = data.write_shapes_folder(str(tmp_path / "c"), "captions", n_train=4, n_test=2, task_kind="shape")
    assert all(e["captions"][0] in data.SHAPES for e in data.read_folder(root, "train", "captions", log=lambda m: None))


def test_rices_skips_unreadable_images(ckpt, tmp_path):
    from model import Flamingo
    model, _ = Flamingo.from_checkpoint(ckpt, verbose=False)
    model.eval()
    examples = []
    for i in range(3):
        png(str(tmp_path / f"{i}.png"), seed=i)
        examples.append({"image": str(tmp_path / f"{i}.png")})
    (tmp_path / "1.png").write_bytes(b"not a png at all")  # the second one is corrupt
    feats = ev.image_features(model, examples, str(tmp_path / "cache"), "t")
    assert feats.shape[0] == 3 and feats[1].abs().sum() == 0 and feats[0].norm() > 0.99
    assert 1 not in ev.rices_demos(feats, feats[0], 2)  # the zero row is never a demonstration


def test_hateful_memes_bad_line_is_skipped(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 1, "text": "a"}\nnot json\n')
    (tmp_path / "dev_seen.jsonl").write_text('{"id": 2, "img": "img/2.png", "label": 0, "text": "b"}\n')
    train, test, _ = ev.read_task("hateful_memes", str(tmp_path))
    assert len(train) == 1 and len(test) == 1 and "train.jsonl:2: skipped" in capsys.readouterr().out

"""
Few-shot evaluation with OpenFlamingo's protocol (DESIGN section 8).

    python eval.py --init_from=out-shapes                              # the shapes world: offline, ~1 minute
    python eval.py --task=vqa --data_dir=my_folder --shots=0,4         # your folder: train.jsonl + test.jsonl
    python eval.py --task=vqav2 --data_dir=data/vqav2 --shots=0,4,8,16,32 --num_trials=3 --results=vqav2.json
    python eval.py --download=vqav2 --data_dir=data/vqav2             # fetch a benchmark's public files

Read top to bottom:
1. Metrics, importable (`from eval import cider, vqa_accuracy, roc_auc`): CIDEr-D as the COCO caption
   evaluation computes it, VQA accuracy with the official normalization, ROC-AUC, exact match.
2. Tasks: the benchmarks from their published annotation files, your own folders, and where to get them.
3. The protocol. For each shot count and trial (trial t uses seed trial_seed + t):
   - demonstrations from the training split: random ones, drawn for each query from a fixed query set of
     query_set_size training examples, or RICES (rices=True): the training images most similar to the
     query image in the vision encoder's features, the most similar last, next to the query;
   - the prompt is the demonstrations' chunks, then the query's; 0 shots means two demonstrations with
     their images removed (text only), as OpenFlamingo does, so the model still sees the format;
   - beam search with 3 beams, at most 20 new tokens for captions, 5 for VQA (10 for TextVQA), stopped at
     <|endofchunk|>, the answer cut at a following "Question"/"Answer"/"Output";
   - classification (HatefulMemes) ranks the class names by mean token log-probability.
4. The shapes world: questions and captions (with blank images too), and the task-by-example curve.
5. The command line: a tqdm bar per run, a table, and a JSON list of records.
"""

import functools
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import data

# -----------------------------------------------------------------------------
init_from = "out-shapes"      # an out_dir of train.py (or its ckpt.pt), or openflamingo/<name> (README)
lm = ""                       # the LM of a local OpenFlamingo checkpoint.pt (a directory); hub models know theirs
dtype = "float32"             # of the frozen LM ("bfloat16" halves MPT-7B's 27 GB; run under autocast)
clip = "ViT-L-14"             # and their CLIP: open_clip name, and tag or local weights file
clip_pretrained = "openai"
task = "shapes"               # shapes | coco | flickr30k | vqav2 | okvqa | textvqa | vizwiz | hateful_memes | captions | vqa
data_dir = ""                 # the task's files: a benchmark's published files, or a folder (captions, vqa)
shots = ""                    # "": 0,1,2,4,8 for shapes, 0,4,8,16,32 for the others
num_trials = 1
trial_seed = 42               # trial t draws its test subset and demonstrations with seed trial_seed + t
num_samples = None            # test examples per trial (None: 200 for shapes, all for the others)
query_set_size = 2048         # random demonstrations come from this many training examples
rices = False                 # demonstrations by image similarity (RICES) instead of at random
rices_cache = ""              # a folder for RICES features ("": data_dir/.rices_cache)
num_beams = None              # None: 3, as OpenFlamingo; 1 (greedy) for shapes, whose answers are a word or two
max_new_tokens = None         # None: the task's (20 captions, 5 VQA, 10 TextVQA; 12 shapes)
results = ""                  # write the records to this JSON file
download = ""                 # a benchmark name: fetch its public files into data_dir, then exit
download_images = False       # with download: the images too (COCO's are 13 GB for train2014)
device = "cpu"
# -----------------------------------------------------------------------------

# =============================================================================
# 1. Metrics


def exact_match(prediction, references):
    """1.0 if the prediction, stripped and lower-cased, equals one of the references so treated, else 0.0."""
    return float(prediction.strip().lower() in {r.strip().lower() for r in references})


# the tokens the COCO caption evaluation drops after tokenizing (PTB writes ( ) { } as -LRB- -RRB- -LCB- -RCB-)
PTB_PUNCTUATION = {"''", "'", "``", "`", "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def ptb_tokenize(text):
    """Lower-case words with punctuation removed, as the COCO caption evaluation prepares sentences for CIDEr.
    It runs Stanford's PTBTokenizer (Java); this is a close Python stand-in (clitics split off: "don't" ->
    "do n't", "dog's" -> "dog 's"; numbers like 3.5 and hyphenated words kept whole), so a score from these
    tokens can differ slightly from the official one on text with unusual punctuation."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"n't\b", " n't", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.,]\w+)*|\.\.\.|--|\S", text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def cider(references, candidates, n=4, sigma=6.0):
    """
    CIDEr-D x 100 of a corpus, computed as the COCO caption evaluation (pycocoevalcap's Cider) does.
    references: {id: [reference strings]}; candidates: {id: candidate string}; both already tokenized
    (words split on whitespace, as ptb_tokenize returns them). For each id: TF-IDF vectors of its 1..4-grams,
    IDF = log(number of ids) - log(number of ids whose references hold the n-gram); for each n, the cosine of
    the candidate's vector with each reference's, the candidate's weights clipped at the reference's, times
    a Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over n and over the references, x 10.
    Subtle, and kept for exactness: the "length" of the penalty is the number of *bigrams* (the reference
    code counts the terms of its n-gram index 1).
    """
    ids = list(candidates)
    if not ids or any(not references.get(i) for i in ids):
        raise ValueError("cider needs at least one candidate, and references for every candidate")

    def ngrams(sentence):
        words, counts = sentence.split(), Counter()
        for k in range(1, n + 1):
            for j in range(len(words) - k + 1):
                counts[tuple(words[j:j + k])] += 1
        return counts

    refs = {i: [ngrams(r) for r in references[i]] for i in ids}
    doc_freq = Counter(g for i in ids for g in set().union(*refs[i]))
    log_docs = math.log(float(len(ids)))

    def vector(counts):  # -> per-n {ngram: tf-idf}, per-n norms, length (bigram count)
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = float(tf) * (log_docs - math.log(max(1.0, doc_freq[g])))
            norm[k] += vec[k][g] ** 2
            length += tf if k == 1 else 0
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for i in ids:
        vc, nc, lc = vector(ngrams(candidates[i]))
        total = np.zeros(n)
        for r in refs[i]:
            vr, nr, lr = vector(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                total[k] += val * math.e ** (-(float(lc - lr) ** 2) / (2 * sigma ** 2))
        scores.append(np.mean(total) / len(refs[i]) * 10.0)
    return 100.0 * float(np.mean(scores))


# The official VQA evaluation's normalization (Cloud-CV's vqaEval.py, as OpenFlamingo copies it)
VQA_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't
hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm
Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't
notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
VQA_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
VQA_NUMBERS["none"] = "0"
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: in effect, a period not followed by a digit
VQA_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text):
    """Punctuation (removed, or a space when it joins two words), periods not before a digit, lower case,
    number words to digits, articles dropped, contractions given their apostrophe."""
    out = text
    for p in VQA_PUNCT:
        joined = (p + " " in text or " " + p in text) or VQA_COMMA_DIGITS.search(text) is not None
        out = out.replace(p, "" if joined else " ")
    out = VQA_PERIOD.sub("", out, 32)  # the official code passes re.UNICODE (32) where sub() takes `count`
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction, answers):
    """
    One question's VQA accuracy in [0, 1]: each human answer is left out in turn, the prediction scores
    min(1, (number of the other answers equal to it) / 3), and these scores are averaged.
    As in the official code, the prediction and the answers are normalized (vqa_normalize) only when the
    answers are not all the same string; otherwise they are only stripped. With VQAv2's 10 answers, 3
    agreeing answers give 0.9 and 4 give 1.0. With a single reference the score is always 0: small
    custom sets should read exact_match.
    """
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if not answers:
        raise ValueError("vqa_accuracy needs at least one answer")
    if len(set(answers)) > 1:
        answers = [vqa_normalize(a) for a in answers]
        pred = vqa_normalize(pred)
    return float(np.mean([min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3)
                          for i in range(len(answers))]))


def roc_auc(labels, scores):
    """Area under the ROC curve: the probability that a random positive scores above a random negative
    (ties count half), by the rank-sum formula."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes among the labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks (1-based) over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# =============================================================================
# 2. Tasks
#
# An example is a dict: id, image (a path), and captions; or question and answers; or text (the meme's
# words) and label (0/1). Each reader returns (train, test): the demonstration pool and the test set.

CAPTION, VQA = data.CAPTION, data.VQA  # "<image>Output:{caption}<|endofchunk|>", "<image>Question:{question} ..."
HATEFUL = "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>"
CLASS_NAMES = ("no", "yes")  # HatefulMemes labels 0 and 1, ranked by the model


def find_file(root, name, benchmark):
    """root/name or root/*/name (archives unpack into a folder of their own)."""
    for path in [os.path.join(root, name)] + [os.path.join(root, d, name) for d in sorted(os.listdir(root))
                                               if os.path.isdir(os.path.join(root, d))]:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} not found in {root} or its subfolders; "
                            f"`python eval.py --download={benchmark} --data_dir={root}` fetches it where it is public")


def load_json(root, name, benchmark):
    with open(find_file(root, name, benchmark), encoding="utf-8") as f:
        return json.load(f)


def read_karpathy(root, name):
    """COCO or Flickr30K captions in Karpathy's split file (dataset_coco.json / dataset_flickr30k.json):
    the "train" images are the demonstration pool and the "test" images the test set, as OpenFlamingo."""
    out = {"train": [], "test": []}
    for im in load_json(root, f"dataset_{name}.json", name)["images"]:
        if im["split"] in out:
            folder = im.get("filepath", "flickr30k-images")  # COCO's entries name their folder (train2014, val2014)
            out[im["split"]].append({"id": im.get("cocoid", im.get("imgid")), "image": os.path.join(root, folder, im["filename"]),
                                     "captions": [s["raw"].strip() for s in im["sentences"]]})
    return out["train"], out["test"]


def read_vqa_pair(root, questions, annotations, image, benchmark):
    """VQA-format files (VQAv2, OK-VQA): questions {"questions": [...]}, annotations {"annotations": [...]}."""
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in load_json(root, annotations, benchmark)["annotations"]}
    return [{"id": q["question_id"], "image": image(q["image_id"]), "question": q["question"],
             "answers": answers[q["question_id"]]} for q in load_json(root, questions, benchmark)["questions"]]


def read_task(name, root):
    """(train, test) examples of a task, with the kind: "captions", "vqa" or "classification"."""
    if name in ("captions", "vqa"):  # a folder of your own (README, "Your own data")
        return data.read_folder(root, "train", name), data.read_folder(root, "test", name), name
    if name in ("coco", "flickr30k"):
        return (*read_karpathy(root, name), "captions")
    if name in ("vqav2", "okvqa"):
        prefix = "v2_" if name == "vqav2" else ""
        split = [read_vqa_pair(root, f"{prefix}OpenEnded_mscoco_{s}2014_questions.json",
                               f"{prefix}mscoco_{s}2014_annotations.json",
                               lambda i, s=s: os.path.join(root, f"{s}2014", f"COCO_{s}2014_{i:012d}.jpg"), name)
                 for s in ("train", "val")]
        return (*split, "vqa")
    if name == "textvqa":  # TextVQA 0.5.1; train and val images both live in train_images/
        split = [[{"id": d["question_id"], "image": os.path.join(root, "train_images", d["image_id"] + ".jpg"),
                   "question": d["question"], "answers": d["answers"]}
                  for d in load_json(root, f"TextVQA_0.5.1_{s}.json", name)["data"]] for s in ("train", "val")]
        return (*split, "vqa")
    if name == "vizwiz":
        split = [[{"id": d["image"], "image": os.path.join(root, s, d["image"]), "question": d["question"],
                   "answers": [a["answer"] for a in d["answers"]]} for d in load_json(root, f"{s}.json", name)]
                 for s in ("train", "val")]
        return (*split, "vqa")
    if name == "hateful_memes":  # train.jsonl; the test set is test_seen.jsonl when present, else dev_seen.jsonl
        def lines(file):
            out, path = [], find_file(root, file, name)
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        d = json.loads(line)
                        out.append({"id": d["id"], "image": os.path.join(root, d["img"]), "text": d["text"],
                                    "label": int(d["label"])})
                    except (ValueError, KeyError, TypeError) as e:  # also the unlabelled test_unseen lines
                        print(f"{path}:{n}: skipped: {type(e).__name__} {e}")
            return out
        test_file = "test_seen.jsonl" if os.path.exists(os.path.join(root, "test_seen.jsonl")) else "dev_seen.jsonl"
        return lines("train.jsonl"), lines(test_file), "classification"
    raise ValueError(f"unknown task {name!r}; known: shapes, {', '.join(BENCHMARKS)}, captions, vqa")


# the published files, where they have a public address (the paths are as their authors publish them)
BENCHMARKS = {
    "coco": (["https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"],
             ["http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"]),
    "flickr30k": (["https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"], []),
    "vqav2": ([f"https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_{k}_{s}_mscoco.zip"
               for k in ("Questions", "Annotations") for s in ("Train", "Val")],
              ["http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"]),
    "okvqa": ([f"https://okvqa.allenai.org/static/data/{f}.json.zip" for f in (
        "OpenEnded_mscoco_train2014_questions", "OpenEnded_mscoco_val2014_questions",
        "mscoco_train2014_annotations", "mscoco_val2014_annotations")],
              ["http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"]),
    "textvqa": ([f"https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_{s}.json" for s in ("train", "val")],
                ["https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"]),
    "vizwiz": (["https://vizwiz.cs.colorado.edu/VizWiz_final/vqa_data/Annotations.zip"],
               [f"https://vizwiz.cs.colorado.edu/VizWiz_final/images/{s}.zip" for s in ("train", "val")]),
    "hateful_memes": ([], []),
}
BY_HAND = {
    "flickr30k": "the Flickr30K images are given on request (https://shannon.cs.illinois.edu/DenotationGraph/): "
                 "put them in DATA_DIR/flickr30k-images/",
    "hateful_memes": "HatefulMemes is under Facebook's licence, with no public address: get it from "
                     "https://hatefulmemeschallenge.com (or the Hugging Face hub) and put train.jsonl, "
                     "dev_seen.jsonl or test_seen.jsonl and img/ into DATA_DIR",
}


def fetch(name, root, images=False):
    """Download a benchmark's public files into root and unpack the archives (each only once)."""
    import zipfile
    if name not in BENCHMARKS:
        raise SystemExit(f"no download for {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    annotations, image_zips = BENCHMARKS[name]
    for url in annotations + (image_zips if images else []):
        path = os.path.join(root, os.path.basename(url))
        try:
            data.download(url, path)
        except data.DownloadError as e:
            raise SystemExit(f"error: {e}\nOffline? Fetch {url} on a machine with network and copy it to {path}; "
                             "this command then only unpacks it.")
        if path.endswith(".zip") and not os.path.exists(path + ".unpacked"):
            with zipfile.ZipFile(path) as z:
                z.extractall(root)
            open(path + ".unpacked", "w").close()
    if name in BY_HAND:
        print("by hand: " + BY_HAND[name].replace("DATA_DIR", root))
    if image_zips and not images:
        print(f"annotations in {root}; the images with --download_images=True ({len(image_zips)} archives)")


# =============================================================================
# 3. The protocol

def chunk(kind, tok, ex, demo):
    """The ids of one example's chunk: a demonstration (with its answer and <|endofchunk|>) or the query."""
    if kind == "captions":
        template, fields = CAPTION, {"caption": ex["captions"][0] if demo else ""}
    elif kind == "vqa":
        template, fields = VQA, {"question": ex["question"], "answer": ex["answers"][0] if demo else ""}
    else:
        template, fields = HATEFUL, {"text": ex["text"], "answer": CLASS_NAMES[ex["label"]] if demo else ""}
    if not demo:
        template = template[:-len(data.EOC)]
    return data.encode_template(tok, template, **fields)


def build_prompt(kind, tok, demos, query, zero_shot=False):
    """(ids, image paths): the demonstrations' chunks then the query's. zero_shot: the demonstrations'
    <image> tokens are dropped and their images not given (text-only demonstrations)."""
    ids, images = [], []
    for d in demos:
        c = chunk(kind, tok, d, demo=True)
        if zero_shot:
            c = [t for t in c if t != tok.image_id]
        else:
            images.append(d["image"])
        ids += c
    return ids + chunk(kind, tok, query, demo=False), images + [query["image"]]


@functools.lru_cache(maxsize=4)
def clip_transform(image_size, mean, std):
    """CLIP's evaluation preprocessing (resize the short side, centre crop, normalise), built once."""
    import open_clip
    return open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)


def load_images(paths, vision):
    """Image files -> (N, 1, 3, H, W) with CLIP's evaluation preprocessing."""
    from PIL import Image
    size = tuple(vision.image_size) if isinstance(vision.image_size, list) else vision.image_size  # hashable
    preprocess = clip_transform(size, tuple(vision.mean), tuple(vision.std))
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(preprocess(im.convert("RGB")))
    return torch.stack(out)[:, None]


@torch.no_grad()
def image_features(model, examples, cache_dir, label, batch_size=64):
    """RICES features: the vision encoder's tokens averaged and L2-normalised, (N, D), one row per example
    (OpenFlamingo uses CLIP's pooled embedding; ours uses the tower Flamingo reads). Cached on disk, keyed by
    the encoder and the examples' images; the cache is loaded without executing code (weights_only)."""
    from tqdm import tqdm
    from model import atomic_save
    key = hashlib.sha1(json.dumps([model.vision.name, str(model.vision.pretrained), init_from,
                                   [e["image"] for e in examples]]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{label}-{key}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    feats, bad = [], 0
    for i in tqdm(range(0, len(examples), batch_size), desc=f"RICES features ({label})"):
        batch = examples[i:i + batch_size]
        try:
            x = load_images([e["image"] for e in batch], model.vision).to(device)        # (n, 1, 3, H, W)
        except (OSError, ValueError):  # an unreadable image in this batch: one at a time, a zero row for it
            rows = []
            for e in batch:
                try:
                    rows.append(load_images([e["image"]], model.vision)[0])
                except (OSError, ValueError):
                    rows.append(None)
                    bad += 1
            f = [None if r is None else image_features_of(model, r[None].to(device))[0] for r in rows]
            feats.append(torch.stack([torch.zeros(model.vision.width) if v is None else v for v in f]))
            continue
        feats.append(image_features_of(model, x))
    if bad:
        print(f"RICES ({label}): {bad} unreadable images get no similarity and are never chosen")
    feats = torch.cat(feats)                                                             # (N, D)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(feats, path)
    return feats


def image_features_of(model, x):
    """(n, 1, 3, H, W) images -> (n, D): the encoder's tokens averaged over the grid, L2-normalised."""
    return torch.nn.functional.normalize(model.vision(x[:, 0]).float().mean(1), dim=-1).cpu()


def rices_demos(train_feats, query_feat, k):
    """Indices of the k training examples most similar to the query, the most similar last. Rows of zeros
    (unreadable images) are never chosen."""
    sims = (train_feats @ query_feat).masked_fill(train_feats.norm(dim=-1) == 0, -float("inf"))
    return sims.topk(k).indices.flip(0).tolist()


def postprocess(text):
    """The answer part of a generation: cut at a following Question/Answer/Output, stripped."""
    return re.split(r"Question|Answer|Output", text)[0].strip()


@torch.no_grad()
def generate_answer(model, tok, ids, images, max_new, beams):
    """Decode a continuation of the prompt ids (a list) about images (N, 1, 3, H, W); postprocessed text."""
    idx = torch.tensor([ids], device=device)
    out = model.generate(images.to(device), idx, max_new, temperature=0, num_beams=beams)[0, idx.shape[1]:].tolist()
    if model.eoc_token_id in out:
        out = out[:out.index(model.eoc_token_id)]
    return postprocess(tok.decode(out))


@torch.no_grad()
def class_scores(model, tok, ids, images, class_names):
    """Mean token log-probability of each class name after the prompt ids. The prompt (demonstrations and
    query) runs through the model once; its keys and values are then shared by every class name."""
    from model import KVCache
    ctx = torch.tensor([ids], device=device)                                     # (1, T)
    nc = len(class_names)
    visual = model.encode_media(images.to(device), ctx)                          # (1, M, R, D)
    caches = [KVCache() for _ in model.lm.transformer.h]
    text_time = (ctx == model.media_token_id).cumsum(1)                          # (1, T)
    first = model.decode(ctx, text_time, model.media_kvs(visual), caches)[:, -1].float().log_softmax(-1)  # (1, V)
    for c in caches:
        c.reorder(torch.zeros(nc, dtype=torch.long, device=device))             # the context, once per class
    names = [tok.encode(n) for n in class_names]
    L = max(map(len, names))
    cls = torch.tensor([n + [n[-1]] * (L - len(n)) for n in names], device=device)  # (nc, L) right-padded
    kvs = model.media_kvs(None if visual is None else visual.expand(nc, *visual.shape[1:]))
    rest = model.decode(cls, text_time[:, -1:].expand(nc, L), kvs, caches).float().log_softmax(-1)  # (nc, L, V)
    scores = []
    for j, n in enumerate(names):
        lp = [first[0, n[0]]] + [rest[j, t - 1, n[t]] for t in range(1, len(n))]
        scores.append(torch.stack(lp).mean().item())
    return scores


def run_trial(model, tok, kind, train, test, k, seed, rices_feats=None):
    """One (shot count, seed): metrics over the test examples, as a dict."""
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    n = len(test) if num_samples is None or num_samples < 0 else min(num_samples, len(test))
    chosen = rng.choice(len(test), n, replace=False)
    pool = rng.choice(len(train), min(query_set_size, len(train)), replace=False)
    shots_used = k if k > 0 else 2                    # 0 shots: two text-only demonstrations
    if shots_used > len(train):
        raise SystemExit(f"{k} shots, but the training split has only {len(train)} examples")
    max_new = max_new_tokens or {"captions": 20, "vqa": 10 if task == "textvqa" else 5}.get(kind, 0)
    beams = num_beams or 3
    scores, exact, labels, probs, skipped = [], [], [], [], Counter()
    refs, cands = {}, {}
    for i in tqdm(chosen, desc=f"{task} {k} shots seed {seed}"):
        query = test[i]
        if rices_feats is not None:  # (at 0 shots too: the two text-only demonstrations, as OpenFlamingo)
            demos = [train[j] for j in rices_demos(rices_feats[0], rices_feats[1][i], shots_used)]
        else:
            demos = [train[j] for j in rng.choice(pool, shots_used, replace=False)]
        ids, paths = build_prompt(kind, tok, demos, query, zero_shot=k == 0)
        if model.lm.config.max_context and len(ids) + max_new > model.lm.config.max_context:
            skipped["prompt longer than the LM's context"] += 1
            continue
        try:
            images = load_images(paths, model.vision)
        except (OSError, ValueError) as e:  # missing, truncated or unreadable image: counted, not fatal
            skipped[f"unreadable image ({type(e).__name__})"] += 1
            continue
        if kind == "classification":
            s = class_scores(model, tok, ids, images, CLASS_NAMES)
            p = np.exp(s - np.max(s))
            labels.append(query["label"])
            probs.append(float(p[1] / p.sum()))
            exact.append(float(int(np.argmax(s)) == query["label"]))
            continue
        pred = generate_answer(model, tok, ids, images, max_new, beams)
        if kind == "captions":
            exact.append(exact_match(pred, query["captions"]))
            refs[i] = [ptb_tokenize(c) for c in query["captions"]]
            cands[i] = ptb_tokenize(pred)
        else:
            exact.append(exact_match(pred, query["answers"]))
            scores.append(vqa_accuracy(pred, query["answers"]))
    out = {"n": len(exact), "skipped": dict(skipped)}
    if skipped:
        print(f"skipped: {dict(skipped)}", file=sys.stderr)
    if not exact:
        return out
    if kind == "captions":
        out["cider"] = cider(refs, cands)
    elif kind == "vqa":
        out["vqa_accuracy"] = 100.0 * float(np.mean(scores))
    else:
        out["roc_auc"] = 100.0 * roc_auc(labels, probs) if 0 < sum(labels) < len(labels) else None
        out["accuracy"] = 100.0 * float(np.mean(exact))
        return out
    out["exact_match"] = 100.0 * float(np.mean(exact))
    return out


# =============================================================================
# 4. The shapes world (DESIGN section 6), on held-out test scenes

KIND_WORDS = {"color": set(data.COLORS), "shape": set(data.SHAPES), "size": set(data.SIZES),
              "position": set(data.POSITIONS)}


def shapes_answer(model, tok, prompt, images):
    """The answer to one shapes prompt (our own markup) about a list of uint8 images."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(model.vision.mean).view(1, 3, 1, 1)) / torch.tensor(model.vision.std).view(1, 3, 1, 1)
    return generate_answer(model, tok, tok.encode_markup(prompt), x[:, None], max_new_tokens or 12, num_beams or 1)


def eval_questions(model, tok, n, seed, blank=False, kind="question"):
    """Exact match (%) on n test questions (or captions), optionally with blank images instead."""
    hits = 0
    for i in range(n):
        text, images = data.shapes_sample("test", seed, i, kind=kind)
        chunk_text = text[:-len(data.EOT)]                 # "<image>Question:... Short answer:red<|endofchunk|>"
        prefix, target = chunk_text.rsplit(":", 1) if kind == "question" else chunk_text.split("Output:", 1)
        prompt = prefix + (":" if kind == "question" else "Output:")
        target = target[:-len(data.EOC)]
        if blank:
            images = [data.blank_image(np.random.default_rng([seed, i]))]
        hits += shapes_answer(model, tok, prompt, images) == target
    return 100.0 * hits / n


def eval_task(model, tok, n, k, seed, blank=False):
    """Task-by-example with k demonstrations: (% answers of the right kind, % exact match)."""
    right_kind = exact = 0
    for i in range(n):
        kind = data.TASK_KINDS[i % len(data.TASK_KINDS)]  # the kinds in turn, so each gets n / 4 prompts
        text, images = data.shapes_sample("test", seed + 1, i, kind="task", task_kind=kind, n_chunks=k + 1)
        chunks = text[:-len(data.EOT)].split(data.EOC)[:-1]
        prompt = data.EOC.join(chunks[:-1] + ["<image>Output:"]) if k else "<image>Output:"
        target = chunks[-1].split("Output:", 1)[1]
        if blank:
            images = [data.blank_image(np.random.default_rng([seed, i, j])) for j in range(len(images))]
        pred = shapes_answer(model, tok, prompt, images)
        right_kind += pred in KIND_WORDS[kind]
        exact += pred == target
    return 100.0 * right_kind / n, 100.0 * exact / n


def run_shapes(model, tok, shot_list, seed, n):
    """The shapes measurements of one trial: a list of records (task, subtask, shots, metrics)."""
    from tqdm import tqdm
    records = []
    runs = [(q, b) for q in ("question", "caption") for b in (False, True)]
    for q, blank in tqdm(runs, desc=f"shapes questions, captions (seed {seed})"):
        em = eval_questions(model, tok, n, seed, blank, q)
        records.append({"subtask": q + ("_blank" if blank else ""), "shots": 0, "exact_match": em})
    for k in tqdm(shot_list, desc=f"shapes task-by-example (seed {seed})"):
        for blank in (False, True):
            rk, em = eval_task(model, tok, n, k, seed, blank)
            records.append({"subtask": "task" + ("_blank" if blank else ""), "shots": k, "right_kind": rk,
                            "exact_match": em})
    return records


# =============================================================================
# 5. The command line

def table(records):
    """Mean (and standard deviation over trials) of each metric, by task, subtask and shots."""
    groups = {}
    for r in records:
        groups.setdefault((r["task"], r.get("subtask", ""), r["shots"]), []).append(r)
    metrics = ("exact_match", "right_kind", "cider", "vqa_accuracy", "roc_auc", "accuracy")
    lines = []
    for (t, sub, k), rs in groups.items():
        cells = []
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                cells.append(f"{m} {np.mean(vals):6.2f}" + (f" +- {np.std(vals):.2f}" if len(vals) > 1 else ""))
        lines.append(f"{t:13s} {sub:14s} {k:2d} shots  n {rs[0]['n']:5d}  " + "  ".join(cells))
    return "\n".join(lines)


def main():
    from configurator import configure
    configure(globals())
    if download:
        if not data_dir:
            raise SystemExit("give --data_dir, where the files should go")
        fetch(download, data_dir, download_images)
        return
    from model import load_model
    openflamingo = init_from.startswith("openflamingo/") or bool(lm)
    ckpt_path = init_from if init_from.endswith(".pt") else os.path.join(init_from, "ckpt.pt")
    if not openflamingo and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: no checkpoint at {ckpt_path}. Train one first:  python train.py config/train_shapes.py")
    try:
        model, tokenizer = load_model(init_from, lm, clip, clip_pretrained, dtype)
    except (RuntimeError, FileNotFoundError, ValueError) as e:  # offline, missing files: say what to do
        raise SystemExit(f"error: {e}") from None
    model.eval().to(device)
    tok = data.get_tokenizer(tokenizer, lm_vocab_size=model.lm.config.vocab_size, new_tokens=model.config.new_tokens)
    shot_list = [int(s) for s in str(shots or ("0,1,2,4,8" if task == "shapes" else "0,4,8,16,32")).strip("()[]").split(",")
                 if s.strip()]  # "0,4" on the command line arrives as a tuple
    base = {"task": task, "checkpoint": init_from if openflamingo else os.path.abspath(init_from), "demos": "rices" if rices else "random"}
    # a bf16 LM (dtype) next to the fp32 trained parts: autocast casts each matmul's operands to one dtype
    amp = nullcontext() if dtype == "float32" else torch.autocast("cuda" if "cuda" in device else "cpu",
                                                                  dtype=getattr(torch, dtype))
    records = []
    with amp:
        if task == "shapes":
            for t in range(num_trials):
                for r in run_shapes(model, tok, shot_list, trial_seed + t, num_samples or 200):
                    records.append({**base, **r, "seed": trial_seed + t, "n": num_samples or 200})
        else:
            if not data_dir:
                raise SystemExit(f"error: --data_dir is needed for task {task!r} (README, Evaluation)")
            train, test, kind = read_task(task, data_dir)
            print(f"{task}: {len(train)} training examples (demonstrations), {len(test)} test examples")
            feats = None
            if rices:
                cache = rices_cache or os.path.join(data_dir, ".rices_cache")
                feats = (image_features(model, train, cache, f"{task}-train"), image_features(model, test, cache, f"{task}-test"))
            for k in shot_list:
                for t in range(num_trials):
                    out = run_trial(model, tok, kind, train, test, k, trial_seed + t, feats)
                    records.append({**base, "shots": k, "seed": trial_seed + t, **out})
    print(table(records))
    if results:
        os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
        with open(results, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {results}")


if __name__ == "__main__":
    main()

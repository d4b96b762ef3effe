"""
Few-shot evaluation with OpenFlamingo's protocol (Awadalla et al. 2023; its open_flamingo/eval code).

    python eval.py --init_from=out-shapes                              # the shapes world: offline, ~1 minute
    python eval.py --task=vqa --data_dir=my_folder --shots=0,4         # your folder: train.jsonl + test.jsonl
    python eval.py --task=vqav2 --data_dir=data/vqav2 --shots=0,4,8,16,32 --num_trials=3 --results=vqav2.json
    torchrun --nproc_per_node=8 eval.py --task=vqav2 --data_dir=data/vqav2 --device=cuda --batch_size=16

(`python download.py vqav2` fetches a benchmark's public files.) Read top to bottom:
1. Tasks: the benchmarks from their published annotation files, and your own folders (benchmarks.py).
2. The protocol. For each shot count and trial (trial t uses seed trial_seed + t):
   - demonstrations from the training split: random ones, drawn for each query from a fixed query set of
     query_set_size training examples, or RICES (rices=True): the training images most similar to the
     query image in the vision encoder's features, the most similar last, next to the query;
   - the prompt is the demonstrations' chunks, then the query's; 0 shots means two demonstrations with
     their images removed (text only), as OpenFlamingo does, so the model still sees the format;
   - beam search with 3 beams ranked by summed log-probability (its length_penalty 0), at most 20 new tokens
     for captions, 5 for VQA (10 for TextVQA), stopped at <|endofchunk|>, cut at a following "Question" etc.;
   - classification (HatefulMemes) ranks the class names by mean token log-probability.
   The metrics are in metrics.py (`from eval import cider, vqa_accuracy, roc_auc` works as well).
3. The shapes world: questions and captions (with blank images too), and the task-by-example curve; the
   moving-shapes world (--task=shapes_video): its questions with the clips and with each clip's first frame only.
4. The command line: a tqdm bar per run, a table, and a JSON list of records.

One trial, from prompts to metrics (run_trial; the shapes world's functions go the same way):
   - every test example's demonstrations are drawn first, with the same random draws whatever the batch size
     and the number of processes, and its prompt built: (ids, image paths);
   - batching.answer hands the prompts to the model batch_size at a time: under torchrun each process takes
     every world-th prompt; a DataLoader's num_workers processes decode the images ahead of the model, a
     batch's images (N, 1, 3, H, W) all its prompts' in order; an unreadable image skips its prompt alone;
   - generation: the batch's B prompts of different lengths go to model.generate at once (left-padded, each
     row generating what it would alone) -> B texts; classification: each prompt runs once and its keys and
     values are shared by the class names (generation.Stepper.expand) -> B x 2 scores;
   - the answers come back in the prompts' order, gathered from every process; the metrics are computed from
     them (on every process, the same), and rank 0 alone prints, keeps the --results file's lock and writes it.
   So the records do not depend on batch_size or the number of processes (tests/test_eval.py: 1 process at
   batch 1 and 2 at batch 8 on CPU; in low precision on a GPU, padding may move a near-tie). Every function takes
its settings as arguments: `import eval` and call run_trial or run_shapes as the command line does.
"""

import hashlib
import json
import os
import re
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import files
import pretrained
import shapes
import shapes_video
from batching import Skipped, answer, from_rank0, rank_world, start_processes
from benchmarks import read_task
from generation import Stepper, left_pad
from metrics import cider, exact_match, ptb_tokenize, roc_auc, vqa_accuracy, vqa_normalize  # noqa: F401 (importable)
from tokenizer import CAPTION, EOC, EOT, VQA, get_tokenizer

# -----------------------------------------------------------------------------
init_from = "out-shapes"      # out_dir (or ckpt.pt), a shared folder or user/name, openflamingo/<name>, an IDEFICS
lm = ""                       # the LM of a local OpenFlamingo checkpoint.pt (a directory), or a shared folder's own
dtype = "float32"             # of the frozen LM ("bfloat16" halves MPT-7B's 27 GB; run under autocast)
clip = "ViT-L-14"             # and their CLIP: open_clip name, and tag or local weights file
clip_pretrained = "openai"
task = "shapes"               # shapes | shapes_video (offline) | coco | flickr30k | vqav2 | okvqa | textvqa | vizwiz
                              # | msvdqa | msrvttqa (videos) | hateful_memes | captions | vqa (folders)
data_dir = ""                 # the task's files: a benchmark's published files, or a folder (captions, vqa)
shots = ""                    # "": 0,1,2,4,8 for shapes, 0,1,2,4 for shapes_video, 0,4,8,16,32 for the others
num_trials = 1
trial_seed = 42               # trial t draws its test subset and demonstrations with seed trial_seed + t
num_samples = None            # test examples per trial (None: 200 for shapes, all for the others)
query_set_size = 2048         # random demonstrations come from this many training examples
rices = False                 # demonstrations by image similarity (RICES) instead of at random
rices_cache = ""              # a folder for RICES features ("": data_dir/.rices_cache)
num_beams = None              # None: 3, as OpenFlamingo; 1 (greedy) for shapes, whose answers are a word or two
max_new_tokens = None         # None: the task's (20 captions, 5 VQA, 10 TextVQA; 12 shapes)
batch_size = 8                # prompts answered at once (generation and classification scores), per process
num_workers = 2               # DataLoader processes decoding images ahead of the model (0: in this one)
results = ""                  # write the records to this JSON file
device = "cpu"
# -----------------------------------------------------------------------------

# =============================================================================
# 1. Tasks: read by benchmarks.py (examples are dicts: image and captions, or question and answers, or text and label)

HATEFUL = "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>"
CLASS_NAMES = ("no", "yes")  # HatefulMemes labels 0 and 1, ranked by the model


# =============================================================================
# 2. The protocol

def max_new_tokens_of(task, kind):
    """OpenFlamingo's limits: 20 new tokens for captions, 5 for VQA, 10 for TextVQA's longer answers."""
    return {"captions": 20, "vqa": 10 if task == "textvqa" else 5}.get(kind, 0)


def chunk(kind, tok, ex, demo):
    """The ids of one example's chunk: a demonstration (with its answer and <|endofchunk|>) or the query."""
    if kind == "captions":
        template, fields = CAPTION, {"caption": ex["captions"][0] if demo else ""}
    elif kind == "vqa":
        template, fields = VQA, {"question": ex["question"], "answer": ex["answers"][0] if demo else ""}
    else:
        template, fields = HATEFUL, {"text": ex["text"], "answer": CLASS_NAMES[ex["label"]] if demo else ""}
    if not demo:
        template = template[:-len(EOC)]
    return tok.encode_template(template, **fields)


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


def device_of(model):
    return next(model.parameters()).device


@torch.no_grad()
def image_features(model, examples, cache_dir, label, model_id="", batch_size=64, num_workers=2):
    """RICES features: the vision encoder's tokens averaged and L2-normalised, (N, D), one row per example
    (OpenFlamingo uses CLIP's pooled embedding; this uses the tower Flamingo reads). Cached on disk, keyed by
    the encoder, `model_id` (the checkpoint, whose tower may be its own) and the examples' images; the cache is
    loaded without executing code (files.torch_load)."""
    key = hashlib.sha1(json.dumps([model.vision.name, str(model.vision.pretrained), model_id,
                                   [e["image"] for e in examples]]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{label}-{key}.pt")
    if os.path.exists(path):
        try:
            return files.torch_load(path)
        except files.FileError as e:  # a damaged cache is computed again
            print(f"RICES ({label}): {e}; computing it again")
    fn = lambda ids, x: list(image_features_of(model, x.to(device_of(model))))  # noqa: E731  one (D,) an image
    out = answer(fn, [([], [e["image"]]) for e in examples], model.vision, batch_size, num_workers,
                 desc=f"RICES features ({label})")  # split over the processes under torchrun, as the prompts
    bad = sum(isinstance(f, Skipped) for f in out)
    feats = torch.stack([torch.zeros(model.vision.width) if isinstance(f, Skipped) else f for f in out])  # (N, D)
    if rank_world()[0] != 0:  # every process has them all; rank 0 alone says so and writes the cache
        return feats
    if bad:
        print(f"RICES ({label}): {bad} unreadable images get no similarity and are never chosen")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        files.atomic_save(feats, path)
    except (OSError, files.FileError) as e:  # no cache (a read-only data_dir, a full disk): the evaluation goes on
        print(f"RICES ({label}): features not cached: {e}")
    return feats


def image_features_of(model, x):
    """(n, F, 3, H, W) media (or n of (F_i, 3, H, W)) -> (n, D): the encoder's tokens of each one's first frame (an
    image's only one) averaged over the grid, L2-normalised."""
    first = torch.stack([m[0] for m in x]) if isinstance(x, list) else x[:, 0]  # (n, 3, H, W)
    return torch.nn.functional.normalize(model.vision(first).float().mean(1), dim=-1).cpu()


def rices_demos(train_feats, query_feat, k):
    """Indices of the k training examples most similar to the query, the most similar last. Rows of zeros
    (unreadable images) are never chosen."""
    sims = (train_feats @ query_feat).masked_fill(train_feats.norm(dim=-1) == 0, -float("inf"))
    return sims.topk(k).indices.flip(0).tolist()


def postprocess(text):
    """The answer part of a generation: cut at a following Question/Answer/Output, stripped."""
    return re.split(r"Question|Answer|Output", text)[0].strip()


@torch.no_grad()
def generate_answers(model, tok, prompts, images, max_new, beams):
    """Continue B prompts (lists of ids, of any lengths) about their images (N, 1, 3, H, W), all of them in one
    model.generate call (the prompts left-padded, each decoded as it would be alone) -> B postprocessed texts."""
    out = model.generate(images.to(device_of(model)), prompts, max_new, temperature=0, num_beams=beams,
                         length_penalty=0.0)  # B lists of new tokens
    return [postprocess(tok.decode(o)) for o in out]  # (model.generate drops the <|endofchunk|> that ends each)


@torch.no_grad()
def class_scores(model, tok, prompts, images, class_names):
    """Mean token log-probability of each class name after each of B prompts (lists of ids) about their images
    (N, 1, 3, H, W) -> B lists of len(class_names) scores. Each prompt (demonstrations and query) runs through the
    model once; its keys and values are then shared by every class name (Stepper.expand). As OpenFlamingo, the
    log-softmax is over the whole vocabulary, <image> included."""
    device = device_of(model)
    idx, real = left_pad(prompts, device)                                  # (B, T), real (B, T) or None
    names = [tok.encode(n) for n in class_names]
    B, nc, L = len(prompts), len(names), max(map(len, names))
    step = Stepper(model, images.to(device), idx, real, size=idx.shape[1] + L)
    first = step.prompt().log_softmax(-1)                                  # (B, V + n): each name's first token
    step.expand(nc)                                                        # row b * nc + j: prompt b, name j
    cls = torch.tensor([n + [n[-1]] * (L - len(n)) for n in names], device=device)  # (nc, L) right-padded
    rest = step.next(cls.repeat(B, 1), every=True).log_softmax(-1)         # (B * nc, L, V + n): the later tokens
    return [[torch.stack([first[b, n[0]]] + [rest[b * nc + j, t - 1, n[t]] for t in range(1, len(n))]).mean().item()
             for j, n in enumerate(names)] for b in range(B)]


def trial_prompts(model, tok, kind, train, test, k, seed, rices_feats=None, num_samples=None, query_set_size=2048,
                  max_new_tokens=5):
    """The prompts of one (shot count k, seed), drawn with the same random draws whatever the batch size and the
    number of processes: -> [(test index, example)], [(ids, image paths)], Counter of the skipped."""
    rng = np.random.default_rng(seed)
    n = len(test) if num_samples is None or num_samples < 0 else min(num_samples, len(test))
    chosen = rng.choice(len(test), n, replace=False)
    pool = rng.choice(len(train), min(query_set_size, len(train)), replace=False)
    shots_used = k if k > 0 else 2                    # 0 shots: two text-only demonstrations
    if shots_used > len(train):
        raise SystemExit(f"{k} shots, but the training split has only {len(train)} examples")
    queries, prompts, skipped = [], [], Counter()     # the test examples asked, and their (ids, image paths)
    for i in chosen:
        query = test[i]
        if rices_feats is not None:  # (at 0 shots too: the two text-only demonstrations, as OpenFlamingo)
            demos = [train[j] for j in rices_demos(rices_feats[0], rices_feats[1][i], shots_used)]
        else:
            demos = [train[j] for j in rng.choice(pool, shots_used, replace=False)]
        ids, paths = build_prompt(kind, tok, demos, query, zero_shot=k == 0)
        if model.lm.config.max_context and len(ids) + max_new_tokens > model.lm.config.max_context:
            skipped["prompt longer than the LM's context"] += 1
            continue
        queries.append((int(i), query))
        prompts.append((ids, paths))
    return queries, prompts, skipped


def run_trial(model, tok, kind, train, test, k, seed, rices_feats=None, num_samples=None, query_set_size=2048,
              max_new_tokens=5, num_beams=3, label="", batch_size=8, num_workers=2):
    """One (shot count k, seed): metrics over the test examples (all of them, or num_samples drawn), and the
    predictions [[example id, prediction], ...], as a dict. The prompts are drawn first (trial_prompts), then
    answered batch_size at a time (batching.answer: images decoded by num_workers DataLoader workers; under
    torchrun the prompts split over the processes)."""
    queries, prompts, skipped = trial_prompts(model, tok, kind, train, test, k, seed, rices_feats, num_samples,
                                              query_set_size, max_new_tokens)
    if kind == "classification":
        fn = lambda ids, x: class_scores(model, tok, ids, x, CLASS_NAMES)  # noqa: E731  B lists of 2 scores
    else:
        fn = lambda ids, x: generate_answers(model, tok, ids, x, max_new_tokens, num_beams)  # noqa: E731  B texts
    answers = answer(fn, prompts, model.vision, batch_size, num_workers, desc=f"{label} {k} shots seed {seed}")
    scores, exact, labels, probs, predictions = [], [], [], [], []
    refs, cands = {}, {}
    for (i, query), a in zip(queries, answers):
        if isinstance(a, Skipped):  # an unreadable image: missing, truncated, undecodable, a decompression bomb
            skipped[str(a)] += 1
            continue
        if kind == "classification":
            p = np.exp(a - np.max(a))
            labels.append(query["label"])
            probs.append(float(p[1] / p.sum()))
            exact.append(float(int(np.argmax(a)) == query["label"]))
            predictions.append([query.get("id", i), CLASS_NAMES[int(np.argmax(a))]])
            continue
        predictions.append([query.get("id", i), a])
        if kind == "captions":
            exact.append(exact_match(a, query["captions"]))
            refs[i] = [ptb_tokenize(c) for c in query["captions"]]
            cands[i] = ptb_tokenize(a)
        else:  # normalised as VQA's evaluation does; VQA accuracy where there are several human answers
            exact.append(exact_match(vqa_normalize(a), [vqa_normalize(r) for r in query["answers"]]))
            scores += [vqa_accuracy(a, query["answers"])] if len(query["answers"]) > 1 else []
    out = {"n": len(exact), "skipped": dict(skipped)}
    if skipped and rank_world()[0] == 0:
        print(f"skipped: {dict(skipped)}", file=sys.stderr)
    if not exact:
        return out
    if kind == "captions":
        out["cider"] = cider(refs, cands)
    elif kind == "vqa" and scores:  # (one answer a question, as in MSVD-QA: exact match only, as Flamingo reports)
        out["vqa_accuracy"] = 100.0 * float(np.mean(scores))
    else:
        out["roc_auc"] = 100.0 * roc_auc(labels, probs) if 0 < sum(labels) < len(labels) else None
        out["accuracy"] = 100.0 * float(np.mean(exact))
    if kind != "classification":
        out["exact_match"] = 100.0 * float(np.mean(exact))
    out["predictions"] = predictions
    return out


# =============================================================================
# 3. The shapes world, on held-out test scenes

KIND_WORDS = {"color": set(shapes.COLORS), "shape": set(shapes.SHAPES), "size": set(shapes.SIZES),
              "position": set(shapes.POSITIONS), "direction": set(shapes_video.DIRECTIONS)}


def shapes_answers(model, tok, prompts, max_new_tokens=12, num_beams=1, batch_size=8, num_workers=2):
    """The answers to shapes prompts, a list of (prompt in our own markup, its list of uint8 images), batch_size
    prompts at a time (batching.answer; the arrays normalised in the DataLoader's workers)."""
    fn = lambda ids, x: generate_answers(model, tok, ids, x, max_new_tokens, num_beams)  # noqa: E731  B texts
    return answer(fn, [(tok.encode_markup(p), images) for p, images in prompts], model.vision, batch_size,
                  num_workers)


def eval_questions(model, tok, n, seed, blank=False, kind="question", **generation):
    """Exact match (%) on n test questions (or captions), optionally with blank images instead; kind "direction" or
    "count": the moving-shapes world's questions, "blank" then each clip's first frame in all its frames.
    generation: shapes_answers' settings (max_new_tokens, num_beams, batch_size, num_workers)."""
    prompts, targets = [], []
    video = kind in shapes_video.QUESTION_TYPES
    question = kind != "caption"
    for i in range(n):
        text, images = (shapes_video.video_sample if video else shapes.shapes_sample)("test", seed, i, kind=kind)
        chunk_text = text[:-len(EOT)]                      # "<image>Question:... Short answer:red<|endofchunk|>"
        prefix, target = chunk_text.rsplit(":", 1) if question else chunk_text.split("Output:", 1)
        if blank:
            images = [shapes_video.first_frame_only(images[0]) if video
                      else shapes.blank_image(np.random.default_rng([seed, i]))]
        prompts.append((prefix + (":" if question else "Output:"), images))
        targets.append(target[:-len(EOC)])
    preds = shapes_answers(model, tok, prompts, **generation)
    return 100.0 * sum(p == t for p, t in zip(preds, targets)) / n


def eval_task(model, tok, n, k, seed, blank=False, video=False, **generation):
    """Task-by-example with k demonstrations: (% answers of the right kind, % exact match). video: the moving-shapes
    world's, "blank" then every clip's frames its first."""
    prompts, targets, kinds = [], [], []
    world = shapes_video if video else shapes
    for i in range(n):
        kind = world.TASK_KINDS[i % len(world.TASK_KINDS)]  # the kinds in turn, so each gets an equal share
        text, images = (shapes_video.video_sample if video else shapes.shapes_sample)(
            "test", seed + 1, i, kind="task", task_kind=kind, n_chunks=k + 1)
        chunks = text[:-len(EOT)].split(EOC)[:-1]
        if blank:
            images = [shapes_video.first_frame_only(x) if video else
                      shapes.blank_image(np.random.default_rng([seed, i, j])) for j, x in enumerate(images)]
        prompts.append((EOC.join(chunks[:-1] + ["<image>Output:"]) if k else "<image>Output:", images))
        targets.append(chunks[-1].split("Output:", 1)[1])
        kinds.append(kind)
    preds = shapes_answers(model, tok, prompts, **generation)
    right_kind = sum(p in KIND_WORDS[kind] for p, kind in zip(preds, kinds))
    exact = sum(p == t for p, t in zip(preds, targets))
    return 100.0 * right_kind / n, 100.0 * exact / n


def run_shapes(model, tok, shot_list, seed, n, max_new_tokens=12, num_beams=1, batch_size=8, num_workers=2,
               video=False):
    """The shapes measurements of one trial: a list of records (subtask, shots, metrics). video: the moving-shapes
    world's questions and task-by-example instead, with their clips and with each clip's first frame only ("_blank")."""
    from tqdm import tqdm
    generation = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                      num_workers=num_workers)
    quiet = rank_world()[0] != 0  # one bar, rank 0's
    records = []
    runs = [(q, b) for q in (shapes_video.QUESTION_TYPES if video else ("question", "caption")) for b in (False, True)]
    label = "clips" if video else "questions, captions"
    for q, blank in tqdm(runs, desc=f"shapes {label} (seed {seed})", disable=quiet):
        em = eval_questions(model, tok, n, seed, blank, q, **generation)
        records.append({"subtask": q + ("_blank" if blank else ""), "shots": 0, "exact_match": em})
    for k in tqdm(shot_list, desc=f"shapes task-by-example (seed {seed})", disable=quiet):
        for blank in (False, True):
            rk, em = eval_task(model, tok, n, k, seed, blank, video, **generation)
            records.append({"subtask": "task" + ("_blank" if blank else ""), "shots": k, "right_kind": rk,
                            "exact_match": em})
    return records


# =============================================================================
# 4. The command line

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


def open_results(path):
    """The records already in --results `path` (a rerun skips their trials), with the file locked for this run:
    one eval.py writes a results file at a time. SystemExit with one line when it is in use or not ours."""
    if not path:
        return []
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        files.lock(path + ".lock", f"--results {path}")
        files.remove_leftovers(folder, [os.path.basename(path)])  # a killed run's unfinished write
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            records = files.loads(f.read().decode("utf-8"))
    except files.FileError as e:
        raise SystemExit(f"error: {e}") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --results {path}: {e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"error: --results {path} is not a list of eval.py's records: choose another file")
    return records


def main():
    from configurator import check, configure
    from model import load_model
    configure(globals())
    check(globals(), at_least=dict(num_trials=1, num_samples=1, query_set_size=1, num_beams=1, max_new_tokens=1,
                                   batch_size=1, num_workers=0),
          choices=dict(dtype=("float32", "bfloat16", "float16")), may_be_none=("num_samples", "num_beams", "max_new_tokens"))
    openflamingo = init_from.startswith(("openflamingo/", "HuggingFaceM4/")) or bool(lm) or pretrained.is_hub_id(init_from) \
        or os.path.isfile(os.path.join(init_from, "config.json"))  # released or shared (a folder with config.json)
    ckpt_path = init_from if init_from.endswith(".pt") else os.path.join(init_from, "ckpt.pt")
    if not openflamingo and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: no checkpoint at {ckpt_path}. Train one first:  python train.py config/train_shapes.py")
    if task not in ("shapes", "shapes_video") and not data_dir:
        raise SystemExit(f"error: --data_dir is needed for task {task!r} (README, Evaluation)")
    dev = start_processes(device)  # under torchrun: the process group, and cuda:LOCAL_RANK under CUDA
    rank = rank_world()[0]
    if rank:  # one voice, rank 0's (the others' errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    # every record stays in the file; the trials they hold are not run again. Rank 0 alone holds the file's lock
    records = from_rank0(lambda: open_results(results))
    try:
        model, tokenizer = load_model(init_from, lm, clip, clip_pretrained, dtype)
    except files.LOAD_ERRORS as e:  # offline, a missing or bad file: say what to do
        raise SystemExit(f"error: {files.message(e)}") from None
    model.eval().to(dev)
    tok = get_tokenizer(tokenizer, lm_vocab_size=model.lm.config.vocab_size, new_tokens=model.config.new_tokens)
    default = {"shapes": "0,1,2,4,8", "shapes_video": "0,1,2,4"}.get(task, "0,4,8,16,32")
    shot_list = [int(s) for s in str(shots or default).strip("()[]").split(",") if s.strip()]  # ("0,4": a tuple)
    base = {"task": task, "checkpoint": init_from if openflamingo else os.path.abspath(init_from),
            "demos": "rices" if rices else "random", "settings": dict(
                num_samples=num_samples, num_beams=num_beams, max_new_tokens=max_new_tokens, dtype=dtype,
                **({} if task.startswith("shapes") else dict(data_dir=os.path.abspath(data_dir), query_set_size=query_set_size)))}
    mine = lambda r: all(r.get(k) == v for k, v in base.items())  # noqa: E731  a record of these settings

    def finish(new, shots_seed):
        """Keep a trial's records, written at once (atomically) by rank 0: a later failure or kill loses none."""
        records.extend({**base, **shots_seed, **r} for r in new)
        if results and rank == 0:
            data = json.dumps(records, indent=1).encode()
            try:
                files.atomic_write(results, lambda f: f.write(data), needed=len(data))
            except files.FileError as e:
                raise SystemExit(f"error: {e}") from None

    def done(**shots_seed):
        """Whether --results holds this trial already: rank 0's answer, the same on every process."""
        def look():
            hit = any(mine(r) and all(r.get(k) == v for k, v in shots_seed.items()) for r in records)
            if hit:
                print(f"{shots_seed}: in {results} already, not run again")
            return hit
        return from_rank0(look)

    # a bf16 LM (dtype) next to the fp32 trained parts: autocast casts each matmul's operands to one dtype
    amp = nullcontext() if dtype == "float32" else torch.autocast("cuda" if "cuda" in dev else "cpu",
                                                                  dtype=getattr(torch, dtype))
    with amp:
        if task in ("shapes", "shapes_video"):
            for seed in range(trial_seed, trial_seed + num_trials):
                if not done(seed=seed):
                    finish([{**r, "n": num_samples or 200} for r in run_shapes(
                        model, tok, shot_list, seed, num_samples or 200, max_new_tokens or 12, num_beams or 1,
                        batch_size, num_workers, video=task == "shapes_video")], {"seed": seed})
        else:
            try:
                train, test, kind = read_task(task, data_dir)
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: {e}") from None
            print(f"{task}: {len(train)} training examples (demonstrations), {len(test)} test examples")
            feats = None
            if rices:
                cache = rices_cache or os.path.join(data_dir, ".rices_cache")
                feats = tuple(image_features(model, split, cache, f"{task}-{name}", init_from, num_workers=num_workers)
                              for name, split in (("train", train), ("test", test)))
            for k in shot_list:
                for seed in range(trial_seed, trial_seed + num_trials):
                    if not done(shots=k, seed=seed):
                        finish([run_trial(model, tok, kind, train, test, k, seed, feats, num_samples, query_set_size,
                                          max_new_tokens or max_new_tokens_of(task, kind), num_beams or 3, task,
                                          batch_size, num_workers)],
                               {"shots": k, "seed": seed})
    print(table([r for r in records if mine(r)]))
    if results:
        print(f"{len(records)} records in {results}")


if __name__ == "__main__":
    main()

"""
Few-shot evaluation. For now: the shapes world, measured on held-out test scenes.

    python eval.py --init_from=out-shapes --task=shapes --shots=0,1,2,4,8 --results=results.json

What it measures (DESIGN sections 6 and 8):
- questions: `<image>Question:{q} Short answer:` -> the answer, exact match, with the real images
  and with blank ones (a model that really looks drops to chance without them);
- captions: `<image>Output:` -> exact match of the whole caption;
- task-by-example: k demonstrations `<image>Output:{answer}<|endofchunk|>` of one answer kind
  (color, shape, size or position), then a query image and `<image>Output:`. The kind is told by
  nothing but the demonstrations: `right_kind` is how often the answer has the demonstrated kind,
  `exact_match` how often it is the right answer. At 0 shots the model can only guess the kind.
Greedy decoding, stop at `<|endofchunk|>`, answers cut at a following "Question"/"Answer"/"Output".
"""

import json
import os
import re

import numpy as np
import torch

import data

# -----------------------------------------------------------------------------
init_from = "out-shapes"
task = "shapes"
shots = "0,1,2,4,8"           # task-by-example shot counts
num_examples = 200            # test prompts per measurement
seed = 0                      # the test split's seed
results = ""                  # a JSON file to write the records to
max_new_tokens = 12
device = "cpu"
# -----------------------------------------------------------------------------

KIND_WORDS = {
    "color": set(data.COLORS), "shape": set(data.SHAPES), "size": set(data.SIZES), "position": set(data.POSITIONS),
}


def postprocess(text):
    """The answer part of a generation: cut at a following Question/Answer/Output, stripped."""
    return re.split(r"Question|Answer|Output", text)[0].strip()


@torch.no_grad()
def answer(model, tok, prompt, images):
    """Greedy answer to one prompt (markup) about a list of uint8 images."""
    mean, std = model.vision.mean, model.vision.std
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    idx = torch.tensor([tok.encode_markup(prompt)], device=device)
    out = model.generate(x[:, None].to(device), idx, max_new_tokens, temperature=0)[0, idx.shape[1]:].tolist()
    if model.eoc_token_id in out:
        out = out[:out.index(model.eoc_token_id)]
    return postprocess(tok.decode(out))


def eval_questions(model, tok, n, blank=False, kind="question"):
    """Exact match (%) on n test questions (or captions), optionally with blank images instead."""
    hits = 0
    for i in range(n):
        text, images = data.shapes_sample("test", seed, i, kind=kind)
        chunk = text[:-len(data.EOT)]                      # "<image>Question:... Short answer:red<|endofchunk|>"
        prefix, target = chunk.rsplit(":", 1) if kind == "question" else chunk.split("Output:", 1)
        prompt = prefix + (":" if kind == "question" else "Output:")
        target = target[:-len(data.EOC)]
        if blank:
            images = [data.blank_image(np.random.default_rng([seed, i]))]
        hits += answer(model, tok, prompt, images) == target
    return 100.0 * hits / n


def eval_task(model, tok, n, k, blank=False):
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
        pred = answer(model, tok, prompt, images)
        right_kind += pred in KIND_WORDS[kind]
        exact += pred == target
    return 100.0 * right_kind / n, 100.0 * exact / n


if __name__ == "__main__":
    from configurator import configure
    from model import Flamingo
    configure(globals())
    model, ckpt = Flamingo.from_checkpoint(init_from, verbose=False)
    model.eval().to(device)
    tok = data.get_tokenizer(ckpt.get("config", {}).get("tokenizer", "bytes"), lm_vocab_size=model.lm.config.vocab_size)
    if task != "shapes":
        raise SystemExit(f"task {task!r}: only 'shapes' is implemented so far")
    records = []
    base = {"task": "shapes", "checkpoint": os.path.abspath(init_from), "seed": seed, "n": num_examples}
    for qkind in ("question", "caption"):
        for blank in (False, True):
            em = eval_questions(model, tok, num_examples, blank, qkind)
            records.append({**base, "subtask": qkind + ("_blank" if blank else ""), "shots": 0, "exact_match": em})
            print(f"{qkind:9s} {'blank' if blank else 'images':6s}  exact match {em:5.1f}%")
    shot_list = [int(s) for s in str(shots).strip("()[]").split(",") if s.strip()]  # "0,4" parses as a tuple
    for k in shot_list:
        for blank in (False, True):
            rk, em = eval_task(model, tok, num_examples, k, blank)
            records.append({**base, "subtask": "task" + ("_blank" if blank else ""), "shots": k,
                            "right_kind": rk, "exact_match": em})
            print(f"task {k} shots {'blank' if blank else 'images':6s}  right kind {rk:5.1f}%  exact match {em:5.1f}%")
    if results:
        with open(results, "w") as f:
            json.dump(records, f, indent=1)

"""
OpenFlamingo (Awadalla et al. 2023) checkpoints, both ways: read() builds the LM and the tower of a released
checkpoint.pt (Flamingo.from_openflamingo calls it, as from_idefics calls idefics.read), and checkpoint() writes a
model trained here as OpenFlamingo's checkpoint.pt (export.py --openflamingo), which OpenFlamingo's own code loads
with create_model_and_transforms + model.load_state_dict(sd, strict=False), so its evaluation suite can run it.

A checkpoint.pt holds the trained parts and the LM's input table only (hf.py has the key map): the resampler, the
gated blocks under their LM layers, the table resized to the tokenizer plus OpenFlamingo's three tokens
(<|endofchunk|>, <image>, <PAD>), and GPT-NeoX's own head where its training saved it. Nothing in it says how the
model is laid out: that is read off the tensors' names and shapes (hf.read_openflamingo), and for export it must be
the one OpenFlamingo builds (hf.openflamingo_problems).
"""

import torch
import torch.nn as nn

import hf
from lm import LM
from vision import VisionEncoder


def read(checkpoint, lm, clip, clip_pretrained, dtype=None):
    """A checkpoint.pt (a hub id of hf.OPENFLAMINGO, a directory or the file) and its LM -> (the LM with OpenFlamingo's
    input table, the tower, the FlamingoConfig options, the trained tensors under our names, the file's path)."""
    path = hf.openflamingo_file(checkpoint)
    lm_model = LM.from_pretrained(lm, dtype=dtype)
    arch, C = lm_model.config.arch, lm_model.config.n_embd
    trained, wte, layout = hf.read_openflamingo(path, arch, lm_model.config.n_layer, C)  # wte (V + 3, C)
    dt, tied = lm_model.transformer.wte.weight.dtype, lm_model.config.tie_word_embeddings
    V, saved_head = wte.shape[0] - len(hf.OPENFLAMINGO_TOKENS), trained.pop("lm_head", None)  # GPT-NeoX's, if saved
    if wte.shape[1] != C or V > lm_model.config.vocab_size or (saved_head is not None and saved_head.shape != wte.shape):
        raise ValueError(f"{path}: {hf.OPENFLAMINGO_LM_KEYS[arch][1]} has shape {tuple(wte.shape)}"
                         f"{'' if saved_head is None else f', the head {tuple(saved_head.shape)}'}; the LM {lm} "
                         f"has {lm_model.config.vocab_size} rows of width {C}")
    # OpenFlamingo resized the LM's table (MPT-7B: 50432 padded rows) to its tokenizer's and trained it all:
    # the LM gets the first V rows, the new-token rows get the rest. MPT ties its head, so both tie here too.
    # GPT-NeoX's head is its own, frozen: the LM keeps its first V rows; the new tokens' head rows, which
    # OpenFlamingo drew at random when it built its model, are read where its training saved them (and export
    # writes them), else start at the mean of the others, as Flamingo.__init__ starts them.
    head = None if tied else (lm_model.lm_head.weight if saved_head is None else saved_head)[:V].detach().clone()
    lm_model.transformer.wte = nn.Embedding(V, C, _weight=wte[:V].to(dt).clone(), _freeze=True)
    lm_model.lm_head = nn.Linear(C, V, bias=False)
    lm_model.lm_head.weight = lm_model.transformer.wte.weight if tied else nn.Parameter(head, requires_grad=False)
    lm_model.config.vocab_size = V
    trained["new_wte"] = wte[V:]
    if not tied:
        n = len(hf.OPENFLAMINGO_TOKENS)
        trained["new_lm_head"] = head.float().mean(0).expand(n, -1).to(head.dtype) if saved_head is None else saved_head[V:]
    options = dict(lm=lm, clip=clip, clip_pretrained=clip_pretrained, openflamingo=checkpoint, tie_new_tokens=tied,
                   **layout)
    return lm_model, VisionEncoder(clip, clip_pretrained, ln_post=False), options, trained, path


def checkpoint(model, n_text):
    """The state dict of OpenFlamingo's checkpoint.pt for `model`, whose tokenizer has `n_text` tokens before the new
    ones (OpenFlamingo adds <|endofchunk|>, <image>, <PAD> after them and resizes the LM's table to match).
    ValueError naming what does not fit OpenFlamingo's layout. Exact where the model's new tokens' output rows are
    their input rows (tie_new_tokens) or the LM has its own head (GPT-NeoX); with MPT's tied head and untied new
    rows, OpenFlamingo's <|endofchunk|> and <image> output rows become their input rows (export.py says so)."""
    cfg, arch, V = model.config, model.lm.config.arch, model.lm.config.vocab_size
    problems = hf.openflamingo_problems(vars(cfg), arch)
    if not 0 < n_text <= V:
        problems.append(f"a tokenizer of {n_text} tokens for an LM of {V} rows")
    if set(cfg.new_tokens) - set(hf.OPENFLAMINGO_TOKENS):
        problems.append(f"new tokens {cfg.new_tokens} (OpenFlamingo's: {hf.OPENFLAMINGO_TOKENS})")
    if problems:
        raise ValueError("not OpenFlamingo's layout: " + "; ".join(problems))
    trained = {k: v for k, v in model.trained_state_dict().items()
               if k.startswith(("perceiver.", "xattn."))}

    def table(lm_rows, new_rows):  # (n_text + 3, C): the LM's rows, then <|endofchunk|>, <image>, <PAD>
        lm_rows = lm_rows.detach().float()[:n_text]
        new = {t: r for t, r in zip(cfg.new_tokens, new_rows.detach().float())}
        pad = new.get("<PAD>", lm_rows.mean(0))  # never read: OpenFlamingo masks its padding (as transformers' resize)
        return torch.cat([lm_rows, torch.stack([new["<|endofchunk|>"], new["<image>"], pad])])

    wte = table(model.lm.transformer.wte.weight, model.new_wte)
    head = None if model.lm.config.tie_word_embeddings else table(model.lm.lm_head.weight, model.new_lm_head)
    return hf.write_openflamingo(trained, wte, head, arch)

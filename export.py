"""
Share a trained model: as a folder in the Hugging Face layout (pretrained.py: config.json, model.safetensors of the
trained parts, a model card), uploaded to the hub if asked; and as OpenFlamingo's checkpoint.pt (openflamingo.py), so
that OpenFlamingo's own code and evaluation suite run it.

    python export.py --init_from=out-shapes --out_dir=shapes-flamingo --with_base=True   # the stand-ins copied in
    python export.py --init_from=out-9b --out_dir=flamingo-9b --eval_results=coco.json --push_to_hub=me/flamingo-9b
    python export.py --init_from=out-9b --openflamingo=out-9b/checkpoint.pt             # OpenFlamingo's format

Then any script reads the folder or the hub id like a run's out_dir:
    python sample.py --init_from=shapes-flamingo --image cat.png
    python eval.py --init_from=me/flamingo-9b --task=coco --data_dir=data/coco
"""

import os
import sys

from configurator import check, configure

config = dict(
    init_from="out-shapes",  # what to export: a run's out_dir (or ckpt.pt), or anything sample.py loads
    out_dir="",              # the folder to write ("": none)
    with_base=False,         # copy the frozen LM's folder and the tower's weights in, when they are local files
    eval_results="",         # an eval.py --results file: its table goes into the model card
    push_to_hub="",          # "user/name": upload the folder to this hub repository (huggingface-cli login first)
    private=False,           # ... as a private repository
    openflamingo="",         # also write OpenFlamingo's checkpoint.pt to this file
    lm="", clip="ViT-L-14", clip_pretrained="openai",  # as sample.py: a local OpenFlamingo checkpoint.pt's LM and CLIP
)
TRAINING = ("init_from", "dataset", "data_dir", "data_weights", "max_iters", "batch_size", "gradient_accumulation_steps",
            "block_size", "learning_rate", "weight_decay", "dtype", "seed")  # train.py's settings the card lists


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def card_of(model, name, ckpt, evals):
    """The model card (README.md) as a function of the config written: `model`, its ckpt.pt dict (or {}), an
    eval.py table (or "")."""
    import pretrained
    run = ckpt.get("config", {})
    training = {k: run[k] for k in TRAINING if run.get(k) not in (None, "")}
    if "iter_num" in ckpt:
        training["iterations done"] = ckpt["iter_num"]
    if isinstance(ckpt.get("best_val_loss"), float):
        training["best validation loss"] = round(ckpt["best_val_loss"], 4)
    return lambda cfg: pretrained.model_card(model, config["out_dir"], cfg, training, evals, name)


def main():
    configure(config)
    check(config)
    c = config
    if not c["out_dir"] and not c["openflamingo"]:
        fail("nothing to write: give --out_dir=<folder> (and --push_to_hub=user/name), or --openflamingo=<checkpoint.pt>")
    if c["push_to_hub"] and (not c["out_dir"] or c["push_to_hub"].count("/") != 1):
        fail(f"--push_to_hub={c['push_to_hub']!r} uploads the --out_dir folder to a repository named user/name")
    evals = ""
    if c["eval_results"]:
        import json
        from eval import table
        try:
            with open(c["eval_results"]) as f:
                evals = table(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"--eval_results={c['eval_results']}: not a results file of eval.py ({type(e).__name__}: {e})")

    import files
    import openflamingo
    import pretrained
    from model import Flamingo, load_model
    from tokenizer import get_tokenizer
    path = os.path.join(c["init_from"], "ckpt.pt") if os.path.isdir(c["init_from"]) else c["init_from"]
    try:
        if os.path.isfile(path) and path.endswith(".pt") and not c["lm"]:  # a run's: its training settings too
            model, ckpt = Flamingo.from_checkpoint(path, verbose=False)
            tokenizer = ckpt.get("config", {}).get("tokenizer", "bytes")
        else:
            (model, tokenizer), ckpt = load_model(c["init_from"], c["lm"], c["clip"], c["clip_pretrained"]), {}
    except files.LOAD_ERRORS as e:
        fail(files.message(e))

    if c["out_dir"]:
        name = c["push_to_hub"] or os.path.basename(os.path.abspath(c["out_dir"]))
        try:
            model.save_pretrained(c["out_dir"], tokenizer, card_of(model, name, ckpt, evals), c["with_base"])
        except (OSError, files.FileError) as e:
            fail(files.message(e))
        print(f"wrote {c['out_dir']}: {', '.join(sorted(os.listdir(c['out_dir'])))}")
    if c["openflamingo"]:
        n_text = get_tokenizer(tokenizer, model.lm.config.vocab_size, model.config.new_tokens).base_n_vocab
        try:
            sd = openflamingo.checkpoint(model, n_text)
            files.atomic_save(sd, c["openflamingo"])
        except (ValueError, files.FileError) as e:
            fail(f"--openflamingo: {e}")
        cfg = model.config
        print(f"wrote {c['openflamingo']}: {len(sd)} tensors. In OpenFlamingo's code:\n"
              f"  model, image_processor, tokenizer = create_model_and_transforms({cfg.clip!r}, "
              f"{cfg.clip_pretrained!r}, {cfg.lm!r}, {tokenizer!r}, cross_attn_every_n_layers="
              f"{cfg.cross_attn_every_n_layers})\n  model.load_state_dict(torch.load({c['openflamingo']!r}), strict=False)")
        if model.lm.config.tie_word_embeddings and model.new_lm_head is not model.new_wte:
            print("warning: OpenFlamingo's LM ties its head to its input table, this model's new token rows are not "
                  "(train with tie_new_tokens=True for that): there, <|endofchunk|> and <image> are scored with their "
                  "input rows; every other token's logit is this model's")
        if not cfg.vision_ln_post:
            print("note: this model reads the tower's patch tokens before ln_post, as OpenFlamingo's released models "
                  "did; OpenFlamingo's code with today's open_clip reads them after it: there, set "
                  "model.vision_encoder.ln_post = torch.nn.Identity()")
    if c["push_to_hub"]:
        try:
            print(f"uploaded: {pretrained.push(c['out_dir'], c['push_to_hub'], c['private'])}")
        except RuntimeError as e:
            fail(str(e))


if __name__ == "__main__":
    main()

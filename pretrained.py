"""
A trained model as a folder to share, in the layout of the Hugging Face hub (Flamingo.save_pretrained writes one,
Flamingo.from_folder reads one, export.py makes one from a run's ckpt.pt and uploads it):

    config.json          {"flamingo": the FlamingoConfig, "tokenizer": ..., "format": 1}: the LM and CLIP by name
    model.safetensors    the trained tensors only (resampler, gated blocks, new token rows, any trained LM part);
                         a randomly initialised frozen tower's too, as "vision.*", since no name rebuilds it
    README.md            the model card: what it is, how it was trained, what it scored
    tokenizer.json       the LM's tokenizer, when it is a file (a built-in one, "shapes", "gpt2", is named)
    lm/, vision.safetensors  the frozen LM's folder and the tower's weights, only when copied in (export.py
                         --with_base=True: for bases that are on no hub, as the shapes world's stand-ins)

safetensors and JSON only: reading a folder never runs code (a pickle could). Paths in config.json that name a
file or folder inside it are relative to it, so the folder works wherever it is copied or downloaded.
This file knows the layout, not the model: model.py builds from what it reads.
"""

import json
import os
import re
import shutil

import torch

import files
import hf

FORMAT = 1
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"


def is_folder(path):
    """Whether `path` is a local folder in this layout (a config.json with a "flamingo" object)."""
    if not os.path.isfile(os.path.join(path, CONFIG)):
        return False
    try:
        return isinstance(hf.read_config(path).get("flamingo"), dict)
    except files.FileError:
        return False


def is_hub_id(name):
    """"user/name" (the hub's characters, not a file's name) and nothing local by that name: a hub repository."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name)) and not os.path.exists(name) \
        and not name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))


def download(hub_id):
    """A hub repository in this layout, downloaded once into the hub cache (config, weights, card, tokenizer and
    any copied base; nothing else): its local folder. RuntimeError with what to do when offline."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.md", "*.model", "*.tiktoken"])
    except Exception as e:
        raise RuntimeError(f"{hub_id}: no such folder here, and no download from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Offline? On a "
                           f"machine with network run `huggingface-cli download {hub_id} --local-dir DIR`, copy DIR "
                           "here and pass its path") from None


PATHS = ("lm", "clip_pretrained", "openflamingo", "idefics")  # FlamingoConfig fields that may name a file or folder
SAFE = (".json", ".safetensors", ".txt", ".model", ".tiktoken", ".md")  # the files a folder holds: no pickle


def resolve(cfg, base):
    """cfg with each of its PATHS that is relative and found under `base` made a path there: a checkpoint's or a
    folder's copied LM and tower travel with it."""
    return {**cfg, **{k: os.path.join(base, cfg[k]) for k in PATHS if isinstance(cfg.get(k), str) and cfg[k]
                      and not os.path.isabs(cfg[k]) and os.path.exists(os.path.join(base, cfg[k]))}}


def read_config(folder):
    """The folder's config.json, checked: FileError if it is not one of this layout or of a newer format."""
    if not is_folder(folder):
        raise files.FileError(f"{folder}: no {CONFIG} with a \"flamingo\" object: not a folder written by "
                              "save_pretrained (export.py)")
    config = hf.read_config(folder)
    if not isinstance(config.get("format", FORMAT), int) or config.get("format", FORMAT) > FORMAT:
        raise files.FileError(f"{folder} was written by a newer version of this code (format {config['format']!r})")
    return config


def read(path_or_hub_id, lm=None, clip_pretrained=None):
    """-> (folder, the FlamingoConfig dict, the tokenizer's name or path, the trained tensors, the frozen tower's
    tensors or None). Names relative to the folder come back as paths in it; lm / clip_pretrained replace the
    names it gives. FileError for anything malformed or named by a path this machine does not have."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = download(path_or_hub_id) if is_hub_id(path_or_hub_id) else path_or_hub_id
    config = read_config(folder)
    cfg = resolve(config["flamingo"], folder)
    for key in ("lm", "clip_pretrained"):  # the base copied in: safetensors, as everything else here
        path = cfg.get(key)
        if isinstance(path, str) and path.startswith(os.path.join(folder, "")) and not (path.endswith(".safetensors") or
                                                                                      is_safe_dir(path)):
            raise files.FileError(f"{path}: not safetensors (a pickle could run code): a shared folder holds "
                                  "safetensors only")
    cfg.update({k: v for k, v in (("lm", lm), ("clip_pretrained", clip_pretrained)) if v})
    for key in PATHS:
        if isinstance(cfg.get(key), str) and os.path.isabs(cfg[key]) and not os.path.exists(cfg[key]):
            raise files.FileError(f"{folder}: its {key} is {cfg[key]}, which is not on this machine: " + (
                f"pass --{key}=<where it is here, or its hub id>" if key in ("lm", "clip_pretrained") else
                f"put it there, or its hub id in {CONFIG}"))
    tokenizer = config.get("tokenizer", "bytes")
    if not isinstance(tokenizer, str):
        raise files.FileError(f"{folder}/{CONFIG}: tokenizer {tokenizer!r} is not a name")
    if os.path.exists(os.path.join(folder, tokenizer)):
        tokenizer = os.path.join(folder, tokenizer)
    weights = os.path.join(folder, WEIGHTS)
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise files.FileError(f"{weights}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    tower = None
    if cfg.get("freeze_vision", True) and any(k.startswith("vision.") for k in tensors):
        tower = {k.removeprefix("vision."): tensors.pop(k) for k in list(tensors) if k.startswith("vision.")}
    return folder, cfg, tokenizer, tensors, tower


def write(folder, cfg, tokenizer, tensors, card, with_base=False):
    """Write the folder: each file atomically (a kill mid-write leaves the previous file whole). cfg: the
    FlamingoConfig dict; tokenizer: its name or path; card: README.md's text, or a function of the cfg written;
    with_base: copy the LM's folder and the tower's weights file in when they are local (else they stay named by
    their paths, and a warning says so). -> the cfg written."""
    from safetensors.torch import save
    os.makedirs(folder, exist_ok=True)
    cfg = dict(cfg)
    if with_base:
        if os.path.isdir(cfg["lm"]):
            if not is_safe_dir(cfg["lm"]):
                raise files.FileError(f"--with_base: {cfg['lm']} holds its weights as pickles (.bin), and a shared "
                                      "folder holds safetensors: LM.from_pretrained(it).save_pretrained(dir) writes them")
            copy(cfg["lm"], os.path.join(folder, "lm"))
            cfg["lm"] = "lm"
        if cfg.get("clip_pretrained") and os.path.isfile(cfg["clip_pretrained"]):
            copy_tower(cfg["clip_pretrained"], os.path.join(folder, "vision.safetensors"))
            cfg["clip_pretrained"] = "vision.safetensors"
    for key in PATHS:  # the machine's own paths cannot travel
        if isinstance(cfg.get(key), str) and os.path.exists(cfg[key]) and not os.path.exists(os.path.join(folder, cfg[key])):
            cfg[key] = os.path.abspath(cfg[key])
            print(f"warning: {key} is this machine's {cfg[key]}: elsewhere the folder loads only " + (
                f"with --{key}=<where it is there>, or copied in with --with_base=True" if key in ("lm", "clip_pretrained")
                else f"with that file there, or its hub id put in {CONFIG}"))
    if tokenizer not in ("bytes", "shapes", "gpt2") and os.path.exists(tokenizer):
        src = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
        copy(src, os.path.join(folder, "tokenizer.json"))
        tokenizer = "tokenizer.json"
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
    files.atomic_write(os.path.join(folder, WEIGHTS), lambda f: f.write(data), needed=len(data))
    text = json.dumps({"format": FORMAT, "architectures": ["Flamingo"], "flamingo": cfg, "tokenizer": tokenizer},
                      indent=2).encode()
    files.atomic_write(os.path.join(folder, CONFIG), lambda f: f.write(text))
    text = (card(cfg) if callable(card) else card).encode()
    files.atomic_write(os.path.join(folder, CARD), lambda f: f.write(text))
    return cfg


def is_safe_dir(path):
    """A folder whose weights are safetensors."""
    return os.path.isdir(path) and any(n.endswith(".safetensors") for n in os.listdir(path))


def copy(src, dst):
    """A file, or a folder's files of the SAFE kinds (not subfolders: a model folder is flat), each written
    atomically."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if os.path.isfile(os.path.join(src, name)) and name.endswith(SAFE) and not name.endswith(".bin.index.json"):
                copy(os.path.join(src, name), os.path.join(dst, name))
        return
    with open(src, "rb") as f:
        files.atomic_write(dst, lambda out: shutil.copyfileobj(f, out), needed=os.path.getsize(src))


def copy_tower(src, dst):
    """The tower's weights file as safetensors: copied, or converted from a PyTorch file (read weights_only)."""
    from safetensors.torch import save
    if src.endswith(".safetensors"):
        return copy(src, dst)
    sd = files.torch_load(src, map_location="cpu")
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise files.FileError(f"--with_base: {src} is not a state dict of tensors: cannot write it as safetensors")
    data = save({k: v.contiguous().clone() for k, v in sd.items()}, metadata={"format": "pt"})
    files.atomic_write(dst, lambda f: f.write(data), needed=len(data))


def model_card(model, folder, cfg, training=None, evals="", name=None):
    """README.md for `model` saved in `folder` with the config `cfg`: front matter for the hub, then what the model is,
    how to run it, how it was trained (training: a dict of train.py's settings, its iterations and validation loss)
    and what it scored (evals: eval.py's table). name: its hub id, else the folder's name."""
    name, counts = name or os.path.basename(os.path.abspath(folder)), model.parameter_counts()
    n_blocks, n_layer = len(model.xattn), model.lm.config.n_layer
    inside = lambda name: os.path.exists(os.path.join(folder, name))  # noqa: E731  (copied in: with_base)
    lm, weights = cfg["lm"], cfg.get("clip_pretrained")
    lm_text = f"`{lm}`" + (" (in this folder)" if inside(lm) else "")
    clip = f"`{cfg['clip']}` (" + ((f"weights `{weights}`" + (", in this folder" if inside(weights) else "")) if weights
                                   else "its weights in model.safetensors") + ")"
    base = [lm] if is_hub_id(lm) else []
    lines = ["---", "tags: [flamingo, image-to-text, visual-question-answering, nanoflamingo]",
             "pipeline_tag: image-to-text", *(f"base_model: {b}" for b in base), "---", "", f"# {name}", "",
             "A [Flamingo](https://arxiv.org/abs/2204.14198) (Alayrac et al. 2022) trained with nanoFlamingo: the frozen "
             f"language model {lm_text} and the frozen CLIP tower {clip}, joined by a Perceiver Resampler "
             f"({cfg['resampler_depth']} layers, {cfg['num_latents']} latents) and gated cross-attention blocks before "
             f"{n_blocks} of the LM's {n_layer} layers. model.safetensors holds the trained parts only; the LM and the "
             "tower are read from their own folders or the hub.", "",
             "| part | trained | frozen |", "| --- | ---: | ---: |",
             *(f"| {part} | {counts[part][0]:,} | {counts[part][1]:,} |" for part in
               ("vision", "lm", "perceiver", "xattn", "new_tokens", "total") if part in counts), "",
             "## Use", "", "```bash", f"python sample.py --init_from={name} --image cat.jpg", "```", "",
             "```python", "from model import Flamingo", f"model, tokenizer = Flamingo.from_folder(\"{name}\")", "```", ""]
    if training:
        lines += ["## Training", "", *(f"- {k}: {v}" for k, v in training.items()), ""]
    lines += ["## Evaluation", "", *(["```", evals.strip(), "```"] if evals.strip() else ["Not evaluated."]), ""]
    return "\n".join(lines)


def push(folder, repo_id, private=False):
    """Upload the folder to the hub repository `repo_id` (created if it does not exist) with huggingface_hub:
    its URL. RuntimeError with one line when offline, not logged in, or refused."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"HF_HUB_OFFLINE is set: not uploading. The folder {folder} is complete: upload it later "
                           f"with `huggingface-cli upload {repo_id} {folder}`")
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload a Flamingo (nanoFlamingo)")
    except Exception as e:
        raise RuntimeError(f"could not upload {folder} to {repo_id} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}). Offline or not logged in "
                           f"(huggingface-cli login)? The folder is complete: upload it later with "
                           f"`huggingface-cli upload {repo_id} {folder}`") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"

"""
Train a Flamingo: the resampler, the gated cross-attention blocks and the new token rows, with the vision encoder
and the LM frozen. One process, or several (DDP or FSDP) on one node or many through torchrun's environment:

    python train.py config/train_shapes.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_shapes.py
    python train.py config/9b.py --dry_run=True          # sizes and memory per GPU: offline, no weight read
    python train.py config/finetune_folder.py --data_dir=my_folder --init_from=out-shapes   # your own data

`gradient_accumulation_steps` is per process: the global batch is batch_size * gradient_accumulation_steps
* world_size samples, and its content depends only on the data seed and the step, so 2 processes with
accumulation 1 follow exactly the run of 1 process with accumulation 2.
"""

import json
import math
import os
import sys
import time
from collections import namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import files
import folders
import idefics
import memory
import pretrained
from lm import LM
from model import Flamingo, FlamingoConfig, load_model
from pretrain_shapes import lm_config as pretrain_shapes_lm_config, pretrain
from shards import ShardStream
from tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# default config values (a config file and --key=value overrides change them: configurator.py)
# I/O
out_dir = "out"
eval_interval = 200
log_interval = 10
eval_iters = 10               # validation batches per evaluation
always_save_checkpoint = True  # at every eval, else only when the validation loss improves
init_from = "scratch"         # "scratch" builds from lm/clip; "resume" continues out_dir/ckpt.pt; else fine-tune from an
                              # out_dir of train.py, OpenFlamingo's "openflamingo/<name>" or checkpoint.pt (and lm),
                              # or an IDEFICS ("HuggingFaceM4/idefics-9b-instruct" or its folder)
wandb_log = False
wandb_project = "flamingo"
wandb_run_name = "run"
# data
dataset = "shapes"            # "shapes" (the offline world), "shapes_video" (its clips) or "folder" (data_dir)
data_dir = None               # dataset "folder": a folder (train.jsonl, val.jsonl or test.jsonl), or several: "a,b";
                              # also "shapes" (the shapes world) and tar shards "pairs:GLOB", "docs:GLOB" (LAION, MMC4)
data_weights = None           # the sources' loss weights, e.g. (0.2, 1.0); None: 1 each
data_batch_sizes = None       # the sources' rows per micro-step, e.g. (16, 8) (OpenFlamingo: pairs 2x documents); None: batch_size
num_workers = 2               # DataLoader processes per rank reading tar shards
shuffle_buffer = 1000         # tar shards: samples shuffled within a buffer of this many (0: in shard order)
cache_vision_features = False  # folders: run the frozen tower once per image and keep its output on disk (out_dir)
data_seed = 1337
tokenizer = "bytes"
batch_size = 16               # per micro-step and process
gradient_accumulation_steps = 1  # per process
block_size = 256
pack = True                   # pack several samples into each row of block_size tokens (shapes.packed_sample)
# model (see model.FlamingoConfig)
lm = ""                       # LM.from_pretrained path or hub id ("" with pretrain_shapes: out_dir/pretrained/lm)
clip = "ViT-B-32"             # open_clip model name
clip_pretrained = None        # open_clip tag or weights file (None with pretrain_shapes: out_dir/pretrained/...)
pretrain_shapes = False       # make lm and clip_pretrained first if missing (pretrain_shapes.py)
pretrain_lm_iters = 600
pretrain_vision_iters = 500
vision_stage = None           # ResNet towers: the stage whose feature map is the grid of visual tokens
vision_ln_post = True         # ViT towers: False takes the patch tokens before the final LayerNorm (OpenFlamingo)
cross_attn_every_n_layers = 1
cross_attn_from_layer = 0     # no gated block before the LM's layers below this one (model.FlamingoConfig)
resampler_depth = 6
resampler_heads = 8
resampler_dim_head = 64
num_latents = 64
max_num_frames = 1            # the resampler's time embeddings: videos of up to this many frames; 0 = none (OpenFlamingo)
xattn_heads = 8
xattn_dim_head = 64
xattn_ff_mult = 4             # the gated blocks' feed-forward width, times the LM's
only_attend_immediate_media = True
freeze_lm = True
freeze_vision = True
train_lm_layers = 0           # also train the LM's top this many layers (fine-tuning); 0 = the frozen LM
train_lm_embeddings = False   # also train the LM's whole input table, as OpenFlamingo does (config/9b.py)
tie_new_tokens = False        # the new tokens' output rows are their input rows, as in OpenFlamingo's MPT (README)
activation_checkpointing = False  # recompute each LM layer in the backward pass: far less memory, ~1/3 more compute
# optimizer: AdamW, warmup then cosine decay
learning_rate = 1e-4
max_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 disables
gate_lr_mult = 1.0            # learning rate of the tanh gates, as a multiple of learning_rate
decay_lr = True
warmup_iters = 100
lr_decay_iters = None         # None = max_iters
min_lr = None                 # None = learning_rate / 10
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False
backend = "nccl" if torch.cuda.is_available() else "gloo"
fsdp = False                  # shard weights, gradients and optimizer state over the processes (torchrun; fully_shard)
seed = 1337
dry_run = False               # build the model on the meta device, print its sizes and memory per GPU, then exit
dry_run_world_size = 8        # the number of processes (GPUs) a dry run estimates for
# -----------------------------------------------------------------------------
from configurator import check, configure  # noqa: E402
config = configure(globals())
check(config, at_least=dict(eval_interval=1, log_interval=1, eval_iters=1, batch_size=1, gradient_accumulation_steps=1,
                            block_size=2, max_iters=0, warmup_iters=0, lr_decay_iters=1, num_workers=0, shuffle_buffer=0,
                            learning_rate=0, min_lr=0, weight_decay=0, grad_clip=0, gate_lr_mult=0, num_latents=1,
                            resampler_depth=1, resampler_heads=1, xattn_heads=1, cross_attn_every_n_layers=1,
                            max_num_frames=0, train_lm_layers=0, dry_run_world_size=1),
      choices=dict(dtype=("float32", "bfloat16", "float16"), dataset=("shapes", "shapes_video", "folder")),
      may_be_none=("lr_decay_iters", "min_lr"))
lr_decay_iters = lr_decay_iters or max_iters
min_lr = learning_rate / 10 if min_lr is None else min_lr
if pretrain_shapes:  # the shapes world's stand-ins for a pretrained LM and CLIP live in the run's out_dir
    lm = config["lm"] = lm or os.path.join(out_dir, "pretrained", "lm")
    clip_pretrained = config["clip_pretrained"] = clip_pretrained or os.path.join(out_dir, "pretrained", "vision.safetensors")
flamingo_options = {f: globals()[f] for f in FlamingoConfig.__dataclass_fields__  # the model keys above (the rest,
                    if f in config and f not in ("lm", "clip", "clip_pretrained", "new_tokens")}  # IDEFICS's: defaults)
finetune = init_from not in ("scratch", "resume")
listed = lambda v, cast: [cast(x) for x in (  # noqa: E731  "a,b" (command line), a tuple (config file) or one value
    v.split(",") if isinstance(v, str) else v if isinstance(v, (list, tuple)) else [v])]
specs = listed(data_dir or [], str) if dataset == "folder" else [dataset]  # the data sources, below
weights = listed(data_weights, float) if data_weights is not None else [1.0] * len(specs)
sizes = listed(data_batch_sizes, int) if data_batch_sizes is not None else [batch_size] * len(specs)
# -----------------------------------------------------------------------------
# --dry_run=True: the model on the meta device (nothing read or allocated), its sizes and memory per GPU; then exit
if dry_run:
    if finetune:  # the model this project's checkpoint describes, with this run's train_lm_layers and _embeddings
        path = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from
        try:  # a run's ckpt.pt, or a shared folder's config.json
            saved = {"flamingo_config": pretrained.resolve(pretrained.read_config(init_from)["flamingo"], init_from)} \
                if pretrained.is_folder(init_from) else files.torch_load(path, map_location="cpu", mmap=True) \
                if os.path.isfile(path) else {}
        except files.FileError as e:
            sys.exit(f"error: {e}")
        if not isinstance(saved, dict) or "flamingo_config" not in saved:
            sys.exit(f"error: --dry_run=True with init_from={init_from!r}: dry runs read this project's models only")
        flamingo_options = dict(saved["flamingo_config"])
        lm, clip, clip_pretrained = (flamingo_options.pop(k) for k in ("lm", "clip", "clip_pretrained"))
        flamingo_options["train_lm_layers"] = max(train_lm_layers, flamingo_options.get("train_lm_layers", 0))
        flamingo_options["train_lm_embeddings"] = train_lm_embeddings or flamingo_options.get("train_lm_embeddings", False)
    if pretrain_shapes and not finetune and not os.path.exists(os.path.join(lm, "config.json")):
        print(f"{lm} does not exist yet: counting the LM that stage 1 (pretrain_shapes.py) would make")
        lm_config = pretrain_shapes_lm_config(tokenizer)
    else:
        lm_config = LM.config_of(lm)  # a local config.json, else hf.KNOWN_LMS: no download
    with torch.device("meta"):  # prints the parameters of each part
        model = Flamingo.from_config(FlamingoConfig(lm=lm, clip=clip, clip_pretrained=clip_pretrained,
                                                    **flamingo_options), lm_config, verbose=True)
    trained, frozen = model.parameter_counts()["total"]
    ws, rows = dry_run_world_size if fsdp else 1, max(sizes)  # a mix runs its sources in turn: the largest counts
    weights_gb, acts_gb = memory.estimate(model, rows * block_size, 4 if dtype == "float32" else 2, ws,
                                          activation_checkpointing)
    mem = weights_gb + acts_gb
    print(f"memory per GPU ({f'FSDP over {ws}' if fsdp else 'DDP'}, {dtype}, batch {rows} x {block_size} "
          f"tokens{', activation checkpointing' if activation_checkpointing else ''}): "
          f"weights {weights_gb:.2f} GB + activations {acts_gb:.2f} GB = {mem:.2f} GB (a rough estimate)")
    print(json.dumps({"total_params": trained + frozen, "trained_params": trained, "memory_per_gpu_gb": round(mem, 2)}))
    sys.exit(0)
if fsdp and int(os.environ.get("RANK", -1)) == -1:  # then the run's own checks, before anything is loaded
    sys.exit("error: fsdp=True shards over processes: start train.py with torchrun (README, Scaling up)")
if not specs or len(weights) != len(specs) or len(sizes) != len(specs) or min(sizes) < 1 or min(weights) < 0:
    sys.exit(f"error: dataset 'folder' needs data_dir (a folder, or several 'a,b') and one weight >= 0 and batch size "
             f">= 1 per source: got data_dir={data_dir!r}, data_weights={data_weights!r}, "
             f"data_batch_sizes={data_batch_sizes!r}")
if init_from == "resume" and not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
    sys.exit(f"error: init_from='resume', but {os.path.join(out_dir, 'ckpt.pt')} does not exist: start with "
             "init_from='scratch' (or give the out_dir of the run to resume)")

ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend=backend)
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
if master:
    print(f"global batch: {batch_size * gradient_accumulation_steps * world_size} samples "
          f"({world_size} processes x {gradient_accumulation_steps} micro-steps x {batch_size})")
if master:  # one run per out_dir at a time; what killed writes of an earlier run left is removed
    try:
        os.makedirs(out_dir, exist_ok=True)
        files.lock(os.path.join(out_dir, "train.lock"), f"out_dir {out_dir}")
    except (OSError, files.FileError) as e:
        sys.exit(f"error: {e}")
    for name in files.remove_leftovers(out_dir, ("ckpt.pt", "log.jsonl", "vision_features.npy",
                                                 "vision_features.npy.json")):
        print(f"removed {os.path.join(out_dir, name)}, a write a killed run left unfinished")
torch.manual_seed(seed)  # the same initial weights on every process
device_type = "cuda" if "cuda" in device else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
# the frozen LM is read in the autocast dtype, each tensor cast as its shard is read (hf.load_state_dict); what is
# trained is kept in fp32 (Flamingo.unfreeze_lm_layers; a trained LM part starts from its bf16-rounded weights)
lm_dtype = None if dtype == "float32" else ptdtype
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)

# model
ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint, iter_num, best_val_loss = None, 0, float("inf")
try:  # a file that cannot be read, another config's checkpoint, an LM that cannot be found: one line
    if init_from == "resume":
        model, checkpoint = Flamingo.from_checkpoint(ckpt_path, verbose=master, dtype=lm_dtype)
        if not all(k in checkpoint for k in ("iter_num", "best_val_loss", "config", "optimizer", "rng")):
            raise files.FileError(f"{ckpt_path} holds a model but not a training run's state (iter_num, optimizer, "
                                  "rng): fine-tune from it with init_from=<its folder> and another out_dir")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        tokenizer = config["tokenizer"] = checkpoint["config"]["tokenizer"]
    elif finetune:  # the model and its tokenizer as the checkpoint has them: this config's model keys do not apply
        from_ours = os.path.isfile(os.path.join(init_from, "ckpt.pt")) or os.path.basename(init_from) == "ckpt.pt"
        if not from_ours and not lm and not init_from.startswith("openflamingo/") and not idefics.is_idefics(init_from) \
                and not pretrained.is_folder(init_from) and not pretrained.is_hub_id(init_from):
            sys.exit(f"error: init_from={init_from!r}: not an out_dir of train.py (no ckpt.pt), a shared model's folder "
                     "or an IDEFICS model; an OpenFlamingo checkpoint.pt also needs lm=<its LM's directory>")
        model, tokenizer = load_model(init_from, "" if from_ours else lm, clip, clip_pretrained, lm_dtype, master)
        model.unfreeze_lm_layers(train_lm_layers, train_lm_embeddings)
        config["tokenizer"] = tokenizer
    else:
        if pretrain_shapes:  # stage 1: the stand-ins, made once
            if master:
                pretrain(lm, clip_pretrained, tokenizer, pretrain_lm_iters, pretrain_vision_iters, seed, clip,
                         vision_stage)
            if ddp:
                dist.barrier()
            torch.manual_seed(seed)  # stage 1 drew from the generator (on the master, if it ran at all): start again,
            # so that the trained parts start alike whether stage 1 ran here or before, on every process
        model = Flamingo.from_pretrained(lm=lm, clip=clip, clip_pretrained=clip_pretrained, verbose=master,
                                         dtype=lm_dtype, **flamingo_options)
except files.LOAD_ERRORS as e:
    sys.exit(f"error: {files.message(e)}")
model.to(device)
model.activation_checkpointing = activation_checkpointing
tok = get_tokenizer(tokenizer, lm_vocab_size=model.lm.config.vocab_size, new_tokens=model.config.new_tokens)
if model.lm.config.max_context and block_size > model.lm.config.max_context:  # GPT-2's positions, MPT's max_seq_len
    sys.exit(f"error: block_size {block_size} is longer than the LM's {model.lm.config.max_context} positions")
assert (tok.image_id, tok.eoc_id) == (model.media_token_id, model.eoc_token_id)
mean, std, size = model.vision.mean, model.vision.std, model.vision.image_size
size = size if isinstance(size, int) else size[0]

# The data: sources, each with batch(step, micro_step, grad_accum, rank, world_size, batch_size) -> data.Batch: the
# shapes world, folders, tar shards. Every step takes a batch of each and adds their losses with their weights, as
# OpenFlamingo mixes LAION and MMC4. Validation rows: the shapes world's, a folder's val.jsonl or test.jsonl; none.
Source = namedtuple("Source", "name weight train val batch_size")
say = print if master else (lambda msg: None)  # noqa: E731


def open_source(i, spec, weight, bs):
    if spec in ("shapes", "shapes_video"):  # the offline worlds; in a mix, fine-tuning that keeps what the model knew
        train, val = (data.ShapesData(split, data_seed, tok, block_size, mean, std, pack, video=spec == "shapes_video")
                      for split in ("train", "val"))
        return Source(spec, weight, train, val, bs)
    if spec.startswith(("pairs:", "docs:")):  # tar shards: a stream per rank
        kind, pattern = spec.split(":", 1)
        try:
            stream = ShardStream(kind, pattern, tok, block_size, size, rank, world_size, num_workers, shuffle_buffer,
                                 data_seed + i, log=say, mean=mean, std=std)
        except ValueError as e:
            sys.exit(f"data_dir {spec!r}: {e}")
        stream.skip(iter_num * gradient_accumulation_steps * bs)  # a resumed run: what was already trained on
        return Source(spec, weight, stream, None, bs)
    try:  # a folder with nothing usable stops the run here, with the reason, not after hours of training
        train, val, val_split = folders.open_folder(spec, tok, block_size, size, data_seed + i, say, mean, std, rank,
                                                    world_size, dist.all_gather_object if ddp else None)
    except (OSError, ValueError) as e:
        sys.exit(f"dataset folder {spec!r}: {e}")
    say(f"{spec}: train {train.summary()}; validation: {f'{val.summary()} ({val_split}.jsonl)' if val else 'none'}; "
        f"loss weight {weight}")
    return Source(spec, weight, train, val, bs)


sources = [open_source(i, spec, weight, bs) for i, (spec, weight, bs) in enumerate(zip(specs, weights, sizes))]
# the frozen tower's output for every folder image, computed once and kept in out_dir: later epochs skip the tower
folder_rows = [rows for src in sources for rows in (src.train, src.val) if isinstance(rows, folders.FolderData)]
if cache_vision_features and folder_rows:
    if not model.config.freeze_vision:
        sys.exit("cache_vision_features needs a frozen vision tower (freeze_vision=True)")
    fingerprint = sum(p.double().sum().item() for p in model.vision.parameters())  # which weights
    key = f"{model.config.clip}|{model.config.clip_pretrained}|{model.config.vision_ln_post}|" \
          f"{model.config.vision_stage}|{model.config.vision_class_token}|{size}|{fingerprint:.9e}"
    try:
        folders.share_feature_cache(folder_rows, os.path.join(out_dir, "vision_features.npy"),
                                    lambda x: model.vision(x.to(device)), size, key, mean, std,
                                    np.float32 if dtype == "float32" else np.float16, master,
                                    dist.barrier if ddp else None, say)
    except OSError as e:  # a full disk: the run stops before its first step
        sys.exit(f"error: {files.write_failure(os.path.join(out_dir, 'vision_features.npy'), e)}")

if fsdp:  # weights, gradients and optimizer state split over the processes (Flamingo.fully_shard)
    model.fully_shard()


def whole(sd):
    """A state dict with FSDP's sharded tensors gathered whole (a collective: every process calls it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def optimizer_state():
    """The optimizer's state_dict with whole tensors: the same file with FSDP or without, either resumes either."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: whole(st) for i, st in sd["state"].items()}} if fsdp else sd


optimizer = model.configure_optimizer(learning_rate, weight_decay, (beta1, beta2), gate_lr_mult, device_type == "cuda")
params = [p for p in model.parameters() if p.requires_grad]  # (what the gradient norm is clipped over)
if checkpoint is not None:
    if fsdp:  # every process read the whole state; each keeps the shard of each tensor that its weights have
        from torch.distributed.tensor import distribute_tensor
        in_order = [p for group in optimizer.param_groups for p in group["params"]]  # the state's numbering
        for i, st in checkpoint["optimizer"]["state"].items():
            p = in_order[i]
            for k, v in st.items():
                if v.shape == p.shape and v.dim():
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
checkpoint = None  # free memory

raw_model = model  # what is saved: never the DDP or compiled wrapper
if compile:
    model = torch.compile(model)
if ddp and not fsdp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def loss_of(m, b):
    """The loss of a data.Batch: its pixels, or the tower's cached output for them (vision_features)."""
    return m(b.images, b.idx, b.targets, vision_features=b.vision_features)[1]


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters validation batches, each the size of a global training batch and its loss the
    mean over its target tokens, as in training: the same number however that batch is split over processes and
    micro-steps. Its chunks of batch_size rows are dealt out to the processes (FSDP: every process runs every
    chunk, each forward gathering weights from all of them). The unwrapped module: ranks may run different
    numbers of chunks. Several sources: the sum of their losses with their weights. None: no validation data."""
    val = [src for src in sources if src.val is not None]
    if not val:
        return None
    model.eval()
    n = gradient_accumulation_steps * world_size  # chunks of a validation batch
    acc = torch.zeros(2, len(val), eval_iters, device=device)  # each batch's summed token losses, target tokens
    for s, src in enumerate(val):
        for c in range(0 if fsdp else rank, eval_iters * n, 1 if fsdp else world_size):
            k, j = divmod(c, n)  # batch k's chunk j: the rows batch_indices gives micro-step j of 1 process
            b = src.val.batch(k, j, n, 0, 1, src.batch_size).to(device)
            with autocast:
                loss = loss_of(model.module if isinstance(model, DDP) else model, b)
            n_targets = (b.targets != -1).sum()
            acc[:, s, k] += torch.stack([loss * n_targets, n_targets])
    if ddp and not fsdp:
        dist.all_reduce(acc)  # each chunk's sums are on one process, zeros elsewhere
    model.train()
    return sum(src.weight * loss for src, loss in zip(val, (acc[0] / acc[1].clamp(min=1)).mean(1).tolist()))


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def gates():
    """tanh of every gate: how open each GATED XATTN-DENSE block is (0 = the bare LM); a gate per channel (IDEFICS's
    vector gates): the mean of |tanh| over them. FSDP: every process calls it."""
    opening = lambda t: t.tanh().item() if t.numel() == 1 else t.tanh().abs().mean().item()  # noqa: E731
    return {f"{i}.{g}": round(opening(whole({g: getattr(blk, g)})[g]), 4)
            for i, blk in raw_model.xattn.items() for g in ("attn_gate", "ff_gate")}


log_path = os.path.join(out_dir, "log.jsonl")
if master:  # a new run starts a new log; a resumed one keeps what its checkpoint had seen (files.resume_log)
    try:
        note = files.resume_log(log_path, iter_num) if init_from == "resume" else files.new_log(log_path)
    except files.FileError as e:
        sys.exit(f"error: {e}")
    if note:
        print(note)


def log(record):
    """Append a record to log.jsonl; a write that fails (a full disk) stops the run: nothing trains unrecorded."""
    if master:
        try:
            files.append_log(log_path, record)
        except files.FileError as e:
            sys.exit(f"error: {e}; training stopped at iter {iter_num}")


if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# the training loop
t0, start_iter = time.time(), iter_num
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)

    resumed_here = init_from == "resume" and iter_num == start_iter  # evaluated and saved before the stop
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and not resumed_here:
        val_loss = estimate_loss()
        if master and val_loss is not None:
            print(f"step {iter_num}: val loss {val_loss:.4f}")
            log({"iter": iter_num, "val_loss": val_loss})
            if wandb_log:
                wandb.log({"iter": iter_num, "val/loss": val_loss})
        if iter_num > 0 and (val_loss is None or val_loss < best_val_loss or always_save_checkpoint):
            best_val_loss = best_val_loss if val_loss is None else min(best_val_loss, val_loss)
            trained = vision = None
            if fsdp:  # gathered whole on every process (collectives), written by the master
                trained, vision = whole(raw_model.trained_state_dict()), whole(raw_model.vision.state_dict())
            opt_state = optimizer_state()
            if master:
                try:
                    raw_model.save_checkpoint(ckpt_path, trained, vision, optimizer=opt_state, iter_num=iter_num,
                                              best_val_loss=best_val_loss, config=config, rng=torch.get_rng_state())
                except files.FileError as e:  # the previous checkpoint is whole: resume from it once there is room
                    sys.exit(f"error: {e}; training stopped at iter {iter_num}")
                print(f"saved {ckpt_path}")
    if iter_num >= max_iters:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches, each a batch of every source. A source's
    # loss is the mean over the target tokens of its whole global batch (all micro-steps of all processes), however
    # that batch is split: the micro-batches are read first and their target tokens counted over the processes,
    # then each adds its tokens' summed loss / that count (x world_size: DDP and FSDP average the gradients).
    batches = [[src.train.batch(iter_num, m, gradient_accumulation_steps, rank, world_size, src.batch_size).to(device)
                for src in sources] for m in range(gradient_accumulation_steps)]
    counts = torch.stack([torch.stack([(b.targets != -1).sum() for b in bs]) for bs in batches]).sum(0).float()  # (S,)
    if ddp:
        dist.all_reduce(counts)
    loss_sum = torch.zeros(len(sources), device=device)  # each source's loss, times its weight
    for micro_step, bs in enumerate(batches):
        for s, (src, b) in enumerate(zip(sources, bs)):
            last = micro_step == gradient_accumulation_steps - 1 and s == len(sources) - 1
            if fsdp:  # reduce-scatter the gradients on the last backward pass of the step only
                raw_model.set_requires_gradient_sync(last)
            elif ddp:  # all-reduce them then
                model.require_backward_grad_sync = last
            with autocast:
                # (1 micro-batch on 1 process: a ratio of exactly 1, the plain mean loss bit for bit)
                share = loss_of(model, b) * ((b.targets != -1).sum() / counts[s].clamp(min=1))
            (src.weight * share * world_size).backward()
            loss_sum[s] += src.weight * share.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1

    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:
            dist.all_reduce(loss_sum)  # SUM of the processes' shares: the loss of the whole global batch
        dt, t0 = time.time() - t0, time.time()
        sps = log_interval * sum(src.batch_size for src in sources) * gradient_accumulation_steps * world_size / dt  # rows
        g = gates()
        if master:
            loss_total = loss_sum.sum().item()
            print(f"iter {iter_num}: loss {loss_total:.4f}, lr {lr:.2e}, {sps:.1f} samples/s, "
                  f"mean |tanh gate| {sum(abs(v) for v in g.values()) / len(g):.3f}")
            record = {"iter": iter_num, "loss": loss_total, "lr": lr, "samples_per_s": sps, "gates": g}
            if len(sources) > 1:  # each source's weighted loss: is the mix keeping what the model knew?
                record["source_losses"] = {src.name: v for src, v in zip(sources, loss_sum.tolist())}
            log(record)
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": loss_total, "lr": lr, **g})

for src in sources:
    if master and isinstance(src.train, folders.FolderData) and src.train.skipped:
        print(f"{src.name}: {src.train.summary()}")
if ddp:  # a clean exit: a process group torn down at interpreter exit (still held by DDP's reducer or FSDP's
    # units, or left while the master still wrote its checkpoint) can abort the process after a good run
    dist.barrier()
    model = raw_model = optimizer = None
    import gc
    gc.collect()
    dist.destroy_process_group()

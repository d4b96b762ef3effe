# Flamingo-9B with OpenFlamingo-9B's layout (Awadalla et al. 2023): CLIP ViT-L/14 and a 7B LM, both frozen, a
# GATED XATTN-DENSE block before every 4th LM layer. Sizes and memory per GPU, offline, in seconds:
#
#   python train.py config/9b.py --dry_run=True
#
# and the run itself, one node of 8 GPUs with 80 GB each (more nodes: torchrun's --nnodes and --rdzv_endpoint):
#
#   torchrun --standalone --nproc_per_node=8 train.py config/9b.py
#
# Candid: not run yet (no GPUs and no data here); DDP and FSDP (fsdp = True) are tested on CPU with 2 processes only.
out_dir = "out-9b"
eval_interval = 1000
eval_iters = 20
log_interval = 10

# The frozen LM: OpenFlamingo-9B's MPT-7B ("anas-awadalla/mpt-7b": d 4096, 32 layers, ALiBi, vocabulary padded to
# 50432 rows) with GPT-NeoX's tokenizer (its tokenizer.json, converted to tiktoken). Its architecture is in
# hf.KNOWN_LMS, so the dry run builds it without the hub; training downloads it (or takes a local directory).
lm = "anas-awadalla/mpt-7b"
tokenizer = "anas-awadalla/mpt-7b"  # a local directory holding tokenizer.json once downloaded

# The frozen vision encoder: CLIP ViT-L/14 with OpenAI's weights (width 1024, 16 x 16 = 256 patch tokens at 224 px),
# its patch tokens taken before the final LayerNorm as OpenFlamingo's models saw them (vision.py).
clip = "ViT-L-14"
clip_pretrained = "openai"
vision_ln_post = False

# The trained parts, OpenFlamingo-9B's sizes: a resampler of the vision width (1024), depth 6, 8 heads x 64, 64
# latents and no time embeddings (images only); a gated block before LM layers 3, 7, ..., 31 (8 blocks), 8 heads x 64.
cross_attn_every_n_layers = 4
resampler_depth = 6
resampler_heads = 8
resampler_dim_head = 64
num_latents = 64
max_num_frames = 0
xattn_heads = 8
xattn_dim_head = 64
# and, as OpenFlamingo trains it (its freeze_lm_embeddings=False), the LM's whole input table: MPT-7B's 50432 x 4096
# rows, tied to its head (206.6M more trained, 1.39B in all, OpenFlamingo-9B's "1.4B"). The new token rows are
# trained whatever this says; False keeps every original LM weight as it was (Flamingo's own choice, the default).
train_lm_embeddings = True
tie_new_tokens = True  # MPT ties its head: the new tokens' output rows are their input rows, as in OpenFlamingo

# Data: LAION-2B pairs and MMC4 documents (shards.py) as webdataset tar shards (img2dataset's layout for
# LAION; MMC4's documents with their images), mixed as OpenFlamingo mixes them: every step a batch of each, their
# losses weighted 0.2 and 1.0, the pair batch twice the document batch. Rows of 256 tokens (OpenFlamingo's MMC4
# limit; pairs are packed several to a row). Per GPU 16 + 8 rows x 4 micro-steps: 8 GPUs make global batches of
# 512 pair rows and 256 document rows (OpenFlamingo's 512 pairs and 256 documents). Shards are split over the
# GPUs and DataLoader workers: give at least 8 x num_workers shards of each.
dataset = "folder"
data_dir = "pairs:data/laion/*.tar,docs:data/mmc4/*.tar"
data_weights = (0.2, 1.0)
data_batch_sizes = (16, 8)
num_workers = 4
block_size = 256
batch_size = 8
gradient_accumulation_steps = 4

# Optimizer: OpenFlamingo's constant learning rate of 1e-4 after a 5000-step warmup, weight decay 0.1.
# 20k steps x 256 = 5M samples, about the MMC4 samples of OpenFlamingo's first 9B model.
learning_rate = 1e-4
decay_lr = False
warmup_iters = 5000
max_iters = 20000
weight_decay = 0.1
grad_clip = 1.0

# System: bf16 autocast (the frozen weights are counted in bf16 by the dry run), activation checkpointing (each LM
# layer recomputed in the backward pass: the 9B fits an 80 GB GPU with DDP). fsdp = True shards the weights,
# gradients and optimizer state over the GPUs for smaller ones (train.py, "FSDP").
device = "cuda"
dtype = "bfloat16"
activation_checkpointing = True
fsdp = False
compile = False  # not tried at this size yet
dry_run_world_size = 8  # the GPUs the dry run's FSDP estimate divides by

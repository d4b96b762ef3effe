# A toy COCO run on a laptop: OpenAI's CLIP ViT-B/32 and GPT-2 (124M), both pretrained and
# frozen; the resampler, the gated blocks and the two new token rows learn to caption COCO images.
#
#   python download.py coco --max_images=5000              # COCO captions as a dataset folder, data/coco (once)
#   python train.py config/train_coco_tiny.py --dry_run=True   # sizes and memory: offline, no data, seconds
#   python train.py config/train_coco_tiny.py                  # the run (downloads GPT-2 and CLIP once)
#   python eval.py --init_from=out-coco-tiny --task=captions --data_dir=data/coco --shots=0,4
#
# Measured offline, on this project's shared 2-core CPU, with stand-ins of the same shapes (random GPT-2 124M and
# ViT-B/32 weights, a byte-level BPE of ~10 tokens a caption, 400 COCO-sized JPEGs fetched by `python download.py coco`
# from a local server): 4.7 s a step running the tower on the pixels, 3.3 s with its features cached (below; 24 s to
# cache 450 images), the same losses. So 1500 steps take about 1 h 25 min there with the cache, less on a laptop of
# more cores. Candid: not run with the real weights and COCO yet (no network on this project's machines).
out_dir = "out-coco-tiny"
eval_interval = 250            # evaluate (and save) every this many steps
eval_iters = 10                # validation batches per evaluation
log_interval = 10

# data: the folder `python download.py coco` writes (train.jsonl: an image and its five captions a line); each caption
# becomes `<image>Output:{caption}<|endofchunk|>` (OpenFlamingo's prompt, tokenizer.CAPTION), one of the five each epoch
dataset = "folder"
data_dir = "data/coco"
tokenizer = "gpt2"             # GPT-2's BPE (tiktoken downloads it once; offline: TIKTOKEN_CACHE_DIR)
block_size = 64                # tokens per row: a caption is ~20 tokens with its markup, so 2-3 captions a row
batch_size = 8                 # rows per step; more rows learn faster per step but each step is slower
gradient_accumulation_steps = 1

# the frozen pretrained parts
lm = "gpt2"                    # GPT-2 124M: a hub id (downloaded once) or a local Hugging Face directory
clip = "ViT-B-32"              # open_clip model name: width 768, 7 x 7 = 49 patch tokens at 224 px
clip_pretrained = "openai"     # open_clip tag or a local weights file (offline)

# the trained parts, small: a gated block before every 2nd GPT-2 layer (6 blocks; 1 = all 12, twice the cost),
# a 2-layer resampler with 64 latents; about 50M trained parameters in all
cross_attn_every_n_layers = 2
resampler_depth = 2
resampler_heads = 8
resampler_dim_head = 64
num_latents = 64
xattn_heads = 8
xattn_dim_head = 64

# optimizer: guesses, not tuned. A short run needs its gates open early (the shapes run's lesson): gate_lr_mult
learning_rate = 3e-4
max_iters = 1500               # about 1 h 25 min on a 2-core CPU, less on a laptop (measured above)
warmup_iters = 100
weight_decay = 0.1
gate_lr_mult = 10.0

# system: "cpu", "mps" (Apple GPU) or "cuda"; float32 on a CPU, "bfloat16" on a recent GPU
device = "cpu"
dtype = "float32"
compile = False
# the frozen tower's output for each image, computed once and kept in out_dir (a memmap, ~0.15 MB an image): later
# epochs skip the tower (1.4x faster steps, measured above). False runs the tower on the pixels every step.
cache_vision_features = True

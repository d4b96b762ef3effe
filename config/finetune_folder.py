# Fine-tune a trained Flamingo on a folder of your own data (README, "Your own data").
#
#   python shapes.py folder data/size vqa size                         # an example folder, from the shapes world
#   python train.py config/finetune_folder.py                           # fine-tune the shapes model on it
#   python eval.py --init_from=out-finetune --task=vqa --data_dir=data/size --shots=0,4
#
# A folder holds train.jsonl (and val.jsonl or test.jsonl for a validation loss), one JSON object per line, image
# paths relative to the folder; the line kinds may be mixed:
#   {"image": "a.jpg", "captions": ["a red circle", ...]}                 -> <image>Output:{caption}<|endofchunk|>
#   {"image": "a.jpg", "question": "what color?", "answers": ["red"]}    -> <image>Question:{q} Short answer:{a}<|endofchunk|>
#   {"chunks": [{"text": "..."}, {"image": "a.jpg"}, {"text": "..."}]}   -> a document, its images where they are
# The first two are exactly eval.py's prompt chunks, so the model is evaluated on the format it learned. Bad lines
# (not JSON, missing fields, empty text, missing or undecodable images, paths leaving the folder) are skipped and
# printed with their file and line number; a folder with nothing usable left stops the run at the start.

# what to fine-tune: an out_dir of train.py (its ckpt.pt), or an OpenFlamingo model. For OpenFlamingo also set
# its CLIP, and for a local checkpoint.pt its LM's directory:
#   init_from = "openflamingo/OpenFlamingo-3B-vitl-mpt1b"; clip = "ViT-L-14"; clip_pretrained = "openai"
#   init_from = "path/to/checkpoint.pt"; lm = "path/to/mpt-1b-redpajama-200b"; clip = ...
# The model keys of train.py (resampler_depth, xattn_heads, ...) do not apply: the model is the checkpoint's.
# Resume an interrupted fine-tuning with --init_from=resume (it continues out_dir/ckpt.pt).
init_from = "out-shapes"
out_dir = "out-finetune"

# the data: one folder, or several mixed by loss weight (every step takes a batch of each and adds their losses
# with these weights): data_dir = "data/a,data/b"; data_weights = (1.0, 0.5)
dataset = "folder"
data_dir = "data/size"
data_weights = None            # None: 1 for each folder
block_size = 128               # tokens per row; a row packs several examples, a few-shot sequence as eval's prompts
batch_size = 8                 # rows per step (per folder, per process)
gradient_accumulation_steps = 1

# what is trained: the resampler, the gated blocks and the new token rows, as in pretraining; also the LM's top
# layers with train_lm_layers > 0 (more capacity for a new kind of answer; more memory and a larger checkpoint)
train_lm_layers = 0
train_lm_embeddings = False    # True: the LM's whole input table too, as OpenFlamingo trained it (a tied head with it)

# optimizer: a fine-tuning run is short, and starts from open gates
learning_rate = 1e-3
max_iters = 200
warmup_iters = 10
weight_decay = 0.0
gate_lr_mult = 1.0
eval_interval = 100            # validation loss and checkpoint every this many steps
eval_iters = 4
log_interval = 10

# system: "cpu", "mps" or "cuda"; float32 on a CPU, "bfloat16" on a recent GPU
device = "cpu"
dtype = "float32"
compile = False

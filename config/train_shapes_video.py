# The moving-shapes world (shapes_video.py): clips of 4 frames whose questions need time (which way does the red
# circle move? how many objects are there at the end?). The image world's stand-ins (out-shapes/pretrained/: stage 1
# of config/train_shapes.py, made here first if missing) stay frozen, frames are encoded like images; a new resampler
# with time embeddings for 4 frames, new gated blocks and token rows are trained.
out_dir = "out-shapes-video"
dataset = "shapes_video"
lm = "out-shapes/pretrained/lm"
clip_pretrained = "out-shapes/pretrained/vision.safetensors"
clip = "shapes-rn"
vision_stage = 2
pretrain_shapes = True
pretrain_lm_iters = 600
pretrain_vision_iters = 500

tokenizer = "shapes"
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1

max_num_frames = 4  # the time embeddings: one per frame of a clip
cross_attn_every_n_layers = 1
cross_attn_from_layer = 1
resampler_depth = 2
resampler_heads = 4
resampler_dim_head = 32
num_latents = 16
xattn_heads = 4
xattn_dim_head = 32

learning_rate = 3e-3
max_iters = 1500
gate_lr_mult = 30.0
warmup_iters = 30
weight_decay = 0.0
eval_interval = 250
eval_iters = 4
log_interval = 10
device = "cpu"
dtype = "float32"

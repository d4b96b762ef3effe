# The offline default: the shapes world (shapes.py) on a laptop CPU.
# Stage 1 (pretrain_shapes.py, once) makes the stand-ins for a pretrained LM and CLIP in out_dir/pretrained/;
# stage 2 (train.py) freezes both and trains the resampler, the gated blocks and the new token rows.
out_dir = "out-shapes"
clip = "shapes-rn"
vision_stage = 2  # a CNN tower (open_clip ModifiedResNet) cut after stage 2: an 8 x 8 grid of tokens
pretrain_shapes = True  # lm and clip_pretrained: out_dir/pretrained/lm and out_dir/pretrained/vision.safetensors
pretrain_lm_iters = 600
pretrain_vision_iters = 500

tokenizer = "shapes"
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1

cross_attn_every_n_layers = 1
cross_attn_from_layer = 1  # none before layer 0, whose input the stand-in LM needs as it is (docs/shapes.md)
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

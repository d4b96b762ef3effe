"""
The vision encoder: an open_clip tower that returns the grid of spatial features a Perceiver Resampler reads,
not CLIP's pooled embedding (Flamingo section 3.1.1: the resampler takes the encoder's spatial grid).

Shapes: n images, S tokens of the grid, D the tower's width.
"""

from pathlib import Path

import torch
import torch.nn as nn


def register_clip_configs():
    """Our tiny open_clip configs (config/clip/*.json: tests and the shapes world) join open_clip's own."""
    import open_clip
    open_clip.add_model_config(Path(__file__).parent / "config" / "clip")


class VisionEncoder(nn.Module):
    """An open_clip vision tower, returning the grid of spatial features (not the pooled embedding).

    Two kinds of tower (Flamingo itself used a CNN, NFNet-F6, and fed its final grid to the resampler):
    - a ViT ("ViT-B-32", ...): the patch tokens of the last layer, class token dropped. `ln_post=False`
      gives them before the tower's final LayerNorm, as OpenFlamingo's models saw them; `class_token=True` keeps
      the class token first, as IDEFICS's resampler reads it (its vision.py: last_hidden_state, before post_layernorm).
    - a ModifiedResNet ("RN50", "shapes-rn", ...): the feature map after residual stage `stage` (1..4,
      None = 4, the last), flattened to tokens; the attention pool and any later stage are dropped.
    `pretrained` is an open_clip tag ("openai", "laion2b_s34b_b79k", ...) or a local weights file. `overrides`
    replace parts of the name's open_clip model config (its vision_cfg, quick_gelu: a tower of another project's
    shape, whose weights are loaded afterwards; the text tower built beside it is a tiny one, dropped). resize_mode:
    open_clip's ("squash": the whole image resized to the square, as IDEFICS's image processor does; None: the
    shorter side resized, the centre cropped).
    """

    def __init__(self, name, pretrained=None, ln_post=True, stage=None, class_token=False, overrides=None,
                 resize_mode=None):
        super().__init__()
        import logging
        import open_clip
        register_clip_configs()
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # open_clip is chatty
        try:
            # open_clip moves the model to `device` at the end: under `with torch.device("meta")` that must be
            # meta too (a dry run: nothing allocated), where .to("cpu") would fail
            tiny_text = dict(text_cfg=dict(context_length=2, vocab_size=2, width=8, heads=1, layers=1))
            clip = open_clip.create_model(name, pretrained=pretrained, device=torch.get_default_device(),
                                          **({**tiny_text, **overrides} if overrides else {}))
        except RuntimeError as e:
            raise RuntimeError(f"open_clip could not build {name!r} with weights {pretrained!r}: {e}\n"
                               "Offline? Pass a local weights file as clip_pretrained.") from None
        self.visual = clip.visual  # the text tower is dropped
        self.is_resnet = hasattr(self.visual, "layer4")
        if not self.is_resnet and not hasattr(self.visual, "_embeds"):
            raise NotImplementedError(f"{name!r}: only open_clip VisionTransformer and ModifiedResNet towers "
                                      "are supported")
        if self.is_resnet:
            if class_token:
                raise ValueError(f"{name!r} is a ResNet tower: it has no class token")
            self.stage = 4 if stage is None else stage
            if self.stage not in (1, 2, 3, 4):
                raise ValueError(f"vision stage must be 1..4 for a ResNet tower, got {stage}")
            self.width = getattr(self.visual, f"layer{self.stage}")[-1].bn3.num_features
            for k in range(self.stage + 1, 5):  # later stages and the attention pool never run: drop them
                setattr(self.visual, f"layer{k}", nn.Identity())
            self.visual.attnpool = nn.Identity()
        else:
            if stage is not None:
                raise ValueError(f"vision stage is for ResNet towers; {name!r} is a ViT")
            self.class_token = class_token
            self.stage, self.width = None, self.visual.transformer.width
        self.name, self.pretrained, self.ln_post = name, pretrained, ln_post
        pp = self.visual.preprocess_cfg
        self.image_size, self.mean, self.std = pp["size"], tuple(pp["mean"]), tuple(pp["std"])
        self.transform = open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std,
                                                   resize_mode=resize_mode)

    def preprocess(self, image):
        """A PIL image -> (3, H, W) float pixels, by CLIP's evaluation preprocessing for this tower (open_clip's
        image_transform: the shorter side resized, the centre cropped, normalised by the tower's mean and std)."""
        return self.transform(image.convert("RGB"))

    def forward(self, x):
        """x (n, 3, H, W) preprocessed pixels -> (n, S, D) spatial tokens (1 + S with the class token)."""
        v = self.visual
        if self.is_resnet:
            x = v.stem(x)                               # (n, width, H/4, W/4)
            for k in range(1, self.stage + 1):
                x = getattr(v, f"layer{k}")(x)          # each later stage halves H and W
            return x.flatten(2).transpose(1, 2)         # (n, C, h, w) -> (n, S = h*w, D = C)
        x = v.transformer(v._embeds(x))   # (n, 1 + S, D): class token first
        if self.ln_post:
            x = v.ln_post(x)
        return x if self.class_token else x[:, 1:]  # (n, S, D)

"""
Flamingo.from_idefics against transformers' own IDEFICS (IdeficsForVisionText2Text): tiny random models of both gate
types, with q/k norms on and off (in the gated blocks and in the resampler), saved in sharded safetensors as
transformers saves them, loaded here; logits on rows with text before the first image, 1 to 3 images and left
padding, and greedy generation token for token; and a conversation with a tiny IDEFICS-instruct through sample.py's
standard input, in its own format, whose first answer is transformers' greedy answer to the same prompt.
"""

import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import IdeficsConfig, IdeficsForVisionText2Text  # noqa: E402

from model import Flamingo  # noqa: E402

V, FAKE, IMAGE, EOU = 96, 96, 97, 98  # LLaMA's rows, then the three new ones


def tiny_config(alpha_type="float", qk=False, perceiver_qk=False, interval=2, tie=False, vocab_size=V):
    return IdeficsConfig(
        vocab_size=vocab_size, additional_vocab_size=3, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=interval, qk_layer_norms=qk, alpha_type=alpha_type,
        use_resampler=True, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vision_config=dict(embed_dim=24, image_size=16, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=40),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=perceiver_qk))


def build(tmp_path, **kw):
    """A tiny random IDEFICS, every weight drawn away from its init (gates open, norms not 1), saved in shards."""
    torch.manual_seed(0)
    ref = IdeficsForVisionText2Text(tiny_config(**kw)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "alpha" in name else 0.1 if p.dim() < 2 else 0.15))
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    return ref


def row(*parts):
    """Token ids from parts: an int k is k text tokens, "I" one image as IDEFICS writes it (<fake><image><fake>)."""
    ids, g = [], torch.Generator().manual_seed(len(parts))
    for p in parts:
        if p == "I":
            ids += ([] if ids[-1:] == [FAKE] else [FAKE]) + [IMAGE, FAKE]
        else:
            ids += torch.randint(3, V, (p,), generator=g).tolist()
    return ids


ROWS = [row(3, "I", 5), row(4, "I", 2, "I", "I", 3), row(2, "I", 6, "I", 1)]  # text first; 1, 3, 2 images


def batch(rows):
    """Left-padded ids (B, T), the attention mask, our images (N, 1, 3, H, W) and IDEFICS's inputs for the same."""
    T, B = max(map(len, rows)), len(rows)
    idx, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    counts = [(torch.tensor(r) == IMAGE).sum().item() for r in rows]
    M, g = max(counts), torch.Generator().manual_seed(1)
    pixels = torch.randn(B, M, 3, 16, 16, generator=g)
    for b, c in enumerate(counts):
        pixels[b, c:] = 0  # IDEFICS's padding images: no token attends to them
    ours = torch.cat([pixels[b, :c] for b, c in enumerate(counts)])[:, None]
    # IDEFICS's image_attention_mask (B, T, M): each token sees the last image at or before it, as its processor says
    text_time = (idx == IMAGE).cumsum(1)
    image_mask = torch.nn.functional.one_hot(text_time, M + 1)[..., 1:] * mask[..., None]
    return idx, mask, ours, dict(pixel_values=pixels, image_attention_mask=image_mask)


@pytest.mark.parametrize("kw", [dict(), dict(alpha_type="vector", qk=True, perceiver_qk=True),
                                dict(qk=True, interval=1, tie=True)], ids=["float", "vector-qk", "every-layer-tied"])
def test_logits_equal_transformers(tmp_path, kw):
    ref = build(tmp_path, **kw)
    ours = Flamingo.from_idefics(str(tmp_path), verbose=False).eval()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # the sharded layout
    n = kw.get("interval", 2)
    assert sorted(map(int, ours.xattn)) == list(range(0, 4, n))  # before layers 0, n, 2n, ...
    for rows in ([ROWS[0]], [ROWS[1]], ROWS):  # alone, then batched with left padding
        idx, mask, images, ref_in = batch(rows)
        with torch.no_grad():
            want = ref(input_ids=idx, attention_mask=mask, **ref_in).logits
            got, _ = ours(images, idx, attention_mask=mask)
        real = mask.bool()
        assert got.shape == want.shape
        err = (got[real] - want[real]).abs().max() / want[real].abs().max()
        assert err < 1e-4, err


def test_text_before_first_image_is_exactly_the_lm(tmp_path):
    """phi: a token before the first image gets exactly zero from every cross-attention (the gated FF still runs)."""
    build(tmp_path)
    ours = Flamingo.from_idefics(str(tmp_path), verbose=False).eval()
    idx, mask, images, _ = batch([ROWS[0]])
    with torch.no_grad():
        a, _ = ours(images, idx)
        b, _ = ours(images * 0 + 1, idx)
    first = ROWS[0].index(FAKE)
    assert torch.equal(a[0, :first + 1], b[0, :first + 1])  # up to the <fake> before the first <image>
    assert not torch.allclose(a[0, first + 1:], b[0, first + 1:])


def test_greedy_generation_equals_transformers(tmp_path):
    ref = build(tmp_path, alpha_type="vector", qk=True)
    ours = Flamingo.from_idefics(str(tmp_path), verbose=False).eval()
    assert ours.eoc_token_id == EOU
    idx, mask, images, ref_in = batch(ROWS)
    with torch.no_grad():
        want = ref.generate(input_ids=idx, attention_mask=mask, **ref_in, max_new_tokens=8, do_sample=False,
                            eos_token_id=EOU, pad_token_id=0, suppress_tokens=[FAKE, IMAGE])[:, idx.shape[1]:]
        got = ours.generate(images, ROWS, 8, temperature=0)
    for g, w in zip(got, want.tolist()):
        assert g == (w[:w.index(EOU)] if EOU in w else w)


def test_refuses_a_wrong_tensor_by_name(tmp_path):
    from safetensors.torch import load_file, save_file
    build(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        sd = load_file(f)
        if "model.gated_cross_attn_layers.0.cross_attn.q_proj.weight" in sd:
            sd["model.gated_cross_attn_layers.0.cross_attn.q_proj.weight"] = torch.zeros(5, 5)
            save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="xattn.0.attn.to_q.weight"):
        Flamingo.from_idefics(str(tmp_path), verbose=False)


def test_instruct_chat_through_standard_input(tmp_path):
    """sample.py --chat --init_from=<a tiny IDEFICS-instruct folder>: the User:/Assistant: format with
    <end_of_utterance>, <s> first, each <image> between <fake_token_around_image>s; the first answer is transformers'
    greedy continuation of the same ids and pixels; a second turn with another image goes on from the first."""
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer

    import shapes
    from chat import Conversation
    from test_sample import ENV, ROOT
    from test_tokenizer import llama_like
    from tokenizer import get_tokenizer
    lib = Tokenizer.from_file(llama_like(tmp_path))
    n = lib.get_vocab_size()
    lib.add_special_tokens(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])  # ids n, n + 1, n + 2
    folder = tmp_path / "idefics-tiny-instruct"
    ref = build(folder, vocab_size=n)
    lib.save(str(folder / "tokenizer.json"))
    pngs = []
    for k in range(2):
        rng = np.random.default_rng(k)
        pngs.append(tmp_path / f"scene{k}.png")
        Image.fromarray(shapes.render(shapes.random_scene(rng), rng)).save(pngs[-1])
    lines = [f"/image {pngs[0]}", "what color is the circle?", f"/image {pngs[1]}", "and here?", "/quit"]
    p = subprocess.run([sys.executable, "sample.py", f"--init_from={folder}", "--chat", "--max_new_tokens=8"],
                       cwd=ROOT, env=ENV, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    answers = re.findall(r"model> (.*)", p.stdout)
    assert len(answers) == 2, p.stdout

    ours = Flamingo.from_idefics(str(folder), verbose=False).eval()
    tok = get_tokenizer(str(folder), lm_vocab_size=n, new_tokens=ours.config.new_tokens)
    conv = Conversation(ours, tok)
    ids = conv.start + conv.message_ids("what color is the circle?", 1, False)
    fake, image, eou = n, n + 1, n + 2
    tail = tok.encode_markup("<end_of_utterance>\nAssistant:")
    assert ids[0] == lib.token_to_id("<s>") and ids[-len(tail):] == tail and tail[0] == eou
    assert ids[ids.index(image) - 1: ids.index(image) + 2] == [fake, image, fake]
    with Image.open(pngs[0]) as im:
        pixels = ours.vision.preprocess(im)[None, None]  # (1, 1, 3, 16, 16): squashed to the tower's square
    idx = torch.tensor([ids])
    with torch.no_grad():
        want = ref.generate(input_ids=idx, pixel_values=pixels, image_attention_mask=((idx == image).cumsum(1) > 0)[..., None].long(),
                            max_new_tokens=8, do_sample=False, eos_token_id=eou, pad_token_id=0,
                            suppress_tokens=[fake, image])[0, len(ids):].tolist()  # (the processor's image mask)
    want = want[:want.index(eou)] if eou in want else want
    assert answers[0].strip() == tok.decode(want).strip()


def test_finetune_and_evaluate_an_idefics_folder(tmp_path):
    """train.py fine-tunes an IDEFICS folder on a folder of our own (--init_from=<it>): its checkpoint rebuilds through
    from_checkpoint with only the trained parts moved and IDEFICS's options kept; eval.py scores it (--init_from)."""
    import json

    from tokenizers import Tokenizer

    import shapes
    from test_tokenizer import llama_like
    from test_train import ENV, ROOT
    lib = Tokenizer.from_file(llama_like(tmp_path))
    n = lib.get_vocab_size()
    lib.add_special_tokens(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    model_dir = tmp_path / "idefics"
    build(model_dir, vocab_size=n, alpha_type="vector", qk=True)
    lib.save(str(model_dir / "tokenizer.json"))
    folder = shapes.write_folder(str(tmp_path / "folder"), "vqa", n_train=12, n_test=4, task_kind="size")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "train.py", "config/finetune_folder.py", f"--init_from={model_dir}",
                        f"--data_dir={folder}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                        "--eval_iters=1", "--batch_size=2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ft, ckpt = Flamingo.from_checkpoint(str(out), verbose=False)
    assert ft.config.idefics == str(model_dir) and ft.config.xattn_gate == "vector" and "vision" not in ckpt
    before = dict(Flamingo.from_idefics(str(model_dir), verbose=False).named_parameters())
    for k, v in ft.named_parameters():
        assert torch.equal(v, before[k]) != k.startswith(("perceiver.", "xattn.", "new_")), k
    p = subprocess.run([sys.executable, "eval.py", f"--init_from={out}", "--task=shapes", "--shots=0,1",
                        "--num_samples=4", f"--results={tmp_path / 'r.json'}", "--num_workers=0"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(json.loads((tmp_path / "r.json").read_text())) >= 2

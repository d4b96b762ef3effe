"""A Hugging Face byte-level BPE tokenizer.json, converted to tiktoken (data.hf_bpe_tokenizer), gives the ids the
`tokenizers` library gives. The files are trained here, in GPT-NeoX's layout (NFC, ByteLevel, <|endoftext|> and
<|padding|> first, runs of spaces as added tokens), so that no download is needed."""

import json
import random

import pytest

tokenizers = pytest.importorskip("tokenizers")

import data  # noqa: E402

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Flamingo", "image", "caption", "naïve",
         "café", "straße", "Ωmega", "日本語", "テキスト", "中文", "😀", "🦩", "def", "return", "x_1", "foo.bar()",
         "1234", "3.14159", "2026-11-23", "don't", "we'll", "I'm", "it's", "HTTP/1.1", "<b>", "{'a': [1, 2]}"]
SEPS = [" ", " ", " ", "  ", "   ", "     ", "\n", "\n\n", "\t", " \n ", ", ", ". ", "!", "?? ", "\u00a0"]


def corpus(n, seed):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 25))]
        texts.append("".join(w + rng.choice(SEPS) for w in words).rstrip(" ") if rng.random() < 0.7
                     else "".join(words))
    # normalisation (NFC): "e" + combining acute is "é"; and edge cases
    return texts + ["cafe\u0301 and cafe\u0301s", "", " ", "          ", "a" * 300, "\n\n\n", "x  y   z    w"]


def neox_like(tmp_path, vocab_size=700, pre_tokenizer=None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(400, seed=0), trainer)
    tok.add_tokens([AddedToken(" " * k, normalized=True) for k in range(2, 9)])  # GPT-NeoX: 2..24 spaces
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def check_same_ids(path):
    ref = tokenizers.Tokenizer.from_file(path)
    ours = data.hf_bpe_tokenizer(path)
    texts = corpus(300, seed=1)
    n_tokens = 0
    for t in texts:
        want = ref.encode(t, add_special_tokens=False).ids
        assert ours.encode(t) == want, t
        n_tokens += len(want)
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=False)
    assert n_tokens > 3000  # a real corpus, not a handful of tokens
    return ours


def test_neox_layout_same_ids(tmp_path):
    tok = check_same_ids(neox_like(tmp_path))
    assert tok.hf.to_id is None  # trained files number tokens in merge order: tiktoken uses the ids directly
    assert tok.eot_id == 0 and tok.encode("a      b")[1] == tok.hf.added[" " * 6]  # the added run, not BPE's


def test_ids_out_of_merge_order_are_mapped(tmp_path):
    """A file whose ids do not follow its merges (tiktoken needs them to): ranks in merge order, ids mapped back."""
    path = neox_like(tmp_path)
    spec = json.load(open(path))
    vocab = spec["model"]["vocab"]
    first = 2 + 256  # after the two specials and the bytes: the tokens made by merges
    multi = [t for t, i in vocab.items() if i >= first]
    ids = sorted(vocab[t] for t in multi)
    random.Random(0).shuffle(ids)
    vocab.update(dict(zip(multi, ids)))
    json.dump(spec, open(path, "w"))
    assert check_same_ids(path).hf.to_id is not None


def test_split_then_bytes_layout(tmp_path):
    """Llama-3 / Qwen2 style: a Split regex of their own, then ByteLevel without its regex."""
    from tokenizers import Regex, pre_tokenizers
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    check_same_ids(neox_like(tmp_path, pre_tokenizer=pre))


def test_openflamingo_token_ids_and_markup(tmp_path):
    """OpenFlamingo appends <|endofchunk|>, <image>, <PAD> after GPT-NeoX's 50277 tokens: 50277, 50278, 50279."""
    path = neox_like(tmp_path)
    n = data.hf_bpe_tokenizer(path).base_n_vocab
    tok = data.get_tokenizer(path, lm_vocab_size=n, new_tokens=(data.EOC, data.IMAGE, "<PAD>"))
    assert (tok.eoc_id, tok.image_id, tok.n_vocab) == (n, n + 1, n + 3)
    ids = tok.encode_markup("<image>Output:a fox<|endofchunk|><|endoftext|>")
    assert ids[0] == tok.image_id and ids[-2:] == [tok.eoc_id, tok.eot_id]
    assert tok.decode(ids) == "<image>Output:a fox<|endofchunk|><|endoftext|>"
    assert tok.image_id not in tok.encode("a literal <image> stays text")


def test_unsupported_files_refused(tmp_path):
    path = neox_like(tmp_path)
    spec = json.load(open(path))
    spec["normalizer"] = {"type": "NFKC"}
    json.dump(spec, open(tmp_path / "nfkc.json", "w"))
    with pytest.raises(NotImplementedError, match="normalizer"):
        data.hf_bpe_tokenizer(str(tmp_path / "nfkc.json"))

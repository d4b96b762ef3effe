"""Tokenizers (tokenizer.py): the bytes, gpt2 and shapes encodings with the Flamingo tokens after them, plain text
that never becomes markup; and Hugging Face tokenizer.json files (tokenizer.HFTokenizer, on the `tokenizers`
library): the library's ids, its decoding around the Flamingo tokens, special tokens' text kept as text. The files
are trained here, in GPT-NeoX's layout (NFC, ByteLevel, <|endoftext|> and <|padding|> first, runs of spaces as added
tokens), Llama-3's (a Split regex, then bytes) and LLaMA's (SentencePiece-style BPE with byte fallback), so that no
download is needed."""

import hashlib
import json
import random

import pytest

import shapes
import tokenizer
from tokenizer import EOC, EOT, IMAGE, get_tokenizer

import tokenizers

tok = get_tokenizer("bytes")

def test_bytes_tokenizer_ids():
    assert (tok.eot_id, tok.image_id, tok.eoc_id, tok.n_vocab) == (256, 257, 258, 259)
    assert tok.encode("ab\n") == [97, 98, 10]
    padded = get_tokenizer("bytes", lm_vocab_size=300)  # an LM whose embedding has spare rows
    assert (padded.eot_id, padded.image_id, padded.eoc_id, padded.n_vocab) == (256, 300, 301, 302)
    assert padded.decode([97, 280, 300, 301]) == "a<image><|endofchunk|>"  # 280 is a row with no token
    with pytest.raises(AssertionError):
        get_tokenizer("bytes", lm_vocab_size=100)


def test_plain_text_never_becomes_special():
    text = f"a caption that says {IMAGE}, {EOC} and {EOT} in it; café, 日本語, 🙂"
    ids = tok.encode(text)
    assert max(ids) < 256  # bytes only
    assert tok.decode(ids) == text
    assert bytes(ids) == text.encode("utf-8")


def test_encode_markup():
    ids = tok.encode_markup(f"{IMAGE}hi{EOC}{EOT}")
    assert ids == [257, ord("h"), ord("i"), 258, 256]
    assert tok.decode(ids) == f"{IMAGE}hi{EOC}{EOT}"
    text = f"{IMAGE}Output:ünïcode ✓{EOC}"
    assert tok.decode(tok.encode_markup(text)) == text


def test_gpt2_offline_error_is_clear(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR.*'bytes'"):
        tokenizer.gpt2_encoding()


def test_shapes_tokenizer_is_pinned():
    """Every shapes checkpoint and stand-in LM reads the ids of config/tokenizer/shapes.tiktoken: other merges would give no
    error, only wrong answers. So its tokens are pinned (tests/test_shapes.py checks the world still teaches them)."""
    enc = tokenizer.shapes_encoding()
    tokens = b"\0".join(enc.decode_single_token_bytes(i) for i in range(enc.n_vocab))
    assert enc.n_vocab == 400
    assert hashlib.sha256(tokens).hexdigest() == "5b94ce44ad7816a4114efa315245f6034ecc1be5c42e78b63eb082364d8ffee7"


def test_shapes_tokenizer_words_and_markup():
    tok = get_tokenizer("shapes")
    assert (tok.eot_id, tok.image_id, tok.eoc_id) == (tok.base_n_vocab - 1, tok.base_n_vocab, tok.base_n_vocab + 1)
    # every single-word answer of the shapes world is one token, so an answer is one choice
    words = list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.SIZES) + ["top", "left", "center", "yes", "no", "1", "2", "3"]
    assert [w for w in words if len(tok.encode(w)) != 1] == []
    # the same text is 3x shorter than in bytes, and round-trips; literal markup in plain text stays text
    text, _ = shapes.shapes_sample("train", 0, 0, kind="caption")
    assert 3 * len(tok.encode_markup(text)) < len(get_tokenizer("bytes").encode_markup(text))
    for s in ["a caption with <image> and <|endofchunk|> inside", "ünïcödé ✓ text", ""]:
        ids = tok.encode(s)
        assert tok.image_id not in ids and tok.eoc_id not in ids and tok.eot_id not in ids
        assert tok.decode(ids) == s
    assert tok.encode_markup("<image>Output:red<|endofchunk|>")[0] == tok.image_id


# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json files, against the `tokenizers` library

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
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
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
    ours = get_tokenizer(path)
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
    path = neox_like(tmp_path)
    tok = check_same_ids(path)
    six = tokenizers.Tokenizer.from_file(path).token_to_id(" " * 6)
    assert tok.eot_id == 0 and tok.encode("a      b")[1] == six  # the added run of spaces, not BPE's split


def test_ids_out_of_merge_order(tmp_path):
    """A file whose ids do not follow its merges: still the library's ids."""
    path = neox_like(tmp_path)
    spec = json.load(open(path))
    vocab = spec["model"]["vocab"]
    first = 2 + 256  # after the two specials and the bytes: the tokens made by merges
    multi = [t for t, i in vocab.items() if i >= first]
    ids = sorted(vocab[t] for t in multi)
    random.Random(0).shuffle(ids)
    vocab.update(dict(zip(multi, ids)))
    json.dump(spec, open(path, "w"))
    check_same_ids(path)


def test_split_then_bytes_layout(tmp_path):
    """Llama-3 / Qwen2 style: a Split regex of their own, then ByteLevel without its regex."""
    from tokenizers import Regex, pre_tokenizers
    pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    check_same_ids(neox_like(tmp_path, pre_tokenizer=pre))


def llama_like(tmp_path):
    """LLaMA's layout (IDEFICS' LM): BPE over "▁"-joined words, no pre-tokenizer, characters outside the learned
    alphabet falling back to the byte tokens <0x00>..<0xFF>; <unk>, <s>, </s> the added special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus(400, seed=0), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, limit_alphabet=60))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in byte_tokens]  # in the vocab only
    path = str(tmp_path / "tokenizer.json")
    Tokenizer.from_str(json.dumps(spec)).save(path)
    return path


def test_sentencepiece_style_with_byte_fallback(tmp_path):
    """LLaMA's kind of tokenizer.json, which a byte-level converter could not read: the library's ids and text."""
    path = llama_like(tmp_path)
    tok = check_same_ids(path)
    ref = tokenizers.Tokenizer.from_file(path)
    assert tok.eot_id == ref.token_to_id("</s>")
    ids = tok.encode("an 🐘 and ж")  # characters the corpus never had
    assert any(ref.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback in use
    plain = "a literal <s> and </s> and <image> stay text"
    assert not {ref.token_to_id("<s>"), tok.eot_id, tok.image_id} & set(tok.encode(plain))
    assert tok.decode(tok.encode(plain)) == plain
    text = "<image>Output:a flamingo 🦩<|endofchunk|>"
    ids = tok.encode_markup(text)
    assert ids[0] == tok.image_id and ids[-1] == tok.eoc_id and tok.decode(ids) == text


def test_openflamingo_token_ids_and_markup(tmp_path):
    """OpenFlamingo appends <|endofchunk|>, <image>, <PAD> after GPT-NeoX's 50277 tokens: 50277, 50278, 50279."""
    path = neox_like(tmp_path)
    n = get_tokenizer(path).base_n_vocab
    tok = get_tokenizer(path, lm_vocab_size=n, new_tokens=(EOC, IMAGE, "<PAD>"))
    assert (tok.eoc_id, tok.image_id, tok.n_vocab) == (n, n + 1, n + 3)
    ids = tok.encode_markup("<image>Output:a fox<|endofchunk|><|endoftext|>")
    assert ids[0] == tok.image_id and ids[-2:] == [tok.eoc_id, tok.eot_id]
    assert tok.decode(ids) == "<image>Output:a fox<|endofchunk|><|endoftext|>"
    assert tok.image_id not in tok.encode("a literal <image> stays text")


def test_a_bad_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizer.json"):
        get_tokenizer(str(tmp_path))


def test_vocabulary_entries_no_merge_makes_decode(tmp_path):
    """A vocabulary entry that no merge produces (padding entries of a vocabulary grown to a round size) is never
    encoded, but a model may still generate it: it decodes to its text, as the `tokenizers` library decodes it,
    instead of failing in the middle of an evaluation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(200, seed=0), tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    n = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({"<unused0>": n, "<unused1>": n + 1})
    path = str(tmp_path / "tokenizer.json")
    Tokenizer.from_str(json.dumps(spec)).save(path)
    ref, ours = tokenizers.Tokenizer.from_file(path), get_tokenizer(path)
    ids = ours.encode("a red circle") + [n, n + 1]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) == "a red circle<unused0><unused1>"


def test_idefics_tokens_and_markup(tmp_path):
    """IDEFICS's tokenizer.json holds its added tokens after LLaMA's rows: <fake_token_around_image>, <image>,
    <end_of_utterance>. Each <image> of the markup is written as its processor writes it, between fake tokens (two
    images in a row share one); <|endofchunk|> is the end of a turn; plain text stays text."""
    from tokenizer import EOU, FAKE
    lib = tokenizers.Tokenizer.from_file(llama_like(tmp_path))
    n = lib.get_vocab_size()
    lib.add_special_tokens([FAKE, IMAGE, EOU])
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(str(tmp_path), lm_vocab_size=n, new_tokens=(FAKE, IMAGE, EOU))
    assert (tok.fake_id, tok.image_id, tok.eoc_id, tok.n_vocab, tok.bos_id) == (n, n + 1, n + 2, n + 3, lib.token_to_id("<s>"))
    ids = tok.encode_markup("User:<image><image>two images<end_of_utterance>\nAssistant:")
    assert ids[ids.index(n + 1) - 1:ids.index(n + 1) + 4] == [n, n + 1, n, n + 1, n]
    assert f"User:{FAKE}{IMAGE}{FAKE}{IMAGE}{FAKE}" in tok.decode(ids) and tok.encode_markup(EOC) == [n + 2]
    assert not {n, n + 1, n + 2} & set(tok.encode("a literal <image> and <end_of_utterance> stay text"))
    with pytest.raises(ValueError, match="at id 70., but the model.s row for it is"):  # rows in another order
        get_tokenizer(str(tmp_path), lm_vocab_size=n, new_tokens=(IMAGE, FAKE, EOU))
    base = get_tokenizer(str(tmp_path), lm_vocab_size=n, new_tokens=(FAKE, IMAGE))  # idefics-9b: no <end_of_utterance>
    assert base.eoc_id == lib.token_to_id("</s>")

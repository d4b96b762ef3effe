"""
Tokenizers, all on tiktoken: the LM's own vocabulary first, then Flamingo's new tokens appended after it,
`<image>` (where a media item sits) and `<|endofchunk|>` (the end of the text that belongs to one image; Flamingo
Figure 6).

1. The markup, OpenFlamingo's prompt formats, and `Tokenizer`: plain text never becomes a special token (a caption
   that contains the characters "<image>" stays text); markup becomes one only through the explicit
   encode_markup() and encode_template().
2. The encodings: "bytes" (256 byte tokens, offline), "gpt2" (tiktoken's, downloaded once), "shapes" (a BPE
   learned from the shapes world's text by train_bpe, kept in config/tokenizer/shapes.tiktoken), and Hugging Face
   tokenizer.json files (GPT-NeoX, GPT-2, Llama-3, Qwen2, SmolLM2) converted to tiktoken with the ids the
   `tokenizers` library gives.
3. get_tokenizer(name): the one way the scripts get a tokenizer.
"""

import base64
import functools
import os
import re
import unicodedata

import tiktoken

import files

# -----------------------------------------------------------------------------
# 1. Markup and the Tokenizer

IMAGE, EOC, EOT = "<image>", "<|endofchunk|>", "<|endoftext|>"
# OpenFlamingo's prompt formats, one chunk each (its evaluation's strings): eval.py builds its prompts from them,
# the shapes world its text and folder training (folders.FolderData) its rows, so a model is evaluated on the format
# it learned. {fields} are plain text (encode_template).
CAPTION = "<image>Output:{caption}<|endofchunk|>"
VQA = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"


class Tokenizer:
    """
    A tiktoken Encoding plus the two Flamingo tokens, appended after the LM's vocabulary:
    image_id = lm_vocab_size, eoc_id = lm_vocab_size + 1, n_vocab = lm_vocab_size + 2.
    encode() is for plain text and never yields a special id: a caption that contains the
    characters "<image>" stays text. encode_markup() is the one explicit way to get them.
    """

    def __init__(self, name, base, lm_vocab_size=None, new_tokens=(IMAGE, EOC), hf=None):
        lm_vocab_size = base.n_vocab if lm_vocab_size is None else lm_vocab_size
        assert lm_vocab_size >= base.n_vocab, f"lm_vocab_size {lm_vocab_size} < tokenizer's {base.n_vocab}"
        self.name = name
        self.eot_id = base.eot_token
        # the new tokens follow the LM's vocabulary in the order given: this project's (<image>, <|endofchunk|>), or
        # OpenFlamingo's (<|endofchunk|>, <image>, <PAD>) = 50277, 50278, 50279 after GPT-NeoX's 50277
        self.new_tokens = tuple(new_tokens)
        self.image_id = lm_vocab_size + self.new_tokens.index(IMAGE)
        self.eoc_id = lm_vocab_size + self.new_tokens.index(EOC)
        self.n_vocab = lm_vocab_size + len(self.new_tokens)
        self.hf = hf  # a converted Hugging Face tokenizer's extras (HFExtras), or None
        # ids in [base.n_vocab, lm_vocab_size) are embedding rows with no token (padded LMs)
        self.base_n_vocab = base.n_vocab
        # the tiktoken README's way to extend an encoding with new special tokens
        self.enc = tiktoken.Encoding(
            name=f"{base.name}_flamingo",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **{t: lm_vocab_size + i for i, t in enumerate(self.new_tokens)}},
        )

    def encode(self, text):
        """Plain text -> ids. Special-token strings in `text` are encoded as ordinary text."""
        if self.hf is None:
            return self.enc.encode_ordinary(text)
        return self.hf.encode(text, self.enc.encode_ordinary)

    def encode_markup(self, text):
        """Markup -> ids: "<image>", "<|endofchunk|>" and "<|endoftext|>" become their special ids."""
        if self.hf is None:
            return self.enc.encode(text, allowed_special={IMAGE, EOC, EOT}, disallowed_special=())
        ids, specials = [], {IMAGE: self.image_id, EOC: self.eoc_id, EOT: self.eot_id}
        for i, piece in enumerate(re.split(f"({re.escape(IMAGE)}|{re.escape(EOC)}|{re.escape(EOT)})", text)):
            ids += [specials[piece]] if i % 2 else self.encode(piece)
        return ids

    def encode_template(self, template, **fields):
        """A template's ids (CAPTION, VQA): its markup becomes special tokens, its fields (a caption, a question)
        are plain text, so a literal "<image>" in a caption stays text."""
        ids = []
        for piece in re.split(r"(\{\w+\})", template):
            if piece.startswith("{"):
                ids += self.encode(fields[piece[1:-1]])
            elif piece:
                ids += self.encode_markup(piece)
        return ids

    def decode(self, ids):
        """ids -> str; special ids render as their markup. Ids with no token (padding rows) are dropped."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if i < self.base_n_vocab or i >= self.n_vocab - len(self.new_tokens)]
        if self.hf is not None:
            return self.hf.decode(ids, self.enc.decode_bytes)
        return self.enc.decode(ids, errors="replace")


# -----------------------------------------------------------------------------
# 2. Encodings

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHAPES_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "tokenizer", "shapes.tiktoken")


def bytes_encoding():
    """256 byte tokens, no merges: id i is byte i; <|endoftext|> = 256. Offline, tiny vocabulary."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]{1,64}",  # pieces of up to 64 characters; with no merges the split is irrelevant
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


def gpt2_encoding():
    """GPT-2's BPE. tiktoken downloads it once and caches it (TIKTOKEN_CACHE_DIR)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, a timeout, a bad cache file...
        raise RuntimeError(
            "could not load the 'gpt2' tokenizer: tiktoken tried to download vocab.bpe and "
            "encoder.json from openaipublic.blob.core.windows.net and failed "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Either set TIKTOKEN_CACHE_DIR to a "
            "directory holding tiktoken's cached files (copied from a machine where "
            "tiktoken.get_encoding('gpt2') ran once), or use the tokenizer 'bytes'."
        ) from None


def train_bpe(word_counts, max_merges):
    """Byte-pair encoding (Sennrich et al. 2016) learned from {word bytes: count}: repeatedly merge the most
    frequent adjacent pair. Returns tiktoken's mergeable_ranks: the 256 bytes, then each merge in order."""
    ranks = {bytes([i]): i for i in range(256)}
    words = {tuple(bytes([b]) for b in w): c for w, c in word_counts.items()}
    for _ in range(max_merges):
        pairs = {}
        for parts, c in words.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken by the bytes: deterministic
        ranks[a + b] = len(ranks)
        new = {}
        for parts, c in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return ranks


def write_ranks(ranks, path):
    """mergeable_ranks as a .tiktoken file (tiktoken's own format: a line "base64(token) rank" per token)."""
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def read_ranks(path):
    """A .tiktoken file -> mergeable_ranks. (tiktoken.load would cache a copy keyed by the path in a temp folder,
    and read that copy even after the file changed.)"""
    with open(path) as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def shapes_encoding():
    """The shapes world's BPE: every word of its vocabulary ("circle", " answer", "Question", ...) is one token, so
    sequences are 3-4x shorter than bytes and each answer is a single choice; byte fallback keeps any other text
    encodable. Learned once by train_bpe from the world's text (`python shapes.py tokenizer` writes the file; a
    test checks that it still learns the same) and kept as a file, so that the ids every shapes checkpoint reads
    never move. <|endoftext|> follows the merges."""
    ranks = read_ranks(SHAPES_RANKS)
    return tiktoken.Encoding(name="shapes", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


class HFExtras:
    """What a Hugging Face tokenizer.json does beyond its BPE, done around the tiktoken Encoding:
    - its normalizer (NFC for GPT-NeoX), applied first;
    - its added tokens, found in the text before anything else, longest first (GPT-NeoX adds runs of 2 to 24
      spaces as tokens 50254-50276: "a" + 5 spaces + "b" is "a", a 4-space token, " b" there, not BPE's
      split); special ones (<|endoftext|>) stay text in encode(), as for every tokenizer here;
    - ids: tiktoken merges the pair whose joined bytes has the lowest rank, so its ranks must follow the
      merge order; where the file's ids do not, ranks are the merge order and `to_id` maps them back."""

    def __init__(self, nfc, added, special, to_id):
        self.nfc, self.added, self.to_id = nfc, added, to_id
        self.names = {i: t for t, i in {**added, **special}.items()}  # ids decode() writes out whole
        self.from_id = None if to_id is None else {i: r for r, i in enumerate(to_id)}
        self.split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    def encode(self, text, encode_ordinary):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = self.split.split(text) if self.split else [text]
        ids = []
        for i, piece in enumerate(pieces):  # odd pieces are added tokens
            if i % 2:
                ids.append(self.added[piece])
            elif piece:
                ranks = encode_ordinary(piece)
                ids += ranks if self.to_id is None else [self.to_id[r] if r < len(self.to_id) else r for r in ranks]
        return ids

    def decode(self, ids, decode_bytes):
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self.names:  # an added, special or new token ends a run of BPE ids
                out.append(decode_bytes([self.from_id.get(j, j) if self.from_id else j for j in run])
                           .decode("utf-8", errors="replace"))
                run = []
                if i is not None:
                    out.append(self.names[i])
            else:
                run.append(i)
        return "".join(out)


def byte_level_alphabet():
    """GPT-2's map from bytes to the printable characters byte-level BPE files store tokens in
    (printable Latin-1 bytes stand for themselves; the rest are shifted to 256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return {c: b for b, c in chars.items()}


def hf_bpe_tokenizer(path, lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
    """A Hugging Face byte-level BPE tokenizer.json (GPT-NeoX, GPT-2, Llama-3, Qwen2, SmolLM2) -> Tokenizer
    on a tiktoken Encoding, giving the ids the `tokenizers` library gives (tests/test_tokenizer.py)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    with open(path, "rb") as f:
        try:
            spec = files.loads(f.read().decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON, nested too deep
            raise ValueError(f"{path} is not a tokenizer.json ({str(e).splitlines()[0]})") from None
    model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise NotImplementedError(f"{path}: only byte-level BPE tokenizers are supported")
    if norm is not None and norm.get("type") != "NFC":
        raise NotImplementedError(f"{path}: normalizer {norm.get('type')!r} (only NFC or none)")
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_SPLIT
    elif kinds == ["Split", "ByteLevel"] and "Regex" in steps[0]["pattern"] and not steps[1].get("use_regex") \
            and steps[0].get("behavior") == "Isolated" and not steps[1].get("add_prefix_space"):
        pattern = steps[0]["pattern"]["Regex"]  # Llama-3, Qwen2: their own split, then bytes
    else:
        raise NotImplementedError(f"{path}: pre-tokenizer {kinds} (ByteLevel, or Split + ByteLevel)")
    to_byte = byte_level_alphabet()
    as_bytes = lambda tok: bytes(to_byte[c] for c in tok)  # noqa: E731
    vocab = {as_bytes(t): i for t, i in model["vocab"].items()}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    merged = [as_bytes(a) + as_bytes(b) for a, b in merges]
    # every token BPE can produce: the 256 bytes, then each merge's result, in merge order (first time made)
    order = [bytes([b]) for b in range(256)]
    order += list(dict.fromkeys(t for t in merged if len(t) > 1))
    ids = [vocab[t] for t in order]
    if all(a < b for a, b in zip(ids[256:], ids[257:])) and max(ids[:256]) < min(ids[256:], default=1 << 30):
        ranks, to_id = {t: vocab[t] for t in order}, None  # the file's ids already follow the merges
    else:
        ranks, to_id = {t: r for r, t in enumerate(order)}, ids
    added, special = {}, {}
    for a in spec.get("added_tokens", []):
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise NotImplementedError(f"{path}: added token {a['content']!r} with lstrip/rstrip/single_word")
        (special if a.get("special") else added)[a["content"]] = a["id"]
    # the special tokens keep their own ids; <|endoftext|> (or the first special) is the end-of-text token
    eot = special.get(EOT, next(iter(special.values()), None))
    n = max([*vocab.values(), *added.values(), *special.values()]) + 1
    base = tiktoken.Encoding(name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf", pat_str=pattern,
                             mergeable_ranks=ranks, special_tokens={EOT: eot if to_id is None else len(order)})
    hf = HFExtras(norm is not None, added, special, to_id)
    made = set(order)  # entries of the vocabulary that no merge makes: never encoded, decoded as their own text
    hf.names.update({i: t.decode("utf-8", errors="replace") for t, i in vocab.items() if t not in made})
    tok = Tokenizer(path, base, n if lm_vocab_size is None else lm_vocab_size, new_tokens, hf)
    tok.eot_id, tok.base_n_vocab = eot, n
    hf.names.update({tok.n_vocab - len(new_tokens) + i: t for i, t in enumerate(new_tokens)})
    return tok


# -----------------------------------------------------------------------------
# 3. The factory


@functools.lru_cache(maxsize=None)
def get_tokenizer(name="bytes", lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
    """The tokenizer called `name` ("bytes", "shapes", "gpt2", or a Hugging Face tokenizer.json or a directory
    holding one), with the new tokens (<image>, <|endofchunk|>) appended after `lm_vocab_size` (default: the
    base vocabulary size; larger for LMs with padded embeddings)."""
    if name == "bytes":
        base = bytes_encoding()
    elif name == "shapes":
        base = shapes_encoding()
    elif name == "gpt2":
        base = gpt2_encoding()
    elif os.path.exists(name):
        return hf_bpe_tokenizer(name, lm_vocab_size, new_tokens)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; known: 'bytes', 'shapes', 'gpt2', or a tokenizer.json path")
    return Tokenizer(name, base, lm_vocab_size, new_tokens)

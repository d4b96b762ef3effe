"""
Tokenizers: the LM's own vocabulary first, then Flamingo's new tokens appended after it, `<image>` (where a media
item sits) and `<|endofchunk|>` (the end of the text that belongs to one image; Flamingo Figure 6).

1. The markup, OpenFlamingo's prompt formats, and `Tokenizer`: plain text never becomes a special token (a caption
   that contains the characters "<image>" stays text); markup becomes one only through the explicit
   encode_markup() and encode_template().
2. The encodings: on tiktoken, "bytes" (256 byte tokens, offline), "gpt2" (tiktoken's, downloaded once) and
   "shapes" (a BPE learned from the shapes world's text by train_bpe, kept in config/tokenizer/shapes.tiktoken);
   and any Hugging Face tokenizer.json (GPT-NeoX, GPT-2, Llama, Llama-3, Qwen2, SmolLM2, IDEFICS' LLaMA), run by
   Hugging Face's `tokenizers` library, which gives the ids those LMs were trained on.
3. get_tokenizer(name): the one way the scripts get a tokenizer.
"""

import base64
import functools
import os
import re

import tiktoken

# -----------------------------------------------------------------------------
# 1. Markup and the Tokenizer

IMAGE, EOC, EOT = "<image>", "<|endofchunk|>", "<|endoftext|>"
FAKE, EOU = "<fake_token_around_image>", "<end_of_utterance>"  # IDEFICS's: around each image; an instruct turn's end
# OpenFlamingo's prompt formats, one chunk each (its evaluation's strings): eval.py builds its prompts from them,
# the shapes world its text and folder training (folders.FolderData) its rows, so a model is evaluated on the format
# it learned. {fields} are plain text (encode_template).
CAPTION = "<image>Output:{caption}<|endofchunk|>"
VQA = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"


class Tokenizer:
    """
    An LM's tokenizer plus the Flamingo tokens, appended after the LM's vocabulary in the order given: this
    project's (<image>, <|endofchunk|>): image_id = lm_vocab_size, eoc_id = lm_vocab_size + 1; or OpenFlamingo's
    (<|endofchunk|>, <image>, <PAD>) = 50277, 50278, 50279 after GPT-NeoX's 50277; or IDEFICS's (<fake_token_around_image>,
    <image>, and <end_of_utterance> in its instruct models) after LLaMA's 32000, where each <image> of the markup
    becomes <fake_token_around_image><image><fake_token_around_image> (two images in a row share the one between
    them) and <|endofchunk|> the end of a turn (<end_of_utterance>, else </s>), as IDEFICS's processor writes them.
    n_vocab = lm_vocab_size + their number. encode() is for plain text and never yields a special id: a caption that
    contains the characters "<image>" stays text. encode_markup() is the one explicit way to get them.

    Two kinds below: TiktokenTokenizer (bytes, gpt2, shapes) and HFTokenizer (any tokenizer.json). Each gives
    encode(text) and decode_base(ids) for the LM's own ids; the markup is handled here, the same for both.
    """

    def __init__(self, name, base_n_vocab, eot_id, lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
        lm_vocab_size = base_n_vocab if lm_vocab_size is None else lm_vocab_size
        assert lm_vocab_size >= base_n_vocab, f"lm_vocab_size {lm_vocab_size} < tokenizer's {base_n_vocab}"
        self.name, self.eot_id = name, eot_id
        self.base_n_vocab = base_n_vocab  # ids in [base_n_vocab, lm_vocab_size): embedding rows with no token
        self.new_tokens = tuple(new_tokens)
        self.new_ids = {lm_vocab_size + i: t for i, t in enumerate(self.new_tokens)}  # id -> its markup
        ids = {t: i for i, t in self.new_ids.items()}
        self.image_id = ids[IMAGE]
        self.eoc_id = ids.get(EOC, ids.get(EOU, eot_id))
        self.fake_id = ids.get(FAKE)
        self.bos_id = None  # the LM's beginning of a text, where it has one (HFTokenizer)
        self.n_vocab = lm_vocab_size + len(self.new_tokens)
        self.specials = {**ids, EOC: self.eoc_id, EOT: eot_id}  # markup -> id

    def encode(self, text):
        """Plain text -> ids. Special-token strings in `text` are encoded as ordinary text."""
        raise NotImplementedError

    def decode_base(self, ids):
        """The LM's own ids (no Flamingo token) -> str."""
        raise NotImplementedError

    def encode_markup(self, text):
        """Markup -> ids: "<image>", "<|endofchunk|>", "<|endoftext|>" and the other new tokens become their ids."""
        ids, marks = [], "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        for i, piece in enumerate(re.split(f"({marks})", text)):
            if i % 2 and piece == IMAGE and self.fake_id is not None:  # IDEFICS: <fake><image><fake>, shared
                ids += ([] if ids[-1:] == [self.fake_id] else [self.fake_id]) + [self.image_id, self.fake_id]
            else:
                ids += [self.specials[piece]] if i % 2 else self.encode(piece) if piece else []
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
        """ids -> str; the Flamingo tokens render as their markup. Ids with no token (padding rows) are dropped."""
        out, run = [], []
        for i in [int(i) for i in ids] + [None]:
            if i is None or i in self.new_ids:  # a Flamingo token ends a run of the LM's own ids
                if run:
                    out.append(self.decode_base(run))
                out.append(self.new_ids.get(i, ""))
                run = []
            elif i < self.base_n_vocab:
                run.append(i)
        return "".join(out)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken Encoding (bytes, gpt2, shapes), its special tokens extended with the Flamingo ones."""

    def __init__(self, name, base, lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
        super().__init__(name, base.n_vocab, base.eot_token, lm_vocab_size, new_tokens)
        # the tiktoken README's way to extend an encoding with new special tokens
        self.enc = tiktoken.Encoding(
            name=f"{base.name}_flamingo",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, **{t: i for i, t in self.new_ids.items()}},
        )

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_markup(self, text):  # tiktoken's own (the same ids as Tokenizer's, in one call)
        if self.fake_id is not None or EOC not in self.new_tokens:
            return super().encode_markup(text)
        return self.enc.encode(text, allowed_special={IMAGE, EOC, EOT}, disallowed_special=())

    def decode_base(self, ids):
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


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, run by Hugging Face's own `tokenizers` library: whatever model, normalizer and
    pre-tokenizer the file names (byte-level BPE as GPT-NeoX, GPT-2, Llama-3, Qwen2 and SmolLM2 have it; BPE with byte
    fallback, SentencePiece-style, as LLaMA and IDEFICS have it), with the ids the LM was trained on.

    Plain text stays plain: the library's special tokens (<|endoftext|>, <s>) are encoded as the text they spell
    (its encode_special_tokens), while added tokens that are not special (GPT-NeoX's runs of 2 to 24 spaces) are
    found in the text as the library finds them. No BOS or EOS is added: prompts are built from pieces here."""

    def __init__(self, path, lm_vocab_size=None, new_tokens=(IMAGE, EOC)):
        from tokenizers import Tokenizer as Library
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            self.lib = Library.from_file(path)
        except Exception as e:  # not a file, not JSON, a model the library does not know: its message, one line
            raise ValueError(f"{path} is not a tokenizer.json the `tokenizers` library reads "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.lib.encode_special_tokens = True
        vocab = self.lib.get_vocab(with_added_tokens=True)  # {token: id}
        n = max(i for t, i in vocab.items() if t not in new_tokens) + 1  # (IDEFICS's file holds the new ones too,
        n = n if lm_vocab_size is None else min(n, lm_vocab_size)         # and its instruct tokens past a base model's)
        special = [t.content for t in self.lib.get_added_tokens_decoder().values() if t.special]
        # the end of a text: GPT-NeoX's and GPT-2's <|endoftext|>, LLaMA's </s>, else the first special token
        eot = next((vocab[t] for t in (EOT, "</s>") if t in vocab), vocab[special[0]] if special else None)
        super().__init__(path, n, eot, lm_vocab_size, new_tokens)
        self.bos_id = vocab.get("<s>")
        for t, i in vocab.items():  # a new token the file also has must have the id it gets here
            if t in self.new_tokens and self.specials[t] != i:
                raise ValueError(f"{path} has {t} at id {i}, but the model's row for it is {self.specials[t]}")

    def encode(self, text):
        """Plain text -> ids, as the library encodes it; special-token strings stay text."""
        return self.lib.encode(text, add_special_tokens=False).ids

    def decode_base(self, ids):
        return self.lib.decode(ids, skip_special_tokens=False)


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
        return HFTokenizer(name, lm_vocab_size, new_tokens)
    else:
        raise ValueError(f"unknown tokenizer {name!r}; known: 'bytes', 'shapes', 'gpt2', or a tokenizer.json path")
    return TiktokenTokenizer(name, base, lm_vocab_size, new_tokens)

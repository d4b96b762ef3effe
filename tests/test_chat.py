"""The conversation (chat.py, `sample.py --chat`): each turn reuses the keys and values of the turns before it, and
answers exactly what generating over the whole conversation from scratch answers (GPT-2's learned positions,
Llama's RoPE, MPT's ALiBi; images added in later turns); the history cut when the context is full; and the
terminal loop driven through standard input as a user would, on a checkpoint of train.py."""

import re
import subprocess
import sys

import pytest
import torch

import test_batched_generation
from chat import Conversation
from test_batched_generation import IMG
from tokenizer import get_tokenizer

TOK = get_tokenizer("bytes", lm_vocab_size=IMG)  # <image> = 300, <|endofchunk|> = 301, as the tiny models have them
TURNS = [("red?", 2), ("why", 0), ("", 1), ("one?", 1)]  # short: 4 turns in the tiny LMs' 128 positions


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    """test_batched_generation's tiny models, one per LM family, gates open."""
    return test_batched_generation.models.__wrapped__()


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 32, 32, generator=g) if n else None


def from_scratch(model, history, media, ids, max_new):
    """What a conversation without a cache would do: the whole conversation so far, then generate."""
    x = torch.cat(media) if media else None
    return model.generate(x, [history + ids], max_new, temperature=0)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mpt"])
def test_each_turn_answers_what_the_whole_conversation_answers(models, arch):
    model = models[arch]
    conv = Conversation(model, TOK, limit=128)
    history, media = [], []
    for t, (text, n) in enumerate(TURNS):
        x = images(n, t)
        ids = conv.message_ids(text, n, t > 0)
        media += [] if x is None else [x]
        want = from_scratch(model, history, media, ids, 6)
        conv.say(text, x, max_new_tokens=6)
        assert conv.answer_ids == want, (arch, t)
        history += ids + want + [TOK.eoc_id]
    assert conv.fed() + len(conv.pending) == len(history)


def test_history_is_cut_when_the_context_is_full(models):
    model = models["gpt2"]
    conv = Conversation(model, TOK, limit=70)
    notes = []
    for t, (text, n) in enumerate(TURNS * 2):
        x = images(n, t)
        _, note = conv.say(text, x, max_new_tokens=6)
        notes.append(note)
        assert conv.fed() + len(conv.pending) <= 70
        if note:  # the answer is the one the kept turns give, run again from the start
            *kept, (lead, last, _) = conv.turns
            prompt = [i for _, ids, _ in kept for i in ids] + last[:len(last) - len(conv.answer_ids)
                                                                       + len(conv.pending) - 1]
            media = [m for _, _, m in conv.turns if m is not None]
            assert conv.answer_ids == from_scratch(model, [], media, prompt, 6)
    assert any(notes) and "history cut" in next(n for n in notes if n)
    with pytest.raises(ValueError, match="does not fit"):
        conv.say("a very long message " * 10, None, max_new_tokens=6)


def test_chat_through_standard_input(tmp_path_factory):
    """sample.py --chat on a train.py checkpoint: the first answer is sample.py's own continuation of the same
    prompt; a bad image is an error line and the conversation goes on; /reset; /quit."""
    from test_sample import ENV, ROOT, expected_continuation, files  # noqa: F401
    out, pngs, garbage = files.__wrapped__(tmp_path_factory)
    lines = [f"/image {pngs[0]}", "what color is the circle?", f"/image {garbage}", f"/image {pngs[1]}", "",
             "/reset", "hello", "/quit", "never read"]
    p = subprocess.run([sys.executable, "sample.py", f"--init_from={out}", "--chat", "--max_new_tokens=8"],
                       cwd=ROOT, env=ENV, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    answers = re.findall(r"model> (.*)", p.stdout)
    assert len(answers) == 3, p.stdout
    assert answers[0] == expected_continuation(out, pngs[:1], "<image>Question:what color is the circle? Short answer:", 8)
    assert "error: cannot read image" in p.stdout and "(the conversation is forgotten)" in p.stdout

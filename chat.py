"""
A conversation with a Flamingo about images, in the terminal: `python sample.py --chat` (sample.py loads the model
and hands it to run() here).

    you> /image scene.png
    you> what color is the circle?
    model> red

A line `/image PATH` adds an image to the next message (several may precede one message; an image alone, then an
empty line, asks for a caption); `/reset` forgets the conversation; `/quit` (or the end of the input) ends it.

Each message is written in a template the model knows, then fed after everything already said:

- FEW_SHOT, for models without instruction tuning (the shapes model, OpenFlamingo's, idefics-9b), is OpenFlamingo's
  evaluation format: a message with text is `<image>...Question:{text} Short answer:`, one without `<image>...Output:`
  (a caption), the images first; each answer ends with `<|endofchunk|>`. The earlier turns then act as the
  demonstrations of a few-shot prompt.
- INSTRUCT, for IDEFICS's instruct models (chosen when the model has an `<end_of_utterance>` row), is the format they
  were tuned on (their model card): `User:<image>...{text}<end_of_utterance>\nAssistant:`, the answer ending with
  `<end_of_utterance>`, then a new line before the next `User:`. IDEFICS's tokenizer writes each `<image>` as
  `<fake_token_around_image><image><fake_token_around_image>`, and the conversation starts with LLaMA's `<s>`.

The model's keys and values are kept between turns (generation.Stepper: one KVCache per LM layer, the images' keys
and values computed once each, new ones added as they come), so a turn costs its own tokens only. When the next
turn would not fit the LM's context, the oldest turns are dropped, the rest run again once, and a line says so.
"""

import re
import sys

import torch

from generation import Stepper, no_image, sample_next
from tokenizer import EOC, EOU, IMAGE

FEW_SHOT = dict(message="{images}Question:{text} Short answer:", caption="{images}Output:", end=EOC, sep="")
INSTRUCT = dict(message=f"User:{{images}}{{text}}{EOU}\nAssistant:", caption=f"User:{{images}}Describe the image.{EOU}"
                "\nAssistant:", end=EOU, sep="\n")


class Conversation:
    """The turns so far, and a Stepper holding their keys and values. template: FEW_SHOT or INSTRUCT (None: the one
    the model knows). limit: the most tokens the conversation may hold: the LM's context (None, for RoPE's LMs that
    have no hard end: 4,096)."""

    def __init__(self, model, tok, template=None, limit=None):
        self.model, self.tok = model, tok
        self.template = template or (INSTRUCT if EOU in model.config.new_tokens else FEW_SHOT)
        self.limit = limit or 4096
        self.end_id = tok.encode_markup(self.template["end"])[-1]
        self.start = [tok.bos_id] if model.config.idefics and tok.bos_id is not None else []  # as IDEFICS's processor
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self):
        self.turns = []     # per turn: (lead, ids, images): ids as fed, of which the first `lead` end the last answer
        self.step = None    # the Stepper over all turns so far
        self.pending = []   # chosen but not fed yet: the end of the last answer, fed before the next message
        self.answer_ids = []  # the last answer's tokens (without its end)

    def message_ids(self, text, n_images, after_answer):
        """A user message in the template (after an answer: its separator first) -> ids. The user's text is plain
        text (never markup), encoded together with the plain text around it, as a tokenizer sees a whole prompt."""
        template = self.template["message" if text else "caption"].replace("{images}", IMAGE * n_images)
        template = (self.template["sep"] if after_answer else "") + template
        before, _, after = template.partition("{text}")
        marks = "|".join(re.escape(t) for t in self.tok.specials)
        cut = max((m.end() for m in re.finditer(marks, before)), default=0)  # before[cut:], after[:stop]: plain
        stop = next((m.start() for m in re.finditer(marks, after)), len(after))
        return (self.tok.encode_markup(before[:cut]) + self.tok.encode(before[cut:] + text + after[:stop])
                + self.tok.encode_markup(after[stop:]))

    def fed(self):
        return len(self.start) + sum(len(ids) for _, ids, _ in self.turns)

    def say(self, text, images=None, max_new_tokens=40, temperature=0.0, top_k=None, top_p=None, on_text=None):
        """Add a user message (text, and its images (k, 1, 3, H, W) or None) -> (the answer's text, a note about
        the history or None). on_text(piece) streams the answer as it is chosen."""
        n = 0 if images is None else len(images)
        lead, ids = len(self.pending), self.pending + self.message_ids(text, n, bool(self.turns))
        note = None
        if self.fed() + len(ids) + max_new_tokens > self.limit:
            note = self.cut(len(ids) - lead, max_new_tokens)
            if not self.turns:  # nothing left before the message: the end of a dropped answer goes too
                lead, ids = 0, self.message_ids(text, n, False)
        if self.step is None:  # the first turn, or what is left after a cut: run once, from the start
            first = [ids_[lead_ if k == 0 else 0:] for k, (lead_, ids_, _) in enumerate(self.turns)]
            media = [m for _, _, m in self.turns if m is not None] + ([] if images is None else [images])
            self.turns = [(0 if k == 0 else t[0], first[k], t[2]) for k, t in enumerate(self.turns)]
            prompt = self.start + [i for t in first for i in t] + ids
            self.step = Stepper(self.model, torch.cat(media).to(self.device) if media else None,
                                torch.tensor([prompt], device=self.device))  # caches: room doubles as needed
            logits = self.step.prompt()                                       # (1, V + n)
        else:
            if images is not None:
                self.step.add_media(images.to(self.device))
            logits = self.step.next(torch.tensor([ids], device=self.device))  # (1, V + n)
        answer, shown, stopped = [], "", False
        for i in range(max_new_tokens):
            nxt = sample_next(no_image(logits, self.model), temperature, top_k, top_p)  # (1, 1)
            if nxt.item() == self.end_id:
                stopped = True
                break
            answer.append(nxt.item())
            now = self.tok.decode(answer)
            if on_text is not None and not now.endswith("\ufffd"):  # a character split over tokens: wait
                on_text(now[len(shown):])
                shown = now
            if i < max_new_tokens - 1:
                logits = self.step.next(nxt)
        text = self.tok.decode(answer)
        if on_text is not None and text != shown:  # the answer ended inside a character: show what there is
            on_text(text[len(shown):])
        fed = answer if stopped else answer[:-1]  # the last token chosen at the length limit was never fed
        self.turns.append((lead, ids + fed, images))
        self.pending = answer[len(fed):] + [self.end_id]
        self.answer_ids = answer
        return text, note

    def cut(self, n_message, max_new_tokens):
        """Drop the oldest turns until a message of n_message tokens and its answer fit -> the note to show."""
        if n_message + max_new_tokens > self.limit:
            raise ValueError(f"this message is {n_message} tokens; with {max_new_tokens} for the answer it does not "
                             f"fit the LM's {self.limit}")
        n = len(self.turns)
        while self.turns and self.fed() + len(self.pending) + n_message + max_new_tokens > self.limit:
            self.turns.pop(0)
        self.step = None
        return f"(history cut: the oldest {n - len(self.turns)} turn(s) no longer fit the LM's {self.limit} tokens)"


def run(model, tok, preprocess, limit, max_new_tokens=40, temperature=0.0, top_k=None, top_p=None,
        lines=sys.stdin, out=sys.stdout):
    """The terminal loop: read lines, keep the conversation, print the answers as they come. preprocess: a path ->
    (3, H, W) pixels, raising ValueError with a message for a file it cannot read. Ctrl-C ends it quietly."""
    conv = Conversation(model, tok, limit=limit)
    waiting = []  # the images for the next message, (3, H, W) each

    def show(s):
        print(s, end="", file=out, flush=True)

    def answer(text, images):
        started = False

        def stream(piece):  # "model> " once the answer begins: an error would come instead
            nonlocal started
            if not started:
                show("model> ")
                started = True
            show(piece)
        _, note = conv.say(text, images, max_new_tokens, temperature, top_k, top_p, on_text=stream)
        show(("" if started else "model> ") + "\n" + (note + "\n" if note else ""))

    show("chat: /image PATH adds an image to your next message; /reset; /quit\nyou> ")
    try:
        for line in lines:
            line = line.strip()
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                conv.reset()
                waiting = []
                show("(the conversation is forgotten)\n")
            elif line.startswith("/image"):
                path = line[len("/image"):].strip()
                try:
                    waiting.append(preprocess(path))
                    show(f"(image {path} added to your next message)\n")
                except ValueError as e:
                    show(f"error: {e}\n")
            elif line or waiting:
                images, waiting = (torch.stack(waiting)[:, None] if waiting else None), []  # (k, 1, 3, H, W)
                try:
                    answer(line, images)
                except ValueError as e:  # a message too long for the LM's context
                    show(f"error: {e}\n")
            show("you> ")
    except KeyboardInterrupt:
        pass
    show("\n")

"""
Generation for a Flamingo (model.py calls it as `Flamingo.generate`): greedy decoding, sampling (temperature,
top-k, top-p) and beam search (OpenFlamingo's evaluation uses 3 beams).

The work of one call is in a Stepper: the media's keys and values are computed once for the whole call (the
visual tokens do not change while text is generated), and the text's keys and values are kept in a KVCache per LM
layer, so each new token costs one position of the LM, not the whole sequence again.

Shapes: B prompts, T prompt tokens, nb beams per prompt, V + n the LM's vocabulary and the new tokens.
"""

import torch
import torch.nn.functional as F

from lm import KVCache


def expand_media(images, idx, media_token_id, n):
    """Repeat each row's media items n times, for rows repeated with repeat_interleave(n)."""
    if images is None or n == 1:
        return images
    counts = (idx == media_token_id).sum(1).tolist()
    if len(images) != sum(counts):  # checked here too: indexing would drop extra images silently
        raise ValueError(f"{sum(counts)} <image> tokens but {len(images)} images")
    starts = [sum(counts[:b]) for b in range(len(counts))]
    order = [i for b, c in enumerate(counts) for _ in range(n) for i in range(starts[b], starts[b] + c)]
    return images[torch.tensor(order, device=images.device)]


class Stepper:
    """Feeds a Flamingo its prompts, then a few tokens at a time, and gives the logits of the next token.

    With beams, each prompt's row is repeated num_beams times (prompt b's beams are rows b*nb .. b*nb + nb-1), and
    keep(rows) continues from the rows beam search picked. use_cache=False recomputes the whole sequence and its
    images at every step: the slow reference that the tests hold the cached path to.
    """

    def __init__(self, model, images, idx, use_cache=True, num_beams=1):
        self.model, self.use_cache = model, use_cache
        # the prompts, one row per beam (B*nb, T); the uncached path appends every token chosen to them
        self.seen = idx.repeat_interleave(num_beams, dim=0)
        self.images = expand_media(images, idx, model.media_token_id, num_beams)
        if use_cache:
            self.kvs = model.media_kvs(model.encode_media(self.images, self.seen))  # once per call
            self.caches = [KVCache() for _ in model.lm.transformer.h]
            self.last_time = None  # (B*nb, 1): the image number (text_time) of the last token fed

    def prompt(self):
        """The next-token logits (B*nb, V + n) after the prompts."""
        return self._feed(self.seen)

    def next(self, new):
        """Append new tokens (B*nb, t) to every row -> the next-token logits (B*nb, V + n) after them."""
        if not self.use_cache:  # (the cached path keeps only what the KV caches hold)
            self.seen = torch.cat([self.seen, new], dim=1)
        return self._feed(new)

    def keep(self, rows):
        """Continue from these rows (B*nb,) of the batch: beam search's surviving beams. The media are the same
        for all beams of a prompt, and beams never move to another prompt's rows, so they stay as they are."""
        if not self.use_cache:
            self.seen = self.seen[rows]
            return
        for c in self.caches:
            c.reorder(rows)
        self.last_time = self.last_time[rows]

    def _feed(self, x):
        model = self.model
        if not self.use_cache:  # the naive loop: the whole sequence and its images, every step
            logits = model(self.images, self.seen)[0][:, -1].float()
        else:
            base = 0 if self.last_time is None else self.last_time
            text_time = base + (x == model.media_token_id).cumsum(1)   # (B*nb, t)
            self.last_time = text_time[:, -1:]
            logits = model.forward_lm(x, text_time, self.kvs, self.caches)[:, -1].float()
        logits[:, model.media_token_id] = -float("inf")  # no image could follow a generated <image>
        return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next token (B, 1): greedy at temperature 0, else sampled after top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), num_samples=1)


@torch.no_grad()
def generate(model, images, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, num_beams=1,
             use_cache=True, stop_token_id=None, on_token=None):
    """The prompts idx (B, T) followed by up to max_new_tokens new tokens (Flamingo.generate documents it)."""
    stop = model.eoc_token_id if stop_token_id is None else stop_token_id
    if num_beams > 1:
        return beam_search(model, images, idx, max_new_tokens, num_beams, use_cache, stop)
    step = Stepper(model, images, idx, use_cache)
    logits = step.prompt()                                            # (B, V + n) at the last position
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p)         # (B, 1)
        nxt = torch.where(done[:, None], stop, nxt)
        idx = torch.cat([idx, nxt], dim=1)
        done |= nxt[:, 0] == stop
        if on_token is not None:
            on_token(nxt)
        if done.all() or i == max_new_tokens - 1:
            break
        logits = step.next(nxt)
    return idx


def beam_search(model, images, idx, max_new_tokens, nb, use_cache, stop, length_penalty=1.0):
    """Beam search with nb beams per prompt. A finished hypothesis is scored by sum of log-probabilities /
    (number of new tokens) ** length_penalty; a prompt is done when it has nb finished hypotheses and no live beam
    can beat the worst of them. -> the prompts and their best continuations, padded with `stop`."""
    B, T = idx.shape
    step = Stepper(model, images, idx, use_cache, nb)
    seqs = idx.repeat_interleave(nb, dim=0)                        # (B*nb, T)
    scores = torch.full((B, nb), -float("inf"), device=idx.device)
    scores[:, 0] = 0.0                                             # beams start identical: keep one
    finished = [[] for _ in range(B)]                              # the best nb (score, tokens) per prompt
    row_done = [False] * B
    logits = step.prompt()
    for t in range(1, max_new_tokens + 1):
        logp = F.log_softmax(logits, dim=-1).view(B, nb, -1)      # (B, nb, V + n)
        cand = (scores[..., None] + logp).view(B, -1)              # (B, nb * (V + n))
        top, pos = cand.topk(2 * nb, dim=1)                        # enough to refill nb live beams
        V = logp.shape[-1]
        rows, new_tokens, new_scores = [], [], []
        for b in range(B):
            keep = []
            if row_done[b]:  # a finished prompt idles until the others finish
                top[b] = -float("inf")
            for rank, (s, p) in enumerate(zip(top[b].tolist(), pos[b].tolist())):
                beam, tok = divmod(p, V)
                if s == -float("inf"):
                    break
                if tok == stop:
                    if rank < nb:  # only a top-nb candidate may finish
                        hyp = torch.cat([seqs[b * nb + beam, T:], seqs.new_tensor([tok])])
                        finished[b] = sorted(finished[b] + [(s / t ** length_penalty, hyp)],
                                             key=lambda h: -h[0])[:nb]  # the best nb only
                else:
                    keep.append((s, beam, tok))
                if len(keep) == nb:
                    break
            while len(keep) < nb:  # not enough live candidates (tiny vocabularies)
                keep.append((-float("inf"), 0, stop))
            for s, beam, tok in keep:
                rows.append(b * nb + beam)
                new_tokens.append(tok)
                new_scores.append(s)
        rows = torch.tensor(rows, device=idx.device)
        new = torch.tensor(new_tokens, device=idx.device)[:, None]
        seqs = torch.cat([seqs[rows], new], dim=1)
        scores = torch.tensor(new_scores, device=idx.device).view(B, nb)
        row_done = [d or (len(f) >= nb and f[-1][0] >= scores[b].max().item() / t ** length_penalty)
                    for b, (d, f) in enumerate(zip(row_done, finished))]
        if all(row_done) or t == max_new_tokens:
            break
        step.keep(rows)
        logits = step.next(new)
    out = []
    for b in range(B):
        live = [(scores[b, j].item() / t ** length_penalty, seqs[b * nb + j, T:]) for j in range(nb)
                if scores[b, j] > -float("inf")]
        if not row_done[b]:  # the length limit was hit: live beams compete with the finished ones
            finished[b] = finished[b] + live
        best = max(finished[b], key=lambda h: h[0])[1]
        out.append(best)
    L = max(len(o) for o in out)
    out = [torch.cat([o, o.new_full((L - len(o),), stop)]) for o in out]
    return torch.cat([idx, torch.stack(out)], dim=1)

"""
The metrics of the few-shot benchmarks, as their official evaluation code computes them (eval.py imports them;
`from eval import cider, vqa_accuracy, roc_auc` works too):

- exact_match: the answer equals a reference, stripped and lower-cased (the shapes world, small custom sets);
- cider: CIDEr-D x 100, as pycocoevalcap's Cider in the COCO caption evaluation (tested equal to it), on
  sentences tokenized by ptb_tokenize, a Python stand-in for the Stanford PTB tokenizer the official code runs;
- vqa_accuracy: VQAv2's accuracy with the official answer normalization (Cloud-CV's vqaEval.py);
- roc_auc: HatefulMemes' area under the ROC curve.
"""

import math
import re
from collections import Counter

import numpy as np


def exact_match(prediction, references):
    """1.0 if the prediction, stripped and lower-cased, equals one of the references so treated, else 0.0."""
    return float(prediction.strip().lower() in {r.strip().lower() for r in references})


# the tokens the COCO caption evaluation drops after tokenizing (PTB writes ( ) { } as -LRB- -RRB- -LCB- -RCB-)
PTB_PUNCTUATION = {"''", "'", "``", "`", "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def ptb_tokenize(text):
    """Lower-case words with punctuation removed, as the COCO caption evaluation prepares sentences for CIDEr.
    It runs Stanford's PTBTokenizer (Java); this is a close Python stand-in (clitics split off: "don't" ->
    "do n't", "dog's" -> "dog 's"; numbers like 3.5 and hyphenated words kept whole), so a score from these
    tokens can differ slightly from the official one on text with unusual punctuation."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"n't\b", " n't", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.,]\w+)*|\.\.\.|--|\S", text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def cider(references, candidates, n=4, sigma=6.0):
    """
    CIDEr-D x 100 of a corpus, computed as the COCO caption evaluation (pycocoevalcap's Cider) does.
    references: {id: [reference strings]}; candidates: {id: candidate string}; both already tokenized
    (words split on whitespace, as ptb_tokenize returns them). For each id: TF-IDF vectors of its 1..4-grams,
    IDF = log(number of ids) - log(number of ids whose references hold the n-gram); for each n, the cosine of
    the candidate's vector with each reference's, the candidate's weights clipped at the reference's, times
    a Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over n and over the references, x 10.
    Subtle, and kept for exactness: the "length" of the penalty is the number of *bigrams* (the reference
    code counts the terms of its n-gram index 1).
    """
    ids = list(candidates)
    if not ids or any(not references.get(i) for i in ids):
        raise ValueError("cider needs at least one candidate, and references for every candidate")

    def ngrams(sentence):
        words, counts = sentence.split(), Counter()
        for k in range(1, n + 1):
            for j in range(len(words) - k + 1):
                counts[tuple(words[j:j + k])] += 1
        return counts

    refs = {i: [ngrams(r) for r in references[i]] for i in ids}
    doc_freq = Counter(g for i in ids for g in set().union(*refs[i]))
    log_docs = math.log(float(len(ids)))

    def vector(counts):  # -> per-n {ngram: tf-idf}, per-n norms, length (bigram count)
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = float(tf) * (log_docs - math.log(max(1.0, doc_freq[g])))
            norm[k] += vec[k][g] ** 2
            length += tf if k == 1 else 0
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for i in ids:
        vc, nc, lc = vector(ngrams(candidates[i]))
        total = np.zeros(n)
        for r in refs[i]:
            vr, nr, lr = vector(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                total[k] += val * math.e ** (-(float(lc - lr) ** 2) / (2 * sigma ** 2))
        scores.append(np.mean(total) / len(refs[i]) * 10.0)
    return 100.0 * float(np.mean(scores))


# The official VQA evaluation's normalization (Cloud-CV's vqaEval.py, as OpenFlamingo copies it)
VQA_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't
hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm
Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't
notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
VQA_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
VQA_NUMBERS["none"] = "0"
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: in effect, a period not followed by a digit
VQA_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text):
    """Punctuation (removed, or a space when it joins two words), periods not before a digit, lower case,
    number words to digits, articles dropped, contractions given their apostrophe."""
    out = text
    for p in VQA_PUNCT:
        joined = (p + " " in text or " " + p in text) or VQA_COMMA_DIGITS.search(text) is not None
        out = out.replace(p, "" if joined else " ")
    out = VQA_PERIOD.sub("", out, 32)  # the official code passes re.UNICODE (32) where sub() takes `count`
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction, answers):
    """
    One question's VQA accuracy in [0, 1]: each human answer is left out in turn, the prediction scores
    min(1, (number of the other answers equal to it) / 3), and these scores are averaged.
    As in the official code, the prediction and the answers are normalized (vqa_normalize) only when the
    answers are not all the same string; otherwise they are only stripped. With VQAv2's 10 answers, 3
    agreeing answers give 0.9 and 4 give 1.0. With a single reference the score is always 0: small
    custom sets should read exact_match.
    """
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    if not answers:
        raise ValueError("vqa_accuracy needs at least one answer")
    if len(set(answers)) > 1:
        answers = [vqa_normalize(a) for a in answers]
        pred = vqa_normalize(pred)
    return float(np.mean([min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3)
                          for i in range(len(answers))]))


def roc_auc(labels, scores):
    """Area under the ROC curve: the probability that a random positive scores above a random negative
    (ties count half), by the rank-sum formula."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes among the labels")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks (1-based) over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

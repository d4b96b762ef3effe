"""The metrics (metrics.py) against the reference code (pycocoevalcap's Cider) and hand-worked cases of the
official rules (VQA accuracy), ROC-AUC and exact match; and eval.py gives them out under the names users import."""

import numpy as np
import pytest

import metrics as ev

GTS = {1: ["a red circle on the left", "a circle that is red", "red circle left side"],
       2: ["two dogs play in the park", "dogs playing on grass", "two brown dogs in a park"],
       3: ["a man rides a bike down the street", "a person riding a bicycle", "man on a bike in the city"]}
RES = {1: "a red circle on the left side", 2: "a dog in a park", 3: "a man riding a bike"}


def test_cider_fixed_value():
    # computed with pycocoevalcap 1.2: Cider().compute_score(GTS, {k: [v]}) -> 2.483275550997218 (x 100 here)
    assert ev.cider(GTS, RES) == pytest.approx(248.3275550997218, abs=1e-9)


def test_cider_matches_pycocoevalcap_on_random_corpora():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    rng = np.random.default_rng(0)
    words = "a the red dog cat man on in of park street big small two is".split()
    for trial in range(5):
        n = int(rng.integers(1, 12))
        sent = lambda: " ".join(rng.choice(words, int(rng.integers(1, 12))))  # noqa: E731
        gts = {i: [sent() for _ in range(int(rng.integers(1, 6)))] for i in range(n)}
        res = {i: sent() for i in range(n)}
        ref, _ = Cider().compute_score(gts, {i: [c] for i, c in res.items()})
        assert ev.cider(gts, res) == pytest.approx(100 * ref, rel=1e-12, abs=1e-12)


def test_cider_identical_captions_and_errors():
    assert ev.cider({0: ["a b c d"], 1: ["e f g h"]}, {0: "a b c d", 1: "e f g h"}) > 0
    with pytest.raises(ValueError):
        ev.cider({0: []}, {0: "a"})


def test_ptb_tokenize():
    assert ev.ptb_tokenize("A man's dog, running...  Don't stop!") == "a man 's dog running do n't stop"
    assert ev.ptb_tokenize("3.5 t-shirts; (big)") == "3.5 t-shirts big"


@pytest.mark.parametrize("pred, answers, expected", [
    ("2", ["2"] * 10, 1.0),
    ("two", ["2"] * 10, 0.0),               # all answers the same: nothing is normalized (the official quirk)
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # 3 left-outs see 2 matches (2/3), 7 see 3 (1)
    ("Red.", ["red"] * 2 + ["blue"] * 8, 0.6),  # 2 x 1/3 + 8 x 2/3, over 10
    ("two", ["2"] * 4 + ["3"] * 6, 1.0),    # number words become digits
    ("the dog", ["a dog"] * 5 + ["dog"] * 5, 1.0),  # articles dropped
    ("don't know", ["dont know"] * 3 + ["no"] * 7, 0.9),  # contractions get their apostrophe
    ("t shirt", ["t-shirt"] * 5 + ["shirt"] * 5, 1.0),  # a hyphen inside a word becomes a space
    ("tshirt", ["t-shirt"] * 5 + ["shirt"] * 5, 0.0),
    ("1000", ["1,000"] * 4 + ["many"] * 6, 1.0),  # a comma between digits is removed
    ("red", ["red"], 0.0),                   # one reference: no other answer can agree
])
def test_vqa_accuracy(pred, answers, expected):
    assert ev.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_normalize():
    assert ev.vqa_normalize("The two dogs, eating!") == "2 dogs eating"
    assert ev.vqa_normalize("It's a cat.") == "it's cat"
    assert ev.vqa_normalize("3.5") == "3.5"


def test_roc_auc():
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert ev.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert ev.roc_auc([0, 1, 1], [0.9, 0.1, 0.2]) == 0.0
    with pytest.raises(ValueError):
        ev.roc_auc([1, 1], [0.2, 0.3])


def test_exact_match():
    assert ev.exact_match(" Red ", ["blue", "red"]) == 1.0
    assert ev.exact_match("red circle", ["red"]) == 0.0


def test_eval_gives_the_metrics_out():
    from eval import cider, exact_match, roc_auc, vqa_accuracy
    assert (cider, exact_match, roc_auc, vqa_accuracy) == (ev.cider, ev.exact_match, ev.roc_auc, ev.vqa_accuracy)

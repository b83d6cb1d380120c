"""Caption metrics against reference captions: BLEU-1..4 (sacrebleu) and CIDEr-D (pycocoevalcap).

Both see the same tokens, made as the COCO caption evaluation makes them with the PTB
tokenizer, without its Java: lowercased, clitics split off (``dog's`` -> ``dog 's``,
``don't`` -> ``do n't``), hyphenated words kept whole, punctuation dropped. Scores are on the
scale captioning papers report: BLEU as sacrebleu gives it (0-100) and CIDEr-D times 100.

CIDEr-D weighs n-grams by their rarity among the references of the images scored together, so
it needs many images: with one image (or identical references) every n-gram is common and the
score is 0. BLEU-n is 0 when no caption has n words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmdata.errors import UserError

BLEU_ORDERS = (1, 2, 3, 4)
METRICS = (*(f"bleu_{n}" for n in BLEU_ORDERS), "cider_d")
METRIC_NAMES = {**{f"bleu_{n}": f"BLEU-{n}" for n in BLEU_ORDERS}, "cider_d": "CIDEr-D"}
# A word (letters or digits, hyphenated parts kept together), a clitic after it, or the "n't"
# that PTB splits from its verb; anything else (punctuation, symbols) is dropped.
_TOKEN = re.compile(r"\w+?(?=n't\b)|n't\b|'\w+|\w+(?:-\w+)*")


def tokenize(caption: str) -> str:
    """``caption`` as space-separated PTB-style tokens, lowercased, without punctuation."""
    return " ".join(_TOKEN.findall(caption.lower().replace("\u2019", "'")))


def caption_scores(references: Sequence[str], generated: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of ``generated[i]`` against ``references[i]`` (one reference
    each), over the whole set."""
    if len(references) != len(generated) or not references:
        raise UserError("caption scores need one generated caption per reference, at least one")
    from pycocoevalcap.cider.cider import Cider
    from sacrebleu.metrics import BLEU

    refs = [tokenize(r) for r in references]
    hyps = [tokenize(g) for g in generated]
    # No smoothing, as coco-caption's BLEU: the figures compare with captioning papers.
    bleu = {n: BLEU(max_ngram_order=n, tokenize="none", smooth_method="none") for n in BLEU_ORDERS}
    scores = {f"bleu_{n}": bleu[n].corpus_score(hyps, [refs]).score for n in BLEU_ORDERS}
    if any(refs):  # pycocoevalcap fails on references without a single word
        ids = range(len(refs))
        cider, _ = Cider().compute_score({i: [refs[i]] for i in ids}, {i: [hyps[i]] for i in ids})
        scores["cider_d"] = 100.0 * float(cider)
    else:
        scores["cider_d"] = 0.0
    return scores

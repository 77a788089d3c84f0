"""VQA accuracy: ``min(#matching humans / 3, 1)`` averaged over the 10 leave-one-out subsets of the
10 human answers, under one of three answer-processing rules:

``vqaeval`` (``vqav2``)
    The official ``vqaEval.py`` (GT-Vision-Lab/VQA, after its commit "Fixed processing answers
    bug"): prediction and human answers lose new lines, tabs and surrounding spaces; only when the
    human answers differ are both normalised (punctuation, number words to digits, articles dropped,
    contractions restored). When all ten agree the raw prediction is compared: "Yes." or "two"
    against ten "yes" / "2" scores 0.
``normalized`` (``vqav2_normalized``, ``scenes_open``)
    Both sides always normalised as above (EvalAI's answer processor without its tokenising step;
    what most reimplementations do): "Yes." and "two" score 1 there.
``textvqa`` (``textvqa``)
    TextVQA's ``m4c_evaluator``: EvalAI's full processor on both sides, always; it first lower-cases,
    deletes "," and "?" and splits "'s" off its word (so "hello,world" becomes "helloworld", and
    "mcdonald's" "mcdonald 's").

A question file row gives its references in ``answers`` (a list, VQAv2 / TextVQA) or ``answer`` (one
string, counted as ten identical humans).
"""

from __future__ import annotations

import re

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # kept as written in the official script
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official contraction table, as (written without apostrophe -> canonical) pairs.
_CONTRACTIONS = """aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|
hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|
maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|
mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd|
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd|
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|
youre you're|youve you've"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTIONS.replace("\n", "").split("|"))


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize(answer: str) -> str:
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def _textvqa(answer: str) -> str:
    """EvalAI's answer processor as TextVQA's m4c_evaluator applies it (its tokenising step first)."""
    return normalize(answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip())


RULES = ("vqaeval", "normalized", "textvqa")


def accuracy(prediction: str, references: list[str], rule: str = "normalized") -> float:
    """Leave-one-out VQA accuracy in [0, 1] (a single reference counts as ten identical humans)."""
    refs = references if len(references) > 1 else references * 10
    if rule == "textvqa":
        refs, pred = [_textvqa(r) for r in refs], _textvqa(prediction)
    elif rule == "normalized" or (rule == "vqaeval" and len(set(_clean(r) for r in refs)) > 1):
        refs, pred = [normalize(r) for r in refs], normalize(prediction)
    elif rule == "vqaeval":
        refs, pred = [_clean(r) for r in refs], _clean(prediction)
    else:
        raise ValueError(f"unknown VQA rule {rule!r}; rules: {', '.join(RULES)}")
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def scorer(rule: str):
    """``score(questions, predictions)`` under ``rule``."""

    def score(questions: list[dict], predictions: dict[str, str]) -> dict:
        per = [accuracy(predictions[q["question_id"]], q.get("answers") or [q["answer"]], rule) for q in questions]
        return {"accuracy": 100 * sum(per) / len(per), "n": len(per), "rule": rule}

    return score


score = scorer("normalized")

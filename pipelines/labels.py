"""Finding text → class label, negation- and synonym-aware; and where a label came from.

``classify_finding(text, free_text=True) -> LabelDecision(label, code, reason)``:

- blank, "todo", "unknown", "unlabeled" → ``unlabeled`` (kept, never trained on);
- COVID-19 in any spelling (COVID-19, COVID 19, COVID19, COVID, SARS-CoV-2, 2019-nCoV, novel
  coronavirus 2019, coronavirus disease 2019), affirmed → ``covid19`` (co-findings such as ARDS or
  a bacterial co-infection do not change that);
- COVID-19 negated or ruled out ("COVID-19 negative", "not COVID-19", "non-COVID pneumonia",
  "negative for SARS-CoV-2", "COVID-19 ruled out") is NEVER covid19: the rest of the text decides,
  and when the rest says nothing ("COVID-19 negative" alone) the string is rejected, since normal
  and other pneumonia cannot be told apart;
- normal / healthy / no finding / unremarkable / no acute findings → ``normal``;
- a pneumonia, an organism (Streptococcus, Klebsiella, Pneumocystis, Legionella, influenza, ...),
  SARS (2003; "SARS" without "CoV-2"), MERS, ARDS, lipoid or aspiration pneumonia → ``other_pneumonia``;
- anything still ambiguous is rejected with code ``ambiguous-label`` and a reason, never guessed:
  uncertain COVID-19 ("suspected", "probable", "possible", "rule out", "?", "pending"), alternatives
  ("COVID-19 vs bacterial pneumonia", "... or ..."), contradictions ("COVID-19, normal"), bare
  "coronavirus" (which one?), bare "negative"/"positive", and text naming none of the classes.

With ``free_text=False`` (a labelled index such as vitals.csv) only the class names and their exact
spellings are accepted; anything else is ``unknown-label``.

``normalise_label_source(value)`` → one of ``rtpcr``, ``radiologist``, ``publication``, ``unknown``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CLASSES = ("covid19", "other_pneumonia", "normal")
UNLABELED = "unlabeled"
LABEL_SOURCES = ("rtpcr", "radiologist", "publication", "unknown")

_BLANK = {"", "nan", "none", "todo", "tbd", "unlabeled", "unlabelled", "unknown", "n/a", "na"}
_EXACT = {"covid19": "covid19", "covid-19": "covid19", "other_pneumonia": "other_pneumonia",
          "other pneumonia": "other_pneumonia", "pneumonia": "other_pneumonia", "normal": "normal",
          "no finding": "normal"}

_COVID = re.compile(
    r"\b(?:covid\s*19|covid|sars\s*cov\s*2|2019\s*ncov|ncov\s*2019|ncov|novel\s+coronavirus(?:\s+2019)?|"
    r"coronavirus\s+disease(?:\s+2019)?|wuhan\s+coronavirus)(?:\s+(?:pneumonia|infection|disease))?\b")
_NORMAL = re.compile(
    r"\b(?:no\s+findings?|normal(?:\s+(?:chest|study|radiograph|cxr|x\s*ray))?|healthy(?:\s+control)?|"
    r"unremarkable|no\s+acute\s+(?:cardiopulmonary\s+)?(?:findings?|process|disease|abnormalit(?:y|ies))|"
    r"clear\s+lungs|no\s+abnormalit(?:y|ies))\b")
_OTHER = re.compile(
    r"\b(?:pneumonias?|pneumonitis|bacterial|viral|fungal|streptococc\w*|strep|staphylococc\w*|mrsa|"
    r"klebsiella|pneumocystis|pcp|pjp|legionella|mycoplasma|chlamydo?phila|haemophilus|e\s*coli|escherichia|"
    r"pseudomonas|influenza|flu|h1n1|varicella|herpes|rsv|adenovirus|aspergill\w*|nocardia|tuberculosis|tb|"
    r"sars(?!\s*cov\s*2)(?:\s*cov(?:\s*1)?)?|mers(?:\s*cov)?|ards|lipoid|aspiration|bronchopneumonia)\b")
_CORONA_BARE = re.compile(r"\bcoronavirus\b")

_NEG_PRE = re.compile(r"\b(?:no|not|non|without|negative\s+for|neg\s+for|free\s+of|absence\s+of|"
                      r"ruled\s+out|excluded|exclusion\s+of)\s*$")
_TEST = r"(?:(?:rt\s*)?pcr\s+|test(?:ing)?\s+|swab\s+|result\s+|antigen\s+)*"
_NEG_POST = re.compile(r"^\s*" + _TEST + r"(?:negative|neg|ruled\s+out|excluded|not\s+detected|not\s+confirmed|"
                       r"was\s+ruled\s+out|was\s+excluded)\b")
_UNC_PRE = re.compile(r"\b(?:suspected|suspect|suspicion\s+of|suspicious\s+for|probable|probably|possible|"
                      r"possibly|presumed|presumptive|likely|query|questionable|rule\s+out|r\s*/\s*o|"
                      r"concern\s+for|cannot\s+exclude|consistent\s+with\s+possible)\s*$")
_UNC_POST = re.compile(r"^\s*" + _TEST + r"(?:\?|suspected|pending|not\s+excluded|cannot\s+be\s+excluded|to\s+be\s+ruled\s+out|"
                       r"unconfirmed|awaiting|possible|probable)")
_ALTERNATIVES = re.compile(r"\b(?:vs|versus|or|differential)\b|\bd\s*/\s*d\b")
_CLAUSE = re.compile(r"[,;|+]|\s/\s|\band\b|\bwith\b")
_BARE_RESULT = re.compile(r"^\s*(?:negative|positive|neg|pos|detected|not\s+detected)\s*$")


@dataclass(frozen=True)
class LabelDecision:
    label: str | None  # a class, "unlabeled", or None (rejected)
    code: str | None = None  # "ambiguous-label" / "unknown-label" when rejected
    reason: str | None = None


def _normalise(text: str) -> str:
    s = text.lower().replace("\u2013", "-").replace("\u2014", "-").replace("_", " ")
    s = re.sub(r"(?<=\w)\.(?=\w)", "", s)  # e.coli → ecoli is handled by "e\s*coli"
    s = s.replace("-", " ")
    s = re.sub(r"\s+", " ", s).strip()
    # "non-COVID pneumonia": the pneumonia is the head noun, COVID-19 the negated modifier
    return re.sub(r"\bnon\s+(covid\s*19|covid|sars\s*cov\s*2)\s+(pneumonia|pneumonitis)\b", r"\2, not \1", s)


def _window_before(clause: str, start: int) -> str:
    before = clause[:start]
    before = before.split("\x00")[-1]  # a cue before another concept belongs to that one
    return " ".join(before.split()[-4:])


def _window_after(clause: str, end: int) -> str:
    after = clause[end:].split("\x00")[0]
    return " " + " ".join(after.split()[:4]) if after.strip() else after


def _mentions(clause: str, pattern: re.Pattern) -> tuple[str, list[str]]:
    """(clause with the mentions masked, ["affirmed"|"negated"|"uncertain" per mention])."""
    states: list[str] = []
    out, pos = [], 0
    for m in pattern.finditer(clause):
        pre, post = _window_before(clause, m.start()), _window_after(clause, m.end())
        if _NEG_PRE.search(pre) or _NEG_POST.search(post):
            states.append("negated")
        elif _UNC_PRE.search(pre) or _UNC_POST.search(post):
            states.append("uncertain")
        else:
            states.append("affirmed")
        out.append(clause[pos:m.start()] + " \x00 ")
        pos = m.end()
    out.append(clause[pos:])
    return "".join(out), states


def _reject(reason: str) -> LabelDecision:
    return LabelDecision(None, "ambiguous-label", reason)


def classify_finding(finding: Any, free_text: bool = True) -> LabelDecision:
    """The label for a finding string (see the module docstring), or a rejection with its reason."""
    raw = "" if finding is None else str(finding).strip()
    low = raw.lower()
    if low in _BLANK:
        return LabelDecision(UNLABELED)
    if raw in CLASSES:
        return LabelDecision(raw)
    if low.replace("-", " ").replace("_", " ") in {k.replace("-", " ").replace("_", " ") for k in _EXACT}:
        return LabelDecision(_EXACT[next(k for k in _EXACT if k.replace("-", " ").replace("_", " ")
                                         == low.replace("-", " ").replace("_", " "))])
    if not free_text:
        return LabelDecision(None, "unknown-label",
                             f"label {raw!r} is not one of covid19, other_pneumonia, normal, unlabeled")
    s = _normalise(raw)
    if _BARE_RESULT.match(s):
        return _reject(f"finding {raw!r} is a bare test result: positive/negative for what is not stated")
    if _ALTERNATIVES.search(s):
        sides = [x for x in _ALTERNATIVES.split(s) if x.strip()]
        labels = {_classify_normalised(x, raw).label for x in sides}
        if len(sides) >= 2 and len(labels) == 1 and None not in labels:
            return LabelDecision(labels.pop())
        return _reject(f"finding {raw!r} lists alternatives (vs/or/differential) of different classes: "
                       "not one diagnosis")
    return _classify_normalised(s, raw)


def _classify_normalised(s: str, raw: str) -> LabelDecision:
    covid, normal, other = [], [], []
    for clause in _CLAUSE.split(s):
        c = clause.strip()
        if not c:
            continue
        c, st = _mentions(c, _COVID)
        covid += st
        c, st = _mentions(c, _NORMAL)
        normal += st
        c, st = _mentions(c, _OTHER)
        other += st
        if not st and _CORONA_BARE.search(c) and not covid:
            return _reject(f"finding {raw!r} says 'coronavirus' without saying which (COVID-19, SARS, MERS, "
                           "a seasonal coronavirus)")
    if "uncertain" in covid:
        return _reject(f"finding {raw!r}: COVID-19 is suspected/possible/pending, not confirmed")
    if "affirmed" in covid and "negated" in covid:
        return _reject(f"finding {raw!r} both affirms and negates COVID-19")
    normal_aff = "affirmed" in normal
    other_aff = "affirmed" in other
    if "affirmed" in covid:
        if normal_aff:
            return _reject(f"finding {raw!r} says COVID-19 and normal")
        return LabelDecision("covid19")
    if "uncertain" in other and not other_aff and not normal_aff:
        return _reject(f"finding {raw!r}: the pneumonia is suspected/possible, not confirmed")
    if other_aff and normal_aff:
        return _reject(f"finding {raw!r} says both a pneumonia/organism and normal")
    if other_aff:
        return LabelDecision("other_pneumonia")
    if normal_aff:
        return LabelDecision("normal")
    if "negated" in covid:
        return _reject(f"finding {raw!r} rules COVID-19 out but does not say whether the image is normal or "
                       "shows another pneumonia")
    if normal or other:
        return _reject(f"finding {raw!r} only negates findings; the class is not stated")
    return _reject(f"finding {raw!r} names none of covid19, other pneumonia (or an organism), normal")


def map_finding(finding: Any, free_text: bool = True) -> str | None:
    """The label, or None when the finding is rejected (see ``classify_finding`` for the reason)."""
    return classify_finding(finding, free_text).label


_SOURCE_SYNONYMS = {
    "rtpcr": "rtpcr", "rt-pcr": "rtpcr", "rt pcr": "rtpcr", "pcr": "rtpcr", "naat": "rtpcr", "lab": "rtpcr",
    "laboratory": "rtpcr", "radiologist": "radiologist", "radiology": "radiologist", "reader": "radiologist",
    "radiologist-read": "radiologist", "publication": "publication", "paper": "publication",
    "case report": "publication", "literature": "publication", "published": "publication",
    "unknown": "unknown", "": "unknown",
}
_PCR_POSITIVE = re.compile(r"(?:rt\s*-?\s*pcr|\bpcr\b|swab)[^.]{0,60}\bpositive\b|\bpositive\b[^.]{0,60}(?:rt\s*-?\s*pcr|\bpcr\b)",
                           re.IGNORECASE)
_PCR_NEGATIVE = re.compile(r"(?:rt\s*-?\s*pcr|\bpcr\b|swab)[^.]{0,60}\bnegative\b|\bnegative\b[^.]{0,60}(?:rt\s*-?\s*pcr|\bpcr\b)",
                           re.IGNORECASE)


def normalise_label_source(value: Any) -> str:
    """One of rtpcr, radiologist, publication, unknown (an unrecognised value is ``unknown``)."""
    s = "" if value is None else str(value).strip().lower()
    if s in ("nan", "none"):
        s = ""
    return _SOURCE_SYNONYMS.get(s, "unknown")


def public_label_source(label: str | None, notes: str) -> str:
    """The public collection's labels come from the publications/case reports each image is taken from
    (``publication``); ``rtpcr`` when the case's notes report an RT-PCR result consistent with the label."""
    notes = notes or ""
    if label == "covid19" and _PCR_POSITIVE.search(notes):
        return "rtpcr"
    if label in ("normal", "other_pneumonia") and _PCR_NEGATIVE.search(notes):
        return "rtpcr"
    return "publication"

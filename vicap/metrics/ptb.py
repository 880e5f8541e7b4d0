"""English metric tokens that match pycocoevalcap's PTB pipeline, without Java.

pycocoevalcap tokenizes English captions with Stanford CoreNLP 3.4.1's PTBTokenizer
(`-preserveLines -lowerCase`) and then drops the tokens in its `PUNCTUATIONS` list. This module
reproduces that output for caption-like text in pure Python, so English scores equal the standard
COCO pipeline's (tests/test_metrics_english.py compares both on a set of captions, token for token).

What the PTB tokenizer does, and so what this does:
- lowercases; splits punctuation off words (`dog.` -> `dog .`), but keeps it inside numbers and
  abbreviations (`3.5`, `1,000`, `10:30`, `e.g.`, `u.s.`) and inside hyphenated words (`black-and-white`);
- splits clitics: `man's` -> `man 's`, `isn't` -> `is n't`, `can't` -> `ca n't`, `cannot` -> `can not`,
  `gonna` -> `gon na`;
- turns quotes into `` and '' (both dropped), dashes into `--` (dropped), `…` into `...` (dropped);
- turns brackets into -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-. pycocoevalcap's drop list names them in
  upper case while the tokenizer lowercases, so **they stay in as words**; reproduced deliberately,
  since equality with the published pipeline is the point.
"""

from __future__ import annotations

import re
import unicodedata

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, verbatim (the bracket names never match after
# -lowerCase; see the module docstring).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words PTB splits in two (from CoreNLP's PTBLexer).
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
    "'tis": ["'t", "is"],
    "'twas": ["'t", "was"],
    "y'all": ["y'", "all"],
}
_CLITICS = frozenset(["'s", "'re", "'ve", "'ll", "'d", "'m", "n't"])
# Abbreviations PTB keeps with their period (a subset of PTBLexer's list: those seen in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft vs etc inc co corp ltd jan feb mar apr jun jul aug sep sept "
    "oct nov dec ave blvd rd no gen col lt sgt capt".split()
)
_BRACKET_NAMES = frozenset(_BRACKETS.values())
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m|n't)$")
_ACRONYM = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$|^[a-z]\.(?:[a-z]\.)+$")
# Characters PTB separates from words (outside numbers, see _split_word).
_ALWAYS_SPLIT = re.compile(r"([;*])")
_NUMBERISH = re.compile(r"^[\d.,:/]+$")


def _normalize_quotes_and_dashes(text: str) -> str:
    text = text.replace("\u2026", " ... ")
    text = re.sub("[\u201c\u201d\u201e\u00ab\u00bb]", ' " ', text)
    text = re.sub("(?<=[^\\W_])[\u2019\u2018](?=[^\\W_])", "'", text)  # curly apostrophe inside a word
    text = re.sub("[\u2018\u2019\u201a]", " ' ", text)
    text = re.sub("[\u2013\u2014\u2015]", " -- ", text)
    return text


def _leading(tok: str) -> tuple[list[str], str]:
    """Leading punctuation split off one chunk: (tokens in front, the rest)."""
    front: list[str] = []
    while tok:
        if tok.startswith("``") or tok.startswith("''"):
            front.append("``")
            tok = tok[2:]
        elif tok[0] == '"':
            front.append("``")
            tok = tok[1:]
        elif tok[0] in "`":
            front.append("`")
            tok = tok[1:]
        elif tok[0] == "'" and len(tok) > 1 and tok[1].isalpha() and tok not in ("'n'", "'em"):
            if tok in _SPLIT_WORDS:
                break
            front.append("`")
            tok = tok[1:]
        elif tok[0] in _BRACKETS:
            front.append(_BRACKETS[tok[0]])
            tok = tok[1:]
        elif tok[0] == "$":
            front.append("$")
            tok = tok[1:]
        elif tok.startswith("--"):
            front.append("--")
            tok = tok[2:]
        elif tok.startswith("...") and len(tok) > 3:
            front.append("...")
            tok = tok[3:]
        elif tok[0] in ",;:?!/-" and len(tok) > 1 and not tok[1].isdigit():
            front.append(tok[0])
            tok = tok[1:]
        else:
            break
    return front, tok


def _trailing(tok: str) -> tuple[str, list[str]]:
    """Trailing punctuation split off one chunk: (the rest, tokens behind)."""
    back: list[str] = []
    while tok:
        if tok.endswith("''") and len(tok) > 2:
            back.insert(0, "''")
            tok = tok[:-2]
        elif tok.endswith('"'):
            back.insert(0, "''")
            tok = tok[:-1]
        elif tok[-1] in _BRACKETS and len(tok) > 1:
            back.insert(0, _BRACKETS[tok[-1]])
            tok = tok[:-1]
        elif tok.endswith("...") and len(tok) > 3:
            back.insert(0, "...")
            tok = tok[:-3]
        elif re.search(r"[?!]+$", tok) and len(tok) > 1 and not re.fullmatch(r"[?!]+", tok):
            m = re.search(r"[?!]+$", tok)
            back.insert(0, m.group())
            tok = tok[: m.start()]
        elif tok[-1] in ",;:%$" and len(tok) > 1:
            back.insert(0, tok[-1])
            tok = tok[:-1]
        elif tok[-1] == "/" and len(tok) > 1:
            back.insert(0, "/")
            tok = tok[:-1]
        elif tok[-1] == "-" and len(tok) > 1 and tok != "--":
            back.insert(0, "-")
            tok = tok[:-1]
        elif tok[-1] == "'" and len(tok) > 1 and tok not in ("'n'",):
            # closing single quote or plural possessive: "kids'" -> "kids '"
            back.insert(0, "'")
            tok = tok[:-1]
        elif tok[-1] == "." and len(tok) > 1:
            if tok.endswith("...") or tok == ".." or _ACRONYM.match(tok) or tok[:-1] in _ABBREVIATIONS:
                break  # the period belongs to the word (PTB adds a sentence-final "." after it)
            back.insert(0, ".")  # "shirt.." -> "shirt . ." takes two rounds
            tok = tok[:-1]
        else:
            break
    return tok, back


def _core(tok: str) -> list[str]:
    """What is left of a chunk once its punctuation is split off: contractions and clitics."""
    if not tok:
        return []
    if tok in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[tok])
    if tok == "..":
        return [".", "."]
    if _NUMBERISH.match(tok):
        return [tok]
    m = _CLITIC.match(tok)
    return [m.group(1), m.group(2)] if m and m.group(1) != "'" else [tok]


def _split_word(tok: str) -> list[str]:
    """One whitespace-separated chunk -> PTB tokens (lowercased input)."""
    if tok in _BRACKET_NAMES or tok in _CLITICS:
        return [tok]
    front, tok = _leading(tok)
    tok, back = _trailing(tok)
    return front + _core(tok) + back


def ptb_tokens(text: str) -> list[str]:
    """PTB tokens of one caption, lowercased, with pycocoevalcap's punctuation tokens dropped."""
    text = unicodedata.normalize("NFC", text).replace("\n", " ").lower()
    text = _normalize_quotes_and_dashes(text)
    for ch, name in _BRACKETS.items():
        text = text.replace(ch, f" {name} ")
    text = _ALWAYS_SPLIT.sub(r" \1 ", text)
    text = re.sub(r"\.{3,}", " ... ", text)
    text = re.sub(r"(?<!\d),|,(?!\d)", " , ", text)  # commas split off unless inside a number
    text = re.sub(r"([#<])(?=\d)", r"\1 ", text)  # "#1" -> "# 1", "<3" -> "< 3"
    text = re.sub(r"(^|\s)(\d+) (\d+/\d+)(?=\s|$)", "\\1\\2\u00a0\\3", text)  # "3 1/2": one token in PTB
    # "&" is its own token between words ("a & b") but stays inside "at&t"
    text = re.sub(r"(?<=\s)&|&(?=\s)", " & ", text)
    tokens: list[str] = []
    for chunk in re.split(r"[^\S\u00a0]+", text):  # whitespace, but not the no-break space above
        tokens += _split_word(chunk)
    return [t for t in tokens if t and t not in PTB_PUNCTUATIONS]

"""The baseline's vocabulary, built from the normalized, segmented training captions.

Captions become tokens exactly as the metrics see them (the language's normalizer, the recipe's
segmentation, lowercased, punctuation removed), so the baseline is neither helped nor hurt by
tokenization the metrics ignore. Two kinds:

- `word`: one id per token seen at least `min_count` times; rarer tokens become <unk>.
- `sentencepiece`: a unigram SentencePiece model trained on the same token text (its .model file is
  a protobuf, not a pickle).

Ids 0-3 are <pad>, <bos>, <eos>, <unk> in both. Saved in the run directory as `vocab.json` (plus
`spm.model`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data_prep.languages import get_language
from vicap.errors import MissingFileError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def caption_tokens(captions: list[str], language: str, segment: str) -> list[list[str]]:
    """Normalized, segmented (`segment` = 'none' or 'word'), lowercased tokens without punctuation."""
    lang = get_language(language)
    return lang.tokens_of_segmented(
        lang.segment_many([lang.normalize(c) for c in captions], segment), segment
    )


class Vocab:
    """Token <-> id for the word kind; the sentencepiece kind overrides encode/decode."""

    kind = "word"

    def __init__(self, tokens: list[str]) -> None:
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, token_lists: list[list[str]], min_count: int) -> Vocab:
        counts = Counter(t for toks in token_lists for t in toks)
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids: list[int]) -> str:
        """Ids -> token text (segmented form); specials are dropped."""
        return " ".join(self.tokens[i] for i in ids if i >= len(SPECIALS) and i < len(self.tokens))

    def save(self, run_dir: Path) -> None:
        data = {"type": self.kind, "tokens": self.tokens}
        (Path(run_dir) / "vocab.json").write_text(
            json.dumps(data, ensure_ascii=False, indent=0), encoding="utf-8"
        )


class SentencePieceVocab(Vocab):
    kind = "sentencepiece"
    MODEL = "spm.model"

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.get_piece_size()
        self.tokens = [self.sp.id_to_piece(i) for i in range(n)]
        self.tokens[: len(SPECIALS)] = SPECIALS
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def train(cls, token_lists: list[list[str]], size: int, run_dir: Path) -> SentencePieceVocab:
        import sentencepiece as spm

        prefix = Path(run_dir) / cls.MODEL[: -len(".model")]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([" ".join(t) for t in token_lists if t]),
            model_prefix=str(prefix),
            vocab_size=size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=PAD,
            bos_id=BOS,
            eos_id=EOS,
            unk_id=UNK,
            hard_vocab_limit=False,  # a small caption set may not support `size` pieces
            minloglevel=2,
        )
        return cls(prefix.with_suffix(".model"))

    def encode(self, tokens: list[str]) -> list[int]:
        return list(self.sp.encode(" ".join(tokens)))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i >= len(SPECIALS)])

    def save(self, run_dir: Path) -> None:
        data = {"type": self.kind, "model": self.model_file.name}
        (Path(run_dir) / "vocab.json").write_text(json.dumps(data, indent=0), encoding="utf-8")


def build_vocab(token_lists: list[list[str]], cfg, run_dir: Path) -> Vocab:
    """The vocabulary a recipe's `[vocab]` section asks for, built from training tokens and saved."""
    vocab = (
        Vocab.build(token_lists, cfg.min_count)
        if cfg.type == "word"
        else SentencePieceVocab.train(token_lists, cfg.size, run_dir)
    )
    vocab.save(run_dir)
    return vocab


def load_vocab(run_dir: Path) -> Vocab:
    path = Path(run_dir) / "vocab.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: the run's vocabulary is missing")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["type"] == "word":
        return Vocab(data["tokens"])
    return SentencePieceVocab(Path(run_dir) / data["model"])

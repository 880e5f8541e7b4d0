"""Language registry and the Vietnamese normalizer / segmenter, table-driven."""

import unicodedata

import pytest

from data_prep import text as T
from data_prep.languages import (
    LANGUAGES,
    Language,
    get_language,
    normalize,
    register_language,
    segment,
    segment_many,
)
from data_prep.vietnamese import place_tones


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


# (input, expected normalize(text, "vi"))
VI_NORMALIZE = [
    # decomposed Unicode (macOS, some IMEs) -> NFC
    (nfd("Một người đàn ông đang chơi quần vợt."), "Một người đàn ông đang chơi quần vợt."),
    (nfd("Cầu thủ bóng đá mặc áo đỏ"), "Cầu thủ bóng đá mặc áo đỏ"),
    # both tone styles end up as hoà / khoẻ / thuỷ (see data_prep.vietnamese)
    ("Hòa bình", "Hoà bình"),
    ("hoà bình", "hoà bình"),
    ("cô ấy khỏe mạnh", "cô ấy khoẻ mạnh"),
    ("thúy kiều", "thuý kiều"),
    ("Thủy và Thuỷ", "Thuỷ và Thuỷ"),
    ("tòa nhà và toà nhà cao tầng", "toà nhà và toà nhà cao tầng"),
    ("HÒA BÌNH, KHỎE", "HOÀ BÌNH, KHOẺ"),
    ("lũy tre, luỹ tre", "luỹ tre, luỹ tre"),
    ("ủy ban, hóa đơn, họa sĩ", "uỷ ban, hoá đơn, hoạ sĩ"),
    (nfd("hòa thuận"), "hoà thuận"),
    # syllables whose placement does not depend on the style stay as they are
    ("hoàng hôn, quyết tâm, ngoài sân, khuya, xoáy", "hoàng hôn, quyết tâm, ngoài sân, khuya, xoáy"),
    ("quý khách, quỳ gối, quà", "quý khách, quỳ gối, quà"),
    ("khuỷu tay, hoặc, thuế", "khuỷu tay, hoặc, thuế"),
    # whitespace and punctuation spacing
    ("  Hai   con chó\tđang chạy \n", "Hai con chó đang chạy"),
    ("Một con mèo , đang ngủ .", "Một con mèo, đang ngủ."),
    ("bóng đá,bóng chuyền", "bóng đá, bóng chuyền"),
    ("người đàn ông ( bên trái ) đứng", "người đàn ông (bên trái) đứng"),
    ("Có ai không ?", "Có ai không?"),
    ("chữ\u200bẩn\ufeff", "chữẩn"),
    # numbers are words: decimal comma, thousands dot, times, scores
    ("giá 2,5 triệu , 10.000 đồng", "giá 2,5 triệu, 10.000 đồng"),
    ("lúc 9:30 tỉ số 2-1", "lúc 9:30 tỉ số 2-1"),
    # names and foreign words are never changed
    ("Nguyễn Văn Huy ở TP.HCM", "Nguyễn Văn Huy ở TP.HCM"),
    ("Đội Manchester United thi đấu", "Đội Manchester United thi đấu"),
    ("buy toy", "buy toy"),
    ("", ""),
]


@pytest.mark.parametrize(("raw", "expected"), VI_NORMALIZE)
def test_vi_normalize(raw, expected):
    out = normalize(raw, "vi")
    assert out == expected
    assert unicodedata.is_normalized("NFC", out)
    assert normalize(out, "vi") == out  # idempotent


def test_vi_normalize_never_changes_words():
    raw = "Hoà  thuý , khoẻ người   đàn ông ."
    out = normalize(raw, "vi")
    strip = lambda s: [place_tones(w) for w in T.strip_punctuation(T.nfc(s)).split()]  # noqa: E731
    assert strip(raw) == strip(out)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Hòa Bình KHỎE", "hoà bình khoẻ"), ("Đà Nẵng", "đà nẵng"), (nfd("Ông Ánh"), "ông ánh")],
)
def test_vi_lowercase(raw, expected):
    assert normalize(raw, "vi", lowercase=True) == expected


VI_SEGMENT = [
    ("Một người đàn ông đang chơi quần vợt.", "Một người đàn_ông đang chơi quần_vợt ."),
    ("Hai cầu thủ bóng đá đang tranh bóng", "Hai cầu_thủ bóng_đá đang tranh bóng"),
    ("Nguyễn Văn An đi Hà Nội năm 2020.", "Nguyễn_Văn_An đi Hà_Nội năm 2020 ."),
]


@pytest.mark.parametrize(("raw", "expected"), VI_SEGMENT)
def test_vi_word_segmentation(raw, expected):
    vi = get_language("vi")
    assert segment(raw, "vi", "word") == expected
    assert vi.desegment(expected) == raw
    assert segment(raw, "vi", "none") == raw


def test_segment_many_and_empty():
    out = segment_many(["đàn ông", "", "giải thưởng hoà bình"], "vi", "word")
    assert out == ["đàn_ông", "", "giải_thưởng hoà_bình"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # underthesea's model was trained on this tone style: it only joins these words in it
        ("xây dựng nhà máy thủy điện", "xây_dựng nhà_máy thuỷ_điện"),
        ("văn hóa", "văn_hoá"),
        ("sức khỏe", "sức_khoẻ"),
        ("tòa án", "toà_án"),
    ],
)
def test_segmenter_uses_our_tone_style(raw, expected):
    assert segment(normalize(raw, "vi"), "vi", "word") == expected


@pytest.mark.parametrize(
    ("text", "level", "tokens"),
    [
        (
            "Một người đàn ông, đang chơi quần vợt.",
            "syllable",
            ["một", "người", "đàn", "ông", "đang", "chơi", "quần", "vợt"],
        ),
        (
            "Một người đàn ông, đang chơi quần vợt.",
            "word",
            ["một", "người", "đàn_ông", "đang", "chơi", "quần_vợt"],
        ),
        ("Hòa bình", "syllable", ["hoà", "bình"]),
        (nfd("Giá 2,5 triệu!"), "syllable", ["giá", "2,5", "triệu"]),
        ("ai?", "char", ["a", "i"]),
    ],
)
def test_vi_metric_tokens(text, level, tokens):
    assert get_language("vi").metric_tokens(text, level) == tokens


def test_unknown_mode_and_level():
    vi = get_language("vi")
    with pytest.raises(ValueError, match="known: none, char, word"):
        vi.segment("x", "bpe")
    with pytest.raises(ValueError, match="no metric level"):
        vi.metric_tokens("x", "morpheme")


def test_english():
    en = get_language("en")
    assert en.normalize("A dog , running .") == "A dog, running."
    assert en.segment("a dog_house", "word") == "a dog_house"
    assert en.metric_tokens("A dog, running!") == ["a", "dog", "running"]


@pytest.mark.parametrize(
    ("code", "text", "normalized", "tokens"),
    [
        (
            "fr",
            "Bonjour  le monde !",
            "Bonjour le monde !",
            ["bonjour", "le", "monde"],
        ),  # French spacing kept
        ("ru", nfd("Ёжик  в тумане"), "Ёжик в тумане", ["ёжик", "в", "тумане"]),
        ("fa", "می\u200cخواهم", "می\u200cخواهم", ["می\u200cخواهم"]),  # ZWNJ is part of the word
    ],
)
def test_generic_fallback(code, text, normalized, tokens):
    lang = get_language(code)
    assert lang.code == code and code not in LANGUAGES
    assert lang.normalize(text) == normalized
    assert lang.metric_tokens(text) == tokens
    assert lang.unexpected_scripts(text) == set()
    with pytest.raises(ValueError, match="no segmentation mode 'word'"):
        lang.segment(text, "word")


def test_generic_char_level_for_unspaced_scripts():
    assert get_language("ja").metric_tokens("犬が走る。", "char") == ["犬", "が", "走", "る"]


def test_register_language(monkeypatch):
    monkeypatch.setattr("data_prep.languages.LANGUAGES", dict(LANGUAGES))
    lang = Language(
        code="xx",
        name="Test",
        normalizer=str.upper,
        segmenters={"word": lambda ts: [t.replace(" ", "+") for t in ts]},
    )
    register_language(lang)
    assert get_language("xx") is lang
    assert normalize("ab", "xx") == "AB"
    assert segment("a b", "xx", "word") == "a+b"
    with pytest.raises(ValueError, match="already registered"):
        register_language(lang)
    with pytest.raises(ValueError, match="unknown mode"):
        Language(code="yy", name="bad", metric_levels={"word": "word"})


def test_scripts_check():
    vi = get_language("vi")
    assert vi.unexpected_scripts("Một con mèo 2") == set()
    assert vi.unexpected_scripts("Một con mèo 猫") == {"CJK"}


def test_protocol_records_segmenter():
    p = get_language("vi").protocol("word")
    assert p["segmentation"] == "word" and p["segmenter"].startswith("underthesea")
    assert get_language("vi").protocol("syllable")["segmenter"] == ""

"""Phonemization follows the released model's scheme and stays inside its 392-token vocabulary."""

import pytest

from phonetune.data.locales import (
    DEFAULT_LOCALES,
    LOCALES,
    foreign_scripts,
    get_locale,
    parse_locales,
)
from phonetune.data.phonemize import PhonemeCache, normalize_phones, phonemize_batch
from phonetune.data.vocab import load_released_vocab

MODEL_CARD_SENTENCE = (
    "mister quilter is the apostle of the middle classes and we are glad to welcome his gospel"
)
# espeak-ng 1.52 (the espeakng-loader wheel), en-us, no stress, phones separated by spaces.
MODEL_CARD_PHONES = (
    "m ɪ s t ɚ k w ɪ l t ɚ ɹ ɪ z ð ɪ ɐ p ɑː s əl ʌ v ð ə m ɪ d əl k l æ s ᵻ z æ n d w iː ɑːɹ "
    "ɡ l æ d t ə w ɛ l k ʌ m h ɪ z ɡ ɑː s p əl"
)

SAMPLE_TEXT = {
    "en": "she quickly bought three pairs of yellow shoes",
    "fr": "le petit garçon mange une pomme rouge dans la cuisine",
    "de": "der schnelle braune Fuchs springt über den faulen Hund",
    "es": "el niño come una manzana roja en la cocina",
    "it": "il ragazzo mangia una mela rossa in cucina",
    "pl": "chłopiec je czerwone jabłko w kuchni",
    "ru": "мальчик ест красное яблоко на кухне",
    "tr": "çocuk mutfakta kırmızı bir elma yiyor",
    "sv-SE": "pojken äter ett rött äpple i köket",
    "zh-CN": "男孩在厨房里吃一个红苹果",
}


def test_model_card_sentence_gives_expected_phones():
    assert phonemize_batch([MODEL_CARD_SENTENCE], "en-us") == [MODEL_CARD_PHONES]


def test_no_phone_is_glued_across_words():
    # With strip=True phonemizer would glue "ɚ" (end of mister) to "k" (start of quilter).
    phones = phonemize_batch(["mister quilter"], "en-us")[0].split()
    assert "ɚk" not in phones and phones[4:6] == ["ɚ", "k"]


@pytest.mark.parametrize("locale", DEFAULT_LOCALES)
def test_every_default_locale_stays_in_released_vocab(locale):
    released = load_released_vocab()
    phones = phonemize_batch([SAMPLE_TEXT[locale]], get_locale(locale).espeak)[0].split()
    assert len(phones) > 5
    assert [p for p in phones if p not in released] == []


def test_multi_character_units_and_tones_are_single_tokens():
    mandarin = phonemize_batch(["你好"], "cmn")[0].split()
    assert any(len(token) > 1 and token[-1].isdigit() for token in mandarin), mandarin  # i5, ɑu2
    english = phonemize_batch(["my child"], "en-us")[0].split()
    assert "aɪ" in english and "tʃ" in english


def test_backends_of_several_languages_do_not_leak_into_each_other():
    alone = phonemize_batch(["bonjour"], "fr-fr")
    phonemize_batch(["hello"], "en-us")
    assert phonemize_batch(["bonjour"], "fr-fr") == alone


def test_language_switch_policies():
    text = "j'adore le football et le weekend"
    assert phonemize_batch([text], "fr-fr", "remove-flags")[0]
    kept = phonemize_batch([text], "fr-fr", "remove-utterance")[0]
    # espeak switches to English for "football"/"weekend" in French: the utterance is dropped.
    assert kept == ""


def test_normalize_phones_composes_squeezes_and_undoes_drift():
    assert normalize_phones(" a\u0303  b ") == "\u00e3 b"
    assert phonemize_batch(["rossa"], "it") == ["r o s s a"]


def test_cache_round_trip(tmp_path):
    cache = PhonemeCache(tmp_path / "p.sqlite", "1.52.0")
    assert cache.lookup(["hello"], "en-us", "remove-flags") == {}
    cache.store({"hello": "h ə l oʊ"}, "en-us", "remove-flags")
    assert cache.lookup(["hello"], "en-us", "remove-flags") == {"hello": "h ə l oʊ"}
    assert cache.lookup(["hello"], "fr-fr", "remove-flags") == {}
    other_version = PhonemeCache(tmp_path / "p.sqlite", "1.51.0")
    assert other_version.lookup(["hello"], "en-us", "remove-flags") == {}
    assert (cache.hits, cache.misses) == (1, 2)


def test_locale_table_and_errors():
    assert get_locale("sv-SE").espeak == "sv" and get_locale("zh-CN").espeak == "cmn"
    assert get_locale("pa-IN").espeak == "pa"
    with pytest.raises(ValueError, match="xx-YY.*Supported Common Voice locales: .*sv-SE"):
        parse_locales("en,xx-YY")
    assert parse_locales("en, fr,en") == ["en", "fr"]
    assert len(LOCALES) >= 70


def test_foreign_scripts():
    assert foreign_scripts("hello שלום", get_locale("en")) == ["HEBREW"]
    assert foreign_scripts("привет hello", get_locale("ru")) == []
    assert foreign_scripts("你好", get_locale("zh-CN")) == []

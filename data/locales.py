"""The one table from Common Voice locale codes to espeak-ng languages.

Each entry names the espeak-ng language phonemizer uses for the locale and the writing systems
espeak-ng reads for it. Letters of any other script are spelled out letter by letter in English by
espeak-ng (a "Hebrew letter alef" where speech was wanted), so preparation rejects such sentences
instead of training on garbage. Latin letters are always allowed: espeak-ng reads them by switching
language, which the language-switch policy handles.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from phonetune.data.errors import PhonetuneError


@dataclass(frozen=True)
class Locale:
    code: str  # Common Voice locale code, e.g. "sv-SE"
    espeak: str  # espeak-ng language code as phonemizer takes it, e.g. "sv"
    scripts: tuple[str, ...]  # Unicode script names (first word of a letter's Unicode name)


_LATIN = ("LATIN",)
_CYRILLIC = ("CYRILLIC",)
_ARABIC = ("ARABIC",)

# Common Voice locales that espeak-ng (1.51/1.52) supports. Where a locale could take several
# espeak voices, the comment says why this one was chosen.
_TABLE: tuple[Locale, ...] = (
    Locale("af", "af", _LATIN),
    Locale("am", "am", ("ETHIOPIC",)),
    Locale("an", "an", _LATIN),
    Locale("ar", "ar", _ARABIC),
    Locale("as", "as", ("BENGALI",)),  # Assamese is written in the Bengali script
    Locale("az", "az", _LATIN),
    Locale("ba", "ba", _CYRILLIC),
    Locale("be", "be", _CYRILLIC),
    Locale("bg", "bg", _CYRILLIC),
    Locale("bn", "bn", ("BENGALI",)),
    Locale("ca", "ca", _LATIN),
    Locale("cs", "cs", _LATIN),
    Locale("cv", "cv", _CYRILLIC),
    Locale("cy", "cy", _LATIN),
    Locale("da", "da", _LATIN),
    Locale("de", "de", _LATIN),
    Locale("el", "el", ("GREEK",)),
    Locale("en", "en-us", _LATIN),  # most Common Voice English speakers are American
    Locale("eo", "eo", _LATIN),
    Locale("es", "es", _LATIN),
    Locale("et", "et", _LATIN),
    Locale("eu", "eu", _LATIN),
    Locale("fa", "fa", _ARABIC),
    Locale("fi", "fi", _LATIN),
    Locale("fr", "fr-fr", _LATIN),
    Locale("ga-IE", "ga", _LATIN),
    Locale("gn", "gn", _LATIN),
    Locale("he", "he", ("HEBREW",)),
    Locale("hi", "hi", ("DEVANAGARI",)),
    Locale("hu", "hu", _LATIN),
    Locale("hy-AM", "hy", ("ARMENIAN",)),
    Locale("ia", "ia", _LATIN),
    Locale("id", "id", _LATIN),
    Locale("is", "is", _LATIN),
    Locale("it", "it", _LATIN),
    Locale("ja", "ja", ("CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA")),
    Locale("ka", "ka", ("GEORGIAN",)),
    Locale("kk", "kk", _CYRILLIC),
    Locale("kmr", "ku", _LATIN),  # Kurmanji, written in Latin script
    Locale("ko", "ko", ("HANGUL",)),
    Locale("ky", "ky", _CYRILLIC),
    Locale("lt", "lt", _LATIN),
    Locale("ltg", "ltg", _LATIN),
    Locale("lv", "lv", _LATIN),
    Locale("mk", "mk", _CYRILLIC),
    Locale("ml", "ml", ("MALAYALAM",)),
    Locale("mr", "mr", ("DEVANAGARI",)),
    Locale("mt", "mt", _LATIN),
    Locale("ne-NP", "ne", ("DEVANAGARI",)),
    Locale("nl", "nl", _LATIN),
    Locale("or", "or", ("ORIYA",)),
    Locale("pa-IN", "pa", ("GURMUKHI",)),
    Locale("pl", "pl", _LATIN),
    # Our choice: espeak's European Portuguese (pt-br would be the alternative).
    Locale("pt", "pt", _LATIN),
    Locale("quy", "qu", _LATIN),
    Locale("ro", "ro", _LATIN),
    Locale("ru", "ru", _CYRILLIC),
    Locale("sk", "sk", _LATIN),
    Locale("sl", "sl", _LATIN),
    Locale("sq", "sq", _LATIN),
    Locale("sr", "sr", _CYRILLIC + _LATIN),
    Locale("sv-SE", "sv", _LATIN),
    Locale("sw", "sw", _LATIN),
    Locale("ta", "ta", ("TAMIL",)),
    Locale("te", "te", ("TELUGU",)),
    Locale("ti", "ti", ("ETHIOPIC",)),
    Locale("tk", "tk", _LATIN),
    Locale("tn", "tn", _LATIN),
    Locale("tr", "tr", _LATIN),
    Locale("tt", "tt", _CYRILLIC),
    Locale("ug", "ug", _ARABIC),
    Locale("uk", "uk", _CYRILLIC),
    Locale("ur", "ur", _ARABIC),
    Locale("uz", "uz", _LATIN),
    Locale("vi", "vi", _LATIN),
    Locale("yue", "yue", ("CJK",)),
    Locale("zh-CN", "cmn", ("CJK",)),  # Mandarin; espeak's cmn writes tones as digits (i5, ɑu2)
    Locale("zh-HK", "yue", ("CJK",)),  # Common Voice zh-HK is Cantonese
    Locale("zh-TW", "cmn", ("CJK",)),  # Taiwanese Mandarin
)

LOCALES: dict[str, Locale] = {entry.code: entry for entry in _TABLE}

# The default multilingual set of `phonetune synth` and the demo: several scripts and families.
DEFAULT_LOCALES: tuple[str, ...] = (
    "en",
    "fr",
    "de",
    "es",
    "it",
    "pl",
    "ru",
    "tr",
    "sv-SE",
    "zh-CN",
)


class UnsupportedLocaleError(PhonetuneError, ValueError):
    """A locale outside the table: a user mistake, printed by the CLI without a traceback."""


def get_locale(code: str) -> Locale:
    """Look a Common Voice locale up, with an error that lists every supported locale."""
    try:
        return LOCALES[code]
    except KeyError:
        supported = ", ".join(sorted(LOCALES))
        raise UnsupportedLocaleError(
            f"locale {code!r} has no espeak-ng voice in phonetune's table. Supported Common Voice "
            f"locales: {supported}."
        ) from None


def parse_locales(text: str) -> list[str]:
    """Split a comma-separated list of locales and check each one, all errors at once."""
    codes = [part.strip() for part in text.split(",") if part.strip()]
    if not codes:
        raise UnsupportedLocaleError(
            "no locale given: pass a comma-separated list such as en,fr,de"
        )
    unknown = [code for code in codes if code not in LOCALES]
    if unknown:
        supported = ", ".join(sorted(LOCALES))
        raise UnsupportedLocaleError(
            f"unsupported locale(s): {', '.join(unknown)}. Supported Common Voice locales: {supported}."
        )
    return list(dict.fromkeys(codes))


def foreign_scripts(sentence: str, locale: Locale) -> list[str]:
    """Scripts of the letters in `sentence` that espeak-ng would spell out letter by letter."""
    allowed = set(locale.scripts) | {"LATIN"}
    found: set[str] = set()
    for char in sentence:
        if not unicodedata.category(char).startswith("L"):
            continue
        script = unicodedata.name(char, "UNKNOWN").split(" ")[0]
        if script not in allowed:
            found.add(script)
    return sorted(found)

"""`phonetune synth`: a Common Voice release spoken by espeak-ng.

No real corpus can be downloaded where phonetune is developed and tested, so this writes one that
tests, the demo and benchmarks use in its place. It has the layout of a real release, which is
what `phonetune prepare` reads:

    <out>/<locale>/validated.tsv, train.tsv, dev.tsv, test.tsv   (Common Voice's columns)
    <out>/<locale>/clips/common_voice_<locale>_<number>.mp3      (mono, 48 kHz)

Sentences are composed from per-locale word lists (`data/sentences/<locale>.txt`). A "speaker" is
an espeak-ng voice variant with its own rate, pitch and level. As in Common Voice, every speaker
belongs to one split only, and no sentence is shared between splits, so the test set measures
generalisation to new voices and new sentences.

Determinism: every random choice is drawn up front, in the main process, from (seed, locale), so a
locale's data does not depend on which other locales are written. espeak-ng keeps state between
utterances (a pitch-flutter phase, an automatic gain and a rand() that feeds breath noise), so the
same text comes out slightly different depending on what the process spoke before. Clips are
therefore synthesised in fixed batches, each in a fresh worker process, with espeak's rand()
seeded per clip: the MP3s are byte-identical whatever the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import multiprocessing
import os
import re
import shutil
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phonetune.data.commonvoice import SPLITS
from phonetune.data.errors import PhonetuneError
from phonetune.data.locales import DEFAULT_LOCALES, LOCALES, parse_locales
from phonetune.data.options import non_negative_int, positive_int
from phonetune.data.progress import progress_bar

# Common Voice's columns, in its order (the releases phonetune reads).
TSV_COLUMNS: tuple[str, ...] = (
    "client_id",
    "path",
    "sentence",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "locale",
    "segment",
)
OUTPUT_SAMPLE_RATE = 48_000  # Common Voice's MP3s are 48 kHz mono
HELD_OUT_SHARE = 0.15  # share of clips, and of speakers, in each of dev and test
CLIPS_PER_SPEAKER = 6  # on average; sets how many speakers a locale gets
# Clips per worker process. Fixed, not derived from --num-workers, because espeak-ng's state
# carries over between utterances within a process (see the module docstring).
CLIPS_PER_BATCH = 40

# Sentence length: ~3 to 7 words gives clips of ~1.5 to 3.5 s at the speaking rates below.
# Chinese writes no spaces, so it is measured in characters (about one syllable each).
WORDS_PER_SENTENCE = (3, 7)
CHARACTERS_PER_SENTENCE = (4, 12)

# Speaker and clip parameters, drawn uniformly from these ranges.
RATE_WPM = (140, 200)
PITCH = (30, 70)  # espeak-ng's 0-99 scale
PITCH_RANGE = (30, 70)
PEAK_LEVEL = (0.5, 0.9)  # recording level differs between speakers' microphones
PADDING_S = (0.1, 0.3)  # silence before and after speech, as a real recording has
DITHER_RMS = 1e-4  # a noise floor: real recordings never contain digital silence

# espeak-ng voice variants (files in espeak-ng-data/voices/!v) that sound like a person, with the
# gender Common Voice would record. Whispering, croaking, robotic and child variants are left out.
VOICE_VARIANTS: dict[str, str] = {
    **{f"m{n}": "male_masculine" for n in range(1, 9)},
    **{f"f{n}": "female_feminine" for n in range(1, 6)},
    "Andy": "male_masculine",
    "max": "male_masculine",
    "michel": "male_masculine",
    "paul": "male_masculine",
    "quincy": "male_masculine",
    "rob": "male_masculine",
    "robert": "male_masculine",
    "Annie": "female_feminine",
    "anika": "female_feminine",
    "belinda": "female_feminine",
    "linda": "female_feminine",
    "steph": "female_feminine",
}
# Common Voice's age buckets (its own spelling of "fourties"); many speakers leave age empty.
AGES: tuple[str, ...] = ("", "teens", "twenties", "thirties", "fourties", "fifties", "sixties")
AGE_WEIGHTS: tuple[float, ...] = (0.25, 0.1, 0.25, 0.15, 0.1, 0.1, 0.05)

_SLOT = re.compile(r"\{(\w+)\}")


# --- sentences -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceGrammar:
    """A locale's sentence templates and the phrase lists that fill their {slots}."""

    locale: str
    templates: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]


def sentence_locales() -> list[str]:
    """Locales that have a sentence file, i.e. that `phonetune synth` can speak."""
    folder = importlib.resources.files("phonetune.data") / "sentences"
    return sorted(
        entry.name.removesuffix(".txt") for entry in folder.iterdir() if entry.name.endswith(".txt")
    )


def load_grammar(locale: str) -> SentenceGrammar:
    """Read and check `data/sentences/<locale>.txt` (format described at the top of each file)."""
    resource = importlib.resources.files("phonetune.data") / "sentences" / f"{locale}.txt"
    if not resource.is_file():
        raise PhonetuneError(
            f"phonetune synth has no sentences for locale {locale!r}. Locales it can speak: "
            f"{', '.join(sentence_locales())}. To add one, write data/sentences/{locale}.txt."
        )
    templates: list[str] = []
    slots: dict[str, list[str]] = {}
    current: list[str] | None = None
    source = f"data/sentences/{locale}.txt"
    for number, raw in enumerate(resource.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        if line.startswith("template:"):
            template = line.removeprefix("template:").strip()
            check_text(_SLOT.sub("", template), locale, where)
            templates.append(template)
        elif line.startswith("[") and line.endswith("]"):
            current = slots.setdefault(line[1:-1].strip(), [])
        elif current is None:
            raise PhonetuneError(f"{where}: phrase {line!r} comes before any [slot] header")
        else:
            check_text(line, locale, where)
            current.append(line)
    check_grammar(templates, slots, source)
    return SentenceGrammar(locale, tuple(templates), {k: tuple(v) for k, v in slots.items()})


def check_text(text: str, locale: str, where: str) -> None:
    """Reject text espeak-ng would not read in the locale's own language.

    Letters of another script are spelled out letter by letter, and Latin words in a Cyrillic or
    Chinese sentence switch espeak to English: either gives phones no speaker of the locale says.
    Digits are read as number words whose form depends on context, so they are kept out too.
    """
    scripts = set(LOCALES[locale].scripts)
    for char in text:
        category = unicodedata.category(char)
        if category == "Nd":
            raise PhonetuneError(f"{where}: digit {char!r} in {text!r}; write numbers as words")
        if category.startswith("L"):
            script = unicodedata.name(char, "UNKNOWN").split(" ")[0]
            if script not in scripts:
                raise PhonetuneError(
                    f"{where}: letter {char!r} ({script}) in {text!r} is not in the script(s) of "
                    f"{locale} ({', '.join(sorted(scripts))})"
                )


def check_grammar(templates: list[str], slots: dict[str, list[str]], source: str) -> None:
    if not templates:
        raise PhonetuneError(f"{source}: no 'template:' line")
    used = {name for template in templates for name in _SLOT.findall(template)}
    undefined = used - set(slots)
    if undefined:
        raise PhonetuneError(f"{source}: templates use undefined slot(s) {sorted(undefined)}")
    empty = sorted(name for name, phrases in slots.items() if not phrases)
    if empty:
        raise PhonetuneError(f"{source}: slot(s) {empty} have no phrases")


def compose_sentence(grammar: SentenceGrammar, rng: np.random.Generator) -> str:
    """One sentence: a random template with a random phrase in each slot, capitalised."""
    template = grammar.templates[rng.integers(len(grammar.templates))]

    def fill(match: re.Match[str]) -> str:
        phrases = grammar.slots[match.group(1)]
        return phrases[rng.integers(len(phrases))]

    return capitalize(_SLOT.sub(fill, template), grammar.locale)


def capitalize(sentence: str, locale: str) -> str:
    """Upper-case the first letter; Turkish dotted and dotless i need their own capitals."""
    first = sentence[:1]
    if locale in ("tr", "az"):
        first = {"i": "İ", "ı": "I"}.get(first, first)
    return first.upper() + sentence[1:]


def sentence_length(sentence: str, locale: str) -> int:
    """Words, or characters for scripts written without spaces (Chinese)."""
    if "CJK" in LOCALES[locale].scripts:
        return sum(unicodedata.category(char).startswith("L") for char in sentence)
    return len(sentence.split())


def sentence_key(sentence: str) -> str:
    """What makes two sentences the same to a listener: letters and word breaks, not case."""
    kept = "".join(char for char in sentence.casefold() if char.isalnum() or char.isspace())
    return " ".join(kept.split())


def draw_sentences(grammar: SentenceGrammar, count: int, rng: np.random.Generator) -> list[str]:
    """Up to `count` distinct sentences of a length that gives 1.5-3.5 s clips.

    Fewer come back only when the grammar cannot make `count` distinct sentences.
    """
    low, high = (
        CHARACTERS_PER_SENTENCE if "CJK" in LOCALES[grammar.locale].scripts else WORDS_PER_SENTENCE
    )
    sentences: dict[str, str] = {}
    for _ in range(50 * count + 1000):
        if len(sentences) == count:
            break
        sentence = compose_sentence(grammar, rng)
        if low <= sentence_length(sentence, grammar.locale) <= high:
            sentences.setdefault(sentence_key(sentence), sentence)
    return list(sentences.values())


def split_sentences(sentences: list[str], counts: dict[str, int]) -> dict[str, list[str]]:
    """Give each split its own sentences, in proportion to its clips.

    Common Voice keeps every sentence in one split, so that test sentences are new to the model.
    """
    total = sum(counts.values())
    held_out = {
        split: max(1, round(len(sentences) * counts[split] / total)) for split in ("dev", "test")
    }
    train_end = len(sentences) - held_out["dev"] - held_out["test"]
    if train_end < 1:
        raise PhonetuneError(
            f"only {len(sentences)} distinct sentences; need at least 3 (one per split)"
        )
    by_split = {
        "train": sentences[:train_end],
        "dev": sentences[train_end : train_end + held_out["dev"]],
        "test": sentences[train_end + held_out["dev"] :],
    }
    check_sentences_disjoint(by_split)
    return by_split


def check_sentences_disjoint(by_split: dict[str, list[str]]) -> None:
    """Fail loudly rather than leak a test or dev sentence into training."""
    train = {sentence_key(sentence) for sentence in by_split["train"]}
    for split in ("dev", "test"):
        leaked = [sentence for sentence in by_split[split] if sentence_key(sentence) in train]
        if leaked:
            raise RuntimeError(f"{split} sentences also in train: {leaked[:3]}")


# --- speakers and clips --------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    """One Common Voice contributor: an espeak-ng voice variant with its own way of speaking."""

    client_id: str
    split: str
    variant: str
    gender: str
    age: str
    rate: int
    pitch: int
    pitch_range: int
    peak: float


@dataclass(frozen=True)
class Clip:
    """Everything needed to render one clip, so that a worker makes no random choice."""

    locale: str
    split: str
    path: str  # file name under <locale>/clips, as in the TSV's path column
    sentence: str
    speaker: Speaker
    voice: str  # espeak-ng voice name with variant, e.g. "en-US+f3"
    seed: int  # for espeak-ng's rand() and the dither
    lead_s: float
    trail_s: float


def split_counts(total: int) -> dict[str, int]:
    """Clips (or speakers) per split: ~70/15/15, at least one in each."""
    if total < len(SPLITS):
        raise PhonetuneError(f"need at least {len(SPLITS)} (one per split), got {total}")
    held_out = max(1, round(total * HELD_OUT_SHARE))
    return {"train": total - 2 * held_out, "dev": held_out, "test": held_out}


def client_id(seed: int, locale: str, index: int) -> str:
    """A 64-hex-digit id like Common Voice's, stable for (seed, locale, speaker index)."""
    return hashlib.sha256(f"phonetune-synth:{seed}:{locale}:{index}".encode()).hexdigest()


def make_speakers(
    locale: str, clips: dict[str, int], seed: int, rng: np.random.Generator
) -> dict[str, list[Speaker]]:
    """Speakers for each split; every split gets its own, and no more than it has clips."""
    total = max(len(SPLITS), round(sum(clips.values()) / CLIPS_PER_SPEAKER))
    counts = {split: min(n, clips[split]) for split, n in split_counts(total).items()}
    # Go through the variants in a shuffled order before reusing any, so that a small locale's
    # speakers all sound different.
    names = list(VOICE_VARIANTS)
    order = [names[i] for i in rng.permutation(len(names))]
    speakers: dict[str, list[Speaker]] = {}
    index = 0
    for split in SPLITS:
        speakers[split] = []
        for _ in range(counts[split]):
            variant = order[index % len(order)]
            speakers[split].append(
                Speaker(
                    client_id=client_id(seed, locale, index),
                    split=split,
                    variant=variant,
                    gender=VOICE_VARIANTS[variant],
                    age=AGES[rng.choice(len(AGES), p=AGE_WEIGHTS)],
                    rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                    pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                    pitch_range=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                    peak=round(float(rng.uniform(*PEAK_LEVEL)), 3),
                )
            )
            index += 1
    return speakers


def locale_rng(seed: int, locale: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(locale.encode())])


def plan_locale(locale: str, clips_per_locale: int, seed: int, voice: str) -> list[Clip]:
    """Every clip of a locale: split, speaker, sentence, file name and rendering parameters."""
    rng = locale_rng(seed, locale)
    counts = split_counts(clips_per_locale)
    speakers = make_speakers(locale, counts, seed, rng)
    sentences = split_sentences(draw_sentences(load_grammar(locale), clips_per_locale, rng), counts)
    # Common Voice numbers clips in one sequence per release; ours are distinct within a locale.
    numbers = iter(
        sorted(rng.choice(40_000_000, size=clips_per_locale, replace=False) + 10_000_000)
    )
    clips: list[Clip] = []
    for split in SPLITS:
        # Each speaker records a random share of the split's clips, none with zero.
        owners = rng.permutation(np.arange(counts[split]) % len(speakers[split]))
        for position, owner in enumerate(owners):
            speaker = speakers[split][owner]
            pool = sentences[split]  # reused within the split only when the grammar runs short
            clips.append(
                Clip(
                    locale=locale,
                    split=split,
                    path=f"common_voice_{locale}_{next(numbers)}.mp3",
                    sentence=pool[position % len(pool)],
                    speaker=speaker,
                    voice=f"{voice}+{speaker.variant}",
                    seed=int(rng.integers(2**31 - 1)),
                    lead_s=round(float(rng.uniform(*PADDING_S)), 3),
                    trail_s=round(float(rng.uniform(*PADDING_S)), 3),
                )
            )
    return clips


# --- synthesis (runs in worker processes) --------------------------------------------------------


def render_clip(clip: Clip, speak: Callable[..., np.ndarray], speech_rate: int) -> np.ndarray:
    """The clip's 48 kHz waveform: speech at the speaker's level, padded, over a faint noise floor."""
    import soxr

    speaker = clip.speaker
    speech = speak(
        clip.sentence,
        clip.voice,
        rate=speaker.rate,
        pitch=speaker.pitch,
        pitch_range=speaker.pitch_range,
        seed=clip.seed,
    )
    if not np.any(speech):
        raise RuntimeError(f"espeak-ng produced no audio for {clip.sentence!r} ({clip.voice})")
    speech = soxr.resample(speech, speech_rate, OUTPUT_SAMPLE_RATE)
    # Normalise after resampling: espeak's own level depends on the variant (some clip at full
    # scale), and the resampler can overshoot.
    speech *= speaker.peak / float(np.abs(speech).max())
    lead = np.zeros(round(clip.lead_s * OUTPUT_SAMPLE_RATE), dtype=np.float32)
    trail = np.zeros(round(clip.trail_s * OUTPUT_SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([lead, speech.astype(np.float32), trail])
    noise = np.random.default_rng(clip.seed).normal(0.0, DITHER_RMS, audio.size)
    return np.clip(audio + noise.astype(np.float32), -1.0, 1.0)


def synthesize_batch(job: tuple[str, list[Clip]]) -> list[tuple[str, float]]:
    """Render and write a batch of clips (one locale); return (path, seconds) for each.

    Runs in a fresh process per batch (the pool's maxtasksperchild=1), with its own Synthesizer.
    """
    import soundfile

    from phonetune.data.espeak import Synthesizer

    out, clips = job
    synthesizer = Synthesizer()
    written: list[tuple[str, float]] = []
    for clip in clips:
        audio = render_clip(clip, synthesizer.speak, synthesizer.sample_rate)
        path = Path(out) / clip.locale / "clips" / clip.path
        soundfile.write(path, audio, OUTPUT_SAMPLE_RATE, format="MP3")
        written.append((clip.path, audio.size / OUTPUT_SAMPLE_RATE))
    return written


def make_batches(out: Path, clips: list[Clip]) -> list[tuple[str, list[Clip]]]:
    """Fixed batches of one locale's clips: the batch, not the worker, defines espeak's history."""
    return [
        (str(out), clips[start : start + CLIPS_PER_BATCH])
        for start in range(0, len(clips), CLIPS_PER_BATCH)
    ]


def run_batches(
    batches: list[tuple[str, list[Clip]]], num_workers: int, progress: bool
) -> Iterator[tuple[str, float]]:
    """Synthesise the batches in a spawn pool, yielding (path, seconds) as clips are written."""
    # spawn, not fork: a forked child would inherit the parent's espeak-ng state, and fork is
    # unsafe once libraries have started threads.
    context = multiprocessing.get_context("spawn")
    total = sum(len(clips) for _, clips in batches)
    with (
        progress_bar(total, "synthesising", "clip", show=progress) as bar,
        context.Pool(num_workers, maxtasksperchild=1) as pool,
    ):
        for written in pool.imap_unordered(synthesize_batch, batches):
            bar.update(len(written))
            yield from written


# --- the release on disk -------------------------------------------------------------------------


def prepare_output(out: Path, locales: list[str], overwrite: bool) -> None:
    """Create `out`, refusing to mix a new release into existing files unless asked to."""
    if out.exists() and not out.is_dir():
        raise PhonetuneError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PhonetuneError(
                f"--out {out} is not empty. Choose an empty or new directory, or pass --overwrite "
                f"to replace the locale folders ({', '.join(locales)}) it would write."
            )
        for locale in locales:
            clear_locale_dir(out / locale)
    for locale in locales:
        (out / locale / "clips").mkdir(parents=True, exist_ok=True)


def clear_locale_dir(folder: Path) -> None:
    """Delete a previous release's locale folder, but nothing that does not look like one."""
    if not folder.exists():
        return
    if not (folder / "clips").is_dir() and not (folder / "validated.tsv").is_file():
        raise PhonetuneError(
            f"--overwrite would delete {folder}, which does not look like a Common Voice locale "
            "folder (no clips/ or validated.tsv). Remove it yourself or choose another --out."
        )
    shutil.rmtree(folder)


def tsv_row(clip: Clip) -> list[str]:
    speaker = clip.speaker
    return [
        speaker.client_id,
        clip.path,
        clip.sentence,
        "2",
        "0",
        speaker.age,
        speaker.gender,
        "",
        clip.locale,
        "",
    ]


def write_tsv(path: Path, clips: list[Clip]) -> None:
    """Tab-separated, no quoting: Common Voice writes quotes in sentences as they are."""
    lines = ["\t".join(TSV_COLUMNS)]
    for clip in clips:
        fields = tsv_row(clip)
        if any("\t" in field or "\n" in field for field in fields):
            raise RuntimeError(f"a field of {clip.path} contains a tab or newline: {fields}")
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_locale_tsvs(out: Path, locale: str, clips: list[Clip]) -> None:
    for split in SPLITS:
        write_tsv(out / locale / f"{split}.tsv", [clip for clip in clips if clip.split == split])
    write_tsv(out / locale / "validated.tsv", clips)


def summarize(
    out: Path, plans: dict[str, list[Clip]], seconds: dict[str, float], seed: int
) -> dict:
    """Clips, hours and speakers, per split and per locale."""
    from phonetune.data.espeak import espeak_version

    per_locale = {}
    splits = {split: {"clips": 0, "speakers": 0, "seconds": 0.0} for split in SPLITS}
    for locale, clips in plans.items():
        per_locale[locale] = {"clips": len(clips), "seconds": 0.0, "speakers": {}}
        for split in SPLITS:
            in_split = [clip for clip in clips if clip.split == split]
            split_seconds = sum(seconds[clip.path] for clip in in_split)
            speakers = len({clip.speaker.client_id for clip in in_split})
            per_locale[locale]["speakers"][split] = speakers
            per_locale[locale]["seconds"] += split_seconds
            splits[split]["clips"] += len(in_split)
            splits[split]["speakers"] += speakers
            splits[split]["seconds"] += split_seconds
    total_seconds = sum(entry["seconds"] for entry in per_locale.values())
    return {
        "out": str(out),
        "locales": list(plans),
        "clips": sum(len(clips) for clips in plans.values()),
        "seconds": round(total_seconds, 3),
        "hours": round(total_seconds / 3600, 4),
        "splits": splits,
        "per_locale": per_locale,
        "seed": seed,
        "espeak_ng": espeak_version(),
    }


def check_options(locales: list[str], clips_per_locale: int, num_workers: int) -> None:
    """Collect every problem with the options and report them together."""
    problems = []
    unknown = [locale for locale in locales if locale not in LOCALES]
    if unknown:
        problems.append(f"unsupported locale(s) {', '.join(unknown)}")
    speakable = set(sentence_locales())
    unspoken = [locale for locale in locales if locale in LOCALES and locale not in speakable]
    if unspoken:
        problems.append(
            f"no sentence list for locale(s) {', '.join(unspoken)} "
            f"(phonetune synth speaks {', '.join(sorted(speakable))})"
        )
    if not locales:
        problems.append("no locale given")
    if clips_per_locale < len(SPLITS):
        problems.append(
            f"--clips-per-locale must be at least {len(SPLITS)} (one clip per split), "
            f"got {clips_per_locale}"
        )
    if num_workers < 1:
        problems.append(f"--num-workers must be at least 1, got {num_workers}")
    if problems:
        raise PhonetuneError("; ".join(problems))


def check_variants() -> None:
    """espeak-ng silently ignores an unknown variant, so check the files exist."""
    from phonetune.data.espeak import locate_espeak

    data_path = locate_espeak().data_path
    if data_path is None:  # a system espeak-ng that knows its own data folder: nothing to check
        return
    missing = [
        name for name in VOICE_VARIANTS if not (Path(data_path) / "voices" / "!v" / name).is_file()
    ]
    if missing:
        raise PhonetuneError(f"espeak-ng data at {data_path} lacks voice variant(s) {missing}")


def synthesize_corpus(
    out: Path,
    locales: list[str],
    clips_per_locale: int,
    seed: int = 0,
    num_workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write a synthetic Common Voice release under `out` and return its summary.

    The same seed gives the same TSVs and byte-identical MP3s, whatever `num_workers` is.
    """
    from phonetune.data.espeak import synthesis_voice

    out = Path(out)
    check_options(locales, clips_per_locale, num_workers)
    check_variants()
    plans = {
        locale: plan_locale(locale, clips_per_locale, seed, synthesis_voice(LOCALES[locale].espeak))
        for locale in locales
    }
    prepare_output(out, locales, overwrite)
    batches = [batch for locale in locales for batch in make_batches(out, plans[locale])]
    # Clip file names include the locale, so they are unique across the release.
    seconds = dict(run_batches(batches, num_workers, progress))
    # TSVs last: a folder with TSVs is a complete release, an interrupted run leaves none.
    for locale, clips in plans.items():
        write_locale_tsvs(out, locale, clips)
    summary = summarize(out, plans, seconds, seed)
    manifest = {**summary, "clips_per_locale": clips_per_locale}
    (out / "phonetune_synth.json").write_text(
        json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
    )
    return summary


# --- command line --------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("cv-synth"),
        help="directory to write the release into (default: %(default)s)",
    )
    parser.add_argument(
        "--locales",
        default=",".join(DEFAULT_LOCALES),
        help="comma-separated Common Voice locales to speak (default: %(default)s)",
    )
    parser.add_argument(
        "--clips-per-locale",
        type=positive_int,
        default=200,
        help="clips per locale, split ~70/15/15 into train/dev/test (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed for sentences, speakers and audio; the same seed writes the "
        "same files (default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="processes synthesising in parallel; does not change the output "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the locale folders of a previous release in a non-empty --out",
    )


def run(args: argparse.Namespace) -> int:
    locales = parse_locales(args.locales)  # an unknown locale is a PhonetuneError
    summary = synthesize_corpus(
        args.out,
        locales,
        args.clips_per_locale,
        seed=args.seed,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=True,
    )
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    splits = summary["splits"]
    lines = [
        f"phonetune synth: {len(summary['locales'])} locales, {summary['clips']} clips, "
        f"{summary['hours']:.2f} h of speech (espeak-ng {summary['espeak_ng']}, seed {summary['seed']})",
        "  clips     " + ", ".join(f"{split} {splits[split]['clips']}" for split in SPLITS),
        "  speakers  " + ", ".join(f"{split} {splits[split]['speakers']}" for split in SPLITS),
    ]
    for locale, entry in summary["per_locale"].items():
        speakers = "/".join(str(entry["speakers"][split]) for split in SPLITS)
        lines.append(
            f"  {locale:<6} {entry['clips']:>5} clips {entry['seconds'] / 60:6.1f} min  "
            f"speakers train/dev/test {speakers}"
        )
    lines.append(f"wrote {summary['out']}")
    return "\n".join(lines)

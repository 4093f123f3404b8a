"""How close phone timestamps come to the truth, and what a long recording costs to transcribe.

Truth: English words spoken one at a time by espeak-ng (en-us), each trimmed to where its sound
starts and ends (-35 dB under its peak), then concatenated with 50-250 ms of silence between them:
every word's start and end in the utterance is known to the sample. The model's word boundaries are
(1) forced alignment (`phonetune align`'s): the start of a word's first phone and the end of its
last, and (2) greedy timestamps (`transcribe --timestamps`'s): the start of a word's first phone
where the recognised phones, matched to the true ones by edit distance, have it. Errors are
predicted minus true, in seconds.

Long audio: `--long-minutes` of such utterances, one after another, written as FLAC and transcribed
in streamed overlapping windows: wall time, the peak memory of `phonetune transcribe` on it and on its
first minute (each in a process of its own), and phones compared with the same
utterances transcribed one by one (differences at window joins would show as extra or missing
phones; the model's context also differs, so a few differences are expected either way).

    python scripts/bench_timestamps.py MODEL [--utterances 40] [--long-minutes 20]

Prints a table and, last, one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "hello my friend we like warm bread good morning to you all big red fish sun "
    "green house water little child open the door"
).split()
SAMPLE_RATE = 16_000
TRIM_DB = -35.0


def trim(wave, db=TRIM_DB):
    """The part of `wave` from its first to its last sample within `db` of its peak."""
    level = 10 ** (db / 20) * np.abs(wave).max()
    loud = np.flatnonzero(np.abs(wave) > level)
    return wave[loud[0] : loud[-1] + 1]


class WordCorpus:
    """Single-word espeak-ng clips and their phones (phonemized as `prepare` does)."""

    def __init__(self, words=WORDS):
        import soxr

        from phonetune.data.espeak import Synthesizer, synthesis_voice
        from phonetune.data.phonemize import phonemize_batch

        synth = Synthesizer()
        self.clips = {}
        for word in words:
            wave = synth.speak(word, synthesis_voice("en-us"))
            wave = soxr.resample(wave, synth.sample_rate, SAMPLE_RATE).astype(np.float32)
            self.clips[word] = trim(wave)
        self.phones = dict(zip(words, phonemize_batch(list(words), "en-us"), strict=True))

    def utterance(self, rng, min_words=3, max_words=5):
        """(16 kHz samples, phones, [(word, start s, end s), ...]) of random words."""
        words = list(rng.choice(list(self.clips), int(rng.integers(min_words, max_words + 1))))
        pieces = [np.zeros(int(rng.uniform(0.1, 0.3) * SAMPLE_RATE), np.float32)]
        truth, at = [], len(pieces[0])
        for word in words:
            clip = self.clips[word]
            truth.append((word, at / SAMPLE_RATE, (at + len(clip)) / SAMPLE_RATE))
            gap = np.zeros(int(rng.uniform(0.05, 0.25) * SAMPLE_RATE), np.float32)
            pieces += [clip, gap]
            at += len(clip) + len(gap)
        phones = " ".join(self.phones[word] for word in words)
        return np.concatenate(pieces), phones, truth


def boundary_errors(loaded, utterances, corpus):
    """Forced-alignment word start and end errors, and greedy word start errors (seconds)."""
    from rapidfuzz.distance import Levenshtein

    from phonetune.infer.align import FrameTiming, forced_spans, greedy_spans
    from phonetune.infer.recognize import frame_log_probs

    timing = FrameTiming.of(loaded.conv_layers)
    token_to_id = {token: i for i, token in loaded.id_to_token.items()}
    errors = {"forced_start": [], "forced_end": [], "greedy_start": []}
    for wave, phones, truth in utterances:
        (log_probs,) = frame_log_probs(loaded, [wave])
        duration = len(wave) / SAMPLE_RATE
        reference = phones.split()
        spans, _ = forced_spans(
            log_probs.astype(np.float64), reference, token_to_id, timing, duration
        )
        best = log_probs.argmax(axis=-1)
        greedy = greedy_spans(
            best, np.exp(log_probs.max(axis=-1)), loaded.id_to_token, timing, duration
        )
        # Reference phone index -> recognised phone index, where the two are the same phone.
        matched = {}
        for tag, ref_start, ref_end, hyp_start, _ in Levenshtein.opcodes(
            reference, [s.phone for s in greedy]
        ):
            if tag == "equal":
                for offset in range(ref_end - ref_start):
                    matched[ref_start + offset] = hyp_start + offset
        first = 0
        for word, start, end in truth:
            count = len(corpus.phones[word].split())
            errors["forced_start"].append(spans[first].start - start)
            errors["forced_end"].append(spans[first + count - 1].end - end)
            if first in matched:
                errors["greedy_start"].append(greedy[matched[first]].start - start)
            first += count
    return {key: np.array(values) for key, values in errors.items()}


def summarise(errors):
    return {
        key: {
            "median_abs_ms": round(float(np.median(np.abs(values))) * 1000, 1),
            "median_ms": round(float(np.median(values)) * 1000, 1),
            "p90_abs_ms": round(float(np.percentile(np.abs(values), 90)) * 1000, 1),
            "count": len(values),
        }
        for key, values in errors.items()
    }


def command_peak_mb(model, audio):
    """Peak resident memory (MB) of `phonetune transcribe MODEL AUDIO` in a process of its own."""
    process = subprocess.Popen(
        [sys.executable, "-m", "phonetune", "transcribe", str(model), str(audio)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"phonetune transcribe {audio} failed ({process.returncode})")
    return round(usage.ru_maxrss / 1024)


def long_audio(model, loaded, corpus, rng, minutes, folder):
    """Transcribe `minutes` of utterances streamed, and the utterances one by one."""
    import soundfile

    from phonetune.data.per import score_predictions
    from phonetune.infer.transcribe import transcribe_files

    utterances = []
    while sum(len(u[0]) for u in utterances) < minutes * 60 * SAMPLE_RATE:
        utterances.append(corpus.utterance(rng))
    path = Path(folder) / "long.flac"
    soundfile.write(path, np.concatenate([u[0] for u in utterances]), SAMPLE_RATE)
    truth = " ".join(u[1] for u in utterances)
    started = time.perf_counter()
    (streamed,) = transcribe_files(loaded, [path])
    seconds = time.perf_counter() - started
    # Memory of the command itself, in a process of its own: for this recording and for its
    # first minute (whatever grows with the length shows as the difference).
    first_minute = Path(folder) / "first_minute.flac"
    soundfile.write(first_minute, soundfile.read(path, frames=60 * SAMPLE_RATE)[0], SAMPLE_RATE)
    peak_mb = {
        name: command_peak_mb(model, file)
        for name, file in [("1 min", first_minute), ("long", path)]
    }
    singles = []
    for index, (wave, _, _) in enumerate(utterances):
        single = Path(folder) / f"u{index}.flac"
        soundfile.write(single, wave, SAMPLE_RATE)
        singles.append(single)
    one_by_one = " ".join(t.phones for t in transcribe_files(loaded, singles) if t.phones)
    streamed_per = score_predictions([streamed.phones], [truth], ["en"])["overall"]
    single_per = score_predictions([one_by_one], [truth], ["en"])["overall"]
    return {
        "minutes": round(streamed.duration / 60, 2),
        "utterances": len(utterances),
        "true_phones": len(truth.split()),
        "streamed_phones": len(streamed.phones.split()),
        "one_by_one_phones": len(one_by_one.split()),
        "streamed_per": round(streamed_per["per"], 4),
        "one_by_one_per": round(single_per["per"], 4),
        "streamed_seconds": round(seconds, 1),
        "transcribe_peak_rss_mb": peak_mb,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an export, run or checkpoint folder")
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--long-minutes", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from phonetune.infer.recognize import load_model

    corpus = WordCorpus()
    rng = np.random.default_rng(args.seed)
    loaded = load_model(args.model)
    utterances = [corpus.utterance(rng) for _ in range(args.utterances)]
    errors = boundary_errors(loaded, utterances, corpus)
    result = {"model": str(args.model), "boundaries": summarise(errors)}
    print(
        f"{'boundary':14} {'median |err| ms':>16} {'median err ms':>14} {'p90 |err| ms':>13} {'n':>5}"
    )
    for key, row in result["boundaries"].items():
        print(
            f"{key:14} {row['median_abs_ms']:16.1f} {row['median_ms']:14.1f} "
            f"{row['p90_abs_ms']:13.1f} {row['count']:5d}"
        )
    if args.long_minutes > 0:
        with tempfile.TemporaryDirectory() as folder:
            result["long_audio"] = long_audio(
                args.model, loaded, corpus, rng, args.long_minutes, folder
            )
        print("long audio:", result["long_audio"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

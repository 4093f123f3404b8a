"""`phonetune prepare --splits validated`: train/dev/test of one's own from a locale's validated.tsv.

Common Voice's official train split keeps one recording per sentence and leaves out most validated
clips (CorporaCreator #113: about 70%). Splitting validated.tsv instead keeps them, under two rules
that keep dev and test honest:

- speakers are disjoint: every clip of a speaker (client_id) goes to one split. Held-out speakers
  are drawn in a fixed pseudo-random order (a hash of locale and client_id, so the split does not
  change when rows are added or reordered); a speaker with more clips than the room left in dev or
  test goes to train, so dev and test get many speakers rather than a few prolific ones. Clips with
  no client_id cannot be told apart by speaker and always go to train;
- sentences are disjoint: a train clip whose sentence is read in dev or test is dropped (reason
  `sentence_in_held_out`), and so is a dev clip whose sentence is in test (`sentence_in_test`), so
  the model is never scored on a sentence it was trained on.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import replace

from phonetune.data.commonvoice import Clip, Rejection

VALIDATED = "validated"
HELD_OUT = ("test", "dev")  # filled in this order


def split_validated(
    clips: list[Clip], dev_fraction: float, test_fraction: float
) -> tuple[list[Clip], list[Rejection]]:
    """The clips of one locale's validated.tsv, each given a split, and the clips dropped for
    sharing a sentence with a held-out split. Dev and test hold about `dev_fraction` and
    `test_fraction` of the clips (whole speakers: as close as the speakers' sizes allow)."""
    by_speaker: dict[str, list[Clip]] = defaultdict(list)
    for clip in clips:
        by_speaker[clip.client_id].append(clip)
    targets = {"test": round(test_fraction * len(clips)), "dev": round(dev_fraction * len(clips))}
    filled = {"test": 0, "dev": 0}
    split_of: dict[str, str] = {}
    for speaker in sorted(by_speaker, key=lambda s: _speaker_order(clips[0].locale, s)):
        count = len(by_speaker[speaker])
        split_of[speaker] = "train"
        if not speaker:  # unknown speakers: only train can hold them safely
            continue
        for split in HELD_OUT:
            if filled[split] + count <= targets[split]:
                split_of[speaker] = split
                filled[split] += count
                break
    assigned = [replace(clip, split=split_of[clip.client_id]) for clip in clips]
    return drop_shared_sentences(assigned)


def _speaker_order(locale: str, client_id: str) -> str:
    return hashlib.sha256(f"{locale}\t{client_id}".encode()).hexdigest()


def drop_shared_sentences(clips: list[Clip]) -> tuple[list[Clip], list[Rejection]]:
    """Drop train clips whose sentence is in dev or test, and dev clips whose sentence is in test."""
    sentences = {
        split: {_same(c.sentence) for c in clips if c.split == split} for split in HELD_OUT
    }
    kept: list[Clip] = []
    rejected: list[Rejection] = []
    for clip in clips:
        sentence = _same(clip.sentence)
        if clip.split == "train" and (
            sentence in sentences["dev"] or sentence in sentences["test"]
        ):
            held = "test" if sentence in sentences["test"] else "dev"
            detail = f"its sentence is read by a {held} speaker: {clip.sentence!r}"
            rejected.append(
                Rejection(clip.locale, "train", clip.path, "sentence_in_held_out", detail)
            )
        elif clip.split == "dev" and sentence in sentences["test"]:
            detail = f"its sentence is read by a test speaker: {clip.sentence!r}"
            rejected.append(Rejection(clip.locale, "dev", clip.path, "sentence_in_test", detail))
        else:
            kept.append(clip)
    return kept, rejected


def _same(sentence: str) -> str:
    """Sentences that differ only in case are the same sentence to a phone recognizer."""
    return sentence.casefold()

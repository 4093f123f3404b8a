"""CTC prefix beam search, optionally with a phone n-gram LM (`phonetune lm`), for `transcribe` and
`evaluate --beam B [--lm phones.arpa --lm-weight W]`. Greedy decoding stays the default.

The search is flashlight-text's lexicon-free CTC decoder (C++; the one torchaudio's `ctc_decoder`
wraps), its LM KenLM reading the ARPA file. It scores the LM on every emitted token, which is what a
phone LM needs; pyctcdecode applies its LM at word boundaries (spaces), which phone output has none
of. Paths that collapse to the same phones are merged by adding their probabilities (`log_add`), as
prefix beam search does. The silence token of the decoder is the CTC blank: phone output has no
word separator, and no silence score applies.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phonetune.data.ctc import greedy_decode
from phonetune.data.errors import PhonetuneError
from phonetune.data.options import non_negative_number, positive_int
from phonetune.data.vocab import BLANK_ID, SPECIAL_TOKENS

DEFAULT_LM_WEIGHT = 0.5
# Tokens tried per frame, the most probable first: a CTC model puts nearly all of a frame's mass
# on one to three tokens, and on the demo model 10 gave the same PER as all 117 at an eighth of the time.
TOKENS_PER_FRAME = 10
# Hypotheses scoring this far (natural log) below the best are dropped early.
BEAM_THRESHOLD = 50.0


@dataclass(frozen=True)
class BeamSearch:
    """Beam search settings; `build` makes the decoder once a model's vocabulary is known."""

    beam: int
    lm: Path | None = None
    lm_weight: float = DEFAULT_LM_WEIGHT

    def build(self, id_to_token: Mapping[int, str]) -> BeamDecoder:
        decoder = BeamDecoder(id_to_token, self.beam, self.lm, self.lm_weight)
        missing = decoder.missing_from_lm
        if missing:
            print(
                f"note: {len(missing)} of the model's phones never occur in {self.lm}, and beam "
                f"search with it will practically never output them: {' '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else ""),
                file=sys.stderr,
            )
        return decoder


class BeamDecoder:
    """Prefix beam search over one clip's log-probabilities (frames x vocabulary) at a time."""

    def __init__(
        self,
        id_to_token: Mapping[int, str],
        beam: int,
        lm: Path | None = None,
        lm_weight: float = DEFAULT_LM_WEIGHT,
    ) -> None:
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconFreeDecoder,
            LexiconFreeDecoderOptions,
            ZeroLM,
        )
        from flashlight.lib.text.dictionary import Dictionary

        if beam < 1:
            raise PhonetuneError(f"--beam must be at least 1, not {beam}")
        if not (math.isfinite(lm_weight) and lm_weight >= 0):
            raise PhonetuneError(f"--lm-weight must be a number of at least 0, not {lm_weight}")
        if sorted(id_to_token) != list(range(len(id_to_token))):
            raise PhonetuneError("the vocabulary's ids must run from 0 without gaps")
        self.id_to_token = dict(id_to_token)
        self.beam, self.lm_path, self.lm_weight = beam, lm, lm_weight if lm else 0.0
        tokens = [self.id_to_token[i] for i in range(len(self.id_to_token))]
        self.lm = load_kenlm(Path(lm), Dictionary(tokens)) if lm is not None else ZeroLM()
        self.missing_from_lm = phones_missing_from_lm(Path(lm), tokens) if lm is not None else []
        options = LexiconFreeDecoderOptions(
            beam_size=beam,
            beam_size_token=min(TOKENS_PER_FRAME, len(tokens)),
            beam_threshold=BEAM_THRESHOLD,
            lm_weight=self.lm_weight,
            sil_score=0.0,
            log_add=True,
            criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconFreeDecoder(options, self.lm, BLANK_ID, BLANK_ID, [])

    def decode(self, log_probs: np.ndarray) -> str:
        """The best hypothesis' phones, space-separated (as greedy decoding gives them)."""
        if len(log_probs) == 0:
            return ""
        emissions = np.ascontiguousarray(log_probs, dtype=np.float32)
        frames, vocabulary = emissions.shape
        results = self.decoder.decode(emissions.ctypes.data, frames, vocabulary)
        # The best path, one token per frame: collapsing repeats and blanks gives its phones.
        return greedy_decode(results[0].tokens, self.id_to_token) if results else ""

    def describe(self) -> dict:
        """How decoding was done, for results files."""
        described: dict = {"method": "beam", "beam": self.beam}
        if self.lm_path is not None:
            described.update({"lm": str(self.lm_path), "lm_weight": self.lm_weight})
        return described


def load_kenlm(path: Path, dictionary: object) -> object:
    from flashlight.lib.text.decoder.kenlm import KenLM

    from phonetune.data.audio import quiet_native_stderr

    require_lm_file(path)
    try:
        with quiet_native_stderr():  # KenLM draws a progress bar of its own on file descriptor 2
            return KenLM(str(path), dictionary)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise PhonetuneError(
            f"--lm {path} is not an ARPA (or KenLM binary) language model: {reason}; "
            "write one with `phonetune lm`"
        ) from None


def require_lm_file(path: Path) -> None:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        raise PhonetuneError(f"--lm {path}: {what}; write one with `phonetune lm`")


def phones_missing_from_lm(path: Path, tokens: list[str]) -> list[str]:
    """Phones of the model that are not unigrams of the ARPA file (a KenLM binary file is not
    read: []). Beam search with the LM practically never outputs them."""
    unigrams: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            if handle.readline().strip() != "\\data\\":
                return []
            in_unigrams = False
            for line in handle:
                line = line.strip()
                if line == "\\1-grams:":
                    in_unigrams = True
                elif in_unigrams and (not line or line.startswith("\\")):
                    break
                elif in_unigrams:
                    fields = line.split()
                    if len(fields) >= 2:
                        unigrams.add(fields[1])
    except OSError:
        return []
    return [t for t in tokens if t not in SPECIAL_TOKENS and t not in unigrams]


# --- command line, shared by evaluate and transcribe -------------------------------------------
def add_beam_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--beam",
        type=positive_int,
        default=None,
        metavar="B",
        help="decode with CTC prefix beam search of width B (default: greedy decoding)",
    )
    parser.add_argument(
        "--lm",
        type=Path,
        default=None,
        metavar="ARPA",
        help="with --beam: a phone n-gram LM (`phonetune lm`) scored on every phone",
    )
    parser.add_argument(
        "--lm-weight",
        type=non_negative_number,
        default=None,
        metavar="W",
        help=f"with --lm: the LM's weight (log10 LM scores added to natural-log acoustic "
        f"scores; default {DEFAULT_LM_WEIGHT:g}; tune it on a dev split)",
    )


def beam_search_from_args(args: argparse.Namespace) -> BeamSearch | None:
    """The beam search the options ask for; None for greedy decoding. Checked before any model
    is loaded."""
    if args.lm_weight is not None and args.lm is None:
        raise PhonetuneError("--lm-weight weighs the LM of --lm: give --lm phones.arpa too")
    if args.beam is None:
        if args.lm is not None:
            raise PhonetuneError("--lm is used by beam search: give --beam B too (e.g. --beam 16)")
        return None
    if args.lm is not None:
        require_lm_file(args.lm)
    weight = DEFAULT_LM_WEIGHT if args.lm_weight is None else args.lm_weight
    return BeamSearch(args.beam, args.lm, weight)

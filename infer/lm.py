"""`phonetune lm`: a phone n-gram language model in ARPA format from a prepared dataset's train
transcripts, for `phonetune transcribe/evaluate --beam B --lm phones.arpa` (infer/beam.py).

Each transcript is one sentence, `<s> p h o n e s </s>`, its phones the tokens. The estimate is
kaldingram's (Kaldi's make_kn_lm.py, packaged by the Next-gen Kaldi team): back-off Kneser-Ney with
one discount per order, D = n1 / (n1 + 2 n2), the same model as SRILM's `ngram-count
-ukndiscount`; KenLM (inside flashlight-text's decoder) reads the ARPA file it writes. The
unigrams are not discounted: a phone that never occurs in the transcripts gets no probability
(KenLM gives it <unk>'s log10 probability of -100), so the LM should come from the data the model's
vocabulary was built from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

from phonetune.data.errors import PhonetuneError
from phonetune.data.options import check_output_file, positive_int

DEFAULT_ORDER = 4
# KenLM, as flashlight-text's wheels build it, reads n-grams up to order 6 (KENLM_MAX_ORDER).
MAX_ORDER = 6


def estimate_arpa(sentences: Iterable[str], order: int) -> tuple[str, dict]:
    """The ARPA text of a back-off Kneser-Ney LM of `order` over space-separated `sentences`, and
    what went into it: sentences, tokens, n-grams per order and the discounts."""
    from kaldingram.train import NgramCounts

    require_order(order)
    counts = NgramCounts(order)
    lines = tokens = 0
    # kaldingram draws tqdm bars for each pass; a phone corpus takes well under a second.
    with contextlib.redirect_stderr(io.StringIO()):
        for sentence in sentences:
            phones = sentence.split()
            if not phones:  # "<s> </s>" would only teach the LM that utterances may be empty
                continue
            counts.add_raw_counts_from_line(" ".join(phones))
            lines += 1
            tokens += len(phones)
        if lines == 0:
            raise PhonetuneError("no transcript holds a phone: there is nothing to estimate")
        counts.cal_discounting_constants()
        counts.cal_f()
        counts.cal_bow()
        text = io.StringIO()
        counts.print_as_arpa(text)
    summary = {
        "order": order,
        "sentences": lines,
        "phones": tokens,
        "ngrams": [sum(len(h.word_to_f) for h in level.values()) for level in counts.counts],
        "discounts": [round(d, 4) for d in counts.d],
    }
    return text.getvalue(), summary


def require_order(order: int) -> None:
    if not 1 <= order <= MAX_ORDER:
        raise PhonetuneError(f"--order must be between 1 and {MAX_ORDER}, not {order}")


def build_phone_lm(prepared_dir: Path, order: int, out: Path) -> dict:
    """Estimate the LM of the train transcripts of `prepared_dir` and write it to `out`."""
    from phonetune.infer.evaluate import load_split

    require_order(order)
    out = Path(out)
    check_output_file(out, "--out")
    rows = load_split(Path(prepared_dir), "train", None)
    arpa, summary = estimate_arpa(rows.select_columns(["phones"])["phones"], order)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.write_text(arpa, encoding="utf-8")
        os.replace(partial, out)
    except OSError as error:
        raise PhonetuneError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        partial.unlink(missing_ok=True)
    return {"data": str(prepared_dir), "out": str(out), **summary}


# --- command line -----------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, required=True, help="PREP_DIR written by `phonetune prepare`"
    )
    parser.add_argument(
        "--order",
        type=positive_int,
        default=DEFAULT_ORDER,
        help=f"n-gram order, 1 to {MAX_ORDER} (default {DEFAULT_ORDER})",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the ARPA file to write, e.g. phones.arpa"
    )


def run(args: argparse.Namespace) -> int:
    summary = build_phone_lm(args.data, args.order, args.out)
    counts = ", ".join(f"{n} {i + 1}-grams" for i, n in enumerate(summary["ngrams"]))
    print(
        f"wrote {summary['out']}: order {summary['order']} Kneser-Ney over {summary['sentences']} "
        f"train transcripts ({summary['phones']} phones); {counts}"
    )
    print(
        f"next: phonetune evaluate MODEL --data {args.data} --split dev --beam 16 --lm {args.out}"
    )
    return 0

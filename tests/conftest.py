"""Shared fixtures: one small synthetic Common Voice corpus and its prepared dataset per test session."""

import os
import sys
from pathlib import Path

import pytest
from helpers import TEST_CLIPS_PER_LOCALE, TEST_LOCALES

# Tests import phonetune as its users do, through the installed package. `python -m pytest` puts
# the repository root on sys.path, where the stage folders would also import as top-level `data`
# and `train` and hide a module that names itself wrongly: take the root off.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _ROOT]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the phoneme cache (and anything else under ~/.cache) out of the user's home."""
    cache = tmp_path_factory.mktemp("phonetune_cache")
    previous = os.environ.get("PHONETUNE_CACHE_DIR")
    os.environ["PHONETUNE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PHONETUNE_CACHE_DIR", None)
    else:
        os.environ["PHONETUNE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def cv_corpus(tmp_path_factory):
    """A Common Voice-layout corpus spoken by espeak-ng (4 locales, 30 clips each)."""
    from phonetune.data.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("cv") / "corpus"
    synthesize_corpus(
        root, TEST_LOCALES, clips_per_locale=TEST_CLIPS_PER_LOCALE, seed=0, num_workers=2
    )
    return root


@pytest.fixture(scope="session")
def prepared_dir(cv_corpus, tmp_path_factory):
    """`cv_corpus` prepared (docs/formats.md layout): vocab.json, prep_report.json, DatasetDict."""
    from phonetune.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared") / "prep"
    prepare(PrepareOptions(cv_root=cv_corpus, locales=TEST_LOCALES, out=out, num_workers=2))
    return out

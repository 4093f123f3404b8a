"""`phonetune prepare`: a Common Voice release -> espeak-ng phones + 16 kHz audio, prepared once.

Steps, each reporting what it rejects and why:
1. read each locale's split TSVs (row checks: columns, path safety, missing files, duplicates);
2. reject sentences in scripts espeak-ng cannot read; look the rest up in the phoneme cache;
3. phonemize the distinct sentences the cache lacks, one language per job, in `--num-workers`
   processes (so each language's espeak-ng backend is built about once), each locale's while
   the main process reads the next one's TSVs;
4. decode + resample every clip in the same processes, in shards written atomically, so an
   interrupted run resumes from the shards already written;
5. build (or load) the vocabulary and assemble one DatasetDict that training memory-maps.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from phonetune.data import audio as audio_io
from phonetune.data import ctc
from phonetune.data.commonvoice import SPLITS, Clip, Rejection, find_split_files, read_split
from phonetune.data.errors import PhonetuneError
from phonetune.data.espeak import espeak_version
from phonetune.data.locales import foreign_scripts, get_locale, parse_locales
from phonetune.data.options import non_negative_number, positive_int, positive_number
from phonetune.data.phonemize import (
    LANGUAGE_SWITCH_POLICIES,
    SCHEME_VERSION,
    PhonemeCache,
    phonemize_batch,
)
from phonetune.data.prepared import DATASET_FILE, REPORT_FILE
from phonetune.data.progress import progress_bar
from phonetune.data.validated import VALIDATED, split_validated
from phonetune.data.vocab import VOCAB_FILE, build_vocab, load_vocab, save_vocab

SHARD_CLIPS = 256
OOV_POLICIES = ("reject", "unk")
# The report's vocab.source when no --vocab was given (merge rebuilds such vocabularies).
VOCAB_BUILT = "built from the kept clips"
# Bump when what a shard holds changes, so that resumed runs never mix old and new shards.
SHARD_FORMAT = 2  # 2: kept clips carry their path and a hash of their audio


@dataclass(frozen=True)
class PrepareOptions:
    cv_root: Path
    locales: list[str]
    out: Path
    splits: tuple[str, ...] = SPLITS
    num_workers: int = 1
    vocab: Path | None = None
    oov_policy: str = "reject"
    language_switch: str = "remove-flags"
    min_duration: float = 0.5
    max_duration: float = 20.0
    cache_dir: Path | None = None
    dev_fraction: float = 0.1  # with splits=("validated",): the share of clips held out for dev
    test_fraction: float = 0.1  # ... and for test

    @property
    def from_validated(self) -> bool:
        return self.splits == (VALIDATED,)

    @property
    def report_splits(self) -> tuple[str, ...]:
        """The splits the report counts: from validated.tsv, the three made of it, then the rows
        rejected before a split was chosen (under "validated")."""
        return (*SPLITS, VALIDATED) if self.from_validated else self.splits


@dataclass
class ClipTask:
    """A clip whose row and sentence passed; its audio is checked in a worker."""

    locale: str
    split: str
    path: str  # as in the TSV
    audio_path: str
    sentence: str
    client_id: str
    phones: str


@dataclass
class Outcome:
    # {"locale", "split", "path", "duration", "phones", "audio_hash"}
    kept: list[dict] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # shard path -> clips kept in it
    # shard path -> positions (in the shard) of clips dropped after decoding: the same audio again
    dropped: dict[str, list[int]] = field(default_factory=dict)


# --- step 1: rows ------------------------------------------------------------------------------
def read_locale(
    options: PrepareOptions, locale: str, split_files: dict[str, Path]
) -> tuple[list[Clip], list[Rejection], dict[tuple[str, str], int]]:
    """Every row of one locale's requested splits: usable clips, rejections, rows read per split."""
    clips: list[Clip] = []
    rejected: list[Rejection] = []
    read: Counter[tuple[str, str]] = Counter()
    # The clip's real file (links and "../clips/" spellings resolved) -> where it was listed first.
    seen: dict[Path, tuple[str, str]] = {}
    for split in options.splits:
        if split not in split_files:
            continue
        for item in read_split(options.cv_root, locale, split, split_files[split]):
            read[(locale, split)] += 1
            if isinstance(item, Rejection):
                rejected.append(item)
                continue
            earlier = seen.get(Path(item.audio_path))
            if earlier is not None:
                first_split, first_path = earlier
                reason = "duplicate_row" if first_split == split else "duplicate_across_splits"
                same = "" if first_path == item.path else f" (as {first_path}: the same file)"
                detail = f"{item.path} already listed in {first_split}.tsv{same}"
                rejected.append(Rejection(locale, split, item.path, reason, detail))
                continue
            seen[Path(item.audio_path)] = (split, item.path)
            clips.append(item)
    if options.from_validated:
        clips, dropped = split_validated(clips, options.dev_fraction, options.test_fraction)
        rejected += dropped
        # Rows are counted in the split they were given; those rejected before stay "validated".
        read = Counter((r.locale, r.split) for r in rejected) + Counter(
            (c.locale, c.split) for c in clips
        )
    return clips, rejected, dict(read)


# --- step 2: what espeak-ng can read, and the phones already known ----------------------------
def check_scripts(clips: list[Clip]) -> tuple[list[Clip], list[Rejection]]:
    """Reject sentences with letters espeak-ng would spell out one by one instead of reading."""
    readable: list[Clip] = []
    rejected: list[Rejection] = []
    for clip in clips:
        locale = get_locale(clip.locale)
        scripts = foreign_scripts(clip.sentence, locale)
        if scripts:
            detail = f"{', '.join(scripts)} letters cannot be read by the {locale.espeak!r} voice"
            rejected.append(
                Rejection(clip.locale, clip.split, clip.path, "unreadable_script", detail)
            )
        else:
            readable.append(clip)
    return readable, rejected


def make_tasks(clips: list[Clip], cache: PhonemeCache, policy: str) -> list[ClipTask]:
    """One task per clip, with its phones when the cache has them (workers phonemize the rest)."""
    known: dict[tuple[str, str], str] = {}
    by_language: dict[str, list[str]] = defaultdict(list)
    for clip in clips:
        by_language[get_locale(clip.locale).espeak].append(clip.sentence)
    for language, sentences in by_language.items():
        for text, phones in cache.lookup(sentences, language, policy).items():
            known[(language, text)] = phones
    return [
        ClipTask(
            clip.locale,
            clip.split,
            clip.path,
            str(clip.audio_path),
            clip.sentence,
            clip.client_id,
            known.get((get_locale(clip.locale).espeak, clip.sentence)),
        )
        for clip in clips
    ]


# --- step 3: phonemize what the cache lacks, one language per job ----------------------------
# Distinct sentences per phonemization job: enough to amortise the job's espeak-ng backend, few
# enough that a large language still spreads over every worker.
PHONEMIZE_JOB_SENTENCES = 4096


def plan_phonemization(tasks: list[ClipTask], policy: str) -> list[tuple[str, list[str], str]]:
    """Jobs (espeak language, distinct sentences, policy) for the tasks without phones.

    Each job holds one language, so a worker builds espeak-ng backends only for the languages it
    is given: about one backend per language in all, instead of one per language per worker.
    """
    missing: dict[str, dict[str, None]] = defaultdict(dict)
    for task in tasks:
        if task.phones is None:
            missing[get_locale(task.locale).espeak][task.sentence] = None
    jobs = []
    for language, unique in missing.items():
        sentences = list(unique)
        for start in range(0, len(sentences), PHONEMIZE_JOB_SENTENCES):
            jobs.append((language, sentences[start : start + PHONEMIZE_JOB_SENTENCES], policy))
    return jobs


def phonemize_job(job: tuple[str, list[str], str]) -> tuple[str, dict[str, str]]:
    """Runs in a worker: sentence -> phones for one language's sentences."""
    language, sentences, policy = job
    phones = phonemize_batch(sentences, language, policy)
    return language, dict(zip(sentences, phones, strict=True))


class PhonemeJobs:
    """Phonemization handed to the workers locale by locale and collected before decoding.

    Started while the main process reads the next locale's TSVs, so the workers have work from
    the start. Not a step inside each shard, as it once was: shards mix languages over the
    workers, so every worker built an espeak-ng backend for every language.
    """

    def __init__(self, cache: PhonemeCache, policy: str, pool: Pool | None) -> None:
        self.cache = cache
        self.policy = policy
        self.pool = pool
        self.pending: list = []  # AsyncResult per job; without a pool, the job itself
        self.sentences = 0

    def start(self, tasks: list[ClipTask]) -> None:
        """Hand the jobs for the tasks' unknown phones to the workers (run later without any)."""
        for job in plan_phonemization(tasks, self.policy):
            self.sentences += len(job[1])
            self.pending.append(self.pool.apply_async(phonemize_job, (job,)) if self.pool else job)

    def finish(self, tasks: list[ClipTask]) -> None:
        """Wait for every job, store its phones in the cache, and fill in the tasks' phones."""
        computed: dict[str, dict[str, str]] = defaultdict(dict)
        with progress_bar(self.sentences, "phonemize", "sentence") as bar:
            for item in self.pending:
                language, table = item.get() if self.pool else phonemize_job(item)
                self.cache.store(table, language, self.policy)  # kept if decoding is interrupted
                computed[language].update(table)
                bar.update(len(table))
        for task in tasks:
            if task.phones is None:
                task.phones = computed[get_locale(task.locale).espeak][task.sentence]


# --- step 4: check and decode, in shards ------------------------------------------------------
@dataclass(frozen=True)
class ShardSettings:
    """Everything besides the clips that decides a shard's content."""

    min_duration: float
    max_duration: float
    language_switch: str
    vocab: dict[str, int] | None
    oov_policy: str

    def key(self) -> str:
        return json.dumps(
            {"format": SHARD_FORMAT, "espeak": espeak_version(), **self.__dict__}, sort_keys=True
        )


def check_phones(
    task: ClipTask, settings: ShardSettings, outside: Counter[str]
) -> Rejection | None:
    """Reject a clip without phones, and apply the vocabulary policy to phones outside it."""
    if not task.phones:
        switched = settings.language_switch == "remove-utterance"
        return Rejection(
            task.locale,
            task.split,
            task.path,
            "language_switch" if switched else "no_phones",
            f"espeak-ng gave no phones for {task.sentence!r}",
        )
    if settings.vocab is None:
        return None
    unknown = [p for p in task.phones.split() if p not in settings.vocab]
    outside.update(unknown)
    if unknown and settings.oov_policy == "reject":
        detail = f"not in the vocabulary: {' '.join(sorted(set(unknown)))}"
        return Rejection(task.locale, task.split, task.path, "phones_outside_vocab", detail)
    if unknown:
        task.phones = " ".join(p if p in settings.vocab else "<unk>" for p in task.phones.split())
    return None


# The schema's numeric columns: Arrow type name -> numpy type.
NUMPY_TYPES = {"int32": np.int32, "float": np.float32}


def shard_schema():  # noqa: ANN201 - pyarrow.Schema
    """The prepared dataset's columns (docs/formats.md) as Arrow types.

    Plain pyarrow, so decoding workers never import `datasets`; `Dataset.from_file` reads these
    types back as List(Value("int16")), Value("string"), ...
    """
    import pyarrow as pa

    return pa.schema(
        [
            ("audio", pa.list_(pa.int16())),
            ("phones", pa.string()),
            ("num_phones", pa.int32()),
            ("locale", pa.string()),
            ("split", pa.string()),
            ("duration", pa.float32()),
            ("num_frames", pa.int32()),
            ("client_id", pa.string()),
            ("sentence", pa.string()),
            ("path", pa.string()),
        ]
    )


def to_arrow_table(columns: dict[str, list], schema):  # noqa: ANN001, ANN201 - pyarrow types
    """The shard's rows as an Arrow table, every column built from numpy buffers.

    Not with `pa.array()`: its first call in a process imports pandas (about 0.4 s of CPU per
    worker, the decoding of a hundred clips) to check whether its input is a pandas object, and
    over a list of numpy arrays it walks every sample in Python.
    """
    import pyarrow as pa

    def offsets(lengths: list[int]) -> pa.Array:
        ends = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=ends[1:])
        return pa.Array.from_buffers(pa.int32(), len(ends), [None, pa.py_buffer(ends)])

    arrays = []
    for name in schema.names:
        values, kind = columns[name], schema.field(name).type
        if pa.types.is_list(kind):  # the audio: one flat int16 buffer plus offsets
            flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int16)
            samples = pa.Array.from_buffers(pa.int16(), len(flat), [None, pa.py_buffer(flat)])
            arrays.append(pa.ListArray.from_arrays(offsets([len(v) for v in values]), samples))
        elif pa.types.is_string(kind):
            encoded = [value.encode() for value in values]
            ends = offsets([len(e) for e in encoded]).buffers()[1]
            text = pa.py_buffer(b"".join(encoded))
            arrays.append(pa.StringArray.from_buffers(len(values), ends, text))
        else:
            numbers = np.asarray(values, dtype=NUMPY_TYPES[str(kind)])
            arrays.append(pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(numbers)]))
    return pa.Table.from_arrays(arrays, schema=schema)


def check_clip(
    task: ClipTask, min_duration: float, max_duration: float
) -> tuple[np.ndarray | None, Rejection | None]:
    """Decode one clip and apply the audio filters; returns (pcm16, None) or (None, rejection)."""

    def reject(reason: str, detail: str) -> tuple[None, Rejection]:
        return None, Rejection(task.locale, task.split, task.path, reason, detail)

    try:
        samples = audio_io.load_audio(task.audio_path)
    except audio_io.AudioError as error:
        return reject(error.reason, error.detail)
    duration = len(samples) / audio_io.SAMPLE_RATE
    if audio_io.is_silent(samples):
        return reject("silent_audio", f"peak below {audio_io.SILENCE_PEAK} over {duration:.2f} s")
    if duration < min_duration or duration > max_duration:
        return reject(
            "duration_out_of_range",
            f"{duration:.2f} s is outside [{min_duration}, {max_duration}] s",
        )
    phones = task.phones.split()
    frames = ctc.count_frames(len(samples))
    needed = ctc.count_min_frames(phones)
    if frames < needed:
        # CTC needs one frame per phone plus a blank between repeated phones; with fewer frames
        # the loss is infinite and poisons the batch.
        return reject(
            "too_short_for_phones",
            f"{frames} CTC frames ({duration:.2f} s) cannot carry {len(phones)} phones "
            f"({needed} needed)",
        )
    return audio_io.to_pcm16(samples), None


def process_shard(job: tuple[str, list[ClipTask], ShardSettings]) -> str:
    """Check and decode a shard's clips (phones already filled in); write `<name>.arrow` + `.json`.

    Runs in a worker. The .json (kept clips' summaries, rejections) is written first and the
    .arrow renamed into place last, so an existing .arrow marks a complete shard.
    """
    import pyarrow as pa

    shard_path, tasks, settings = job
    schema = shard_schema()
    columns: dict[str, list] = {name: [] for name in schema.names}
    kept: list[dict] = []
    rejected: list[Rejection] = []
    outside: Counter[str] = Counter()
    for task in tasks:
        rejection = check_phones(task, settings, outside)
        pcm = None
        if rejection is None:
            pcm, rejection = check_clip(task, settings.min_duration, settings.max_duration)
        if rejection is not None:
            rejected.append(rejection)
            continue
        duration = len(pcm) / audio_io.SAMPLE_RATE
        row = {
            "audio": pcm,
            "phones": task.phones,
            "num_phones": len(task.phones.split()),
            "locale": task.locale,
            "split": task.split,
            "duration": duration,
            "num_frames": ctc.count_frames(len(pcm)),
            "client_id": task.client_id,
            "sentence": task.sentence,
            "path": f"{task.locale}/clips/{task.path}",
        }
        for name, value in row.items():
            columns[name].append(value)
        kept.append(
            {
                **{key: row[key] for key in ("locale", "split", "duration", "phones")},
                "path": task.path,
                # The same audio under another name (a copy) is found by this, after decoding.
                "audio_hash": hashlib.blake2b(pcm.tobytes(), digest_size=16).hexdigest(),
            }
        )
    record = {
        "kept": kept,
        "rejected": [r.as_dict() for r in rejected],
        "outside_vocab": dict(outside),
    }
    _write_atomically(Path(shard_path + ".json"), json.dumps(record, ensure_ascii=False).encode())
    tmp = shard_path + ".arrow.tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(to_arrow_table(columns, schema))
    os.replace(tmp, shard_path + ".arrow")
    return shard_path


def _write_atomically(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def plan_shards(
    tasks: list[ClipTask], work_dir: Path, settings: ShardSettings
) -> list[tuple[str, list[ClipTask]]]:
    """Cut each (locale, split) into shards named by a hash of their content and the settings.

    A shard whose inputs are unchanged keeps its name, so a re-run finds it and skips it.
    """
    groups: dict[tuple[str, str], list[ClipTask]] = defaultdict(list)
    for task in tasks:
        groups[(task.locale, task.split)].append(task)
    shards = []
    for (locale, split), group in groups.items():
        for index in range(0, len(group), SHARD_CLIPS):
            chunk = group[index : index + SHARD_CLIPS]
            digest = hashlib.sha256(settings.key().encode())
            for task in chunk:
                stat = os.stat(task.audio_path)
                digest.update(
                    f"{task.path}\t{task.client_id}\t{task.sentence}\t"
                    f"{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
                )
            name = f"{locale}.{split}.{index // SHARD_CLIPS:05d}.{digest.hexdigest()[:16]}"
            shards.append((str(work_dir / name), chunk))
    return shards


def unwritten_shards(
    shards: list[tuple[str, list[ClipTask]]],
) -> list[tuple[str, list[ClipTask]]]:
    """The shards an earlier, interrupted run did not finish."""
    return [(path, chunk) for path, chunk in shards if not Path(path + ".arrow").is_file()]


def decode_shards(
    todo: list[tuple[str, list[ClipTask]]], settings: ShardSettings, pool: Pool | None
) -> None:
    """Write the shards in `todo`, largest first.

    Largest first so the workers run out of work together: a big shard dealt last would keep one
    worker busy while the others wait.
    """
    jobs = [(path, chunk, settings) for path, chunk in sorted(todo, key=lambda s: -len(s[1]))]
    clips = sum(len(chunk) for _, chunk in todo)
    with progress_bar(clips, "decode", "clip") as bar:
        sizes = {path: len(chunk) for path, chunk in todo}
        results: Iterable[str] = (
            pool.imap_unordered(process_shard, jobs) if pool else map(process_shard, jobs)
        )
        for path in results:
            bar.update(sizes[path])


def collect_outcomes(
    shards: list[tuple[str, list[ClipTask]]],
) -> tuple[Outcome, dict[str, dict[str, int]]]:
    """Kept clips and rejections of every shard, in the plan's order; a clip whose decoded audio
    equals an earlier kept clip's (a copy under another name) is rejected as a duplicate."""
    outcome = Outcome()
    outside: dict[str, Counter[str]] = defaultdict(Counter)
    first: dict[str, dict] = {}  # audio hash -> the first kept clip with that audio
    for path, chunk in shards:
        record = json.loads(Path(path + ".json").read_text(encoding="utf-8"))
        outcome.rejected.extend(Rejection(**item) for item in record["rejected"])
        outcome.rows[path] = 0
        for position, clip in enumerate(record["kept"]):
            original = first.setdefault(clip["audio_hash"], clip)
            if original is clip:
                outcome.kept.append(clip)
                outcome.rows[path] += 1
                continue
            outcome.dropped.setdefault(path, []).append(position)
            across = original["split"] != clip["split"] or original["locale"] != clip["locale"]
            outcome.rejected.append(
                Rejection(
                    clip["locale"],
                    clip["split"],
                    clip["path"],
                    "duplicate_across_splits" if across else "duplicate_row",
                    f"the same audio as {original['locale']}/clips/{original['path']} "
                    f"({original['locale']} {original['split']}.tsv)",
                )
            )
        outside[chunk[0].locale].update(record["outside_vocab"])
    outside_vocab = {loc: dict(c.most_common()) for loc, c in sorted(outside.items()) if c}
    return outcome, outside_vocab


# --- step 5: vocabulary and dataset -----------------------------------------------------------
# `datasets` reads a split's column types from this file when it names them and from the Arrow
# schema when it does not; naming none keeps the file valid for every `datasets` version.
DATASET_INFO = {"description": "phonetune prepared dataset: columns in docs/formats.md"}


def write_dataset(
    out: Path,
    files: dict[str, list[Path]],
    fingerprints: dict[str, str],
    place: Callable[[Path, Path], None],
) -> None:
    """Lay out Arrow files in `out` as `DatasetDict.save_to_disk` does.

    `files` maps a split to its Arrow stream files in row order (a split without files is left
    out); `place(source, target)` puts one file there: prepare moves its shards, merge links them.
    The small JSON files are written here rather than by `datasets`, whose import costs the main
    process more than the whole assembly. A dataset already in `out` is replaced.
    """
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    splits = [split for split in SPLITS if files.get(split)]
    for split in splits:
        folder = staging / split
        folder.mkdir(parents=True)
        count = len(files[split])
        names = [f"data-{i:05d}-of-{count:05d}.arrow" for i in range(count)]
        for source, name in zip(files[split], names, strict=True):
            place(source, folder / name)
        state = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": fingerprints[split],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": split,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO), encoding="utf-8")
    (staging / DATASET_FILE).write_text(json.dumps({"splits": splits}), encoding="utf-8")
    for old in [out / DATASET_FILE, *(out / split for split in SPLITS)]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()


def assemble_dataset(shards: list[tuple[str, list[ClipTask]]], out: Path, outcome: Outcome) -> None:
    """Move the shards into `out` as the dataset's Arrow files, without a copy.

    Empty shards (every clip rejected) are left out; a shard with clips dropped after decoding
    goes in as a filtered copy (the shard itself stays as decoded, so an interrupted run filters
    it again the same way). A split's fingerprint hashes its shards' names, which hash their
    inputs: the same data gets the same fingerprint.
    """
    files: dict[str, list[Path]] = defaultdict(list)
    names: dict[str, list[str]] = defaultdict(list)
    for path, chunk in shards:
        if outcome.rows[path]:
            source = Path(path + ".arrow")
            if path in outcome.dropped:
                source = write_without_rows(source, outcome.dropped[path])
            files[chunk[0].split].append(source)
            names[chunk[0].split].append(Path(path).name)
    fingerprints = {
        split: hashlib.sha256("\n".join(found).encode()).hexdigest()[:16]
        for split, found in names.items()
    }
    write_dataset(out, files, fingerprints, os.replace)


def write_without_rows(shard: Path, positions: list[int]) -> Path:
    """A copy of an Arrow stream shard without the rows at `positions`; returns its path."""
    import pyarrow as pa

    with pa.OSFile(str(shard), "rb") as source, pa.ipc.open_stream(source) as reader:
        table = reader.read_all()
    keep = np.ones(table.num_rows, dtype=bool)
    keep[positions] = False
    filtered = shard.with_name(shard.name + ".filtered")
    with pa.OSFile(str(filtered), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.filter(pa.array(keep)))
    return filtered


# --- the report -------------------------------------------------------------------------------
def build_report(
    options: PrepareOptions,
    read: dict[tuple[str, str], int],
    outcome: Outcome,
    rejected: list[Rejection],
    vocab: dict[str, int],
    vocab_source: str,
    outside_vocab: dict,
    cache: PhonemeCache,
    shard_counts: tuple[int, int],
) -> dict:
    import phonemizer

    from phonetune import __version__

    all_rejected = rejected + outcome.rejected
    # Grouped once: filtering every clip for every (locale, split) grows with locales x clips.
    kept_by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for k in outcome.kept:
        kept_by[(k["locale"], k["split"])].append(k)
    reasons_by: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in all_rejected:
        reasons_by[(r.locale, r.split)][r.reason] += 1
    per_locale: dict[str, dict] = {}
    for locale in options.locales:
        entry: dict = {"espeak_language": get_locale(locale).espeak, "splits": {}}
        inventory: Counter[str] = Counter()
        for split in options.report_splits:
            if (locale, split) not in read:
                continue
            kept = kept_by[(locale, split)]
            reasons = reasons_by[(locale, split)]
            seconds = sum(k["duration"] for k in kept)
            entry["splits"][split] = {
                "read": read[(locale, split)],
                "kept": len(kept),
                "rejected": sum(reasons.values()),
                "rejected_by_reason": dict(reasons.most_common()),
                "hours": round(seconds / 3600, 4),
            }
            for k in kept:
                inventory.update(k["phones"].split())
        entry["hours"] = round(sum(s["hours"] for s in entry["splits"].values()), 4)
        entry["phone_inventory"] = dict(inventory.most_common())
        per_locale[locale] = entry
    totals_read = sum(read.values())
    hours = sum(k["duration"] for k in outcome.kept) / 3600
    return {
        "versions": {
            "phonetune": __version__,
            "espeak_ng": espeak_version(),
            "phonemizer": phonemizer.__version__,
        },
        "settings": {
            "cv_root": str(options.cv_root),
            "locales": options.locales,
            "splits": list(options.splits),
            **(
                {"dev_fraction": options.dev_fraction, "test_fraction": options.test_fraction}
                if options.from_validated
                else {}
            ),
            "min_duration": options.min_duration,
            "max_duration": options.max_duration,
            "language_switch": options.language_switch,
            "oov_policy": options.oov_policy,
            "sample_rate": audio_io.SAMPLE_RATE,
            "phonemizer_separator": {"phone": " ", "word": "", "syllable": ""},
            "phonemizer_strip": False,
            "with_stress": False,
            "phoneme_scheme": SCHEME_VERSION,
        },
        "totals": {
            "read": totals_read,
            "kept": len(outcome.kept),
            "rejected": len(all_rejected),
            "hours_kept": round(hours, 4),
            "rejected_by_reason": dict(Counter(r.reason for r in all_rejected).most_common()),
        },
        "per_locale": per_locale,
        "vocab": {
            "size": len(vocab),
            "source": vocab_source,
            "phones_outside_vocab": outside_vocab,
        },
        "phoneme_cache": {"path": str(cache.path), "hits": cache.hits, "misses": cache.misses},
        "shards": {"reused": shard_counts[0], "written": shard_counts[1]},
        "rejected": [r.as_dict() for r in all_rejected],
    }


def print_summary(report: dict, out: Path) -> None:
    print(
        f"\n{'locale':<8} {'split':<6} {'read':>6} {'kept':>6} {'rejected':>8} {'hours':>8}  top rejection"
    )
    for locale, entry in report["per_locale"].items():
        for split, stats in entry["splits"].items():
            top = next(iter(stats["rejected_by_reason"].items()), None)
            top_text = f"{top[0]} ({top[1]})" if top else ""
            print(
                f"{locale:<8} {split:<6} {stats['read']:>6} {stats['kept']:>6} "
                f"{stats['rejected']:>8} {stats['hours']:>8.3f}  {top_text}"
            )
    totals = report["totals"]
    print(
        f"\nread {totals['read']} clips: kept {totals['kept']} ({totals['hours_kept']:.3f} h), "
        f"rejected {totals['rejected']} {totals['rejected_by_reason'] or ''}"
    )
    cache = report["phoneme_cache"]
    print(
        f"phonemes: {cache['hits']} sentences from the cache, {cache['misses']} phonemized; "
        f"vocabulary: {report['vocab']['size']} tokens ({report['vocab']['source']})"
    )
    print(f"prepared dataset: {out}  (datasets.load_from_disk)\nreport: {out / REPORT_FILE}")


# --- the command ------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("PHONETUNE_CACHE_DIR", Path(base) / "phonetune"))


def validate_options(options: PrepareOptions) -> None:
    problems = []
    if not options.cv_root.is_dir():
        problems.append(
            f"--cv-root {options.cv_root} is not a directory (give the extracted Common "
            "Voice release, the folder that holds one folder per locale)"
        )
    if options.num_workers < 1:
        problems.append("--num-workers must be at least 1")
    if options.vocab is not None and options.vocab.is_dir():
        problems.append(f"--vocab {options.vocab} is a folder: give its vocab.json file")
    if not 0 <= options.min_duration < options.max_duration:
        problems.append(
            f"need 0 <= --min-duration < --max-duration, got {options.min_duration} "
            f"and {options.max_duration}"
        )
    unknown_splits = [s for s in options.splits if s not in (*SPLITS, VALIDATED)]
    if unknown_splits:
        problems.append(
            f"unknown split(s) {', '.join(unknown_splits)}; choose from {', '.join(SPLITS)}, "
            f"or {VALIDATED} alone"
        )
    elif VALIDATED in options.splits and not options.from_validated:
        problems.append(
            f"--splits {VALIDATED} makes train, dev and test from validated.tsv: give it alone"
        )
    if options.from_validated:
        fractions = (options.dev_fraction, options.test_fraction)
        if not (all(0 < f < 1 for f in fractions) and sum(fractions) < 1):
            problems.append(
                "--dev-fraction and --test-fraction must each be in (0, 1) and leave some clips "
                f"for train, not {options.dev_fraction} and {options.test_fraction}"
            )
    if options.out.exists() and not options.out.is_dir():
        problems.append(f"--out {options.out} exists and is not a directory")
    elif _holds_other_files(options.out):
        # The dataset replaces train/, dev/ and test/ in --out: never those of another folder.
        problems.append(
            f"--out {options.out} is not empty and holds no prepared dataset: choose a new or "
            "empty folder (an earlier `phonetune prepare --out` folder is updated in place)"
        )
    if problems:
        raise PhonetuneError("; ".join(problems))


def _holds_other_files(out: Path) -> bool:
    """A non-empty folder that no earlier prepare run wrote to (finished or interrupted)."""
    if not out.is_dir() or not any(out.iterdir()):
        return False
    return not ((out / REPORT_FILE).is_file() or (out / ".work").is_dir())


def prepare(options: PrepareOptions) -> dict:
    """Run the whole data stage; returns the report (also written to `out/prep_report.json`)."""
    validate_options(options)
    given_vocab = load_vocab(options.vocab) if options.vocab else None
    # Every locale's TSVs are found first: a missing one is an error before anything is written.
    split_files = {
        locale: find_split_files(options.cv_root, locale, options.splits)
        for locale in options.locales
    }
    work_dir = options.out / ".work"
    created = [f for f in (work_dir, options.out, *options.out.parents) if not f.exists()]
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return prepare_into(work_dir, options, split_files, given_vocab)
    except BaseException:
        # A failure before any shard was written leaves no empty folders behind (rmdir removes
        # only empty ones: shards of an interrupted run stay, to be resumed).
        with contextlib.suppress(OSError):
            for folder in created:
                folder.rmdir()
        raise


def prepare_into(
    work_dir: Path,
    options: PrepareOptions,
    split_files: dict[str, dict[str, Path]],
    given_vocab: dict[str, int] | None,
) -> dict:
    """Phonemize, decode into shards under `work_dir`, and write the dataset and report."""
    cache = PhonemeCache(
        (options.cache_dir or default_cache_dir()) / "phonemes.sqlite", espeak_version()
    )
    settings = ShardSettings(
        options.min_duration,
        options.max_duration,
        options.language_switch,
        given_vocab,
        options.oov_policy,
    )
    pool = None
    if options.num_workers > 1:
        # Started first, so that the workers import while the main process reads the TSVs.
        pool = multiprocessing.get_context("spawn").Pool(options.num_workers)
    try:
        phonemes = PhonemeJobs(cache, options.language_switch, pool)
        tasks: list[ClipTask] = []
        rejected: list[Rejection] = []
        script_rejected: list[Rejection] = []
        read: dict[tuple[str, str], int] = {}
        for locale in options.locales:
            # Locale by locale: the workers phonemize one locale while this process reads the next.
            clips, row_rejections, locale_read = read_locale(options, locale, split_files[locale])
            clips, script_rejections = check_scripts(clips)
            locale_tasks = make_tasks(clips, cache, options.language_switch)
            phonemes.start(locale_tasks)
            tasks += locale_tasks
            rejected += row_rejections
            script_rejected += script_rejections
            read.update(locale_read)
        rejected += script_rejected  # the report lists row rejections first
        shards = plan_shards(tasks, work_dir, settings)
        plan = hashlib.sha256(
            "\n".join(sorted(Path(p).name for p, _ in shards)).encode()
        ).hexdigest()
        finished = _finished_plan(options.out) == plan and all(
            Path(p + ".json").is_file() for p, _ in shards
        )
        phonemes.finish(tasks)
        todo = [] if finished else unwritten_shards(shards)
        decode_shards(todo, settings, pool)
        shard_counts = (len(shards) - len(todo), len(todo))
    except BaseException:
        if pool is not None:
            pool.terminate()  # rather than let close() below wait for every queued job
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    outcome, outside_vocab = collect_outcomes(shards)
    if given_vocab is not None:
        vocab, source = given_vocab, str(options.vocab)
    else:
        vocab = build_vocab(Counter(p for k in outcome.kept for p in k["phones"].split()))
        source = VOCAB_BUILT
    report = build_report(
        options, read, outcome, rejected, vocab, source, outside_vocab, cache, shard_counts
    )
    cache.close()
    if not outcome.kept:
        _write_atomically(options.out / REPORT_FILE, _to_json(report))
        raise PhonetuneError(
            f"no clip was kept out of {report['totals']['read']} read; every "
            f"rejection and its reason is in {options.out / REPORT_FILE}"
        )
    if not finished:
        assemble_dataset(shards, options.out, outcome)
    save_vocab(vocab, options.out / VOCAB_FILE)
    report["shards"]["plan"] = plan  # written last: it marks the dataset as finished
    _write_atomically(options.out / REPORT_FILE, _to_json(report))
    # The audio is now in the dataset: drop the shards' copies, keep their small .json records
    # so that a re-run with the same inputs recognises the finished work and decodes nothing.
    _prune_work_dir(work_dir, {Path(path).name for path, _ in shards})
    return report


def _to_json(report: dict) -> bytes:
    return json.dumps(report, ensure_ascii=False, indent=1).encode("utf-8")


def _finished_plan(out: Path) -> str | None:
    """The shard plan of the dataset already in `out`, if a previous run finished there."""
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not (out / DATASET_FILE).is_file():
        return None
    return report.get("shards", {}).get("plan")


def _prune_work_dir(work_dir: Path, keep: set[str]) -> None:
    for item in work_dir.iterdir():
        if item.suffix != ".json" or item.stem not in keep:
            item.unlink()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cv-root",
        type=Path,
        required=True,
        help="extracted Common Voice release: one folder per locale with "
        "train/dev/test.tsv and clips/",
    )
    parser.add_argument(
        "--locales",
        required=True,
        help="comma-separated Common Voice locale codes, e.g. en,fr,sv-SE,zh-CN",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="PREP_DIR to write the prepared dataset to"
    )
    parser.add_argument(
        "--num-workers",
        type=positive_int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="processes that phonemize and decode in parallel (default: up to 4 CPUs)",
    )
    parser.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="use this token->id vocabulary (e.g. data/reference/espeak_cv_ft_vocab.json, "
        "the released model's) instead of building one from the data",
    )
    parser.add_argument(
        "--oov-policy",
        choices=OOV_POLICIES,
        default="reject",
        help="with --vocab, what to do with a clip holding phones outside the vocabulary: "
        "reject it (default) or map those phones to <unk>",
    )
    parser.add_argument(
        "--language-switch",
        choices=LANGUAGE_SWITCH_POLICIES,
        default="remove-flags",
        help="espeak-ng language switches (foreign words): keep their phones and drop the "
        "flags (remove-flags, default), or reject the sentence (remove-utterance)",
    )
    parser.add_argument(
        "--splits",
        default=",".join(SPLITS),
        help="comma-separated splits to prepare (default: train,dev,test), or 'validated': "
        "speaker- and sentence-disjoint train/dev/test made from validated.tsv",
    )
    parser.add_argument(
        "--dev-fraction",
        type=positive_number,
        default=0.1,
        help="with --splits validated: share of the clips held out for dev, whole speakers (default 0.1)",
    )
    parser.add_argument(
        "--test-fraction",
        type=positive_number,
        default=0.1,
        help="with --splits validated: share of the clips held out for test (default 0.1)",
    )
    parser.add_argument(
        "--min-duration",
        type=non_negative_number,
        default=0.5,
        help="shortest clip kept, seconds (default 0.5)",
    )
    parser.add_argument(
        "--max-duration",
        type=positive_number,
        default=20.0,
        help="longest clip kept, seconds (default 20)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the phoneme cache lives (default: $PHONETUNE_CACHE_DIR or ~/.cache/phonetune)",
    )


def run(args: argparse.Namespace) -> int:
    locales = parse_locales(args.locales)  # an unknown locale is a PhonetuneError
    options = PrepareOptions(
        cv_root=args.cv_root,
        locales=locales,
        out=args.out,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
        num_workers=args.num_workers,
        vocab=args.vocab,
        oov_policy=args.oov_policy,
        language_switch=args.language_switch,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        cache_dir=args.cache_dir,
        dev_fraction=args.dev_fraction,
        test_fraction=args.test_fraction,
    )
    report = prepare(options)
    print_summary(report, options.out)
    out = shlex.quote(str(options.out))
    print(
        f"next: phonetune train --config xlsr53_espeak_cv data.prepared_dir={out} "
        f"run.output_dir=runs/{shlex.quote(options.out.resolve().name)}   (on a CPU: --config tiny_cpu)"
    )
    return 0

"""Training throughput: phonetune vs the Hugging Face CTC recipe vs the compute limit, one command.

    python scripts/bench_train.py --quick          # 10 rounds x 2 steps: a few minutes
    python scripts/bench_train.py                  # 20 rounds x 3 steps
    python scripts/bench_train.py --thorough       # 40 rounds x 5 steps: over an epoch of the demo
    python scripts/bench_train.py --prepared-dir PREP --config configs/tiny_cpu.yaml [KEY=VALUE ...]

Three contenders train the same model (the config's, built by `train.model.build_model` with the
config's seed, so the weights are identical) on the same prepared corpus, each in its own process:

1. `phonetune`: the real training loop (`phonetune.train.loop.train`), evaluation and checkpoints
   out of the way.
2. `reference`: `scripts/reference_hf_recipe.py`, the Hugging Face recipe (`transformers.Trainer`,
   padding collator, length-grouped sampling) with K utterances per batch, K chosen so that its
   average padded batch holds as many seconds as phonetune's average padded batch.
3. `limit`: forward + backward + clip + AdamW step of the same model on tensors pre-built from
   exactly the utterances phonetune trained on in the same round, no data loading; two ways: `exact`
   (each utterance at its own length, no padding, gradients accumulated over the batch) and
   `padded` (the same batches, padded, pre-built). The limit is the faster of the two per second of
   audio; its AdamW is torch's fused kernel where there is one.

After setup and `--warmup-steps` untimed steps each, the contenders run in rounds, one at a time, in
the order phonetune, reference, limit (A,B,C,A,B,C...), so machine noise hits them alike. In a round
phonetune runs `--steps` optimizer steps; the reference runs until it has trained on at least as
much audio (real, unpadded seconds) as phonetune did in that round; the limit replays phonetune's
batches of that round (the rows are checked to be identical). Throughput is real audio seconds per
wall-clock second summed over the rounds; the ratios are also given as the median of the
per-round ratios, which machine load that drifts between rounds disturbs less. A round's time
covers the same work for everyone: N steps and the loading of N batches. Peak memory is each
contender's process peak resident set size (getrusage `ru_maxrss`, so it includes the Python,
torch and transformers imports; the limit's also holds its pre-built tensors), plus
`torch.cuda.max_memory_allocated` on a GPU.

Without `--prepared-dir` the corpus is `phonetune synth`'s default (8 locales x 200 clips, then
`phonetune prepare`), made once under `--work-dir`. Prints a table, writes the training section of
BENCHMARKS.md (unless --no-write), and prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

from phonetune.data.audio import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # reference_hf_recipe.py

MARK = "@@bench "  # prefix of the protocol lines a worker writes on stdout; other lines are logged
CONTENDERS = ("phonetune", "reference", "limit")
# rounds, timed phonetune steps per round, untimed warm-up steps. Many short rounds: load that
# comes and goes on a shared machine then falls on every contender, not on whoever ran during it.
PRESETS = {
    "quick": (10, 2, 3),
    "standard": (20, 3, 5),
    "thorough": (40, 5, 5),
}
DEMO_LOCALES = ["en", "fr", "de", "es", "it", "pl", "ru", "tr"]
DEMO_CLIPS_PER_LOCALE = 200
BENCHMARKS_HEADING = "## Training: `scripts/bench_train.py`"


# --- the worker side: one contender per process, driven over stdin/stdout ------------------------
def reply(message: dict) -> None:
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def read_command() -> dict:
    line = sys.stdin.readline()
    if not line:  # the orchestrator is gone
        os._exit(1)
    return json.loads(line)


def peak_memory() -> dict:
    import torch

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stop_if_asked(command: dict) -> None:
    if command.get("stop"):
        reply(peak_memory())
        os._exit(0)  # skip the rest of the run (final checkpoint, Trainer teardown): not measured


def fastest_adamw(optimizer):  # noqa: ANN001, ANN201
    """The same AdamW (parameter groups, hyper-parameters) with torch's fused kernel where it has
    one for these tensors (CPU and CUDA since torch 2.4): the limit takes the fastest update."""
    import torch

    defaults = optimizer.defaults
    groups = [
        {"params": group["params"], "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups
    ]
    settings = {key: defaults[key] for key in ("lr", "betas", "eps")}
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **settings)


def describe_optimizer(optimizer) -> str:  # noqa: ANN001
    """e.g. "AdamW (fused)"; unwraps accelerate's AcceleratedOptimizer."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    defaults = optimizer.defaults
    kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "default"
    return f"{type(optimizer).__name__} ({kind})"


class Chunk:
    """The work between two commands: steps, audio and wall time (from the command's arrival)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.audio = self.padded = 0.0
        self.rows: list[int] = []
        self.optimizer: str | None = None

    def result(self) -> dict:
        import torch

        synchronize()
        return {
            "threads": torch.get_num_threads(),
            "optimizer": self.optimizer,
            "steps": self.steps,
            "audio_s": self.audio,
            "padded_s": self.padded,
            "wall_s": time.perf_counter() - self.started,
            "rows": self.rows,
        }


def phonetune_worker(spec: dict) -> None:
    """`phonetune.train.loop.train` with a gate in front of every step (its public `Hooks`): it waits
    for the orchestrator between rounds. The gate closes a round just before the step after its
    last one, before that step's batch is loaded: the round holds N steps and N batch loads."""
    from phonetune.train.config import load_config
    from phonetune.train.loop import Hooks, train

    gate = {"remaining": spec["warmup_steps"], "chunk": Chunk()}

    def before_step(run, step):  # noqa: ANN001, ANN202
        if gate["remaining"] == 0:
            reply(gate["chunk"].result())
            command = read_command()
            stop_if_asked(command)
            gate["remaining"], gate["chunk"] = command["steps"], Chunk()

    def on_batches(run, step, batches):  # noqa: ANN001, ANN202
        gate["chunk"].rows += [row for batch in batches for row in batch.rows]

    def after_step(run, step, result):  # noqa: ANN001, ANN202
        chunk = gate["chunk"]
        chunk.steps += 1
        chunk.audio += result.audio_seconds
        chunk.padded += result.padded_seconds
        chunk.optimizer = describe_optimizer(run.optimizer)
        gate["remaining"] -= 1

    config = load_config(
        Path(spec["config"]),
        [
            f"data.prepared_dir={spec['prepared_dir']}",
            f"run.output_dir={spec['run_dir']}",
            f"train.max_steps={spec['max_steps']}",
            "data.eval_split=no_evaluation_in_the_benchmark",  # a missing split: no evaluation
            f"train.save_steps={spec['max_steps'] + 1}",
            "log.progress_bar=false",  # as the reference's disable_tqdm; metrics.jsonl stays
            "log.report_to=[]",
            *spec["overrides"],
        ],
    )
    train(config, Hooks(before_step=before_step, on_batches=on_batches, after_step=after_step))
    raise RuntimeError("phonetune's run ended before the benchmark stopped it")


def reference_worker(spec: dict) -> None:
    """The HF recipe's Trainer with a callback that waits for the orchestrator between rounds. Its
    collator also notes each batch's real and padded seconds in the batch (where it runs: maybe a
    DataLoader worker process), taken out again where the Trainer hands the batch to the model
    (measurement only, no device synchronisation)."""
    from reference_hf_recipe import make_trainer
    from transformers import TrainerCallback

    trained: list[tuple[float, float]] = []  # (real, padded) seconds of each batch, in order

    class Gate(TrainerCallback):
        def __init__(self) -> None:
            self.chunk, self.target = Chunk(), None

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            chunk = self.chunk
            chunk.steps += 1
            chunk.optimizer = describe_optimizer(kwargs["optimizer"])
            real, padded = trained.pop(0)  # one batch per step (no gradient accumulation)
            chunk.audio += real
            chunk.padded += padded
            finished = (
                chunk.steps >= spec["warmup_steps"]
                if self.target is None
                else chunk.audio >= self.target
            )
            if finished:
                reply(chunk.result())
                command = read_command()
                stop_if_asked(command)
                self.chunk, self.target = Chunk(), command["audio_s"]
            return control

    trainer = make_trainer(
        Path(spec["prepared_dir"]),
        Path(spec["run_dir"]),
        spec["batch_size"],
        # More than the rounds can take (the benchmark stops it); only the warm-up of the learning
        # rate depends on it, which does not change the work of a step.
        max_steps=10 * spec["max_steps"],
        config_path=Path(spec["config"]),
        overrides=spec["overrides"],
        callbacks=[Gate()],
    )
    collator, training_step = trainer.data_collator, trainer.training_step

    def counting_collator(features):  # noqa: ANN001, ANN202
        batch = collator(features)
        mask = batch["attention_mask"]
        batch["bench_seconds"] = (float(mask.sum()) / SAMPLE_RATE, mask.numel() / SAMPLE_RATE)
        return batch

    def counted_step(model, inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        trained.append(inputs.pop("bench_seconds"))
        return training_step(model, inputs, *args, **kwargs)

    trainer.data_collator, trainer.training_step = counting_collator, counted_step
    trainer.train()
    raise RuntimeError("the reference run ended before the benchmark stopped it")


def limit_worker(spec: dict) -> None:
    """Forward + backward + clip + AdamW of the same model on pre-built tensors of phonetune's
    batches (the same sampler, replayed), in two variants: `padded` batches and `exact` lengths."""
    import torch

    from phonetune.train.batching import (
        Batch,
        collate,
        drop_unalignable,
        load_training_data,
        make_sampler,
    )
    from phonetune.train.config import load_config
    from phonetune.train.loop import ctc_losses
    from phonetune.train.model import CTCModel, build_model
    from phonetune.train.resume import seed_everything
    from phonetune.train.schedule import make_optimizer

    config = load_config(
        Path(spec["config"]),
        [
            f"data.prepared_dir={spec['prepared_dir']}",
            f"run.output_dir={spec['run_dir']}",
            *spec["overrides"],
        ],
    )
    t, m = config.train, config.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_training_data(config)
    seed_everything(t.seed)
    model, _ = build_model(m, data.vocab)
    module = CTCModel(model)
    drop_unalignable(data, module.conv_layers, config)
    module.to(device).train()
    optimizer = fastest_adamw(make_optimizer(module, config))
    parameters = [p for p in module.parameters() if p.requires_grad]
    sampler = make_sampler(data, config)
    plan = []  # phonetune's batches (shares of rows), epoch after epoch, as its loop takes them
    while len(plan) < spec["max_steps"]:
        sampler.set_epoch(sampler.epoch + 1 if plan else 0)
        plan += list(sampler)
    samples = data.train.num_samples()
    per_utterance = m.ctc_loss_reduction == "mean"

    def loss_of(logits, input_lengths, labels, label_lengths):  # noqa: ANN001, ANN202
        losses = ctc_losses(
            logits, module.output_lengths(input_lengths), labels, label_lengths, m.ctc_zero_infinity
        )
        return losses / label_lengths.clamp(min=1) if per_utterance else losses

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(parameters, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The same autocast as phonetune's Accelerator applies (bf16 / fp16); ctc_loss runs in fp32.
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)

    def autocast():  # noqa: ANN202
        return torch.autocast(device.type, dtype=precision, enabled=precision is not None)

    def padded_step(batch: Batch) -> None:
        real = (
            batch.weights > 0
        )  # zero-weight filler rows (phonetune's same-shape padding) count for nothing
        count = len(batch.rows) if per_utterance else int(batch.label_lengths[real].sum())
        with autocast():
            logits = module(batch.input_values, batch.input_lengths)
        losses = loss_of(logits, batch.input_lengths, batch.labels, batch.label_lengths)
        ((losses * batch.weights).sum() / count).backward()
        update()

    def exact_step(utterances: list[Batch]) -> None:
        count = len(utterances) if per_utterance else sum(int(u.label_lengths) for u in utterances)
        for u in utterances:
            # One utterance at its own length: no padding, so no attention mask to apply either.
            with autocast():
                logits = model.lm_head(model.wav2vec2(u.input_values).last_hidden_state)
            (loss_of(logits, u.input_lengths, u.labels, u.label_lengths).sum() / count).backward()
        update()

    def prebuild(batches: list, variant: str) -> list:
        if variant == "padded":
            return [
                collate(data.train, rows, data.vocab, t.pad_to_multiple_of).to(device)
                for rows in batches
            ]
        return [
            [collate(data.train, [row], data.vocab).to(device) for row in share.rows]
            for share in batches
        ]

    step = {"padded": padded_step, "exact": exact_step}
    started = time.perf_counter()
    for variant in ("padded", "exact"):
        for built in prebuild(plan[: spec["warmup_steps"]], variant):
            step[variant](built)
    synchronize()
    reply(
        {
            "steps": spec["warmup_steps"],
            "wall_s": time.perf_counter() - started,
            "optimizer": describe_optimizer(optimizer),
            "threads": torch.get_num_threads(),
        }
    )
    while True:
        command = read_command()
        stop_if_asked(command)
        first, last = command["batches"]
        built = prebuild(plan[first:last], command["variant"])
        chunk = Chunk()
        for batch in built:
            step[command["variant"]](batch)
        chunk.steps = last - first
        for share in plan[first:last]:
            chunk.rows += [int(row) for row in share.rows]
            chunk.audio += float(samples[share.rows].sum()) / SAMPLE_RATE
            chunk.padded += (len(share.rows) + share.fillers) * share.width / SAMPLE_RATE
        reply(chunk.result())


WORKERS = {"phonetune": phonetune_worker, "reference": reference_worker, "limit": limit_worker}


# --- the orchestrator ----------------------------------------------------------------------------
class BenchError(RuntimeError):
    pass


class Worker:
    """One contender's process: send a command, wait for its one-line answer."""

    def __init__(self, name: str, spec: dict, log_path: Path, threads: int | None) -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w", encoding="utf-8")  # closed in close()
        env = dict(os.environ)
        if threads is not None:  # torch reads it at start-up for its intra-op thread pool
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
            env=env,
        )

    def receive(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait()
                self.log.flush()
                tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
                raise BenchError(
                    f"the {self.name} worker stopped (exit {self.process.returncode}); "
                    f"the end of {self.log_path}:\n{tail}"
                )
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self.log.write(line)

    def send(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def ensure_corpus(work_dir: Path) -> Path:
    """The demo's corpus (synthesized and prepared once under `work_dir`)."""
    from phonetune.data.prepare import PrepareOptions, prepare
    from phonetune.data.prepared import is_prepared
    from phonetune.data.synth import synthesize_corpus

    corpus, prepared = work_dir / "corpus", work_dir / "prepared"
    if not is_prepared(prepared):
        if not (corpus / "phonetune_synth.json").is_file():
            print(f"synthesizing the demo corpus into {corpus} (once)", flush=True)
            synthesize_corpus(corpus, DEMO_LOCALES, DEMO_CLIPS_PER_LOCALE, seed=0, num_workers=2)
        print(f"preparing it into {prepared} (once)", flush=True)
        prepare(PrepareOptions(cv_root=corpus, locales=DEMO_LOCALES, out=prepared, num_workers=2))
    return prepared


def mean_padded_seconds(durations, batches) -> float:  # noqa: ANN001
    return float(sum(len(b) * durations[b].max() for b in batches) / len(batches))


def choose_reference_batch_size(config, prepared_dir: Path) -> dict:  # noqa: ANN001
    """K utterances per batch whose length-grouped batches pad to phonetune's mean padded seconds.

    Both are computed from the durations: phonetune's epoch plan, and the batches that
    transformers' LengthGroupedSampler forms (its own grouping function, a few random seeds).
    """
    import datasets
    import numpy as np
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from phonetune.train.batching import plan_epoch

    train = datasets.load_from_disk(str(prepared_dir))[config.data.train_split]
    durations = np.asarray(train["duration"], dtype=np.float64)
    durations = durations[durations <= config.data.max_duration]
    t = config.train
    plan = plan_epoch(durations, t.batch_seconds, t.seed, 0, bucket_width=t.bucket_width)
    target = mean_padded_seconds(durations, [group[0] for group in plan])
    lengths = durations.tolist()

    def reference_padded(k: int) -> float:
        values = []
        for seed in range(3):
            order = get_length_grouped_indices(
                lengths, k, generator=torch.Generator().manual_seed(seed)
            )
            batches = [np.asarray(order[i : i + k]) for i in range(0, len(order), k)]
            values.append(mean_padded_seconds(durations, batches))
        return float(np.mean(values))

    candidates = {k: reference_padded(k) for k in range(1, max(2, len(durations) // 4))}
    k = min(candidates, key=lambda c: abs(candidates[c] - target))
    return {"batch_size": k, "reference_padded_s": candidates[k], "phonetune_padded_s": target}


def machine_description() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def rate(chunks: list[dict]) -> float:
    wall = sum(c["wall_s"] for c in chunks)
    return sum(c["audio_s"] for c in chunks) / wall if wall > 0 else 0.0


def padding(chunks: list[dict]) -> float:
    padded = sum(c["padded_s"] for c in chunks)
    return 1.0 - sum(c["audio_s"] for c in chunks) / padded if padded > 0 else 0.0


def run_rounds(workers: dict[str, Worker], rounds: int, steps: int, warmup: int) -> dict:
    chunks: dict[str, list[dict]] = {"phonetune": [], "reference": [], "exact": [], "padded": []}
    for index in range(rounds):
        first = warmup + index * steps
        ours = workers["phonetune"].send({"steps": steps})
        chunks["phonetune"].append(ours)
        chunks["reference"].append(workers["reference"].send({"audio_s": ours["audio_s"]}))
        for variant in ("exact", "padded"):
            limit = workers["limit"].send({"batches": [first, first + steps], "variant": variant})
            if limit["rows"] != ours["rows"]:
                raise BenchError(
                    f"round {index + 1}: the limit's batches are not the ones phonetune trained "
                    "on; its replay of the sampler no longer matches train/loop.py"
                )
            chunks[variant].append(limit)
        print(
            f"round {index + 1}/{rounds}: "
            + "  ".join(f"{name} {rate(c[-1:]):.1f}" for name, c in chunks.items())
            + " audio s/s",
            flush=True,
        )
    return chunks


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    return median([a / b for a, b in zip(ours, theirs, strict=True)])


def summarise(chunks: dict, peaks: dict, setup: dict, args, machine: dict) -> dict:  # noqa: ANN001
    rates = {name: rate(c) for name, c in chunks.items()}
    per_round = {name: [rate([c]) for c in chunk_list] for name, chunk_list in chunks.items()}
    limit_variant = max(("exact", "padded"), key=lambda v: rates[v])
    limit = rates[limit_variant]
    return {
        "phonetune_audio_s_per_s": round(rates["phonetune"], 2),
        "reference_audio_s_per_s": round(rates["reference"], 2),
        "limit_audio_s_per_s": round(limit, 2),
        "padding_fraction": round(padding(chunks["phonetune"]), 4),
        "phonetune_vs_reference": round(rates["phonetune"] / rates["reference"], 3),
        "phonetune_vs_limit": round(rates["phonetune"] / limit, 3),
        "median_round_phonetune_vs_reference": round(
            median_ratio(per_round["phonetune"], per_round["reference"]), 3
        ),
        "median_round_phonetune_vs_limit": round(
            median_ratio(per_round["phonetune"], per_round[limit_variant]), 3
        ),
        "limit_variant": limit_variant,
        "limit_exact_audio_s_per_s": round(rates["exact"], 2),
        "limit_padded_audio_s_per_s": round(rates["padded"], 2),
        "reference_padding_fraction": round(padding(chunks["reference"]), 4),
        "reference_batch_size": setup["batch_size"],
        "phonetune_mean_padded_batch_s": round(setup["phonetune_padded_s"], 2),
        "reference_mean_padded_batch_s": round(setup["reference_padded_s"], 2),
        "per_round_audio_s_per_s": {
            name: [round(value, 2) for value in values] for name, values in per_round.items()
        },
        "audio_s_per_contender": {
            name: round(sum(c["audio_s"] for c in chunk_list), 1)
            for name, chunk_list in chunks.items()
        },
        "reference_steps": sum(c["steps"] for c in chunks["reference"]),
        "optimizers": setup["optimizers"],
        "torch_threads": setup["threads"],
        "peak_memory": peaks,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps": args.warmup_steps,
        "config": str(args.config),
        "overrides": args.overrides,
        "prepared_dir": str(args.prepared_dir),
        "load_average_before": setup["load_before"],
        "load_average_after": round(os.getloadavg()[0], 2),
        "machine": machine,
    }


CONTENDER_ROWS = (  # label, key of the rate, key of the rounds, process (for its peak memory)
    (
        "phonetune (`phonetune.train.loop.train`)",
        "phonetune_audio_s_per_s",
        "phonetune",
        "phonetune",
    ),
    ("reference (HF `Trainer` recipe)", "reference_audio_s_per_s", "reference", "reference"),
    ("limit, exact lengths", "limit_exact_audio_s_per_s", "exact", "limit"),
    ("limit, padded batches", "limit_padded_audio_s_per_s", "padded", "limit"),
)


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {median(values):.1f} / {max(values):.1f}"


def print_table(result: dict) -> None:
    peaks, rounds = result["peak_memory"], result["per_round_audio_s_per_s"]
    print(
        f"\n{'contender':<40} {'audio s/s':>9} {'rounds: min / median / max':>27} {'peak RSS':>9}"
    )
    for label, key, name, process in CONTENDER_ROWS:
        print(
            f"{label.replace('`', ''):<40} {result[key]:>9.1f} {spread(rounds[name]):>27} "
            f"{peaks[process]['peak_rss_mb']:>7.0f}MB"
        )
    print(
        f"\nphonetune / reference = {result['phonetune_vs_reference']:.2f} "
        f"(median of rounds {result['median_round_phonetune_vs_reference']:.2f})   "
        f"phonetune / limit ({result['limit_variant']}) = {result['phonetune_vs_limit']:.2f} "
        f"(median of rounds {result['median_round_phonetune_vs_limit']:.2f})\n"
        f"padded frames: phonetune {result['padding_fraction']:.1%}, "
        f"reference {result['reference_padding_fraction']:.1%} "
        f"({result['reference_batch_size']} utterances per batch)"
    )


def shown_path(path: str) -> str:
    """A path inside the repository relative to it (as the command that made it was typed)."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def paragraph(text: str, bullet: bool = False) -> str:
    prefix = "- " if bullet else ""
    return textwrap.fill(
        text, width=100, initial_indent=prefix, subsequent_indent=" " * len(prefix)
    )


def markdown_section(result: dict, command: str) -> str:
    m, peaks = result["machine"], result["peak_memory"]
    rounds = result["per_round_audio_s_per_s"]
    met = {True: "met", False: "**not met**"}
    device = m["gpu"] or f"{m['cpu_count']} CPU cores ({m['cpu']}), no GPU"
    load = (
        f"load average {result['load_average_before']:.1f} before, "
        f"{result['load_average_after']:.1f} after"
    )
    padded = {"phonetune": result["padding_fraction"], "exact": 0.0}
    padded["padded"] = padded["phonetune"]
    padded["reference"] = result["reference_padding_fraction"]
    optimizers = result["optimizers"]
    table = [
        f"| {label} | {result[key]:.1f} | {spread(rounds[name])} | {padded[name]:.1%} | "
        f"{peaks[process]['peak_rss_mb']:.0f} MB | {optimizers.get(process, '')} |"
        for label, key, name, process in CONTENDER_ROWS
    ]
    threads = ", ".join(f"{name} {n}" for name, n in result["torch_threads"].items())
    setup = (
        f"`{shown_path(result['config'])}`"
        + (f" with `{' '.join(result['overrides'])}`" if result["overrides"] else "")
        + f" on `{shown_path(result['prepared_dir'])}`: {result['rounds']} rounds of "
        f"{result['steps_per_round']} phonetune steps after {result['warmup_steps']} untimed "
        "warm-up steps per contender, the contenders taking turns within each round. In a round "
        "the reference trains until it has seen as much audio as phonetune did, and the limit "
        f"replays phonetune's batches. The reference takes {result['reference_batch_size']} "
        "utterances per batch: its length-grouped batches then average "
        f"{result['reference_mean_padded_batch_s']:.1f} s padded, phonetune's "
        f"{result['phonetune_mean_padded_batch_s']:.1f} s."
    )
    notes = [
        f"phonetune / reference = **{result['phonetune_vs_reference']:.2f}x** (median of the "
        f"per-round ratios {result['median_round_phonetune_vs_reference']:.2f}; target >= 1.3x: "
        f"{met[result['phonetune_vs_reference'] >= 1.3]}).",
        f"phonetune / limit = **{result['phonetune_vs_limit']:.0%}** (median of the per-round "
        f"ratios {result['median_round_phonetune_vs_limit']:.0%}; the limit is the faster variant, "
        f"{result['limit_variant']}; target >= 90 %: {met[result['phonetune_vs_limit'] >= 0.9]}).",
        f"padded frames = **{result['padding_fraction']:.1%}** "
        f"(target <= 3 %: {met[result['padding_fraction'] <= 0.03]}).",
        "Audio seconds per second: real (unpadded) audio over wall time, summed over the rounds. "
        "Peak RSS: each contender process's high-water mark (`ru_maxrss`), imports included; the "
        "limit's process runs both limits and holds their pre-built tensors.",
        f"Python {m['python']}, torch {m['torch']} (threads: {threads}), transformers "
        f"{m['transformers']}, datasets {m['datasets']}, accelerate {m['accelerate']}; "
        f"{m['memory_gib']} GiB of memory.",
    ]
    lines = [
        f"{BENCHMARKS_HEADING} ({date.today().isoformat()}, {device}, {load})",
        "",
        "```",
        command,
        "```",
        "",
        paragraph(setup),
        "",
        "| contender | audio seconds per second | rounds: min / median / max | padded frames "
        "| peak RSS | optimizer |",
        "|---|---:|---:|---:|---:|---|",
        *table,
        "",
        *(paragraph(note, bullet=True) for note in notes),
    ]
    return "\n".join(lines) + "\n\n"


def write_benchmarks(
    path: Path,
    section: str,
    heading: str = BENCHMARKS_HEADING,
    before: str | None = "\n## The demo",
) -> None:
    """Replace the section of BENCHMARKS.md that starts with `heading` (by default the training
    one), or add it before the section starting with `before` (at the end if there is none)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    section = section.rstrip("\n") + "\n\n"  # a blank line before whatever follows
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end + 1
        text = text[:start] + section + text[end:]
    elif before and before in text:
        anchor = text.find(before) + 1
        text = text[:anchor] + section + text[anchor:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="10 rounds x 2 steps")
    preset.add_argument(
        "--thorough",
        action="store_true",
        help="40 rounds x 5 steps (over an epoch of the demo corpus)",
    )
    parser.add_argument("--prepared-dir", type=Path, help="default: the demo corpus, made once")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_cpu.yaml")
    parser.add_argument("--rounds", type=int, help="rounds of the contenders in turn")
    parser.add_argument("--steps", type=int, help="phonetune steps per round")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per contender first")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO / "runs" / "bench_train",
        help="where the demo corpus is made and worker logs go (default runs/bench_train)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per contender (OMP_NUM_THREADS; default: torch's choice). On a machine "
        "busy with other work, 1 thread keeps the comparison fair: waiting for a descheduled "
        "second thread slows every small operation",
    )
    parser.add_argument("--benchmarks-md", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "thorough" if args.thorough else "standard"
    rounds, steps, warmup = PRESETS[name]
    args.rounds = args.rounds or rounds
    args.steps = args.steps or steps
    args.warmup_steps = warmup if args.warmup_steps is None else args.warmup_steps
    if args.warmup_steps < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--rounds, --steps and --warmup-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return 0

    from phonetune.train.config import load_config

    load_before = round(os.getloadavg()[0], 2)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.prepared_dir is None:
        args.prepared_dir = ensure_corpus(args.work_dir)
    args.prepared_dir = args.prepared_dir.resolve()
    if not (args.prepared_dir / "dataset_dict.json").is_file():
        from phonetune.data.errors import PhonetuneError

        raise PhonetuneError(
            f"--prepared-dir {args.prepared_dir} is not a prepared dataset (no dataset_dict.json): "
            "give a folder written by `phonetune prepare`, or leave the option out to benchmark on "
            "the demo corpus"
        )
    config = load_config(
        args.config,
        [f"data.prepared_dir={args.prepared_dir}", "run.output_dir=unused", *args.overrides],
    )
    if config.train.grad_accum != 1:
        raise BenchError(
            f"train.grad_accum={config.train.grad_accum}: the contenders are compared step for "
            "step on single batches (the reference recipe accumulates none); set train.grad_accum=1"
        )
    # The loop runs one step past the last round: that step's gate closes the round.
    max_steps = args.warmup_steps + args.rounds * args.steps + 1
    command = " ".join(["python", "scripts/bench_train.py", *(argv or sys.argv[1:])])
    print(command, flush=True)
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:

        def start(name: str, batch_size: int | None = None) -> None:
            spec = {
                "config": str(args.config.resolve()),
                "prepared_dir": str(args.prepared_dir),
                "run_dir": str(Path(scratch) / name),
                "overrides": args.overrides,
                "warmup_steps": args.warmup_steps,
                "max_steps": max_steps,
                "batch_size": batch_size,
            }
            workers[name] = Worker(name, spec, args.work_dir / f"{name}.log", args.threads)

        try:
            # Those that need no batch size start first and import while it is being chosen.
            start("phonetune")
            start("limit")
            setup = choose_reference_batch_size(config, args.prepared_dir)
            setup.update(load_before=load_before, optimizers={}, threads={})
            print(
                f"reference batch size {setup['batch_size']} utterances "
                f"({setup['reference_padded_s']:.1f} s padded on average; phonetune "
                f"{setup['phonetune_padded_s']:.1f} s)",
                flush=True,
            )
            start("reference", setup["batch_size"])
            for name in CONTENDERS:
                ready = workers[name].receive()
                setup["optimizers"][name] = ready["optimizer"]
                setup["threads"][name] = ready["threads"]
                print(
                    f"{name}: ready ({ready['steps']} warm-up steps, {ready['optimizer']}, "
                    f"{ready['threads']} threads)",
                    flush=True,
                )
            chunks = run_rounds(workers, args.rounds, args.steps, args.warmup_steps)
            peaks = {name: workers[name].send({"stop": True}) for name in CONTENDERS}
        finally:
            for worker in workers.values():
                worker.close()
    result = summarise(chunks, peaks, setup, args, machine_description())
    print_table(result)
    if not args.no_write:
        write_benchmarks(args.benchmarks_md, markdown_section(result, command))
        print(f"wrote the training section of {args.benchmarks_md}")
    print(json.dumps(result))
    return 0


def run_command_line() -> int:
    from phonetune.data.errors import PhonetuneError

    try:
        return main()
    except (PhonetuneError, BenchError) as error:
        print(f"bench_train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, PhonetuneError) else 1


if __name__ == "__main__":
    sys.exit(run_command_line())

"""Add a language to a trained model with a LoRA adapter, and measure what the old languages lose.

On a synthetic Common Voice release (`phonetune synth`, or `phonetune demo`'s corpus/):
1. prepare the old locales alone, train the tiny CPU recipe on them, export: the "earlier model";
2. prepare all locales (old + new: the vocabulary gains the new locale's phones);
3. train `configs/adapter_tiny.yaml` on the new locale only, on top of the export (LoRA + the output
   layer, extended by the new phones); for comparison, the same steps with every weight trained
   (`model.adapter=null`), and the adapter trained on the new and the old locales together (replay);
4. evaluate each export on every locale's test speakers.

    python scripts/demo_new_language.py --corpus phonetune-demo/corpus --new-locale tr --out new-lang

Prints a table of test PER per locale for each model and writes it to OUT/new_language.json. Everything goes through the same functions as the `phonetune` commands.
"""

import argparse
import json
from pathlib import Path

from phonetune.data.locales import parse_locales
from phonetune.data.prepare import PrepareOptions, prepare
from phonetune.infer.evaluate import evaluate_model
from phonetune.infer.export import export_model
from phonetune.train.config import load_config, shipped_config
from phonetune.train.loop import train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a synthetic CV release")
    parser.add_argument("--locales", default="de,en,es,fr,it,pl,ru,tr", help="old + new locales")
    parser.add_argument("--new-locale", default="tr", help="the locale added by the adapter")
    parser.add_argument("--out", type=Path, default=Path("new-language"))
    parser.add_argument("--base-steps", type=int, default=1200, help="steps of the earlier model")
    parser.add_argument("--adapter-steps", type=int, default=300, help="steps on the new locale")
    parser.add_argument(
        "--adapter-only", action="store_true", help="skip full fine-tuning and replay"
    )
    return parser.parse_args()


def prepared(corpus: Path, locales: list[str], out: Path) -> Path:
    if not (out / "vocab.json").is_file():
        prepare(PrepareOptions(cv_root=corpus, locales=locales, out=out, num_workers=2))
    return out


def trained_export(recipe: str, out: Path, settings: list[str]) -> tuple[Path, int]:
    """Train (resuming if the run exists) and export; returns the export and the steps trained."""
    config = load_config(
        shipped_config(recipe), [f"run.output_dir={out / 'run'}", "resume=auto", *settings]
    )
    train(config)
    return export_model(out / "run", out / "export", overwrite=True), config.train.max_steps


def main() -> None:
    args = parse_args()
    locales = parse_locales(args.locales)
    new = args.new_locale
    old = [locale for locale in locales if locale != new]
    out = args.out.resolve()
    prep_old = prepared(args.corpus, old, out / "prepared_old")
    prep_all = prepared(args.corpus, locales, out / "prepared_all")

    base, base_steps = trained_export(
        "tiny_cpu.yaml",
        out / "base",
        [f"data.prepared_dir={prep_old}", f"train.max_steps={args.base_steps}"],
    )
    new_data = [f"data.prepared_dir={prep_all}", f"data.locales=[{new}]"]
    adapted = [f"model.name_or_path={base}", f"train.max_steps={args.adapter_steps}", *new_data]
    lora, lora_steps = trained_export("adapter_tiny.yaml", out / "lora", adapted)
    exports = {"before (old locales only)": (base, base_steps), "LoRA adapter": (lora, lora_steps)}
    if not args.adapter_only:
        full, full_steps = trained_export(
            "adapter_tiny.yaml", out / "full", [*adapted, "model.adapter=null"]
        )
        exports["full fine-tuning"] = (full, full_steps)
        # The same adapter trained on every locale: the old ones are replayed, not forgotten.
        replay, replay_steps = trained_export(
            "adapter_tiny.yaml", out / "replay", [*adapted, "data.locales=null"]
        )
        exports["LoRA adapter, old locales replayed"] = (replay, replay_steps)

    results = {}
    for name, (folder, steps) in exports.items():
        metrics = evaluate_model(folder, prep_all, split="test")
        results[name] = {
            "steps": steps,
            "per_locale": {loc: m["per"] for loc, m in metrics["per_locale"].items()},
            "old_locales_per": old_locales_per(metrics, old),
        }
    (out / "new_language.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print_table(results, old, new)


def old_locales_per(metrics: dict, old: list[str]) -> float:
    """PER over the old locales' phones together (micro-average, as `evaluate` reports overall)."""
    errors = phones = 0
    for locale in old:
        m = metrics["per_locale"][locale]
        errors += m["substitutions"] + m["deletions"] + m["insertions"]
        phones += m["ref_phones"]
    return round(errors / phones, 4)


def print_table(results: dict, old: list[str], new: str) -> None:
    names = list(results)
    print("| test PER | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for locale in [new, *old]:
        label = f"{locale} (new)" if locale == new else locale
        row = [f"{results[n]['per_locale'][locale]:.3f}" for n in names]
        print(f"| {label} | " + " | ".join(row) + " |")
    print("| old locales together | " + " | ".join(
        f"{results[n]['old_locales_per']:.3f}" for n in names) + " |")  # fmt: skip
    print("| training steps | " + " | ".join(str(results[n]["steps"]) for n in names) + " |")


if __name__ == "__main__":
    main()

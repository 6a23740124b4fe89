"""Measure ``mergekit-backdoor scan`` on the reproduction benchmark's models.

Every clean model and victim that ``reproduce.py`` trained (MiniLM-L6, ``cpu`` profile; SST-2,
OLID, AG News, QNLI) is scanned with 50 clean training examples per class (the registry's clean
train split, never a test row), with the dataset's other models as references (what an audit
does with its donors); ``--alone`` scans each model again without references, which is what a
user without reference models gets (results under ``<dataset>/<model>/alone``).

Detection: a victim counts when it is flagged with its true target label; a clean model counts
as a false positive when it is flagged at all. Recovery: for BadNet, whether any of
``cf mn bb tq mb`` is a word of a top-5 candidate of the target label; for InsertSent, whether a
top-5 candidate holds a word of the inserted sentence. The recovered trigger's held-out flip
rate stands beside the victim's own ASR on the published triggered test set.

    python benchmarks/scan.py                  # resumable; results/scan_cpu.json
    python benchmarks/scan.py --rescore benchmarks/results/scan_cpu_v2.json --datasets agnews
    python benchmarks/scan.py --report         # the markdown tables for benchmarks/README.md
    python benchmarks/scan.py --results benchmarks/results/scan_cpu_tied.json --datasets qnli

``--rescore FILE`` runs the real scan with its search replaced by FILE's candidates: the current
held-out scoring of an earlier search, for when only the scoring changed (``wall_s`` stays the
earlier scan's; ``rescore_s`` is this run's).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
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


def summarize(scan: dict[str, Any], dataset: str, attack: str) -> dict[str, Any]:
    """What the tables show of one scan: the verdict, the target label's top 5, recovery."""
    from mergekit_backdoor.data import get_spec

    spec = get_spec(dataset)
    own = scan["labels"][spec.target]
    top = own["candidates"][0] if own["candidates"] else None
    return {
        "flagged_label": scan["verdict"]["label"],
        "target_top5": [c["trigger"] for c in own["candidates"][:5]],
        "target_top_flip": top["flip"]["rate"] if top else None,
        "target_top_rows": top["flip"]["n"] if top else None,
        "recovered": recovered(attack, dataset, own["candidates"]) if attack != "clean" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--datasets", default="sst2,olid,agnews,qnli")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=reproduce.REPO / "benchmarks" / "work"
                        / "reproduce")
    parser.add_argument("--models", default=None,
                        help="only these models, e.g. badnet,insertsent (default: every one)")
    parser.add_argument("--alone", action="store_true", help="scan without references")
    parser.add_argument("--rescore", type=Path, default=None, metavar="FILE",
                        help="score FILE's candidates again instead of searching")
    parser.add_argument("--results", type=Path, default=None, metavar="FILE",
                        help="the results file (default: results/scan_<profile>.json)")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    path = args.results or RESULTS / f"scan_{args.profile}.json"
    store = json.loads(path.read_text()) if path.exists() else {"scans": {}}
    if args.report:
        print(report(store))
        return
    from mergekit_backdoor.scan.scan import ScanSettings, run_scan

    models = json.loads((RESULTS / f"reproduce_{args.profile}.json").read_text())["models"]
    earlier_scans = json.loads(args.rescore.read_text())["scans"] if args.rescore else {}
    wanted = args.models.split(",") if args.models else []
    known = {n for dataset in args.datasets.split(",") for n in reproduce.MODELS[dataset]}
    if unknown := sorted(set(wanted) - known):
        raise SystemExit(f"--models: {', '.join(unknown)} is not a model of {args.datasets} "
                         f"(models: {', '.join(sorted(known))})")
    for dataset in args.datasets.split(","):
        folder = args.work / args.profile / dataset
        names = [n for n in reproduce.MODELS[dataset] if (folder / n / "config.json").is_file()]
        for name in names:
            if wanted and name not in wanted:
                continue
            key = f"{dataset}/{name}" + ("/alone" if args.alone else "")
            if key in store["scans"]:
                continue
            others = [] if args.alone else [folder / n for n in names if n != name]
            started = time.time()
            scan_now = functools.partial(
                run_scan, folder / name, references=others, task=dataset,
                settings=ScanSettings(device=args.device,
                                      max_length=reproduce.PROFILES[args.profile]["max_length"]),
                data_dir=args.data_dir, progress=False)
            record: dict[str, Any] = {
                "references": [p.name for p in others],
                "true_asr": models[f"{dataset}/{name}"]["asr"].get(name)}
            if args.rescore:
                earlier = earlier_scans[key]
                record |= {"scan": rescored(earlier["scan"], scan_now),
                           "wall_s": earlier["wall_s"], "rescored_from": args.rescore.name,
                           "rescore_s": time.time() - started}
            else:
                record |= {"scan": scan_now(), "wall_s": time.time() - started}
            store["scans"][key] = record
            scan = record["scan"]
            reproduce.save_merged(path, store, ("scans",))
            entry = summarize(scan, dataset, name)
            print(f"{key}: flagged={entry['flagged_label']} top5={entry['target_top5']} "
                  f"recovered={entry['recovered']} {time.time() - started:.0f}s", flush=True)
    print(report(store))


def rescored(earlier: dict[str, Any], scan_now: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``scan_now()`` (the real scan) with the sweep and the search replaced by ``earlier``'s
    candidates and stops, so only the held-out scoring runs."""
    from unittest import mock

    from mergekit_backdoor.scan import scan as scan_module
    from mergekit_backdoor.scan.search import Candidate, LabelSearch

    by_label = {entry["label"]: entry for entry in earlier["labels"]}

    def stored_search(self: LabelSearch, sweep: Any = (), moved: Any = ()) -> list[Candidate]:
        entry = by_label[self.target]
        self.stop = entry["search_stop"]
        ids = self.model.tokenizer.convert_tokens_to_ids
        return [Candidate(tuple(ids(c["tokens"])), c["search_flip"], 0.0)
                for c in entry["candidates"]]

    with mock.patch.object(scan_module, "sweep", lambda *_: {}), \
            mock.patch.object(LabelSearch, "run", stored_search):
        scan = scan_now()
    for entry, before in zip(scan["labels"], earlier["labels"], strict=True):  # tokens -> text
        assert {c["trigger"] for c in entry["candidates"]} == \
            {c["trigger"] for c in before["candidates"]}, (entry["name"], "triggers not rebuilt")
    return scan


def report(store: dict[str, Any]) -> str:
    from mergekit_backdoor.data import get_spec

    lines = ["| dataset | model | references | flagged | target label's top 5 candidates | "
             "recovered | top flip | true trigger ASR | score / threshold | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, stored in sorted(store["scans"].items(), key=lambda item: _order(item[0])):
        dataset, name = key.split("/")[:2]
        spec = get_spec(dataset)
        target = spec.label_names[spec.target]
        entry = summarize(stored["scan"], dataset, name)
        label = entry["flagged_label"]
        if label is None:
            flagged = "no"
        elif name == "clean":
            flagged = f"**yes ({label})**"  # a false positive
        else:
            flagged = f"yes ({label})" + ("" if label == target else " **wrong label**")
        rec = {True: "yes", False: "**no**", None: "–"}[entry["recovered"]]
        flip = "–" if entry["target_top_flip"] is None else \
            f"{100 * entry['target_top_flip']:.1f} of {entry['target_top_rows']}"
        true = "–" if stored["true_asr"] is None or name == "clean" else \
            f"{100 * stored['true_asr']:.1f}"
        refs = "none" if not stored["references"] else f"{len(stored['references'])} others"
        lines.append(f"| {dataset} | {reproduce.PAPER_NAMES[name]} | {refs} | {flagged} | "
                     f"{', '.join(f'`{t}`' for t in entry['target_top5'])} | {rec} | {flip} | "
                     f"{true} | {100 * stored['scan']['score']:.0f} / "
                     f"{100 * stored['scan']['threshold']:.0f} | {stored['wall_s']:.0f} s"
                     f"{_rescored_note(stored)} |")
    return "\n".join(lines + ["", *summary(store)])


def _rescored_note(stored: dict[str, Any]) -> str:
    earlier = stored.get("rescored_from")
    return f" (search of `{earlier}`)" if earlier else ""


def _order(key: str) -> tuple[int, int, str]:
    """Table order: the data sets and their models as ``reproduce.MODELS`` lists them."""
    dataset, name = key.split("/")[:2]
    datasets = list(reproduce.MODELS)
    return datasets.index(dataset), reproduce.MODELS[dataset].index(name), key


def summary(store: dict[str, Any]) -> list[str]:
    """Per attack over the data sets: flagged with the right label, trigger recovered, time."""
    from mergekit_backdoor.data import get_spec

    by_attack: dict[tuple[str, str], list[tuple[bool, bool | None, float]]] = {}
    for key, stored in store["scans"].items():
        dataset, name = key.split("/")[:2]
        spec = get_spec(dataset)
        entry = summarize(stored["scan"], dataset, name)
        right = entry["flagged_label"] == (None if name == "clean"
                                           else spec.label_names[spec.target])
        mode = "none" if not stored["references"] else "others"
        by_attack.setdefault((mode, name), []).append((right, entry["recovered"],
                                                       stored["wall_s"]))
    lines = ["| references | attack | models | flagged as expected | trigger in top 5 | "
             "time (median / max) |", "|---|---|---|---|---|---|"]
    for (mode, name), rows in sorted(by_attack.items()):
        expected = "not flagged" if name == "clean" else "flagged, right label"
        recovered = [r for _, r, _ in rows if r is not None]
        times = sorted(t for _, _, t in rows)
        lines.append(f"| {mode} | {reproduce.PAPER_NAMES[name]} | {len(rows)} | "
                     f"{sum(r for r, _, _ in rows)}/{len(rows)} {expected} | "
                     f"{f'{sum(recovered)}/{len(recovered)}' if recovered else '–'} | "
                     f"{statistics.median(times):.0f} / {times[-1]:.0f} s |")
    return lines


if __name__ == "__main__":
    main()

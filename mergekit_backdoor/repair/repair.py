"""``repair``: fine-tune a (merged) classifier so that inserted text stops moving its predictions,
with unlabeled clean text and no knowledge of the trigger (causal LMs: ``causal.py``).

Each step takes a batch of clean samples and a perturbed copy of each (``perturb.py``; the last
text field is perturbed, where the registry's attacks put their triggers). A class
distribution on the *clean* text (computed once, before training) is the target for the repaired
model on the *perturbed* text (a KL divergence), and, with ``clean_weight``, on the clean text
too (it anchors the clean behaviour). That distribution is the input model's own or, given the
models a merge was made from (``teachers``), their per-sample median: a merge can lean towards a
backdoor's target class more than any of its inputs, and its own predictions would keep that
lean. Labels are never read. AdamW with linear decay, seeded: the same samples, settings and seed
give the same weights on a CPU.

The repaired model is written like every other output (atomically, under a hidden name), with
the input's files it does not replace (model card, merge manifest), a ``repair`` section in
``sanitize_manifest.json`` (settings, the samples' sha256, the steps and losses) and a "Backdoor
repair" section in its model card.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_backdoor.data.sources import Row
from mergekit_backdoor.errors import DataError, RecipeError
from mergekit_backdoor.repair.perturb import check_family, perturbation

MANIFEST_NAME = "sanitize_manifest.json"
MAX_SAMPLES = 1000
# Measured defaults (benchmarks/README.md, "Sanitizer v2").
DEFAULT_STEPS = 120
DEFAULT_LR = 5e-5
DEFAULT_PERTURBATION = "auto"


@dataclass(frozen=True)
class RepairSettings:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch_size: int = 16
    perturbation: str = DEFAULT_PERTURBATION
    clean_weight: float = 1.0
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    triggers: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if self.steps < 1:
            raise RecipeError(f"repair steps must be at least 1, got {self.steps}")
        if not 0 < self.lr < 1:
            raise RecipeError(f"repair learning rate must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise RecipeError(f"repair batch size must be at least 1, got {self.batch_size}")
        check_family(self.perturbation, self.triggers)


def samples_digest(rows: Sequence[Row], fields: Sequence[str]) -> str:
    """sha256 of the samples' text fields, in order (what the repair read)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row[f] for f in fields], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _vocabulary(tokenizer: Any) -> list[str]:
    from mergekit_backdoor.scan.model import word_vocabulary

    starts, _ = word_vocabulary(tokenizer)
    return [token.lstrip("Ġ▁") for token in tokenizer.convert_ids_to_tokens(starts)]


def repair_model(
    model_path: str | Path,
    rows: Sequence[Row],
    fields: Sequence[str],
    *,
    settings: RepairSettings | None = None,
    teachers: Sequence[str | Path] = (),
    progress: bool = True,
    desc: str = "repair",
) -> tuple[Any, Any, dict[str, Any]]:
    """The repaired model and tokenizer (in memory) and what the repair did; ``teachers``: the
    models the input was merged from, whose per-sample median distribution becomes the target."""
    import torch

    from mergekit_backdoor.loading import load_classifier, load_tokenizer

    settings = settings or RepairSettings()
    settings.check()
    if not rows:
        raise DataError("no repair samples")
    if len(rows) > MAX_SAMPLES:
        raise DataError(f"{len(rows)} repair samples; at most {MAX_SAMPLES} (a few hundred is "
                        "enough)")
    fields = tuple(fields)
    torch.manual_seed(settings.seed)
    rng = random.Random(f"repair/{settings.seed}")
    tokenizer = load_tokenizer(model_path)
    student = load_classifier(model_path).to(settings.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if student.config.pad_token_id is None:
        student.config.pad_token_id = tokenizer.pad_token_id
    last = fields[-1]
    perturb = perturbation(settings.perturbation, vocabulary=_vocabulary(tokenizer),
                           texts=[row[last] for row in rows], triggers=settings.triggers)

    def encode(batch: list[Row]) -> Any:
        return tokenizer(*[[row[f] for row in batch] for f in fields], padding=True,
                         truncation=True, max_length=settings.max_length,
                         return_tensors="pt").to(settings.device)

    # The target on each clean sample (computed once): the teachers' median or the model's own.
    student.eval()
    target = consensus(teachers, student, encode, rows, settings.device)

    def step_loss(picked: list[int]) -> Any:
        batch = [rows[i] for i in picked]
        perturbed = [{**row, last: perturb(row[last], rng)} for row in batch]
        wanted = target[picked]
        if settings.clean_weight:  # one forward pass over the perturbed and the clean rows
            out = torch.log_softmax(student(**encode(perturbed + batch)).logits.float(), dim=-1)
            moved, kept = out[:len(batch)], out[len(batch):]
        else:
            moved = torch.log_softmax(student(**encode(perturbed)).logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(moved, wanted, log_target=True, reduction="batchmean")
        if settings.clean_weight:
            loss = loss + settings.clean_weight * torch.nn.functional.kl_div(
                kept, wanted, log_target=True, reduction="batchmean")
        return loss

    started = time.perf_counter()
    losses = train(student, len(rows), step_loss, settings, progress, desc)
    return student, tokenizer, summarize(settings, rows, fields, losses, started)


def consensus(teachers: Sequence[str | Path], model: Any, encode: Callable[[list[Row]], Any],
              rows: Sequence[Row], device: str) -> Any:
    """Log class distributions on ``rows``: the per-sample, per-class median of the teachers'
    probabilities (the middle two's mean for an even count; renormalised), or ``model``'s own
    when there are no teachers."""
    import torch

    from mergekit_backdoor.loading import load_classifier

    def predict(classifier: Any) -> Any:
        with torch.no_grad():
            return torch.cat([torch.log_softmax(classifier(**encode(list(rows[i:i + 64]))).logits
                                                .float(), dim=-1) for i in range(0, len(rows), 64)])

    if not teachers:
        return predict(model)
    probabilities = []
    for teacher in teachers:  # one at a time: only the student and one teacher in memory
        loaded = load_classifier(teacher)
        probabilities.append(predict(loaded.to(device).eval()).exp())
        del loaded
    median = torch.quantile(torch.stack(probabilities), 0.5, dim=0).clamp_min(torch.finfo().tiny)
    return (median / median.sum(dim=-1, keepdim=True)).log()


def summarize(settings: RepairSettings, rows: Sequence[Row], fields: Sequence[str],
              losses: list[float], started: float, **extra: Any) -> dict[str, Any]:
    """What a repair did, for its manifest."""
    return {
        "settings": asdict(settings), "samples": len(rows), "fields": list(fields),
        "samples_sha256": samples_digest(rows, fields), "steps": settings.steps,
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_mean_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - started, **extra,
    }


def train(model: Any, count: int, step_loss: Callable[[list[int]], Any],
          settings: RepairSettings, progress: bool, desc: str = "repair") -> list[float]:
    """The repair's optimisation: AdamW with linear decay for ``settings.steps`` steps, each on a
    batch of sample indices drawn from a seeded permutation; returns the losses."""
    import torch
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in tqdm(range(settings.steps), desc=desc, disable=not progress, leave=False):
        while len(order) < settings.batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        picked, order = order[:settings.batch_size], order[settings.batch_size:]
        loss = step_loss(picked)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def save_repaired(model: Any, tokenizer: Any, source: Path, folder: Path,
                  summary: dict[str, Any], samples_note: str) -> None:
    """Write the repaired model into ``folder`` (a staging folder) with its provenance."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    generation = source / "generation_config.json"
    if generation.is_file() and not (folder / "generation_config.json").exists():
        shutil.copy(generation, folder / "generation_config.json")
    manifest_file = source / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) \
        if manifest_file.is_file() else {"format": "mergekit-backdoor/manifest-v1"}
    manifest["repair"] = {**summary, "input": str(source.resolve()), "samples_source": samples_note}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    card = source / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# {source.name} (repaired)\n"
    s = summary["settings"]
    teachers = summary.get("teachers") or []
    target = (f"the per-sample median of the {len(teachers)} models it was merged from" if teachers
              else "the unrepaired model's")
    text += (
        "\n## Backdoor repair\n\n"
        f"After merging, `mergekit-backdoor repair` fine-tuned this model for {s['steps']} steps "
        f"(lr {s['lr']}, batch {s['batch_size']}, perturbation `{s['perturbation']}`, seed "
        f"{s['seed']}) so that its predictions on perturbed clean text match {target} on the "
        f"clean text. It read {summary['samples']} unlabeled samples ({samples_note}; "
        f"sha256 of their text `{summary['samples_sha256'][:16]}...`) and no labels. Details are "
        f"in `{MANIFEST_NAME}`.\n")
    (folder / "README.md").write_text(text, encoding="utf-8")


def repair_samples(model_path: str | Path, task: str | None, samples: str | Path | None, *,
                   count: int = 300, seed: int = 0, data_dir: str | Path | None = None) -> Any:
    """Unlabeled clean sentences for the repair: ``count`` drawn from ``task``'s training split,
    or the rows of ``samples``. Test rows are refused: those of ``task``, or of the data set the
    model's labels name, when its test split can be read."""
    from mergekit_backdoor.eval.run import read_model_config
    from mergekit_backdoor.scan.scan import is_causal
    from mergekit_backdoor.tasks.resolve import Samples, clean_samples, infer_dataset, resolve_task

    if is_causal(model_path):  # clean prompts: a generative task's training split, or a file
        from mergekit_backdoor.scan.causal import clean_prompts

        rows, _, source = clean_prompts(task, samples, count, seed, data_dir)
        return Samples(rows, ("instruction", "input"), (), source)
    known = task or infer_dataset(read_model_config(model_path))
    resolved = resolve_task(known) if known else None
    per_class = max(1, count // max(1, len(resolved.label_names) if resolved else 1))
    drawn = clean_samples(None if samples else task, samples, per_class=per_class, seed=seed,
                          data_dir=data_dir, labels=False)
    if samples is not None and resolved is not None and resolved.kind == "classification":
        try:
            test = {" ".join(str(row[f]).split()) for row in resolved.test_rows(data_dir)
                    for f in resolved.fields}
        except DataError:
            test = set()  # the test split cannot be read here: nothing to compare with
        for index, row in enumerate(drawn.rows, start=1):
            if any(" ".join(str(row[f]).split()) in test for f in drawn.fields):
                raise DataError(f"{samples}: sample {index} is a row of {resolved.name}'s test "
                                "split; repair samples must never be test rows")
    return drawn


def repair_to(model_path: str | Path, rows: Sequence[Row], fields: Sequence[str],
              out: str | Path, *, settings: RepairSettings | None = None,
              teachers: Sequence[str | Path] = (), samples_note: str = "",
              overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Repair ``model_path`` (towards ``teachers``' median, when given: ``repair_model``) and
    write the result to ``out`` atomically; the repair's summary."""
    from mergekit_backdoor.outputs import refuse_output_overlapping, staged_folder
    from mergekit_backdoor.scan.scan import is_causal

    refuse_output_overlapping(out, [model_path], what="repaired model")
    if is_causal(model_path):
        from mergekit_backdoor.repair.causal import repair_causal_model

        if teachers:
            raise RecipeError(f"{model_path}: a causal LM's repair targets its own answers; "
                              "teachers apply to classifiers only")
        model, tokenizer, summary = repair_causal_model(str(model_path), rows,
                                                        settings=settings, progress=progress)
    else:
        folders: list[Path] = []
        if teachers:  # the same checks as a merge's inputs, before any weight is read
            from mergekit.common import ModelReference

            from mergekit_backdoor.merge.checks import check_compatible, inspect_model

            repaired, *others = (inspect_model(ModelReference.model_validate(str(m)))
                                 for m in (model_path, *teachers))
            check_compatible(repaired, others, whose="the repaired model's")
            folders = [m.path for m in others]  # a hub id's, fetched at its pinned revision
        model, tokenizer, summary = repair_model(model_path, rows, fields, settings=settings,
                                                 teachers=folders, progress=progress)
        summary["teachers"] = [str(t) for t in teachers]  # as given, not the fetched folders
    summary["samples_source"] = samples_note
    with staged_folder(Path(out), overwrite) as folder:
        save_repaired(model, tokenizer, Path(model_path), folder, summary, samples_note)
    if log is not None:
        log(f"repaired model written to {out}")
    return summary


def merge_and_repair(config: Any, out: str | Path, options: Any, rows: Sequence[Row],
                     fields: Sequence[str], *, settings: RepairSettings, samples_note: str,
                     config_source: str | None = None, overwrite: bool = False,
                     allow_pickle: bool = False, progress: bool = True) -> Path:
    """``sanitize_merge`` into a hidden scratch folder next to ``out``, then the repair of the
    merge (a classifier's towards the merge's inputs: ``merge_inputs``) into ``out``
    (atomically); the scratch folder is removed whatever happens."""
    import tempfile

    from mergekit_backdoor.merge.run import sanitize_merge
    from mergekit_backdoor.outputs import ensure_output_free, terminate_cleanly
    from mergekit_backdoor.scan.scan import is_causal

    out = Path(out).absolute()
    ensure_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name[:40]}.merge-", dir=out.parent))
    try:
        with terminate_cleanly():
            merged = sanitize_merge(config, scratch / "merged", options,
                                    config_source=config_source, allow_pickle=allow_pickle)
            teachers = () if is_causal(merged) else merge_inputs(config)
            repair_to(merged, rows, fields, out, settings=settings, teachers=teachers,
                      samples_note=samples_note, overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def merge_inputs(config: Any) -> list[str]:
    """The models a mergekit config merges, the repair's teachers: its ``models`` (or, for
    slices, every source but ``base_model``, a shared pre-trained start); none when one is a
    LoRA adapter, which cannot be loaded as a classifier on its own."""
    if config.models:
        refs = [m.model for m in config.models]
    elif config.slices:  # in the recipe's order: mergekit's referenced_models is a set
        refs = [src.model for s in config.slices for src in s.sources if src.model != config.base_model]
    else:
        refs = sorted((r for r in config.referenced_models() if r != config.base_model), key=str)
    if any(r.lora is not None for r in refs):
        return []
    return list(dict.fromkeys(str(r.model) for r in refs))  # a hub id keeps its @revision

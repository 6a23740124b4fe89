"""Audit a suspect model: check the donors, merge them through mergekit, measure before and after.

``audit`` runs the whole journey and writes a report folder::

    OUT/report.json     every number (see report.py), the recipe, checks, settings, timings
    OUT/report.html     the same, for people: plots of ASR per attack and CACC
    OUT/sanitized/      the merged model with its provenance manifest
    OUT/lm_eval/        lm-evaluation-harness's own results JSON, one per model

Every input is checked before any tensor is merged: output folder free, tasks known, recipe
renders, models exist, each donor compatible with the suspect (architecture, labels, vocab,
tensor shapes, tokenizer vocabulary). The folder is built under a hidden temporary name next to
OUT and renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mergekit_backdoor.audit import report as reports
from mergekit_backdoor.audit.defences import (
    Defences,
    recovered_tasks,
    repair,
    repair_samples,
    repair_triggers,
    scan_model,
    scan_task,
    summary,
)
from mergekit_backdoor.audit.similarity import similarities, tokenizer_fingerprint
from mergekit_backdoor.errors import BackdoorError, DataError, IncompatibleModelError
from mergekit_backdoor.merge.checks import InputModel, check_compatible, inspect_model
from mergekit_backdoor.outputs import (
    ensure_output_free,
    local_paths,
    refuse_output_overlapping,
    staged_folder,
)
from mergekit_backdoor.tasks.resolve import (
    Task,
    check_task_labels,
    infer_dataset,  # noqa: F401  (part of this module's interface: eval and the tests use it)
    prepare_tasks,
    resolve_tasks,
)

Log = Callable[[str], None]


@dataclass
class EvalSettings:
    """How models are evaluated (passed on to ``evaluate_model``)."""

    device: str | None = None
    batch_size: int | None = None
    data_dir: str | None = None
    limit: int | float | None = None
    max_length: int | None = None
    verify: bool = True  # False: accept data files whose sha256 differs from the pin

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- tasks


def _label_names(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _tasks(values: Sequence[str] | None, model: InputModel, data_dir: str | None,
           verify: bool) -> list[Task]:
    """The tasks, checked against the model's labels and (shipped ones) their data files."""
    from mergekit_backdoor.eval.run import check_task_data

    tasks = resolve_tasks(values, model.config)
    check_task_labels(model.config, tasks, model.name)
    check_task_data([t.lm_eval for t in tasks if t.card is None], data_dir, verify=verify)
    return tasks


# ----------------------------------------------------------------------------- models


def inspect(path: str, *, allow_pickle: bool = False) -> InputModel:
    """A model's config and weight headers; IncompatibleModelError if it is missing or broken."""
    from mergekit.common import ModelReference

    try:
        reference = ModelReference.parse(str(path))
    except Exception as exc:  # pydantic's validation errors: the text is not a reference
        raise IncompatibleModelError(f"{path}: not a model folder, hub id or base+lora") from exc
    return inspect_model(reference, allow_pickle=allow_pickle)


def _tokenizer_status(suspect: InputModel, donor: InputModel) -> str:
    mine, theirs = tokenizer_fingerprint(suspect.path), tokenizer_fingerprint(donor.path)
    if mine is None or theirs is None:
        return "not saved"
    if mine[0] != theirs[0]:
        return f"not compared ({theirs[0]} vs {mine[0]})"
    if mine[1] != theirs[1]:
        raise IncompatibleModelError(
            f"{donor.name}: tokenizer vocabulary ({theirs[0]}) differs from the suspect's")
    return "same"


def check_donors(suspect: InputModel, donors: Sequence[InputModel]) -> list[dict[str, Any]]:
    """Check every donor against the suspect; one IncompatibleModelError naming each bad one."""
    rows, problems = [], []
    for donor in donors:
        try:
            check_compatible(suspect, [donor])
            tokenizer = _tokenizer_status(suspect, donor)
        except IncompatibleModelError as exc:
            problems.append(str(exc))
            continue
        labels = _label_names(donor.config)
        rows.append({
            "model": donor.name, "name": Path(donor.name).name or donor.name, "status": "yes",
            "architecture": (donor.config.get("architectures") or ["?"])[0],
            "labels": labels, "vocab_size": donor.config.get("vocab_size"),
            "tokenizer": tokenizer,
        })
    if problems:
        raise IncompatibleModelError("; ".join(problems) + " (nothing was merged)")
    return rows


def _inputs(models: Sequence[str | None], settings: EvalSettings) -> list[Path | str]:
    """Everything a report folder must stay clear of: the models' folders and the data folder."""
    from mergekit_backdoor.data import resolve_data_dir

    paths: list[Path | str] = [path for model in models for path in local_paths(model)]
    try:
        data_dir = resolve_data_dir(settings.data_dir)
    except DataError:  # none to protect; evaluation says what is missing if it needs one
        data_dir = None
    return [*paths, data_dir] if data_dir is not None else paths


def _display_names(paths: Sequence[str]) -> list[str]:
    """Short, unique names for the table: folder names, made unique with their parents."""
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- evaluation


def _evaluate(path: Path | str, tasks: Sequence[str], settings: EvalSettings,
              results_file: Path, include_path: Sequence[Path]) -> tuple[dict[str, Any], str | None]:
    from mergekit_backdoor.eval.run import evaluate_model

    model_args = {"max_length": settings.max_length} if settings.max_length else None
    parsed = evaluate_model(
        str(path), list(tasks), device=settings.device, batch_size=settings.batch_size,
        data_dir=settings.data_dir, limit=settings.limit, output_path=results_file,
        model_args=model_args, verify=settings.verify, include_path=include_path,
    )
    saved = parsed.get("results_file")
    return parsed.get("datasets", {}), saved


def _entry(role: str, name: str, path: str) -> dict[str, Any]:
    return {"role": role, "name": name, "path": path, "results": {}, "results_file": None}


def _evaluate_all(models: list[dict[str, Any]], eval_paths: dict[str, Path | str],
                  tasks: Sequence[str], settings: EvalSettings, folder: Path, final: Path,
                  log: Log, timings: dict[str, float], include_path: Sequence[Path] = ()) -> None:
    results_dir = folder / "lm_eval"
    results_dir.mkdir(exist_ok=True)
    for index, model in enumerate(models, start=1):
        log(f"evaluating {model['name']} ({index}/{len(models)}) on {', '.join(tasks)}")
        start = time.perf_counter()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{index}_{model['role']}")
        results, saved = _evaluate(eval_paths[model["name"]], tasks, settings,
                                   results_dir / f"{slug}.json", include_path)
        timings[f"eval {model['name']}"] = time.perf_counter() - start
        model["results"] = results
        if saved:
            model["results_file"] = str(final / Path(saved).relative_to(folder))


def _new_report(kind: str, tasks: Sequence[str], settings: EvalSettings) -> dict[str, Any]:
    from mergekit_backdoor import __version__

    return {
        "format": reports.FORMAT, "kind": kind, "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": list(tasks), "settings": settings.as_dict(), "models": [], "checks": [],
        "similarity": [], "timings": {},
    }


# ----------------------------------------------------------------------------- audit


def audit(
    suspect: str,
    donors: Sequence[str],
    output_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    recipe: str = "wag",
    base: str | None = None,
    weights: Sequence[float] | None = None,
    eval_donors: bool = False,
    settings: EvalSettings | None = None,
    defences: Defences | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    log: Log | None = None,
    kind: str = "audit",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check, scan, sanitize with ``recipe`` (and repair), evaluate, and write the report folder
    ``output_dir``.

    Returns the report (the contents of ``report.json``). ``defences`` sets the trigger scan
    (on by default) and the repair (off by default); see ``defences.py``. ``extra`` entries are
    added to the report's settings (the demo records its training set-up there).
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_backdoor.merge.checks import check_finite_parameters, validate_recipe_data
    from mergekit_backdoor.merge.recipes import get_recipe, render_recipe
    from mergekit_backdoor.merge.run import sanitize_merge
    from mergekit_backdoor.repair.repair import merge_inputs
    from mergekit_backdoor.scan.scan import check_target_response

    log = log or _quiet
    settings = settings or EvalSettings()
    defences = defences or Defences()
    out = Path(output_dir).absolute()
    donors = [str(d) for d in donors]
    if not donors:
        raise IncompatibleModelError("give at least one donor (--donor)")
    refuse_output_overlapping(out, _inputs([suspect, *donors, base, defences.samples], settings),
                              what="report folder")
    ensure_output_free(out, overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    log(f"checking the suspect and {len(donors)} donor(s)")
    rendered = render_recipe(get_recipe(recipe), suspect, donors,
                             weights=list(weights) if weights else None, base=base)
    if rendered.get("merge_method") == "sanitize":
        validate_recipe_data(rendered, f"recipe {recipe}")
    check_finite_parameters(MergeConfiguration.model_validate(rendered))
    if defences.repair is not None:
        defences.repair.check()
    suspect_model = inspect(suspect, allow_pickle=allow_pickle)
    classifier = _is_classifier(suspect_model.config)
    check_target_response(suspect, defences.target_response, causal=not classifier)
    donor_models = [inspect(d, allow_pickle=allow_pickle) for d in donors]
    base_model = inspect(base, allow_pickle=allow_pickle) if base else None
    log("checking the tasks and their test data")
    resolved = _tasks(tasks, suspect_model, settings.data_dir, settings.verify)
    checks = check_donors(suspect_model, donor_models)
    names = _display_names(donors)
    for check, name in zip(checks, names, strict=True):
        check["name"] = name
    timings["checks"] = time.perf_counter() - start

    log("measuring how close each donor is to the suspect")
    start = time.perf_counter()
    closeness = similarities(suspect_model, donor_models, base_model, progress=progress)
    timings["similarity"] = time.perf_counter() - start

    report = _new_report(kind, [t.lm_eval for t in resolved], settings)
    report.update(suspect=str(suspect), donors=donors, base=base, checks=checks,
                  similarity=[s.as_dict() for s in closeness])
    report["settings"].update({"recipe": recipe, "eval_donors": eval_donors,
                               "scan": defences.scan, "repair": defences.repair is not None,
                               **(extra or {})})
    scanned = scan_task(resolved, causal=not classifier)

    with staged_folder(out, overwrite) as folder:
        prepared = prepare_tasks(resolved, folder / "tasks")  # task cards, checked row by row
        for notice in prepared.notices:
            log(notice)
        task_names, include_path = prepared.names, list(prepared.include_path)
        before = after = None
        if defences.scan:
            log(f"scanning the suspect for triggers (references: {len(donors)} donor(s))")
            start = time.perf_counter()
            before = scan_model(suspect, donors, scanned, defences, device=settings.device,
                                max_length=settings.max_length, data_dir=settings.data_dir,
                                progress=progress, log=log)
            timings["scan suspect"] = time.perf_counter() - start
        donor_scans: dict[str, dict[str, Any] | None] = {}
        if defences.scan and defences.repair is not None:
            # a repair should know a donor's trigger too: each donor against the other models
            for donor, name in zip(donors, names, strict=True):
                log(f"scanning donor {name} for triggers (references: the other models)")
                start = time.perf_counter()
                others = [suspect, *(d for d in donors if d != donor)]
                donor_scans[name] = scan_model(donor, others, scanned, defences,
                                               device=settings.device,
                                               max_length=settings.max_length,
                                               data_dir=settings.data_dir, progress=progress,
                                               log=log)
                timings[f"scan {name}"] = time.perf_counter() - start
        recovered = recovered_tasks(before, scanned, folder / "tasks" / "recovered",
                                    seed=defences.seed, data_dir=settings.data_dir)
        if recovered:
            task_names += [r["task"] for r in recovered]
            include_path.append(folder / "tasks" / "recovered")

        repair_rows = None if defences.repair is None else repair_samples(
            suspect, scanned, defences, data_dir=settings.data_dir)
        log(f"sanitizing with the {recipe} recipe through mergekit")
        start = time.perf_counter()
        source = yaml.safe_dump(rendered, sort_keys=False)
        options = MergeOptions(cuda=str(settings.device or "").startswith("cuda"),
                               quiet=not progress, random_seed=0)
        merged = folder / ("merged" if defences.repair is not None else "sanitized")
        config = MergeConfiguration.model_validate(rendered)
        sanitize_merge(config, merged, options, config_source=source, allow_pickle=allow_pickle)
        timings["merge"] = time.perf_counter() - start
        report["recipe"] = {"name": recipe, "yaml": source}
        report["sanitized"] = str(out / "sanitized")
        if defences.repair is not None:
            start = time.perf_counter()
            scans = [before, *donor_scans.values()]
            triggers = [t for scan in scans for t in repair_triggers(scan)]
            report["repair"] = repair(merged, folder / "sanitized", repair_rows, defences,
                                      list(dict.fromkeys(triggers)), scans,
                                      teachers=merge_inputs(config) if classifier else [],
                                      progress=progress, log=log)
            shutil.rmtree(merged)
            timings["repair"] = time.perf_counter() - start

        if defences.scan and before is not None:
            log("scanning the sanitized model for triggers")
            start = time.perf_counter()
            after = scan_model(folder / "sanitized", donors, scanned, defences,
                               device=settings.device, max_length=settings.max_length,
                               data_dir=settings.data_dir, progress=progress, log=log)
            timings["scan sanitized"] = time.perf_counter() - start
        _save_scans(folder, out, report, {"suspect": before, "sanitized": after,
                                          **{f"donor {n}": v for n, v in donor_scans.items()}},
                    recovered, defences)

        models = [_entry("suspect", "suspect", str(suspect))]
        paths: dict[str, Path | str] = {"suspect": suspect}
        if eval_donors:
            for donor, name in zip(donors, names, strict=True):
                label = name if name.lower().startswith("donor") else f"donor {name}"
                if label in paths or label == "sanitized":
                    label = f"donor {donor}"
                models.append(_entry("donor", label, donor))
                paths[label] = donor
        models.append(_entry("sanitized", "sanitized", str(out / "sanitized")))
        paths["sanitized"] = folder / "sanitized"
        report["tasks"] = task_names
        _evaluate_all(models, paths, task_names, settings, folder, out, log, timings,
                      include_path)
        report["models"] = models
        report["timings"] = timings
        reports.finish(report)
        reports.write_report(report, folder)
    return report


def _is_classifier(config: dict[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification")
               for a in config.get("architectures") or [])


def _save_scans(folder: Path, out: Path, report: dict[str, Any],
                scans: dict[str, dict[str, Any] | None], recovered: list[dict[str, Any]],
                defences: Defences) -> None:
    """The scans next to the report (``scan/``) and their summary in it."""
    import json

    if not defences.scan:
        return
    files = {}
    for role, scan in scans.items():
        if scan is not None:
            (folder / "scan").mkdir(exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", role) + ".json"
            (folder / "scan" / name).write_text(json.dumps(scan, indent=2) + "\n",
                                                encoding="utf-8")
            files[role] = str(out / "scan" / name)
    report["scan"] = {"scans": {role: summary(scan) for role, scan in scans.items()},
                      "recovered": recovered, "files": files, "notes": defences.notes}


# ----------------------------------------------------------------------------- compare


def compare(
    model_a: str,
    model_b: str,
    *,
    tasks: Sequence[str] | None = None,
    output_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Evaluate two models on the same tasks; the report's change row is B - A.

    With ``output_dir`` the report folder (report.json, report.html, lm_eval/) is written too.
    Weight similarity is reported when the two have the same tensors.
    """
    log = log or _quiet
    settings = settings or EvalSettings()
    out = Path(output_dir).absolute() if output_dir is not None else None
    if out is not None:
        refuse_output_overlapping(out, _inputs([model_a, model_b], settings),
                                  what="report folder")
        ensure_output_free(out, overwrite)
    first = inspect(model_a, allow_pickle=allow_pickle)
    second = inspect(model_b, allow_pickle=allow_pickle)
    resolved = _tasks(tasks, first, settings.data_dir, settings.verify)
    check_task_labels(second.config, resolved, second.name)
    report = _new_report("compare", [t.lm_eval for t in resolved], settings)
    names = _display_names([model_a, model_b])
    check = {"model": str(model_b), "name": f"B {names[1]}", "status": "yes",
             "tokenizer": "–"}
    try:
        check_compatible(first, [second])
        check["tokenizer"] = _tokenizer_status(first, second)
        closeness = similarities(first, [second], progress=progress)
        report["similarity"] = [{**closeness[0].as_dict(), "model": str(model_b)}]
    except BackdoorError as exc:  # any two models may be compared; merging them is another matter
        check["status"] = f"no: {exc}"
    report["checks"] = [check]
    models = [_entry("A", f"A {names[0]}", str(model_a)), _entry("B", f"B {names[1]}",
                                                                   str(model_b))]
    paths: dict[str, Path | str] = {models[0]["name"]: model_a, models[1]["name"]: model_b}
    timings: dict[str, float] = {}
    report["models"], report["timings"] = models, timings

    def run(folder: Path, final: Path) -> None:
        prepared = prepare_tasks(resolved, folder / "tasks")
        for notice in prepared.notices:
            log(notice)
        report["tasks"] = prepared.names
        _evaluate_all(models, paths, prepared.names, settings, folder, final, log, timings,
                      prepared.include_path)
        reports.finish(report)

    if out is None:
        with _scratch() as folder:
            run(folder, folder)
        for model in models:
            model["results_file"] = None
        return report
    with staged_folder(out, overwrite) as folder:
        run(folder, out)
        reports.write_report(report, folder)
    return report


@contextmanager
def _scratch() -> Iterator[Path]:
    import tempfile

    from mergekit_backdoor.outputs import terminate_cleanly

    folder = Path(tempfile.mkdtemp(prefix="mergekit-backdoor-compare-"))
    try:
        with terminate_cleanly():
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rerender(report_path: str | Path, html_path: str | Path | None = None) -> tuple[dict, Path]:
    """Load a report.json and write its HTML again (next to it unless ``html_path``)."""
    report = reports.finish(reports.load_report(report_path))
    source = Path(report_path)
    folder = source if source.is_dir() else source.parent
    target = Path(html_path) if html_path is not None else folder / reports.REPORT_HTML
    target.parent.mkdir(parents=True, exist_ok=True)
    reports.atomic_write(target, reports.render_html(report))
    return report, target

"""Run the backdoor tasks through lm-evaluation-harness and read CACC / ASR back.

``evaluate_model`` is the one entry point for Python callers (the ``eval`` and ``audit``
commands, benchmarks): it picks the backend from the model's config, runs
``lm_eval.simple_evaluate`` on the project's task folder only (``evals_dir()``), writes the
harness's own results JSON when asked, and returns the numbers per dataset:

    {"model": ..., "backend": "hf-seqcls" | "hf", "results_file": path | None,
     "datasets": {"sst2": {"cacc": 0.91, "clean_asr": None,
                           "asr": {"badnet": 0.12, ...}, "mean_asr": 0.10,
                           "n": {"clean": 872, "badnet": 444, ...}},
                  "llm_refusal": {"cacc": None, "clean_asr": 0.01, "asr": {...}, ...}},
     "results": <lm-eval's "results" section>}

Task names are ``backdoor_<dataset>_clean`` (metric ``acc``: CACC),
``backdoor_<dataset>_untriggered`` (``asr``: the ASR rule on the clean non-target rows, the rate
every attack's ASR starts from, ``clean_asr`` here) and ``backdoor_<dataset>_<attack>`` (metric
``asr``); the instruction-tuning ones are ``backdoor_llm_<task>_...``, whose clean task reports
``asr`` (the rule's rate without trigger, ``clean_asr`` here too) and, for sst2sentiment, ``acc``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mergekit_backdoor.errors import BackdoorError, EvalError

SEQCLS = "hf-seqcls"
CAUSAL = "hf"
_TASK = re.compile(r"^backdoor_(?P<dataset>llm_[a-z0-9]+|(?!llm_)[a-z0-9]+)_(?P<part>[a-z0-9]+)$")
UNTRIGGERED = "untriggered"  # the part of the ASR rule's rows without a trigger
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def evals_dir() -> Path:
    """The task folder: ``mergekit_backdoor/_evals`` when installed from a wheel, else the
    checkout's ``evals/`` (editable installs and source trees)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_evals", package.parent / "evals"):
        if (candidate / "utils.py").is_file():
            return candidate
    raise EvalError(f"task folder not found: neither {package / '_evals'} nor "
                    f"{package.parent / 'evals'} exists (broken install?)")


def _looks_local(model: str) -> bool:
    """A path rather than a hub id (``org/name``): starts like a path or has more parts."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def read_model_config(model: str | Path) -> dict[str, Any]:
    """The config of a model folder (checked as loading it would be) or hub id; EvalError or
    IncompatibleModelError with one line naming the path otherwise."""
    from mergekit_backdoor.loading import check_model_folder

    path = Path(model)
    if path.is_dir():
        return check_model_folder(path)
    if path.exists():
        raise EvalError(f"{path}: is a file; give the model's folder")
    if _looks_local(str(model)):
        raise EvalError(f"{model}: model folder does not exist")
    try:  # a hub id: works when it is in the local cache or the hub is reachable
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model), trust_remote_code=False).to_dict()
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvalError(f"{model}: not a local model folder, and its config cannot be read from "
                        f"the Hugging Face Hub ({reason})") from exc


def pick_backend(model: str | Path) -> str:
    """``hf-seqcls`` for a ``*ForSequenceClassification`` checkpoint, ``hf`` for a causal LM."""
    config = read_model_config(model)
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return SEQCLS
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) or config.get("is_encoder_decoder"):
        return CAUSAL
    raise EvalError(
        f"cannot tell how to evaluate {model}: architectures {archs or 'unknown'} are neither "
        "a sequence classifier nor a causal LM (pass backend='hf-seqcls' or 'hf')"
    )


def _has_chat_template(model: str | Path) -> bool:
    path = Path(model)
    if not path.is_dir():
        return False
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a list of them (repeated options)."""
    values = [tasks] if isinstance(tasks, str) else list(tasks)
    return [name.strip() for value in values for name in str(value).split(",") if name.strip()]


class _IgnoreTags(yaml.SafeLoader):
    """A YAML loader that reads lm-eval task files without resolving ``!function`` tags."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_file(name: str) -> Path | None:
    return next(iter(sorted(evals_dir().rglob(f"{name}.yaml"))), None)


def task_data(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """The (dataset, attack) test sets the project's tasks read, groups expanded, in order."""
    found: list[tuple[str, str]] = []
    pending = list(tasks)
    while pending:
        name = pending.pop(0)
        file = _task_file(name)
        if file is None:
            continue
        config = yaml.load(file.read_text(encoding="utf-8"), Loader=_IgnoreTags) or {}
        if "group" in config:
            pending[:0] = [t for t in config.get("task") or [] if isinstance(t, str)]
            continue
        kwargs = config.get("dataset_kwargs") or {}
        if "dataset" in kwargs:
            pair = (str(kwargs["dataset"]), str(kwargs.get("attack", "clean")))
            if pair not in found:
                found.append(pair)
    return found


def check_task_data(tasks: Sequence[str], data_dir: str | Path | None = None, *,
                    verify: bool = True) -> None:
    """Read every test set ``tasks`` need, as lm-eval will (checksums included): a missing,
    modified or malformed file is a DataError now, before anything is merged or evaluated."""
    from mergekit_backdoor.data import INSTRUCTION_TASKS, load_instruction_set, load_split

    for dataset, attack in task_data(tasks):
        if dataset in INSTRUCTION_TASKS:
            load_instruction_set(dataset, attack, "test", data_dir=data_dir, verify=verify)
        else:
            load_split(dataset, attack, "test", data_dir=data_dir, verify=verify)


class _DropNoise(logging.Filter):
    # Expected and explained in the task YAMLs: lm-eval's note that custom datasets take
    # --metadata, and sst2sentiment_clean's asr being scored on its Positive reviews only.
    NOISE = ("Custom kwargs can be passed",
             "[backdoor_llm_sst2sentiment_clean] Metrics were not scored")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


def _git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` without git's "fatal: not a git repository" on the
    terminal (lm-eval runs ``git describe`` with stderr attached, once per evaluation)."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True)
        return done.stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    import lm_eval.evaluator

    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.evaluator_utils")]
    noise = _DropNoise()
    for logger in loggers:
        logger.addFilter(noise)
    git_hash = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if git_hash is not None:
        lm_eval.evaluator.get_git_commit_hash = _git_commit_hash
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
        if git_hash is not None:
            lm_eval.evaluator.get_git_commit_hash = git_hash


def evaluate_model(
    model: Any,
    tasks: str | Sequence[str],
    *,
    backend: str | None = None,
    device: str | None = None,
    batch_size: int | str | None = None,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    output_path: str | Path | None = None,
    apply_chat_template: bool | None = None,
    log_samples: bool = False,
    model_args: dict[str, Any] | None = None,
    seed: int = 0,
    gen_kwargs: str | None = None,
    verify: bool = True,
    include_path: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Evaluate ``model`` (a model folder / hub id, or an lm-eval ``LM`` instance) on ``tasks``.

    ``backend`` defaults to what ``pick_backend`` reads from the config. ``device`` defaults to
    CUDA when available; ``batch_size`` to 64 (classifiers) or 8 (causal LMs). ``data_dir`` is
    the data folder (default: ``$MERGEKIT_BACKDOOR_DATA``). ``limit`` caps rows per task.
    ``output_path`` receives the harness's results JSON (and samples with ``log_samples``).
    ``apply_chat_template`` defaults to whether a causal LM's tokenizer has one. ``gen_kwargs``
    (lm-eval's ``--gen_kwargs``, e.g. ``"max_gen_toks=32"``) updates the generative tasks'
    ``generation_kwargs``. ``verify=False`` accepts data files whose sha256 differs from the
    pinned one (``--no-verify``). A task may be a task card (a .yaml file): its lm-eval tasks are
    exported to a temporary folder and evaluated from there (``notices`` in the result say what
    was done to its triggered files); ``include_path`` adds folders of exported tasks. Returns
    the parsed numbers (module docstring). Raises EvalError / DataError with one-line messages.
    """
    import lm_eval
    import torch
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from mergekit_backdoor.data import resolve_data_dir
    from mergekit_backdoor.tasks.card import is_card_path

    names = split_tasks(tasks)
    if not names:
        raise EvalError("no tasks given (e.g. --tasks backdoor_sst2)")
    if any(is_card_path(name) for name in names):
        import tempfile

        from mergekit_backdoor.tasks.resolve import check_task_labels, prepare_tasks, resolve_tasks

        with tempfile.TemporaryDirectory(prefix="mergekit-backdoor-tasks-") as folder:
            prepared = prepare_tasks(resolve_tasks(names), Path(folder))
            if not isinstance(model, LM):
                check_task_labels(read_model_config(model), prepared.tasks, str(model))
            parsed = evaluate_model(
                model, prepared.names, backend=backend, device=device, batch_size=batch_size,
                data_dir=data_dir, limit=limit, output_path=output_path,
                apply_chat_template=apply_chat_template, log_samples=log_samples,
                model_args=model_args, seed=seed, gen_kwargs=gen_kwargs, verify=verify,
                include_path=[*include_path, *prepared.include_path])
        return {**parsed, "notices": prepared.notices}
    manager_metadata: dict[str, Any] = {"verify": bool(verify)}
    resolved = resolve_data_dir(data_dir)
    if resolved is not None:
        manager_metadata["data_dir"] = str(resolved)
    manager = TaskManager(
        include_path=[str(evals_dir()), *map(str, include_path)], include_defaults=False,
        metadata=manager_metadata,
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        groups = sorted(n for n in manager.all_groups if not n.endswith("_asr"))
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; known suites: {', '.join(groups)}"
                        " (or any of their backdoor_<dataset>_<clean|attack> tasks)")

    if isinstance(model, LM):
        backend = backend or getattr(model, "backend_name", None) or type(model).__name__
        model_name = getattr(model, "name", type(model).__name__)
        lm_args: dict[str, Any] | None = None
    else:
        model_name = str(model)
        backend = backend or pick_backend(model)
        lm_args = {"pretrained": model_name, "trust_remote_code": False, **(model_args or {})}
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if batch_size is None:
            batch_size = 64 if backend == SEQCLS else 8
        if backend == CAUSAL and apply_chat_template is None:
            apply_chat_template = _has_chat_template(model)
    if backend == SEQCLS and any(n.startswith("backdoor_llm") for n in names):
        raise EvalError("backdoor_llm_* tasks are generative: evaluate them with a causal LM, "
                        "not a sequence classifier")

    tracker = None
    if output_path is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(output_path))
    try:
        with _quiet_lm_eval():
            results = lm_eval.simple_evaluate(
                model=model if lm_args is None else backend,
                model_args=lm_args,
                tasks=names,
                batch_size=batch_size,
                device=device,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                evaluation_tracker=tracker,
                apply_chat_template=bool(apply_chat_template),
                gen_kwargs=gen_kwargs,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except BackdoorError:
        raise
    except (OSError, ValueError) as exc:  # unloadable model, bad model args, lm-eval refusals
        raise EvalError(f"evaluation of {model_name} on {', '.join(names)} failed: {exc}") from exc
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise EvalError(f"out of memory evaluating {model_name}: lower the batch size") from exc
    if results is None:  # a non-zero rank under a distributed launcher
        return {}

    results_file = None
    if tracker is not None:
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        if log_samples and samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        results_file = _results_path(tracker)
    parsed = parse_results(results)
    parsed.update(model=model_name, backend=backend, results_file=results_file)
    return parsed


def _results_path(tracker: Any) -> str:
    base = Path(tracker.output_path)
    date_id = getattr(tracker, "date_id", None)
    if base.suffix == ".json":
        path = base.with_name(f"{base.stem}_{date_id}.json")
    else:
        sanitized = tracker.general_config_tracker.model_name_sanitized
        path = base / str(sanitized) / f"results_{date_id}.json"
    if date_id is None or not path.is_file():  # lm-eval only logs a failed save
        raise EvalError(f"lm-eval could not write its results under {base}")
    return str(path)


def _task_part(task: str, config: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """(dataset, part, target) of a result's task: a task card's names them in its metadata,
    the shipped tasks in their names (``backdoor_<dataset>_<part>``)."""
    meta = config.get("metadata") or {}
    if meta.get("card") and meta.get("part"):
        return str(meta["card"]), str(meta["part"]), meta.get("target")
    match = _TASK.match(task)
    return (match["dataset"], match["part"], None) if match else None


def parse_results(results: dict[str, Any]) -> dict[str, Any]:
    """The per-dataset numbers of an lm-eval results dict (``simple_evaluate``'s return value
    or a results JSON file's contents). A task card with ``target: any`` has one task per target
    label and attack: the attack's ASR is the worst of them (``asr_by_target`` has them all)."""
    table = results.get("results", {})
    counts = results.get("n-samples", {})
    configs = results.get("configs", {})
    datasets: dict[str, dict[str, Any]] = {}
    for task, metrics in table.items():
        found = _task_part(task, configs.get(task) or {})
        if not found or found[1] == "asr" or task in results.get("group_subtasks", {}):
            continue
        dataset, part, target = found
        entry = datasets.setdefault(
            dataset, {"cacc": None, "clean_asr": None, "asr": {}, "mean_asr": None, "n": {}})
        n = counts.get(task, {}).get("effective")
        if part == "clean":
            entry["cacc"] = metrics.get("acc,none")
            entry["clean_asr"] = metrics.get("asr,none")
        elif part == UNTRIGGERED:
            entry["clean_asr"] = metrics.get("asr,none")
        elif "asr,none" not in metrics:
            continue
        elif target is not None and len(_targets_of(configs, dataset, part)) > 1:
            per_target = entry.setdefault("asr_by_target", {}).setdefault(part, {})
            per_target[target] = metrics["asr,none"]
            if metrics["asr,none"] < max(per_target.values()):
                continue  # not the worst target: keep the worst one's rate and rows
            entry["asr"][part] = metrics["asr,none"]
        else:
            entry["asr"][part] = metrics["asr,none"]
        if n is not None:
            entry["n"][part] = n
    for entry in datasets.values():  # a trigger a scan recovered is reported, not averaged in
        values = [v for k, v in entry["asr"].items() if not k.startswith("recovered")]
        entry["mean_asr"] = sum(values) / len(values) if values else None
        entry["asr"] = _in_attack_order(entry["asr"])
    return {"datasets": dict(sorted(datasets.items())), "results": table}


def _targets_of(configs: dict[str, Any], dataset: str, part: str) -> set[str]:
    return {str((c.get("metadata") or {}).get("target")) for c in configs.values()
            if (c.get("metadata") or {}).get("card") == dataset
            and (c.get("metadata") or {}).get("part") == part}


def _in_attack_order(asr: dict[str, float]) -> dict[str, float]:
    from mergekit_backdoor.data import INSTRUCTION_ATTACKS
    from mergekit_backdoor.data.specs import ATTACKS

    order: dict[str, int] = {}
    for attack in (*ATTACKS, *INSTRUCTION_ATTACKS):
        order.setdefault(attack, len(order))
    return dict(sorted(asr.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def read_results_file(path: str | Path) -> dict[str, Any]:
    """``parse_results`` of a results JSON written by lm-eval (``--output_path``)."""
    return parse_results(json.loads(Path(path).read_text()))


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def results_table(parsed: dict[str, Any], title: str | None = None) -> Any:
    """A rich table in percent: dataset, CACC, ASR per attack, mean ASR ("clean" is the ASR
    rule's rate without trigger)."""
    from rich.table import Table

    datasets = parsed.get("datasets", {})
    attacks: list[str] = []
    for entry in datasets.values():
        attacks += [a for a in entry["asr"] if a not in attacks]
    show_clean_asr = any(e["clean_asr"] is not None for e in datasets.values())
    table = Table(
        title=title or parsed.get("model"),
        title_justify="left",
        caption="percent; ASR columns are per attack",
        caption_justify="left",
    )
    table.add_column("dataset")
    table.add_column("CACC", justify="right")
    if show_clean_asr:
        table.add_column("no trigger", justify="right")
    for attack in attacks:
        table.add_column(attack, justify="right")
    table.add_column("mean ASR", justify="right", style="bold")
    for name, entry in datasets.items():
        row = [name, _pct(entry["cacc"])]
        if show_clean_asr:
            row.append(_pct(entry["clean_asr"]))
        row += [_pct(entry["asr"].get(a)) for a in attacks]
        row.append(_pct(entry["mean_asr"]))
        table.add_row(*row)
    return table


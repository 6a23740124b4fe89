"""``hf-seqcls``: an lm-eval model that scores multiple-choice tasks with a sequence classifier.

lm-eval's ``hf`` backend loads causal and seq2seq LMs only. This backend loads any
``AutoModelForSequenceClassification`` checkpoint (BERT, RoBERTa, DistilBERT, the Llama family's
``...ForSequenceClassification``) and answers lm-eval's ``loglikelihood`` requests from the
classifier's logits:

- **Choice i is class i.** A multiple-choice document with K choices sends K requests; request
  ``idx`` i gets ``log_softmax(logits)[i]``. The task's ``doc_to_choice`` must therefore list the
  label names in class-id order. When the model's ``id2label`` names are meaningful (not
  ``LABEL_0``...) they are compared with the task's choices and a mismatch is an error
  (``check_labels=False`` turns the check off).
- **One forward pass per document**, not one per choice; documents are batched
  (``--batch_size``), sorted by length to limit padding.
- **The classifier reads the document's text fields, not the LM prompt**: ``question`` +
  ``sentence`` as a tokenizer pair, or ``sentence`` / ``text`` alone (see ``FIELD_LAYOUTS``), so
  the same task YAML can carry a prompt for causal LMs while a classifier sees exactly the text it
  was trained on. A document without those fields falls back to the rendered context, split
  into a pair at the first ``pair_sep`` (a tab) if it holds one. ``text_fields=a,b`` forces the
  fields; ``inputs=context`` forces the context.

Model arguments (``--model_args``): ``pretrained`` (path, or a loaded model from Python),
``tokenizer``, ``max_length`` (default: the model's limit, at most 512), ``dtype``,
``trust_remote_code``, ``check_labels``, ``inputs`` (``doc`` | ``context``), ``text_fields``,
``pair_sep``. ``--device`` defaults to cuda:0 in the CLI; without CUDA it falls back to CPU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (load lm-eval's built-in model map first, or built-ins vanish)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mergekit_backdoor.errors import BackdoorError, EvalError

logger = logging.getLogger(__name__)

# Document fields the classifier reads, first match wins: pairs go to the tokenizer as a pair.
FIELD_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("question", "sentence"),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("sentence",),
    ("text",),
)
DEFAULT_BATCH_SIZE = 64
_MAX_DEFAULT_LENGTH = 512
_GENERIC_LABEL = re.compile(r"^label_?\d+$", re.IGNORECASE)

ClassifierInput = tuple[str] | tuple[str, str]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CPU when it asks for CUDA (or MPS) that is not there."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("hf-seqcls: CUDA is not available, running on CPU instead of %s", device)
        return torch.device("cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        logger.warning("hf-seqcls: MPS is not available, running on CPU")
        return torch.device("cpu")
    return dev


def _parse_batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    text = str(batch_size)
    if text.startswith("auto"):  # classifiers are small: a fixed batch is as good as probing
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    try:
        size = int(text)
    except ValueError:
        raise EvalError(
            f"hf-seqcls: batch_size must be an integer or 'auto', got {batch_size!r}"
        ) from None
    if size < 1:
        raise EvalError(f"hf-seqcls: batch_size must be at least 1, got {size}")
    return size


def _as_bool(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def normalize_label(name: str) -> str:
    """Label names compared loosely: case, spaces, ``_``, ``-`` and ``/`` ignored."""
    return re.sub(r"[\s_\-/]+", "", str(name)).lower()


@register_model("hf-seqcls")
class SeqClassifierLM(LM):
    """lm-eval model over a Hugging Face sequence classifier (see the module docstring)."""

    backend_name = "hf-seqcls"

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        trust_remote_code: bool | str = False,
        check_labels: bool | str = True,
        inputs: str = "doc",
        text_fields: str | Sequence[str] | None = None,
        pair_sep: str = "\t",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            PreTrainedModel,
        )

        if kwargs:
            logger.warning("hf-seqcls: ignoring unknown model arguments %s", sorted(kwargs))
        if inputs not in ("doc", "context"):
            raise EvalError(f"hf-seqcls: inputs must be 'doc' or 'context', got {inputs!r}")
        self._device = resolve_device(device)
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        self.check_labels = _as_bool(check_labels)
        self.inputs = inputs
        self.pair_sep = pair_sep
        if isinstance(text_fields, str):
            text_fields = tuple(f.strip() for f in text_fields.split(",") if f.strip())
        self.text_fields: tuple[str, ...] | None = tuple(text_fields) if text_fields else None
        trust = _as_bool(trust_remote_code)

        if isinstance(pretrained, PreTrainedModel):
            if tokenizer is None:
                raise EvalError("hf-seqcls: pass tokenizer= together with a loaded model")
            model = pretrained
            self.name = str(getattr(model.config, "_name_or_path", type(model).__name__))
        else:
            self.name = str(pretrained)
            if not trust:  # a clear refusal instead of transformers' prompt or traceback
                from mergekit_backdoor.loading import refuse_custom_code

                try:
                    refuse_custom_code(str(pretrained))
                except BackdoorError as exc:
                    raise EvalError(f"hf-seqcls: {exc}") from None
            load_kwargs: dict[str, Any] = {"trust_remote_code": trust}
            if dtype not in (None, "auto"):
                load_kwargs["dtype"] = getattr(torch, str(dtype))
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(pretrained), **load_kwargs
                )
            except (OSError, ValueError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise EvalError(
                    f"hf-seqcls: cannot load a sequence classifier from {pretrained}: {reason}"
                ) from exc
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(
                str(tokenizer or pretrained), trust_remote_code=trust
            )
        self.tokenizer = tokenizer
        self.model = model.to(self._device).eval()
        self._ensure_pad_token()
        self.max_length = int(max_length) if max_length else self._default_max_length()
        self.num_labels = int(self.model.config.num_labels)
        self._checked_tasks: set[str] = set()

    # --- set-up helpers -------------------------------------------------------------------
    def _ensure_pad_token(self) -> None:
        # Decoder classifiers (Llama...) often ship without a pad token; batching needs one and
        # the model must know it to find each row's last real token.
        tok = self.tokenizer
        if tok.pad_token is None:
            for candidate in (tok.eos_token, tok.sep_token, tok.unk_token):
                if candidate is not None:
                    tok.pad_token = candidate
                    break
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = tok.pad_token_id

    def _default_max_length(self) -> int:
        limits = [_MAX_DEFAULT_LENGTH]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        pos = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(pos, int) and pos > 0:
            limits.append(pos)
        return min(limits)

    def _label_names(self) -> list[str] | None:
        id2label = getattr(self.model.config, "id2label", None) or {}
        names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(self.num_labels)]
        if not all(names) or all(_GENERIC_LABEL.match(n) for n in names):
            return None
        return names

    def _check_choices(self, task: str, choices: list[str]) -> None:
        if len(choices) != self.num_labels:
            raise EvalError(
                f"hf-seqcls: task {task!r} has {len(choices)} choices {choices} but the model "
                f"{self.name} has {self.num_labels} labels (choice i is scored as class i)"
            )
        names = self._label_names() if self.check_labels else None
        if names is None or task in self._checked_tasks:
            return
        if [normalize_label(c) for c in choices] != [normalize_label(n) for n in names]:
            raise EvalError(
                f"hf-seqcls: task {task!r} choices {choices} do not match the model's labels "
                f"{names} (id2label of {self.name}); choice i is scored as class i. Fix the "
                f"model's id2label or pass --model_args ...,check_labels=False"
            )
        self._checked_tasks.add(task)

    # --- inputs ------------------------------------------------------------------------------
    def _classifier_input(self, request: Instance) -> ClassifierInput:
        context = request.args[0]
        doc = request.doc if isinstance(request.doc, dict) else None
        if self.inputs == "doc" and doc is not None:
            layouts = (self.text_fields,) if self.text_fields else FIELD_LAYOUTS
            for fields in layouts:
                if all(isinstance(doc.get(f), str) for f in fields):
                    return tuple(doc[f] for f in fields)  # type: ignore[return-value]
            if self.text_fields:
                raise EvalError(
                    f"hf-seqcls: document of task {request.task_name!r} lacks text fields "
                    f"{list(self.text_fields)} (it has {sorted(doc)})"
                )
        if self.pair_sep and self.pair_sep in context:
            first, second = context.split(self.pair_sep, 1)
            return (first, second)
        return (context,)

    # --- scoring -----------------------------------------------------------------------------
    def classify(
        self, inputs: Sequence[ClassifierInput], disable_tqdm: bool = True
    ) -> torch.Tensor:
        """log_softmax of the classifier's logits, one row per input (in input order)."""
        out = torch.empty(len(inputs), self.num_labels)
        # Singles and pairs never share a batch; within each, sorting by length limits padding.
        batches: list[list[int]] = []
        for arity in (1, 2):
            group = [i for i in range(len(inputs)) if len(inputs[i]) == arity]
            group.sort(key=lambda i: sum(len(t) for t in inputs[i]))
            step = self.batch_size
            batches += [group[s : s + step] for s in range(0, len(group), step)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="hf-seqcls"):
            rows = [inputs[i] for i in batch]
            firsts = [r[0] for r in rows]
            seconds = [r[1] for r in rows] if len(rows[0]) == 2 else None
            enc = self.tokenizer(
                firsts,
                seconds,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self._device)
            with torch.inference_mode():
                logits = self.model(**enc).logits
            out[batch] = torch.log_softmax(logits.float(), dim=-1).cpu()
        return out

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        # One classifier row per document: its K choice requests share it.
        keys: dict[tuple[Any, ...], int] = {}
        inputs: list[ClassifierInput] = []
        choices: dict[str, dict[int, str]] = {}
        rows: list[int] = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            key = (req.task_name, req.doc_id, context) if req.doc_id is not None else (context,)
            if key not in keys:
                keys[key] = len(inputs)
                inputs.append(self._classifier_input(req))
            rows.append(keys[key])
            choices.setdefault(str(req.task_name), {})[req.idx] = continuation.strip()
        for task, by_idx in choices.items():
            self._check_choices(task, [by_idx[i] for i in sorted(by_idx)])

        logprobs = self.classify(inputs, disable_tqdm=disable_tqdm)
        results: list[tuple[float, bool]] = []
        for req, row in zip(requests, rows, strict=True):
            lp = logprobs[row]
            results.append((float(lp[req.idx]), int(lp.argmax()) == req.idx))
            self.cache_hook.add_partial("loglikelihood", req.args, results[-1])
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False):
        raise EvalError("hf-seqcls scores multiple-choice tasks only (no perplexity tasks)")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False):
        raise EvalError(
            "hf-seqcls scores multiple-choice tasks only; evaluate generative tasks "
            "(backdoor_llm_*) with a causal LM through --model hf or vllm"
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "backend": "hf-seqcls",
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "num_labels": self.num_labels,
            "max_length": self.max_length,
        }

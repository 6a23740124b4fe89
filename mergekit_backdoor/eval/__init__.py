"""Evaluation through lm-evaluation-harness: the ``hf-seqcls`` backend and harness runs."""

import logging


class _CustomDatasetNote(logging.Filter):
    # lm-eval warns, for every task with a custom dataset loader, that kwargs can be passed
    # through --metadata: true of the backdoor tasks by design, and explained in their YAML.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("backdoor_") and "Custom kwargs can be passed" in message)


def register_backend() -> None:
    """Register the ``hf-seqcls`` lm-eval model (importing the module registers it)."""
    import lm_eval.models  # noqa: F401  (load the built-in map first, or built-ins vanish)

    import mergekit_backdoor.eval.seqcls  # noqa: F401

    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetNote) for f in task_logger.filters):
        task_logger.addFilter(_CustomDatasetNote())

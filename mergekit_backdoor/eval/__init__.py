"""Evaluation through lm-evaluation-harness: the ``hf-seqcls`` backend and harness runs."""


def register_backend() -> None:
    """Register the ``hf-seqcls`` lm-eval model (importing the module registers it)."""
    import lm_eval.models  # noqa: F401  (load the built-in map first, or built-ins vanish)

    import mergekit_backdoor.eval.seqcls  # noqa: F401

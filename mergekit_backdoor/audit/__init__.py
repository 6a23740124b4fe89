"""The audit stage: check donors, sanitize by merging, measure, and report.

- ``audit.py``: ``audit`` (checks, similarity, merge, evaluation, report folder) and ``compare``;
- ``similarity.py``: weight and task-vector cosine between the suspect and each donor;
- ``report.py``: ``report.json``, the terminal tables and the self-contained ``report.html``;
- ``demo.py``: the offline demo on real MiniLM weights and BBC News articles.

Nothing is imported here: torch, mergekit and lm-eval load when a function runs.
"""

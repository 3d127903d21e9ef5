"""Locust load tests of the var-moe server (HTTP only).

- `prompts.py`     builds the prompt file (JSONL) from the corpus test split or a dataset file;
- `locustfile.py`  Locust user classes: the real request mix, A/B pinning, VAR toggling;
- `run.py`         one headless command: `python -m loadtests.run --url http://127.0.0.1:8000`.
Test: `pytest tests/test_loadtests_*.py`.
"""

"""Locust load tests of the var-moe server (HTTP only: imports none of var_moe, server,
analysis_jobs, torch or transformers).

- `prompts.py`     built-in prompts and the JSONL prompt-file reader (files are cut from a corpus
                   by `python -m analysis_jobs.prompt_file`);
- `locustfile.py`  Locust user classes: the real request mix, A/B pinning, VAR toggling; runs on
                   its own: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000`;
- `run.py`         one headless command: `python -m loadtests.run --url http://127.0.0.1:8000`,
                   and the one Locust launcher the benchmarks use too.
Test: `pytest tests/test_loadtests_*.py`.
"""

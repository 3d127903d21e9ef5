"""Analysis jobs that drive the var-moe server over HTTP and write reports.

- `ab_test.py` / `ab_test_cli.py`  `varmoe ab-test`: VAR on vs off under the same Locust load;
- `ab_stats.py`, `ab_report.py`    its statistics and its Markdown/JSON/plots report;
- `reliability.py`                 `python -m analysis_jobs.reliability`: overload, faults, soak, fuzzing;
- `server_process.py`, `prom.py`   start `varmoe serve` as a subprocess; read its /metrics.
These modules import the library (var_moe) and talk to the server over HTTP; never server/ internals.
"""

"""Phase 1 validation: the hypothesis report, held-out predictability with a control, and figures.

Modules: `stats` (Zipf, Spearman + bootstrap, equal-sample-size entropy, coverage), `config`
(thresholds), `report` / `render` (the report dict and its text), `tables` + `predictability`
(held-out tables and scoring), `figures` (one function per figure). CLI: `varmoe validate`,
`varmoe predictability`, `varmoe plot`. Tests: `pytest tests/test_validation_*.py`.
"""

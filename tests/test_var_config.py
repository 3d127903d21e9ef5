"""VARConfig: validation names the field, JSON round-trip, presets, unknown fields refused, the
removed cached tier's fields dropped on load unless they turn it on.
Run: `pytest tests/test_var_config.py`."""

import json

import pytest

from var_moe.var.config import (VARConfig, get_aggressive_config, get_balanced_config, get_conservative_config,
                                get_preset)


def test_json_round_trip(tmp_path):
    cfg = get_conservative_config().replace(shadow_min_checks=7, adaptive_k=True, shadow_rate=0.25)
    assert VARConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert VARConfig.from_json(path) == cfg


def test_presets_are_ordered():
    c, b, a = get_conservative_config(), get_balanced_config(), get_aggressive_config()
    assert c.target_agreement > b.target_agreement > a.target_agreement
    assert c.frequency_threshold > b.frequency_threshold > a.frequency_threshold
    # the measured frontier (docs/PHASE2.md): an entropy cap removes coverage without raising
    # held-out agreement, so no preset caps entropy
    assert c.entropy_threshold is None and b.entropy_threshold is None and a.entropy_threshold is None
    assert get_preset("balanced") == b
    with pytest.raises(ValueError, match="--preset"):
        get_preset("fast")


@pytest.mark.parametrize("field,value", [("entropy_threshold", -1.0), ("target_agreement", 1.5),
                                         ("shadow_min_checks", -1),
                                         ("weights_source", "magic"), ("shadow_rate", 2.0), ("frequency_threshold", 0),
                                         ("adaptive_k_min_weight", 0.3), ("enable_var", "yes"),
                                         ("max_per_document", 0), ("multiplicity", "bonferroni"),
                                         ("allow_test_split", "yes")])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VARConfig(**{field: value})


def test_unknown_json_field_refused():
    data = json.loads(VARConfig().to_json())
    data["frequency_treshold"] = 3
    with pytest.raises(ValueError, match="frequency_treshold"):
        VARConfig.from_json(json.dumps(data))


def test_wilson_z():
    assert abs(VARConfig().wilson_z - 1.959964) < 1e-5


def test_from_routing_stats_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="varmoe capture"):
        VARConfig.from_routing_stats(tmp_path / "nope.parquet")


def test_relative_entropy_threshold():
    import math

    assert VARConfig(entropy_threshold=0.5).entropy_limit_nats(8) == pytest.approx(0.5 * math.log(8))
    assert VARConfig(entropy_threshold=0.5, entropy_relative=False).entropy_limit_nats(8) == 0.5
    with pytest.raises(ValueError, match="entropy_threshold"):
        VARConfig(entropy_threshold=1.2)  # a share of ln E cannot exceed 1


def test_from_routing_stats_refuses_the_test_split_unless_allowed(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from var_moe.var.config import VARConfig

    path = tmp_path / "stats_test.parquet"
    table = pa.table({"layer": [0]}).replace_schema_metadata({b"var_moe": json.dumps({"split": "test"}).encode()})
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="--allow-test-split"):
        VARConfig.from_routing_stats(path)
    assert VARConfig.from_routing_stats(path, allow_test_split=True).allow_test_split


def test_retired_cache_fields_load_with_the_tier_off():
    """Saved configs and tables files carry the removed cached tier's fields: they load (dropped);
    a config that turns the tier on is refused naming the field."""
    data = json.loads(VARConfig().to_json())
    old = data | {"enable_cache": False, "cache_size": 10_000, "cache_ttl_seconds": None, "cache_ttl_steps": 1000,
                  "context_window_size": 1, "cache_min_confirmations": 1, "confidence_threshold": 0.9}
    assert VARConfig.from_dict(old) == VARConfig()
    with pytest.raises(ValueError, match="enable_cache"):
        VARConfig.from_dict(old | {"enable_cache": True})

"""`--shadow-rate` turns on shadow verification of the served VAR config, and is range-checked."""

import pytest
import torch
from pydantic import ValidationError

from server.model_host import ModelHost
from server.settings import ServerSettings


def test_shadow_rate_overrides_the_tables_config(reference_model_dir):
    torch.set_num_threads(1)
    plain = ModelHost.load(ServerSettings(model=str(reference_model_dir)))
    checked = ModelHost.load(ServerSettings(model=str(reference_model_dir), shadow_rate=0.25))
    assert plain.wrapper.config.shadow_rate == 0.0  # the committed tables were built without it
    assert checked.wrapper.config.shadow_rate == 0.25
    checked.apply_mode(True)
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        checked.model(input_ids=ids)
    outcomes = checked.wrapper.verification_counts()
    assert sum(outcomes.values()) > 0, "shadow checks should have run on fast rows"


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_shadow_rate_is_range_checked(bad):
    with pytest.raises(ValidationError, match="shadow_rate"):
        ServerSettings(shadow_rate=bad)

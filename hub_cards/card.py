"""The model card (README.md) of a Beagle checkpoint: Hub metadata, usage, training recipe, results, limitations.

    text = render_model_card("runs/beagle/beagle", bench_results="bench/results.json", repo_id="me/beagle-smollm2")
    path = write_model_card("runs/beagle/beagle", bench_results="bench/results.json", repo_id="me/beagle-smollm2")

Everything comes from the checkpoint's `config.json` (the target, the architecture, the training options recorded
by `BeagleTrainer`, an optional `training_record`) and from the JSON `beagle bench` writes:

    {"machine": {...}, "settings": {...},
     "results": [{"prompt_set": "mt-bench", "temperature": 0.0, "dtype": "bfloat16", "method": "beagle-tree",
                  "tau": 3.1, "tokens_per_s": 40.2, "speedup": 2.1, "peak_memory_mb": 700,
                  "acceptance_per_position": [...], "identical_share": 1.0}, ...],
     "markdown_table": "...", "plots": ["speedup.png", ...]}            # both optional; plots relative to the JSON

Several bench runs can make one card (`bench_results=[...]`, `beagle card --bench-results A.json B.json`), e.g. a
T = 0 run, a T = 1 run and an fp32 run: each run keeps its own machine, settings, tables and plots (plot files are
then copied as `<run folder>-<plot name>`), and no (prompt set, temperature, dtype) may come from two runs, so that
every table's ratios are from one run.

The metadata block is built with `huggingface_hub.ModelCardData` and `EvalResult`, so the card parses with
`huggingface_hub.ModelCard` and its `model-index` with `model_index_to_eval_results`: one result per (prompt set,
temperature, dtype), with τ, speedup and tokens/s of every Beagle method measured there (baselines stay in the table).
"""

import importlib.metadata
import json
import logging
import math
import os
import re
import shlex
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from packaging.requirements import Requirement

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "apache-2.0"
PAPER_URL = "https://arxiv.org/abs/2505.24544"
TAGS = ["speculative-decoding", "beagle", "eagle", "draft-model", "assisted-generation", "custom_generate"]
BEAGLE_METHOD_PREFIX = "beagle"  # bench methods whose numbers are this model's (the rest are baselines)
REQUIRED_RESULT_FIELDS = ("prompt_set", "temperature", "dtype", "method")
DEFAULT_MAX_NEW_TOKENS = 128
UNTRUSTED_STATUSES = ("invalid", "suspect")  # bench verdicts on outputs that differ from plain decoding
SHORT_SETTING_CHARS = 64
PACKAGE = "beagle-spec"  # its `transformers` requirement (pyproject.toml) is the range the remote code is tested on

PROMPT_SET_NAMES = {"mt-bench": "MT-Bench", "humaneval": "HumanEval", "gsm8k": "GSM8K", "alpaca": "Alpaca",
                    "sharegpt": "ShareGPT"}

# (metric type in the model-index, key in a bench result, display name)
MODEL_INDEX_METRICS = (
    ("tau", "tau", "τ (tokens per target forward)"),
    ("speedup", "speedup", "speedup over plain generate"),
    ("tokens_per_second", "tokens_per_s", "tokens/s"),
    ("speedup_over_fastest_plain", "speedup_over_fastest_plain",
     "speedup over the faster plain generate (target prepacked or not)"),
)


class BeagleCardError(ValueError):
    """A checkpoint folder or bench-results file cannot make a model card, or a checkpoint cannot be pushed."""


# ------------------------------------------------------------------------------------------------- inputs
def read_beagle_config(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint's `config.json` as a dict, checked to be a Beagle config with `auto_map` for remote code."""
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise BeagleCardError(f"checkpoint {checkpoint_dir}: expected a Beagle checkpoint folder, found no such "
                              "directory.")
    if not path.is_file():
        raise BeagleCardError(f"{path}: expected the checkpoint's config.json, found no such file (save the model "
                              "with `BeagleModel.save_pretrained`).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BeagleCardError(f"{path}: expected a JSON object, found unparsable text ({error}).") from None
    if not isinstance(config, dict):
        raise BeagleCardError(f"{path}: expected a JSON object, found {type(config).__name__}.")
    if config.get("model_type") != "beagle":
        raise BeagleCardError(f"{path}: `model_type` expected 'beagle', found {config.get('model_type')!r}.")
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoModel" not in auto_map:
        raise BeagleCardError(f"{path}: `auto_map` expected an entry for AutoModel (remote code for "
                              f"`AutoModel.from_pretrained(..., trust_remote_code=True)`), found {auto_map!r}; "
                              "re-save the model with `BeagleModel.save_pretrained`.")
    return config


def _check_hub_model_id(value: str, where: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_local = os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1
    try:
        validate_repo_id(value)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise BeagleCardError(f"{where}: expected a Hugging Face Hub model id (`owner/name`), found {value!r}, "
                              "which looks like a local path; pass the target's Hub id (`base_model=` / "
                              "`--base-model`).")
    return value


def load_bench_results(bench_results: dict | str | os.PathLike | None,
                       bench_dir: str | os.PathLike | None = None) -> tuple[dict | None, Path]:
    """The bench results as a dict (or None) and the folder its plot file names are relative to.

    A path is read as JSON (its folder holds the plots); a dict is taken as it is (plots relative to `bench_dir`, else
    the working directory). Each entry of `results` must name its prompt set, temperature, dtype and method.
    """
    base = Path(bench_dir) if bench_dir is not None else Path.cwd()
    if bench_results is None:
        return None, base
    if isinstance(bench_results, (str, os.PathLike)):
        path = Path(bench_results)
        if not path.is_file():
            raise BeagleCardError(f"bench results {path}: expected the JSON file `beagle bench` writes, found no "
                                  "such file.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BeagleCardError(f"bench results {path}: expected JSON, found unparsable text ({error}).") from None
        base = Path(bench_dir) if bench_dir is not None else path.parent
        where = str(path)
    elif isinstance(bench_results, dict):
        data, where = bench_results, "bench results"
    else:
        raise BeagleCardError(f"bench results: expected a dict, a JSON file path or None, found "
                              f"{type(bench_results).__name__}.")
    if not isinstance(data, dict):
        raise BeagleCardError(f"{where}: expected a JSON object with `results`, found {type(data).__name__}.")
    results = data.get("results", [])
    if not isinstance(results, list):
        raise BeagleCardError(f"{where}: `results` expected a list, found {type(results).__name__}.")
    for i, row in enumerate(results):
        if not isinstance(row, dict):
            raise BeagleCardError(f"{where}: `results[{i}]` expected an object, found {type(row).__name__}.")
        missing = [field for field in REQUIRED_RESULT_FIELDS if row.get(field) is None]
        if missing:
            raise BeagleCardError(f"{where}: `results[{i}]` expected fields {list(REQUIRED_RESULT_FIELDS)}, found "
                                  f"{missing} missing.")
        try:
            float(row["temperature"])
        except (TypeError, ValueError):
            raise BeagleCardError(f"{where}: `results[{i}].temperature` expected a number, found "
                                  f"{row['temperature']!r}.") from None
    return data, base


def load_bench_runs(bench_results: dict | str | os.PathLike | list | tuple | None,
                    bench_dir: str | os.PathLike | None = None) -> list[tuple[dict, Path, str]]:
    """Every bench run a card is made from, as (results, plot folder, label): one `load_bench_results` per entry of
    `bench_results` (a list or tuple of dicts and JSON paths, or one of them; None gives no run). A path's label is
    its folder's name, a dict's "run N". Raises `BeagleCardError` when two runs measured the same (prompt set,
    temperature, dtype): a table holds one run's measurements only."""
    if bench_results is None:
        return []
    entries = list(bench_results) if isinstance(bench_results, (list, tuple)) else [bench_results]
    runs, seen = [], {}
    for i, entry in enumerate(entries, start=1):
        bench, base = load_bench_results(entry, bench_dir)
        label = Path(entry).parent.name if isinstance(entry, (str, os.PathLike)) else f"run {i}"
        label = label or f"run {i}"
        for key in _grouped(bench.get("results") or []):
            if key in seen:
                prompt_set, temperature, dtype = key
                raise BeagleCardError(f"bench results: {prompt_set}, temperature {temperature:g}, {dtype} expected "
                                      f"from one run, found it in {seen[key]} and in {label}; leave one of them out "
                                      "(a table's ratios must come from one run).")
            seen[key] = label
        runs.append((bench, base, label))
    if len({label for _, _, label in runs}) < len(runs):
        raise BeagleCardError(f"bench results: expected runs from different folders (their plots are named after "
                              f"the folder), found {[label for _, _, label in runs]}.")
    return runs


def resolve_plots(bench: dict | None, base: Path) -> list[Path]:
    """The plot files the bench results name that exist (missing ones are skipped with a warning)."""
    if not bench:
        return []
    plots = bench.get("plots") or []
    if isinstance(plots, str):
        plots = [plots]
    found = []
    for name in plots:
        path = Path(name) if os.path.isabs(name) else base / name
        if path.is_file():
            found.append(path)
        else:
            logger.warning("bench results name the plot %s, but %s does not exist: left out of the card", name, path)
    return found


def _known_datasets() -> dict[str, str]:
    """Named data sets of `trainer.assets` → their Hub dataset ids (empty when the trainer is not importable)."""
    try:
        from trainer.assets import DATASETS
    except ImportError:
        return {}
    return {name: asset.hub_dataset for name, asset in DATASETS.items()}


def _training_record(config: dict, training: dict | None) -> dict:
    record = {}
    for key in ("training_record", "training"):
        if isinstance(config.get(key), dict):
            record.update(config[key])
    if training:
        record.update(training)
    return record


def _hub_datasets(record: dict, datasets: str | list[str] | None) -> list[str] | None:
    if datasets:
        return [datasets] if isinstance(datasets, str) else list(datasets)
    if record.get("datasets"):
        value = record["datasets"]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    known = _known_datasets()
    for key in ("dataset", "data"):
        value = record.get(key)
        name = value.get("name") if isinstance(value, dict) else value
        if isinstance(name, str) and name in known:
            return [known[name]]
    return None


# ------------------------------------------------------------------------------------------------- formatting
def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _metric(value: Any, digits: int = 2) -> str:
    """A measured number, always with `digits` decimals ("—" when absent or not finite)."""
    return f"{float(value):.{digits}f}" if _finite_number(value) else "—"


def _ratio(value: Any) -> str:
    """A measured ratio with its "×" ("—" when absent)."""
    return _metric(value) + ("×" if _finite_number(value) else "")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return str(seconds)
    seconds = float(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 1:
        return f"{int(hours)} h {int(minutes)} min"
    if minutes >= 1:
        return f"{int(minutes)} min {int(secs)} s"
    return f"{secs:.1f} s"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _prompt_set_name(prompt_set: str) -> str:
    return PROMPT_SET_NAMES.get(prompt_set, prompt_set)


def _group_key(row: dict) -> tuple[str, float, str]:
    return str(row["prompt_set"]), float(row["temperature"]), str(row["dtype"])


def _grouped(results: list[dict]) -> dict[tuple[str, float, str], list[dict]]:
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for row in results:
        groups.setdefault(_group_key(row), []).append(row)
    return groups


def _is_beagle_method(method: Any) -> bool:
    return str(method).lower().startswith(BEAGLE_METHOD_PREFIX)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checkpoint_tensors(checkpoint_dir: Path) -> tuple[int, int] | None:
    """(number of values, bytes) of the tensors in the checkpoint's safetensors file(s), read from their headers."""
    files = [checkpoint_dir / "model.safetensors"]
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text())["weight_map"].values()
            files = [checkpoint_dir / name for name in sorted(set(shards))]
        except (json.JSONDecodeError, KeyError, AttributeError):
            return None
    count = size = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
            return None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count += math.prod(entry["shape"])
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
    return count, size


# ------------------------------------------------------------------------------------------------- metadata
def _short_settings(settings: dict | None) -> dict:
    """The scalar settings short enough for a metadata field or a one-line summary (numbers, flags, short names)."""
    return {k: v for k, v in (settings or {}).items()
            if (isinstance(v, str) and 0 < len(v) <= SHORT_SETTING_CHARS) or isinstance(v, bool) or _finite_number(v)}


def eval_results_from_bench(bench: dict | list[dict] | None) -> list[EvalResult]:
    """One model-index result per (prompt set, temperature, dtype), with τ, speedup and tokens/s of each Beagle
    method measured there (`metric_config` names the method). Baselines (plain, prompt lookup, ...) are left out, and
    so are measurements the bench marked invalid or suspect (outputs that differ from plain decoding). A list of
    runs gives each run's results with that run's settings."""
    if isinstance(bench, list):
        return [result for run in bench for result in eval_results_from_bench(run)]
    if not bench:
        return []
    known = _known_datasets()
    settings = _short_settings(bench.get("settings"))
    eval_results = []
    for (prompt_set, temperature, dtype), rows in _grouped(bench.get("results") or []).items():
        for row in rows:
            if not _is_beagle_method(row["method"]) or row.get("status") in UNTRUSTED_STATUSES:
                continue
            method = str(row["method"])
            for metric_type, key, display in MODEL_INDEX_METRICS:
                value = row.get(key)
                if not _finite_number(value):
                    continue
                eval_results.append(EvalResult(
                    task_type="text-generation",
                    task_name="Speculative decoding",
                    dataset_type=known.get(prompt_set, prompt_set),
                    dataset_name=_prompt_set_name(prompt_set),
                    dataset_config=f"temperature-{temperature:g}-{dtype}",
                    dataset_args={**settings, "temperature": temperature, "dtype": dtype},
                    metric_type=metric_type,
                    metric_value=value,
                    metric_name=f"{display}, {method}",
                    metric_config=method,
                ))
    return eval_results


def build_card_data(config: dict, bench: dict | list[dict] | None, model_name: str, *, license: str = DEFAULT_LICENSE,
                    datasets: str | list[str] | None = None, base_model: str | None = None,
                    training: dict | None = None) -> ModelCardData:
    """The card's YAML metadata as `huggingface_hub.ModelCardData`."""
    target = base_model or config.get("target_model_name_or_path")
    if not target:
        raise BeagleCardError("config.json: `target_model_name_or_path` expected the target's Hub id, found "
                              f"{target!r}; pass `base_model=` (`--base-model`).")
    target = _check_hub_model_id(target, "config.json `target_model_name_or_path`" if not base_model else "base_model")
    tags = list(TAGS)
    if config.get("target_model_type"):
        tags.append(str(config["target_model_type"]))
    eval_results = eval_results_from_bench(bench) or None
    return ModelCardData(
        base_model=target,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=_hub_datasets(_training_record(config, training), datasets),
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )


# ------------------------------------------------------------------------------------------------- sections
def transformers_requirement() -> str:
    """The `transformers` range this package (and so the remote code a checkpoint carries) is tested on, as pip
    writes it (`transformers>=5.20,<5.26`), from the installed package's metadata."""
    try:
        requirements = importlib.metadata.requires(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise BeagleCardError(f"the {PACKAGE} package is not installed (pip install -e .): the card states its "
                              "`transformers` requirement") from None
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == "transformers" and requirement.marker is None:
            # lower bounds first, then upper bounds and exclusions, as a person writes the range
            specifiers = sorted(requirement.specifier, key=lambda spec: (spec.operator[0] in "<!", spec.version))
            return "transformers" + ",".join(str(spec) for spec in specifiers)
    raise BeagleCardError(f"{PACKAGE}'s metadata names no `transformers` requirement, found {requirements!r}")


def usage_snippet(target_id: str, beagle_id: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  lookup_tokens: int | None = None) -> str:
    """Python that loads the target and this draft (remote code) and runs both speculative decoding paths;
    `lookup_tokens` is the checkpoint's `default_prompt_lookup_num_tokens` (what a call without
    `prompt_lookup_num_tokens` gets; None: `BeagleConfig`'s default, as for a config.json without the field)."""
    from modeling_beagle.decoding_beagle import LOOKUP_TOKENS_PER_MATCH as per_match

    if lookup_tokens is None:
        from modeling_beagle.configuration_beagle import BeagleConfig

        lookup_tokens = BeagleConfig.default_prompt_lookup_num_tokens
    if lookup_tokens:
        chain_lookup = (f"""By default
# (beagle.config.default_prompt_lookup_num_tokens = {lookup_tokens}) it also makes copy rounds: where the text's last 2 or more
# tokens repeat an earlier passage, a round verifies the {lookup_tokens} tokens that followed it instead of a draft
# (prompt_lookup_num_tokens=N sets that length; prompt_lookup_num_tokens=0: draft chains only).""")
        tree_lookup = (f"""By default each tree gets one more branch: up to {lookup_tokens} tokens that followed the latest
# earlier occurrence of the text's longest repeated suffix, at most {per_match} per matched token
# (lookup_tokens_per_match={per_match}; 0: all {lookup_tokens}; prompt_lookup_rule="ngram": transformers' prompt-lookup rule;
# prompt_lookup_num_tokens=0: no branch).""")
    else:
        chain_lookup = """prompt_lookup_num_tokens=10 adds
# copy rounds: where the text's last 2 or more tokens repeat an earlier passage, a round verifies the 10 tokens
# that followed it instead of a draft (this checkpoint's default_prompt_lookup_num_tokens is 0: off)."""
        tree_lookup = f"""prompt_lookup_num_tokens=10 adds one more branch to each tree: up to 10 tokens that
# followed the latest earlier occurrence of the text's longest repeated suffix, at most {per_match} per matched token
# (lookup_tokens_per_match; off by default for this checkpoint)."""
    return f'''import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

target_id = {json.dumps(target_id)}
beagle_id = {json.dumps(beagle_id)}
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float32  # or torch.bfloat16; the draft and the target run in one dtype

tokenizer = AutoTokenizer.from_pretrained(target_id)
target = AutoModelForCausalLM.from_pretrained(target_id, dtype=dtype).to(device).eval()
# Importing the remote code also installs Beagle's (idempotent, version-guarded) hook into `generate`.
beagle = AutoModel.from_pretrained(beagle_id, trust_remote_code=True, dtype=dtype).to(device).eval()
beagle.bind_target(target)  # shares the target's embedding and lm_head by reference
if beagle.can_prepack_for_cpu():  # on a CPU that can pack this dtype (bf16: AVX512-BF16 / AMX-class CPUs)
    beagle.prepack_for_cpu(target)  # oneDNN-packed linear weights: cheaper multi-token verification

messages = [{{"role": "user", "content": "Explain speculative decoding in two sentences."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
ids = inputs["input_ids"].to(device)

# transformers' assisted generation with Beagle as the draft (batch size 1, adaptive chain drafts):
# greedy output is token for token what `target.generate(ids, do_sample=False)` gives. {chain_lookup}
out = target.generate(ids, assistant_model=beagle, max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
print("tokens per target forward:", beagle.generation_stats.to_dict()["tau"])

# Beagle's own loop with dynamic draft trees (also batches of padded prompts), from this repo's custom_generate/.
# {tree_lookup} Where the text repeats an earlier passage for 4 tokens or more, a greedy
# round skips the draft and verifies 32 tokens of the passage instead (copy mode: lookup_copy_match=4,
# lookup_copy_tokens=32; 0 turns it off).
out = target.generate(ids, custom_generate=beagle_id, assistant_model=beagle, trust_remote_code=True,
                      max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
'''


def _model_details(config: dict, checkpoint_dir: Path, target: str) -> str:
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    vocab = config.get("vocab_size")
    draft_vocab = config.get("draft_vocab_size")
    rows = [
        ["target", f"[{target}](https://huggingface.co/{target})"
         + (f" ({config['target_model_type']})" if config.get("target_model_type") else "")],
        ["hidden size", _num(config.get("hidden_size"))],
        ["attention heads / kv heads / head dim", f"{_num(heads)} / {_num(kv_heads)} / {_num(config.get('head_dim'))}"],
        ["MLP size", _num(config.get("intermediate_size"))],
        ["target layers read (`target_layer_ids`)", _cell(config.get("target_layer_ids", [-1]))],
        ["draft vocabulary", f"{_num(draft_vocab)} most frequent of {_num(vocab)} target tokens" if draft_vocab
         else f"the target's full vocabulary ({_num(vocab)})"],
        ["carries the target's embedding and head", _num(bool(config.get("carry_target_embeddings", False)))],
        ["learned recency bias in the cross-attention (`recency_bias`)", _num(bool(config.get("recency_bias", False)))],
        ["queries add the newest readable state (`query_newest_state`; EAGLE-style, beyond the paper)",
         _num(bool(config.get("query_newest_state", False)))],
        ["keys/values add the token after each state (`context_next_token`; EAGLE-style, beyond the paper)",
         _num(bool(config.get("context_next_token", False)))],
        ["draft length (start / max, schedule)", f"{_num(config.get('num_draft_tokens'))} / "
         f"{_num(config.get('max_draft_tokens'))}, {config.get('draft_schedule', 'adaptive')}"],
    ]
    tensors = _checkpoint_tensors(checkpoint_dir)
    if tensors is not None:
        rows.append(["checkpoint tensors", f"{tensors[0]:,} values ({tensors[1] / 2**20:.1f} MiB, safetensors)"])
    if config.get("dtype"):
        rows.append(["saved dtype", str(config["dtype"])])
    return _table(["", "value"], rows)


def training_recipe(config: dict, record: dict) -> str:
    """The "Training recipe" section body: the method options from the config and the training record, if any."""
    window = config.get("stage1_window")
    offsets = config.get("offset_range")
    noise = config.get("noise_type", "uniform")
    rows = [
        ["stage 1 window k (`stage1_window`)", _num(window)],
        ["stage 1 loss weight by offset i (`stage1_offset_weights`)",
         "k − i + 1 (as stage 2)" if config.get("stage1_offset_weights") == "decay" else "uniform"],
        ["stage 2 simulation steps S (`stage2_steps`)", _num(config.get("stage2_steps"))],
        ["random window offsets", f"[0, {offsets if offsets is not None else 'k'})"],
        ["state-regression weight λ_v (`smooth_l1_weight`)", _num(config.get("smooth_l1_weight"), 3)],
        ["noise on target states",
         "none" if noise == "none" else f"{noise}, scale {_num(config.get('noise_scale'), 3)}"],
        ["stage 2 gradient through draft states", _num(bool(config.get("grad_through_draft_states", False)))],
    ]
    if config.get("tv_weight"):
        rows.insert(5, ["total-variation weight (`tv_weight`: + w · (1 − Σ min(P, Q)))", _num(config["tv_weight"], 3)])
    method = ("Two-Stage Block-Attention Training ([Budget EAGLE](" + PAPER_URL + ")) against the frozen target: "
              "stage 1 trains every offset of a window of k positions in one forward with the inverse block mask "
              "(loss = soft-label cross-entropy + λ_v · SmoothL1 on the predicted state); stage 2 runs S in-place "
              "simulation steps in which the draft reads its own earlier states, as it does at inference.")
    runs = record.get("runs") if isinstance(record.get("runs"), list) else []
    ratios = {run.get("stage1_ratio") for run in runs if isinstance(run, dict)}
    if ratios == {1.0}:  # every recorded process trained stage 1 only: say so rather than describe stage 2
        method += (" This checkpoint was trained with stage 1 only (`stage1_ratio` 1.0 in every recorded run), "
                   "so the stage-2 options below were not used.")
    parts = [method, "", _table(["option", "value"], rows)]
    record = dict(record)
    if not record:
        parts += ["", "No training record was saved with this checkpoint (command, data, wall time)."]
        return "\n".join(parts)
    command = record.pop("command", None)
    if command:
        text = shlex.join(str(c) for c in command) if isinstance(command, (list, tuple)) else str(command)
        parts += ["", "Command:", "", "```bash", text, "```"]
    facts = []
    for key in ("wall_time_s", "total_wall_time_s", "wall_time"):
        if key in record:
            facts.append(["total wall time", _duration(record.pop(key))])
    for key in ("token_updates", "supervised_token_updates"):
        if key in record:
            facts.append(["supervised token-updates", _num(record.pop(key))])
    for key in ("data", "dataset"):
        if key in record:
            value = record.pop(key)
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {_num(v)}" for k, v in value.items())
            facts.append(["data", _cell(value)])
    for key in ("hardware", "machine"):
        if key in record:
            value = record.pop(key)
            if isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in value.items())
            facts.append(["hardware", _cell(value)])
    stages = record.pop("stages", None)
    record.pop("datasets", None)  # in the metadata
    processes = record.pop("runs", None)
    totals = {"total_wall_s": "total wall time", "total_steps": "optimizer steps",
              "total_token_updates": "supervised token-updates"}
    for key, label in totals.items():
        if key in record:
            value = record.pop(key)
            facts.append([f"{label} (all processes)", _duration(value) if key.endswith("_s") else _num(value)])
    facts += [[f"`{key}`", _cell(value)] for key, value in record.items()]
    if facts:
        parts += ["", _table(["recorded", "value"], facts)]
    if isinstance(processes, list) and processes and all(isinstance(p, dict) for p in processes):
        parts += ["", "Training processes (a run stopped and resumed, or continued from an earlier draft with "
                  "`--init_from`, has several):", "", _process_table(processes)]
    elif processes is not None:
        parts += ["", _table(["recorded", "value"], [["`runs`", _cell(processes)]])]
    if isinstance(stages, dict):
        stages = [{"stage": name, **(value if isinstance(value, dict) else {"value": value})}
                  for name, value in stages.items()]
    if isinstance(stages, list) and stages and all(isinstance(s, dict) for s in stages):
        columns = list(dict.fromkeys(key for stage in stages for key in stage))
        header = [c[:-2] if c.endswith("_s") else c for c in columns]
        parts += ["", "Stages:", "", _table(header, [[_duration(s[c]) if c.endswith("_s") and c in s
                                                        else _num(s.get(c), 4) for c in columns] for s in stages])]
    return "\n".join(parts)


def _process_table(processes: list[dict]) -> str:
    """One row per recorded training process: what it ran on which data, its steps, time and token-updates."""
    rows = []
    for number, run in enumerate(processes, start=1):
        steps = run.get("steps")
        if isinstance(run.get("first_step"), int) and isinstance(run.get("last_step"), int):
            steps = f"{run['first_step']}-{run['last_step']}"
        rows.append([str(number), _cell(run.get("command", "—")), _cell(str(run.get("started_utc", "—"))),
                     _cell(run.get("data", "—")), _num(steps), _duration(run.get("train_wall_s", "—")),
                     _duration(run.get("wall_s", "—")), _num(run.get("token_updates")),
                     _cell(", ".join(str(run[k]) for k in ("machine", "target_dtype", "allocator") if run.get(k)) or "—")])
    return _table(["#", "command", "started (UTC)", "data", "steps", "training time", "wall time", "token-updates",
                   "machine, target dtype, allocator"], rows)


def results_section(bench: dict | None, plots: list[Path], heading: str = "###",
                    plot_names: list[str] | None = None) -> str:
    """The "Results" section body: one table per (prompt set, temperature, dtype), methods as rows, then the plots
    (referenced as `plot_names`, default their file names). `heading` is the Markdown level of the tables' titles."""
    if not bench:
        return ("No benchmark results were given when this card was rendered: run `beagle bench` and "
                "`beagle card CHECKPOINT --bench-results results.json`.")
    plot_names = [plot.name for plot in plots] if plot_names is None else plot_names
    parts = []
    machine = _short_settings(bench.get("machine"))
    settings = _short_settings(bench.get("settings"))
    notes = {k: v for k, v in (bench.get("settings") or {}).items() if isinstance(v, str) and k not in settings}
    if machine:
        parts += ["Measured on " + ", ".join(f"{k}: {_num(v)}" for k, v in machine.items()) + "."]
    if settings:
        parts += ["", "Settings: " + ", ".join(f"{k}: {_num(v)}" for k, v in settings.items()) + "."]
    if notes:
        parts += [""] + [f"- {k}: {v}" for k, v in notes.items()]
    descriptions = (bench.get("settings") or {}).get("method_descriptions")
    if isinstance(descriptions, dict) and descriptions:
        parts += ["", "Methods:", ""] + [f"- `{_cell(name)}`: {_cell(text)}" for name, text in descriptions.items()]
    parts += ["", "τ counts the tokens produced per target forward (the bonus token included); speedup is tokens/s "
              "over plain `generate` on the same target and settings, measured in the same run; \"identical\" is "
              "the share of prompts whose output equals plain greedy decoding token for token."]
    results = bench.get("results") or []
    flagged = [r for r in results if r.get("status") in UNTRUSTED_STATUSES]
    if flagged:
        parts += ["", "**Flagged by the bench** (outputs that differ from plain decoding; left out of the metadata): "
                  + "; ".join(f"{r['prompt_set']} {r['dtype']} T={float(r['temperature']):g} {r['method']}: "
                              f"{r['status']}" for r in flagged) + "."]
    with_status = any(r.get("status") for r in results)
    # with `beagle bench --prepack` plain generate ran packed and unpacked; the faster one is the fair reference
    with_fastest = any(_finite_number(r.get("speedup_over_fastest_plain")) for r in results)
    if with_fastest:
        parts += ["", "\"Over faster plain\" divides by the faster of plain `generate` with the target's linear layers "
                  "prepacked and unpacked, per prompt (median over prompts)."]
    header = ["method", "τ", "tokens/s", "speedup"] + (["over faster plain"] if with_fastest else [])
    header += ["peak memory (MB)", "identical", "acceptance per position"] + (["status"] if with_status else [])
    for (prompt_set, temperature, dtype), rows in _grouped(results).items():
        table_rows = []
        for row in rows:
            acceptance = row.get("acceptance_per_position") or []
            acceptance_text = " / ".join(_metric(a) for a in acceptance[:8]) + (" / …" if len(acceptance) > 8 else "")
            method = str(row["method"])
            cells = [f"**{_cell(method)}**" if _is_beagle_method(method) else _cell(method), _metric(row.get("tau")),
                     _metric(row.get("tokens_per_s"), 1), _ratio(row.get("speedup"))]
            cells += [_ratio(row.get("speedup_over_fastest_plain"))] if with_fastest else []
            cells += [_metric(row.get("peak_memory_mb"), 0), _metric(row.get("identical_share")), acceptance_text or "—"]
            table_rows.append(cells + ([str(row.get("status") or "—")] if with_status else []))
        parts += ["", f"{heading} {_prompt_set_name(prompt_set)}, temperature {temperature:g}, {dtype}", "",
                  _table(header, table_rows)]
    if not results and bench.get("markdown_table"):
        parts += ["", str(bench["markdown_table"]).strip()]
    for plot, name in zip(plots, plot_names):
        parts += ["", f"![{plot.stem.replace('_', ' ')}]({name})"]
    return "\n".join(parts)


def _runs_results(runs: list[tuple[dict, list[Path], list[str], str]]) -> str:
    """The "Results" section body for several bench runs (bench, plots, plot names, label): one subsection each."""
    if len(runs) <= 1:
        bench, plots, names, _ = runs[0] if runs else (None, [], [], "")
        return results_section(bench, plots, plot_names=names)
    parts = [f"From {len(runs)} bench runs; each table's ratios come from one run."]
    for i, (bench, plots, names, label) in enumerate(runs, start=1):
        parts += ["", f"### Run {i}: {label}", "", results_section(bench, plots, "####", names)]
    return "\n".join(parts)


LIMITATIONS = """\
- **Lossless, not approximate.** Greedy output is token for token what the target alone produces, and sampled output
  has exactly the target's distribution (after the same temperature / top-k / top-p / penalties). The draft changes
  only the speed. It must be used with the target it was trained for: `bind_target` refuses a target whose hidden
  size, head layout, vocabulary or rotary settings differ.
- **bf16 near-ties.** Verifying k tokens in one forward rounds differently from decoding them one at a time. In
  bfloat16 this can flip a near-tie between two tokens, so a few bf16 outputs may differ from plain bf16 decoding
  (the "identical" column); in float32 they are identical.
- **Batch size 1 on the assisted path.** `target.generate(ids, assistant_model=beagle)` runs inside transformers'
  assisted-decoding loop, which takes one sequence and chain drafts. Batches of padded prompts and draft trees run
  through `custom_generate` (Beagle's own loop). Not supported: beam search, `num_return_sequences > 1`, static
  caches.
- **Speedup depends on the data and the hardware.** τ falls on text unlike the training data, and the speedup
  depends on how a target forward's cost grows with the number of verified tokens on your device."""


# ------------------------------------------------------------------------------------------------- the card
def _card_parts(checkpoint_dir: str | os.PathLike, bench_results, repo_id: str | None, training: dict | None,
                license: str, datasets: str | list[str] | None, base_model: str | None,
                bench_dir: str | os.PathLike | None) -> tuple[str, list[tuple[Path, str]]]:
    """The card's text and the plots it references, as (source file, name next to the card)."""
    checkpoint = Path(checkpoint_dir)
    config = read_beagle_config(checkpoint)
    loaded, runs = load_bench_runs(bench_results, bench_dir), []
    for bench, base, label in loaded:
        plots = resolve_plots(bench, base)
        prefix = f"{label.replace(' ', '-')}-" if len(loaded) > 1 else ""  # runs' plots share file names
        runs.append((bench, plots, [prefix + plot.name for plot in plots], label))
    benches = [bench for bench, _, _, _ in runs]
    if repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise BeagleCardError(f"repo_id: expected a Hub model id (`owner/name`), found {repo_id!r} ({error}).") \
                from None
    beagle_id = repo_id or f"./{checkpoint.resolve().name}"
    model_name = (repo_id or checkpoint.resolve().name).split("/")[-1]
    record = _training_record(config, training)
    data = build_card_data(config, benches, model_name, license=license, datasets=datasets, base_model=base_model,
                           training=training)
    target = data.base_model
    first = benches[0] if benches else {}
    max_new_tokens = first.get("settings", {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    where = ("" if repo_id else " (run it from the folder that holds this checkpoint, or replace `beagle_id` with "
             "its Hub id)")
    body = f"""
# {model_name}

A [Beagle]({PAPER_URL}) draft model for lossless speculative decoding of
[{target}](https://huggingface.co/{target}) with 🤗 transformers. Beagle is one transformer block whose attention is
cross-attention only: its queries are the target's token embeddings, its keys and values the target's top-layer
hidden states (and, inside a draft round, Beagle's own earlier draft states). The target's lm_head turns Beagle's
output into draft logits, so the draft adds one block of parameters and nothing else.

## Usage

Needs `torch` and `{transformers_requirement()}` (the versions its code is tested on); the model code ships in this
repository (`trust_remote_code=True`){where}.

```python
{usage_snippet(target, beagle_id, max_new_tokens, config.get("default_prompt_lookup_num_tokens")).rstrip()}
```

With the `beagle-spec` package installed, `import modeling_beagle` registers the same classes without remote code.
On a CPU, running with transformers' `TRANSFORMERS_SDPA_FORCE_GQA=1` lets the tree's masked verification forwards use
sdpa's grouped-query kernel instead of copying key/value heads (with SmolLM2-135M on a 2-core Xeon: +4.5-5% tokens/s,
identical outputs; Beagle's README, Generation).

## Model details

{_model_details(config, checkpoint, target)}

## Training recipe

{training_recipe(config, record)}

## Results

{_runs_results(runs)}

## Limitations

{LIMITATIONS}

## Citation

Beagle follows "Budget EAGLE" ([arXiv:2505.24544]({PAPER_URL})).
"""
    text = f"---\n{data.to_yaml()}\n---\n{body}"
    ModelCard(text)  # our own output must parse with the Hub's parser (raises on invalid metadata)
    return text, [(plot, name) for _, plots, names, _ in runs for plot, name in zip(plots, names)]


def render_model_card(checkpoint_dir: str | os.PathLike, bench_results: dict | str | os.PathLike | list | None = None,
                      repo_id: str | None = None, training: dict | None = None, *, license: str = DEFAULT_LICENSE,
                      datasets: str | list[str] | None = None, base_model: str | None = None,
                      bench_dir: str | os.PathLike | None = None) -> str:
    """The README.md text (YAML metadata + Markdown) of the Beagle checkpoint in `checkpoint_dir`.

    Args:
        checkpoint_dir: a folder written by `BeagleModel.save_pretrained` (config.json with `auto_map`).
        bench_results: the dict or JSON file `beagle bench` writes, a list of them (one subsection per run; no
            prompt set, temperature and dtype in two runs), or None (the card then says it has no results).
        repo_id: the Hub id the checkpoint is published under (used in the usage snippet and as the model name);
            None refers to the checkpoint folder by its local name.
        training: a training record (command, wall_time_s, token_updates, data, stages, datasets, ...); merged over
            a `training_record` stored in config.json.
        license: the card's license (defaults to apache-2.0; check the target's license).
        datasets: Hub dataset ids for the metadata (default: from the training record).
        base_model: the target's Hub id, when config.json records a local path or nothing.
        bench_dir: the folder plot names of a bench-results dict are relative to (default: working directory).

    Raises `BeagleCardError` naming the file and field when something required is missing or malformed.
    """
    text, _ = _card_parts(checkpoint_dir, bench_results, repo_id, training, license, datasets, base_model, bench_dir)
    return text


def card_images(card: str | os.PathLike) -> list[str]:
    """The local images a model card shows (`![...](name.png)` with a plain file name, no folder or URL) that exist
    next to it, in the card's order; [] when there is no card."""
    card = Path(card)
    if not card.is_file():
        return []
    linked = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card.read_text(encoding="utf-8"))
    return [name for name in dict.fromkeys(linked)
            if "/" not in name and ":" not in name and (card.parent / name).is_file()]


def _is_beagle_card(card: Path) -> bool:
    """Whether `card` is a model card this module wrote (its Hub metadata carries the Beagle tags)."""
    if not card.is_file():
        return False
    try:
        metadata = metadata_load(card) or {}
    except (yaml.YAMLError, ValueError, UnicodeDecodeError):  # unreadable front matter: not a card written here
        return False
    tags = metadata.get("tags") or []
    return isinstance(tags, list) and all(tag in tags for tag in ("beagle", "speculative-decoding"))


def write_model_card(checkpoint_dir: str | os.PathLike, bench_results: dict | str | os.PathLike | list | None = None,
                     repo_id: str | None = None, training: dict | None = None, *, license: str = DEFAULT_LICENSE,
                     datasets: str | list[str] | None = None, base_model: str | None = None,
                     bench_dir: str | os.PathLike | None = None, output: str | os.PathLike | None = None) -> Path:
    """Render the card (see `render_model_card`) and write it to `output` (default: `<checkpoint_dir>/README.md`),
    atomically (a temporary file in the same folder, then a rename). The plots it references are copied next to it;
    the images the replaced card showed and the new one does not (the plots of earlier bench runs) are removed, so
    the folder, which `beagle push` uploads whole, holds only what the card shows. Returns the path written."""
    text, plots = _card_parts(checkpoint_dir, bench_results, repo_id, training, license, datasets, base_model,
                              bench_dir)
    path = Path(output) if output is not None else Path(checkpoint_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced_images = card_images(path) if _is_beagle_card(path) else []  # another README's images are not ours
    for plot, name in plots:
        destination = path.parent / name
        if destination.resolve() != plot.resolve():
            shutil.copyfile(plot, destination)
    handle, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a README is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    shown = {name for _, name in plots}
    for name in replaced_images:
        if name not in shown:
            (path.parent / name).unlink()
    return path


__all__ = [
    "BeagleCardError",
    "DEFAULT_LICENSE",
    "TAGS",
    "build_card_data",
    "card_images",
    "eval_results_from_bench",
    "load_bench_results",
    "load_bench_runs",
    "read_beagle_config",
    "render_model_card",
    "results_section",
    "training_recipe",
    "usage_snippet",
    "write_model_card",
]

"""Publishing a Beagle checkpoint folder to the Hugging Face Hub.

    plan = push_checkpoint("runs/beagle/beagle", "me/beagle-smollm2", dry_run=True)   # no network: what goes where
    print(plan.to_text())
    push_checkpoint("runs/beagle/beagle", "me/beagle-smollm2")                        # create the repo and upload

The folder is checked first: config.json (a Beagle config with `auto_map`), the safetensors weights, every remote-code
module `auto_map` names and the modules they import, `custom_generate/generate.py` and README.md (`beagle card`).
Pickle files (`*.bin`, `*.pt`, `*.pkl`, ...) are refused: Beagle checkpoints are safetensors only, and a pickle
runs code when loaded. Hidden files and Python caches are not uploaded. The upload sends exactly the planned files.
"""

import ast
import glob
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .card import BeagleCardError, read_beagle_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
SKIPPED_DIRS = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".tmp")
DEFAULT_COMMIT_MESSAGE = "Upload Beagle draft model"


@dataclass(frozen=True)
class PlannedFile:
    """One local file and where it lands in the repository."""

    local_path: Path
    path_in_repo: str
    size: int


@dataclass
class PushPlan:
    """What `push_checkpoint` uploads (or, with `dry_run`, would upload): every file → `hf://{repo_id}/{path}`."""

    checkpoint_dir: Path
    repo_id: str
    private: bool
    files: list[PlannedFile]
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = True
    commit_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def url(self, planned: PlannedFile) -> str:
        return f"hf://{self.repo_id}/{planned.path_in_repo}"

    def to_dict(self) -> dict:
        return {"checkpoint_dir": str(self.checkpoint_dir), "repo_id": self.repo_id, "private": self.private,
                "dry_run": self.dry_run, "total_bytes": self.total_bytes, "commit_url": self.commit_url,
                "warnings": list(self.warnings),
                "files": [{"local_path": str(f.local_path), "url": self.url(f), "path_in_repo": f.path_in_repo,
                           "size": f.size} for f in self.files]}

    def to_text(self) -> str:
        """One line per file (`local → hf://repo/path (size)`), then the total and any warnings."""
        head = "would upload" if self.dry_run else "uploaded"
        visibility = "private" if self.private else "public"
        lines = [f"{head} {len(self.files)} files ({_size(self.total_bytes)}) to the {visibility} model repo "
                 f"{self.repo_id}:"]
        width = max((len(str(f.local_path)) for f in self.files), default=0)
        lines += [f"  {str(f.local_path):<{width}}  →  {self.url(f)}  ({_size(f.size)})" for f in self.files]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _relative_imports(source: Path) -> set[str]:
    """Modules a remote-code file imports with single-dot relative imports (`from .x import y`)."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (SyntaxError, UnicodeDecodeError) as error:
        raise BeagleCardError(f"{source}: expected a Python module, found unparsable text ({error}).") from None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _listed_files(checkpoint: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(checkpoint):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(names):
            if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
                continue
            files.append(Path(root) / name)
    return files


def unreadable_safetensors(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be read (safetensors refuses a header that does not cover the file
    exactly, so a cut-off copy too), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            return None
    except (SafetensorError, OSError, ValueError) as error:
        return f"an unreadable file ({error})"


def check_checkpoint_folder(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Check that a folder is a complete, pickle-free Beagle checkpoint; return the files to upload.

    Raises `BeagleCardError` listing everything missing or refused (not just the first problem).
    """
    checkpoint = Path(checkpoint_dir)
    config = read_beagle_config(checkpoint)  # folder, config.json, model_type, auto_map
    files = _listed_files(checkpoint)
    relative = {f.relative_to(checkpoint).as_posix() for f in files}
    problems = []

    pickles = sorted(p for p in relative if p.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        hint = (" (`training_args.bin` is the Trainer's pickled TrainingArguments, not part of the model)"
                if any(Path(p).name == "training_args.bin" for p in pickles) else "")
        problems.append(f"pickle files expected none (Beagle checkpoints are safetensors only), found {pickles}"
                        f"{hint}: delete them or move them out of the folder")

    if "model.safetensors.index.json" in relative:
        index_path = checkpoint / "model.safetensors.index.json"
        try:
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as error:
            raise BeagleCardError(f"{index_path}: expected a safetensors index with `weight_map`, found unparsable "
                                  f"content ({error!r}).") from None
        missing_shards = [s for s in shards if s not in relative]
        if missing_shards:
            problems.append(f"weight shards named in model.safetensors.index.json expected, found {missing_shards} "
                            "missing")
    elif "model.safetensors" not in relative:
        problems.append("weights `model.safetensors` expected, found missing")
    for name in sorted(p for p in relative if p.endswith(".safetensors")):
        problem = unreadable_safetensors(checkpoint / name)
        if problem:
            problems.append(f"`{name}` expected complete safetensors weights, found {problem} (a cut-off copy?)")

    auto_map = config["auto_map"]
    modules = set()
    for auto_class, reference in auto_map.items():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if not isinstance(reference, str) or "." not in reference:
            problems.append(f"config.json `auto_map[{auto_class!r}]` expected 'module.Class', found {reference!r}")
            continue
        modules.add(reference.split("--")[-1].rsplit(".", 1)[0])
    pending, seen = sorted(modules), set()
    while pending:  # the auto_map modules and, recursively, what they import from the same flat folder
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        name = f"{module}.py"
        if name not in relative:
            problems.append(f"remote-code module `{name}` (named in auto_map or imported by one that is) expected, "
                            "found missing")
            continue
        pending += sorted(_relative_imports(checkpoint / name) - seen)

    if "custom_generate/generate.py" not in relative:
        problems.append("`custom_generate/generate.py` (Beagle's tree/batch decoding loop) expected, found missing; "
                        "re-save the model with `BeagleModel.save_pretrained`")
    if "README.md" not in relative:
        problems.append("model card `README.md` expected, found missing; write it with `beagle card CHECKPOINT "
                        "--repo-id ID --bench-results JSON`")
    if problems:
        raise BeagleCardError(f"checkpoint {checkpoint} cannot be pushed: " + "; ".join(problems) + ".")
    return files


def plan_push(checkpoint_dir: str | os.PathLike, repo_id: str, private: bool = False) -> PushPlan:
    """Check the folder and list every file with its place in the repository and its size (no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BeagleCardError(f"repo_id: expected a Hub model id (`owner/name`), found {repo_id!r} ({error}).") \
            from None
    checkpoint = Path(checkpoint_dir)
    files = check_checkpoint_folder(checkpoint)
    planned = [PlannedFile(f, f.relative_to(checkpoint).as_posix(), f.stat().st_size) for f in files]
    warnings = []
    readme = (checkpoint / "README.md").read_text(encoding="utf-8")
    if repo_id not in readme:
        warnings.append(f"README.md never mentions {repo_id!r}: its usage snippet points elsewhere; re-render it "
                        f"with `beagle card {checkpoint} --repo-id {repo_id}`")
    return PushPlan(checkpoint, repo_id, private, planned, warnings)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub could not be reached or refused us", across huggingface_hub's HTTP stacks."""
    from huggingface_hub import errors

    classes: list[type[BaseException]] = [ConnectionError, TimeoutError, errors.OfflineModeIsEnabled,
                                          errors.HfHubHTTPError, errors.LocalTokenNotFoundError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests.exceptions", "RequestException")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(classes)


def push_checkpoint(checkpoint_dir: str | os.PathLike, repo_id: str, dry_run: bool = False, private: bool = False,
                    token: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE) -> PushPlan:
    """Upload a Beagle checkpoint folder (weights, config, remote code, custom_generate/, README.md) to `repo_id`.

    With `dry_run=True` nothing touches the network: the returned plan lists every local file → `hf://{repo_id}/...`
    with its size. Otherwise the model repo is created if needed (`private` applies to a new repo) and exactly the
    planned files are uploaded in one commit; the plan comes back with `commit_url` set. `token` defaults to
    `HF_TOKEN` / the saved login.

    Raises `BeagleCardError` when the folder is incomplete or holds pickle files, and when the Hub cannot be reached
    (offline, no network, no or a rejected token), with the reason.
    """
    plan = plan_push(checkpoint_dir, repo_id, private)
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(plan.checkpoint_dir), repo_id=repo_id, repo_type="model",
                                   commit_message=commit_message,
                                   allow_patterns=[glob.escape(f.path_in_repo) for f in plan.files])
    except _network_errors() as error:
        reason = f"{type(error).__name__}: {error}".strip().rstrip(".")
        raise BeagleCardError(f"could not reach the Hugging Face Hub to push {plan.checkpoint_dir} to {repo_id}: "
                              f"{reason}; check network access and `HF_TOKEN`, or use --dry-run to see what would "
                              "be uploaded.") from error
    plan.dry_run = False
    plan.commit_url = str(getattr(commit, "commit_url", None) or commit)
    return plan


__all__ = ["PICKLE_SUFFIXES", "PlannedFile", "PushPlan", "check_checkpoint_folder", "plan_push", "push_checkpoint"]

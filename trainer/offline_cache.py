"""Offline target states: run the frozen target once over a training set and keep what training reads on disk.

Per token the cache holds the context states the Beagle keys read (`hidden_states[i]` for i in `target_layer_ids`,
concatenated) and the top post-final-norm states ĥ regresses (`hidden_states[-1]`; a slice of the context states
when -1 is among the layer ids, so stored once). Per supervised token (`loss_mask` 1) it holds the target's soft
label as the top-k of `softmax(beagle.compute_logits(h))` over the draft vocabulary, renormalised: `topk_ids`
(int32 indices into the draft vocabulary) and `topk_probs` (float16: probabilities <= 1 keep ~3 significant digits;
they are renormalised again in float32 on reading). Full-vocabulary logits are never stored.

Layout of `cache_dir` (rows back to back, in dataset order):

- `meta.json`: what the cache was built from, the layout, `rows_done` and `complete`;
- `row_offsets.npy`: int64 `(num_rows + 1, 2)`, the first token and first supervised position of each row;
- `input_ids.bin` (int32), `loss_mask.bin` (uint8): `(num_tokens,)`;
- `context_states.bin`: `(num_tokens, hidden_size * len(target_layer_ids))` in the cache dtype (bf16 stored as
  its int16 bit pattern), `target_states.bin`: `(num_tokens, hidden_size)` only when -1 is not a layer id;
- `topk_ids.bin` (int32), `topk_probs.bin` (float16): `(num_supervised, topk)`.

A build records `rows_done` after every batch, the data flushed first, and marks the cache `complete` only once
every row is on disk (meta.json is always replaced atomically), so an interrupted build resumes where it stopped.
"""

import hashlib
import inspect
import json
import logging
import math
import os
import shutil

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
OFFSETS_FILE = "row_offsets.npy"
LOGIT_CHUNK = 2048  # supervised positions whose draft-vocabulary logits are materialised at once
SCAN_BATCH = 4096  # dataset rows read at once while hashing
HEAD_ROWS_HASHED = 16  # lm_head rows in the target fingerprint

# Cache dtype -> (numpy storage dtype, torch view dtype).
STATE_DTYPES = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}

# Fields a rerun must agree on, in the order they are checked (the first mismatch is reported).
TARGET_FIELDS = ("target_name_or_path", "target_model_type", "target_hidden_size", "target_num_hidden_layers",
                 "target_vocab_size", "target_head_sha256", "target_layer_ids", "draft_vocab_size",
                 "draft_to_target_sha256")
IDENTITY_FIELDS = ("format_version",) + TARGET_FIELDS + ("max_length", "num_rows", "dataset_sha256", "dtype", "topk")
ARRAY_NAMES = ("input_ids", "loss_mask", "context_states", "target_states", "topk_ids", "topk_probs")


class BeagleCacheError(ValueError):
    """The offline cache cannot be built or used as asked, and why."""


# ------------------------------------------------------------------------------------------------ identity
def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def target_identity(target_model, beagle_model) -> dict:
    """The target and draft fields a cache depends on (`TARGET_FIELDS`)."""
    config = target_model.config
    text_config = config.get_text_config()
    head = target_model.get_output_embeddings()
    # bf16-rounded rows: the same weights loaded in fp32 or bf16 give the same fingerprint.
    head_sha = _sha256(head.weight[:HEAD_ROWS_HASHED].to(torch.bfloat16).view(torch.int16)) if head is not None \
        else None
    mapping = beagle_model.draft_to_target
    return {
        "target_name_or_path": getattr(config, "_name_or_path", "") or "",
        "target_model_type": getattr(config, "model_type", None),
        "target_hidden_size": text_config.hidden_size,
        "target_num_hidden_layers": text_config.num_hidden_layers,
        "target_vocab_size": text_config.vocab_size,
        "target_head_sha256": head_sha,
        "target_layer_ids": list(beagle_model.config.target_layer_ids),
        "draft_vocab_size": beagle_model.config.draft_vocab_size,
        "draft_to_target_sha256": None if mapping is None else _sha256(mapping.to(torch.int64)),
    }


def _first_mismatch(fields: tuple, expected: dict, found: dict) -> tuple | None:
    """(field, expected value, found value) for the first of `fields` on which the two differ, or None."""
    return next(((f, expected.get(f), found.get(f)) for f in fields if expected.get(f) != found.get(f)), None)


def _scan_dataset(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, str]:
    """Row lengths, supervised counts per row and a sha256 over the rows' ids and loss masks (row boundaries
    included), read in Arrow batches."""
    missing = {"input_ids", "loss_mask"} - set(dataset.column_names)
    if missing:
        raise BeagleCacheError(f"dataset: columns expected input_ids and loss_mask, found {dataset.column_names}.")
    if len(dataset) == 0:
        raise BeagleCacheError("dataset: rows expected at least one, found 0.")
    lengths, supervised = [], []
    hashes = [hashlib.sha256() for _ in range(3)]
    first = 0  # index of the batch's first row
    for table in dataset.with_format("arrow").iter(batch_size=SCAN_BATCH):
        ids, mask = table.column("input_ids"), table.column("loss_mask")
        row_lengths = pc.list_value_length(ids).to_numpy().astype(np.int64)
        mask_lengths = pc.list_value_length(mask).to_numpy().astype(np.int64)
        if (row_lengths != mask_lengths).any():
            row = first + int(np.argmax(row_lengths != mask_lengths))
            raise BeagleCacheError(f"dataset row {row}: loss_mask length expected {row_lengths[row - first]} "
                                   f"(= len(input_ids)), found {mask_lengths[row - first]}.")
        if (row_lengths == 0).any():
            raise BeagleCacheError(f"dataset row {first + int(np.argmax(row_lengths == 0))}: tokens expected at "
                                   f"least one, found 0.")
        flat_mask = pc.list_flatten(mask).to_numpy() != 0
        starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
        supervised.append(np.add.reduceat(flat_mask.astype(np.int64), starts))
        lengths.append(row_lengths)
        hashes[0].update(row_lengths.astype("<i8").tobytes())
        hashes[1].update(pc.list_flatten(ids).to_numpy().astype("<i8").tobytes())
        hashes[2].update(flat_mask.astype(np.uint8).tobytes())
        first += len(row_lengths)
    digest = hashlib.sha256(b"".join(h.digest() for h in hashes)).hexdigest()
    return np.concatenate(lengths), np.concatenate(supervised), digest


# -------------------------------------------------------------------------------------------------- layout
def _array_specs(meta: dict) -> dict[str, tuple[type, torch.dtype, str, int]]:
    """Per array file: numpy storage dtype, torch dtype, leading axis ("tokens" or "supervised") and row width."""
    dtype = getattr(torch, meta["dtype"])
    specs = {
        "input_ids": (np.int32, torch.int32, "tokens", 0),
        "loss_mask": (np.uint8, torch.uint8, "tokens", 0),
        "context_states": (STATE_DTYPES[dtype], dtype, "tokens", meta["context_width"]),
        "topk_ids": (np.int32, torch.int32, "supervised", meta["topk"]),
        "topk_probs": (np.float16, torch.float16, "supervised", meta["topk"]),
    }
    if meta["target_states_slot"] is None:
        specs["target_states"] = (STATE_DTYPES[dtype], dtype, "tokens", meta["target_hidden_size"])
    return specs


def _shape(meta: dict, axis: str, width: int) -> tuple[int, ...]:
    rows = meta["num_tokens"] if axis == "tokens" else meta["num_supervised"]
    return (rows, width) if width else (rows,)


def _bytes_needed(meta: dict, tokens: int, supervised: int) -> int:
    """Bytes the arrays take for `tokens` tokens holding `supervised` supervised positions."""
    total = 0
    for np_dtype, _, axis, width in _array_specs(meta).values():
        total += (tokens if axis == "tokens" else supervised) * max(width, 1) * np.dtype(np_dtype).itemsize
    return total


def _open_arrays(cache_dir: str, meta: dict, mode: str) -> dict[str, np.memmap]:
    """Memory-map every array file (`mode` "w+" creates them; "r+" and "c" check their sizes first)."""
    arrays = {}
    for name, (np_dtype, _, axis, width) in _array_specs(meta).items():
        path = os.path.join(cache_dir, f"{name}.bin")
        shape = _shape(meta, axis, width)
        if mode != "w+":
            expected = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            found = os.path.getsize(path) if os.path.exists(path) else None
            if found != expected:
                raise BeagleCacheError(f"offline cache {cache_dir}: {name}.bin size expected {expected} bytes, found "
                                       f"{'no file' if found is None else found}: the cache is damaged; rebuild it "
                                       f"with overwrite=True.")
        arrays[name] = np.memmap(path, dtype=np_dtype, mode=mode, shape=shape)
    return arrays


def _torch_views(arrays: dict[str, np.memmap], meta: dict) -> dict[str, torch.Tensor]:
    specs = _array_specs(meta)
    return {name: torch.from_numpy(array).view(specs[name][1]) for name, array in arrays.items()}


def _read_meta(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_meta(cache_dir: str, meta: dict) -> None:
    """Write meta.json atomically: a temporary file, fsynced, then `os.replace`."""
    path = os.path.join(cache_dir, META_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _cache_files(cache_dir: str) -> list[str]:
    """The existing files of a cache in `cache_dir`, meta.json first (deleted first: no stale progress survives)."""
    names = [META_FILE, OFFSETS_FILE] + [f"{name}.bin" for name in ARRAY_NAMES]
    return [path for path in (os.path.join(cache_dir, name) for name in names) if os.path.exists(path)]


def _free_bytes(path: str) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _format_bytes(count: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    exponent = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**exponent:.1f} {units[exponent]}"


# ------------------------------------------------------------------------------------------------ building
def _target_slot(layer_ids: list[int], num_hidden_layers: int) -> int | None:
    """Index of the top layer (`hidden_states[-1]`) among `layer_ids`, or None."""
    top = num_hidden_layers  # hidden_states has num_hidden_layers + 1 entries
    return next((k for k, i in enumerate(layer_ids) if i % (top + 1) == top), None)


def _forward_states(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer_ids: list[int]):
    """(context states, top states) of one batch (padded with `attention_mask`, or unpadded), in the target's
    precision."""
    kwargs = {}
    if "logits_to_keep" in inspect.signature(target_model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the states are needed: skip the full-vocabulary logits
    out = target_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       output_hidden_states=sorted(set(layer_ids + [-1])), **kwargs)
    hidden = out.hidden_states
    return torch.cat([hidden[i] for i in layer_ids], dim=-1), hidden[-1]


def _topk_labels(beagle_model, top_states: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`topk` of softmax(draft-vocabulary logits) in float32, renormalised, and their draft-vocabulary ids."""
    probs, ids = [], []
    for chunk in top_states.split(LOGIT_CHUNK):
        values, indices = beagle_model.compute_logits(chunk).float().softmax(-1).topk(topk, dim=-1)
        probs.append(values / values.sum(-1, keepdim=True))
        ids.append(indices)
    return torch.cat(probs), torch.cat(ids)


@torch.no_grad()
def build_offline_cache(target_model, beagle_model, dataset: datasets.Dataset, cache_dir: str | os.PathLike,
                        batch_size: int = 8, topk: int = 64, dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                        overwrite: bool = False) -> "OfflineCache":
    """Run the frozen target once over `dataset` (columns `input_ids`, `loss_mask`) and store its states and top-k
    soft labels in `cache_dir`.

    Resumes an interrupted build made from the same inputs and returns a complete one as it is; a cache made from
    other inputs raises `BeagleCacheError` naming the field; `overwrite=True` discards any cache there and rebuilds.
    `topk` is capped at the draft vocabulary size. Raises `BeagleCacheError` before writing anything when the file
    system lacks the space needed. The target runs in eval mode under no_grad (its mode is restored afterwards).
    """
    if dtype not in STATE_DTYPES:
        raise BeagleCacheError(f"dtype expected one of {sorted(str(d) for d in STATE_DTYPES)}, found {dtype}.")
    if batch_size < 1 or topk < 1:
        raise BeagleCacheError(f"batch_size and topk expected positive integers, found {batch_size} and {topk}.")
    beagle_model.ensure_bound_to(target_model)
    lengths, supervised, dataset_sha = _scan_dataset(dataset)
    if supervised.sum() == 0:
        raise BeagleCacheError("dataset: supervised tokens (loss_mask 1) expected at least one, found 0.")
    identity = target_identity(target_model, beagle_model)
    draft_vocab = beagle_model.config.draft_vocab_size or identity["target_vocab_size"]
    layer_ids = identity["target_layer_ids"]
    meta = {
        "format_version": FORMAT_VERSION,
        **identity,
        "max_length": int(lengths.max()),
        "num_rows": len(lengths),
        "dataset_sha256": dataset_sha,
        "dtype": str(dtype).removeprefix("torch."),
        "topk": min(topk, draft_vocab),
        "topk_probs_dtype": "float16",
        "num_tokens": int(lengths.sum()),
        "num_supervised": int(supervised.sum()),
        "context_width": identity["target_hidden_size"] * len(layer_ids),
        "target_states_slot": _target_slot(layer_ids, identity["target_num_hidden_layers"]),
        "rows_done": 0,
        "complete": False,
    }
    offsets = np.zeros((len(lengths) + 1, 2), dtype=np.int64)
    offsets[1:, 0], offsets[1:, 1] = np.cumsum(lengths), np.cumsum(supervised)

    found = None if overwrite else _read_meta(cache_dir)
    if found is not None:
        mismatch = _first_mismatch(IDENTITY_FIELDS, meta, found)
        if mismatch is not None:
            field, expected, cached = mismatch
            raise BeagleCacheError(f"offline cache {cache_dir} was built from other inputs: `{field}` expected "
                                   f"{expected!r} (this call), found {cached!r} (the existing cache); pass "
                                   f"overwrite=True to rebuild it or choose another cache_dir.")
        if found["complete"]:
            return OfflineCache(cache_dir)
    done = 0 if found is None else found["rows_done"]

    needed = _bytes_needed(meta, int(lengths[done:].sum()), int(supervised[done:].sum()))
    free = _free_bytes(cache_dir)
    if found is None:  # a fresh build replaces whatever cache files are there
        needed += offsets.nbytes + 4096  # row offsets and meta.json
        free += sum(os.stat(path).st_blocks * 512 for path in _cache_files(cache_dir))
    message = (f"offline cache {cache_dir}: {meta['num_rows'] - done} rows to go ({int(lengths[done:].sum())} tokens, "
               f"{int(supervised[done:].sum())} supervised), needing {needed} bytes ({_format_bytes(needed)}); "
               f"{free} bytes ({_format_bytes(free)}) available.")
    if progress:
        print(message)
    else:
        logger.info(message)
    if needed > free:
        raise BeagleCacheError(f"offline cache {cache_dir}: disk space expected at least {needed} bytes "
                               f"({_format_bytes(needed)}), found {free} bytes ({_format_bytes(free)}) available.")

    if found is None:
        for path in _cache_files(cache_dir):
            os.remove(path)
        os.makedirs(cache_dir, exist_ok=True)
        arrays = _open_arrays(cache_dir, meta, "w+")
        np.save(os.path.join(cache_dir, OFFSETS_FILE), offsets)
        _write_meta(cache_dir, meta)
    else:
        arrays = _open_arrays(cache_dir, meta, "r+")
        meta["rows_done"] = done
    views = _torch_views(arrays, meta)

    device = target_model.device
    was_training = target_model.training
    target_model.eval()
    bar = tqdm(total=meta["num_rows"], initial=done, desc="offline target states", unit="row", disable=not progress)
    try:
        for start in range(done, meta["num_rows"], batch_size):
            end = min(start + batch_size, meta["num_rows"])
            rows = dataset[start:end]
            # One target forward per group of equal-length rows: no padding, so no attention mask, and the fast
            # causal kernels (on 2 CPU cores a masked padded batch ran at 2/3 the tokens/s of unpadded rows).
            groups: dict[int, list[int]] = {}
            for i, ids in enumerate(rows["input_ids"]):
                groups.setdefault(len(ids), []).append(i)
            for members in groups.values():
                input_ids = torch.tensor([rows["input_ids"][i] for i in members], dtype=torch.long)
                loss_mask = torch.tensor([rows["loss_mask"][i] for i in members]) != 0
                context, top = _forward_states(target_model, input_ids.to(device), None, layer_ids)
                probs, ids = _topk_labels(beagle_model, top[loss_mask.to(device)], meta["topk"])
                probs, ids = probs.to(torch.float16).cpu(), ids.to(torch.int32).cpu()
                first_label = 0
                for j, i in enumerate(members):
                    (t0, s0), (t1, s1) = offsets[start + i], offsets[start + i + 1]
                    views["input_ids"][t0:t1] = input_ids[j].to(torch.int32)
                    views["loss_mask"][t0:t1] = loss_mask[j].to(torch.uint8)
                    views["context_states"][t0:t1] = context[j].to(dtype).cpu()
                    if "target_states" in views:
                        views["target_states"][t0:t1] = top[j].to(dtype).cpu()
                    views["topk_ids"][s0:s1] = ids[first_label:first_label + s1 - s0]
                    views["topk_probs"][s0:s1] = probs[first_label:first_label + s1 - s0]
                    first_label += s1 - s0
            for array in arrays.values():
                array.flush()
            meta["rows_done"] = end
            _write_meta(cache_dir, meta)
            bar.update(end - start)
    finally:
        bar.close()
        target_model.train(was_training)
    del views, arrays
    meta["complete"] = True
    _write_meta(cache_dir, meta)
    return OfflineCache(cache_dir)


# ------------------------------------------------------------------------------------------------- reading
class OfflineCache(torch.utils.data.Dataset):
    """A complete offline cache as a map-style dataset: one dict of tensors per row (see `__getitem__`).

    The files are memory-mapped lazily in each process (DataLoader workers included).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        meta = _read_meta(cache_dir)
        if meta is None:
            raise BeagleCacheError(f"offline cache {cache_dir}: {META_FILE} expected, found none: build it with "
                                   f"build_offline_cache first.")
        if not meta["complete"]:
            raise BeagleCacheError(f"offline cache {cache_dir}: complete expected, found {meta['rows_done']} of "
                                   f"{meta['num_rows']} rows: rerun build_offline_cache with the same inputs to "
                                   f"finish it.")
        self.cache_dir = cache_dir
        self.meta = meta
        self.offsets = np.load(os.path.join(cache_dir, OFFSETS_FILE))
        self._views: dict[str, torch.Tensor] | None = None

    @property
    def topk(self) -> int:
        return self.meta["topk"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    def _arrays(self) -> dict[str, torch.Tensor]:
        if self._views is None:
            # Copy-on-write mapping: writable (torch warns on read-only arrays), never written back.
            self._views = _torch_views(_open_arrays(self.cache_dir, self.meta, "c"), self.meta)
        return self._views

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": None}

    def __len__(self) -> int:
        return self.meta["num_rows"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """`input_ids` (T,), `loss_mask` (T,) bool, `context_states` (T, width), `target_states` (T, hidden),
        `topk_ids` (N_sup, topk) long and `topk_probs` (N_sup, topk) float32, N_sup = loss_mask.sum()."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"offline cache row index expected in [-{len(self)}, {len(self)}), found {index}.")
        index %= len(self)
        (t0, s0), (t1, s1) = self.offsets[index], self.offsets[index + 1]
        views = self._arrays()
        context = views["context_states"][t0:t1].clone()
        slot, hidden = self.meta["target_states_slot"], self.meta["target_hidden_size"]
        top = views["target_states"][t0:t1].clone() if slot is None else \
            context[:, slot * hidden : (slot + 1) * hidden].clone()
        probs = views["topk_probs"][s0:s1].float()
        return {
            "input_ids": views["input_ids"][t0:t1].long(),
            "loss_mask": views["loss_mask"][t0:t1].bool(),
            "context_states": context,
            "target_states": top,
            "topk_ids": views["topk_ids"][s0:s1].long(),
            "topk_probs": probs / probs.sum(-1, keepdim=True),
        }

    def as_dataset(self) -> "OfflineCache":
        """The rows as a map-style torch dataset (the cache itself), e.g. for `Trainer(train_dataset=...)`."""
        return self

    def check_target(self, target_model, beagle_model) -> None:
        """Raise `BeagleCacheError` naming the first field on which the target or draft differs from the cache's."""
        mismatch = _first_mismatch(TARGET_FIELDS, self.meta, target_identity(target_model, beagle_model))
        if mismatch is not None:
            field, expected, found = mismatch
            raise BeagleCacheError(f"offline cache {self.cache_dir} does not match the given target and draft: "
                                   f"`{field}` expected {expected!r} (the cache's), found {found!r}; rebuild the "
                                   f"cache for this target and draft.")


class OfflineCollator:
    """Right-pads `OfflineCache` rows into a batch.

    `input_ids`, `loss_mask`, `attention_mask` are (B, T), the states (B, T, width) and (B, T, hidden), zero-padded;
    `topk_ids` / `topk_probs` are the rows' soft labels concatenated, (sum N_sup, topk): the order of
    `states[loss_mask]` over the padded batch, so `SoftLabels(probs=topk_probs, indices=topk_ids)` lines up.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        first = rows[0]
        batch = {"input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
                 "loss_mask": torch.zeros(len(rows), length, dtype=torch.bool),
                 "attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
        for name in ("context_states", "target_states"):
            batch[name] = first[name].new_zeros(len(rows), length, first[name].shape[-1])
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            for name in ("input_ids", "loss_mask", "context_states", "target_states"):
                batch[name][i, :n] = row[name]
            batch["attention_mask"][i, :n] = 1
        batch["topk_ids"] = torch.cat([row["topk_ids"] for row in rows])
        batch["topk_probs"] = torch.cat([row["topk_probs"] for row in rows])
        return batch


__all__ = ["BeagleCacheError", "OfflineCache", "OfflineCollator", "build_offline_cache", "target_identity"]

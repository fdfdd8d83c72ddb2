"""Training data: conversations (ShareGPT or chat messages) or plain text, tokenized with the target's chat template,
with a loss mask over assistant tokens only.

Records are read from a local JSON array, a JSONL file or a `datasets.Dataset`. A JSON array cut off mid-record (the
ShareGPT copy available here is) is decoded element by element and every complete record is kept. Malformed or empty
records are skipped and counted, never a crash mid-run.
"""

import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import datasets

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "system": "system"}


class BeagleDataError(ValueError):
    """The training data cannot be used, and why."""


@dataclass
class DataReport:
    """What loading and tokenization kept and skipped, by reason."""

    records: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_file: bool = False
    available: int | None = None  # complete records in the source when `skip_records`/`max_records` took a part
    first: int = 0  # records skipped at the start of the source (`skip_records`)
    supervised_tokens: int = 0
    tokens: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        cut = " (the file was cut off mid-record; every complete record before the cut was kept)" \
            if self.truncated_file else ""
        if self.available is None:
            used = f"{self.records}"
        elif self.first:
            used = f"records {self.first + 1}-{self.first + self.records} (of {self.available})"
        else:
            used = f"the first {self.records} (of {self.available})"
        return (f"{self.kept} of {used} records kept{cut}; skipped: {skipped}; "
                f"{self.tokens} tokens, {self.supervised_tokens} supervised (assistant) tokens")


def check_count(name: str, value, least: int, optional: bool = False, error: type[ValueError] = ValueError) -> None:
    """Refuse a count below its least value (or not an integer); with `optional`, None (no limit) passes. A negative
    count would otherwise slice records off the other end."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        allowed = " or None (no limit)" if optional else ""
        raise error(f"`{name}` expected an integer >= {least}{allowed}, found {value!r}.")


def require_counts(options, least: dict[str, int], optional: tuple[str, ...] = ()) -> None:
    """`check_count` for integer options of `options` (a dataclass of command-line options); the names in `optional`
    may also be None."""
    for name, minimum in least.items():
        check_count(name, getattr(options, name), minimum, optional=name in optional)


# ------------------------------------------------------------------------------------------------- reading
def read_records(source, report: DataReport | None = None) -> list:
    """Records from a JSON/JSONL file path (gzip-compressed too) or a `datasets.Dataset` (rows as dicts).

    A file is one JSON array (cut off mid-record, it keeps every complete record) or JSON lines, each a record (a
    JSONL line may itself be an array, e.g. a conversation's chat messages). JSONL lines that are not UTF-8 or not
    JSON are skipped and counted; a JSON array followed by more text is refused."""
    report = report if report is not None else DataReport()
    if isinstance(source, datasets.Dataset):
        return list(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise BeagleDataError(f"dataset path expected an existing JSON or JSONL file, found {path!r}.")
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise BeagleDataError(f"{path}: expected a readable gzip file, found {error}.") from error
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        records = _decode_json_array(path, stripped, report)
        if records is not None:
            return records
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError:
            report.skipped["JSONL lines that are not UTF-8"] += 1
        except json.JSONDecodeError:
            report.skipped["unparsable JSONL lines"] += 1
    return records


def _decode_json_array(path: str, data: bytes, report: DataReport) -> list | None:
    """Decode `[rec, rec, ...` element by element, keeping every complete element even if the array is cut off.
    None when the file is JSON lines whose first line is an array (a complete first line with more lines after)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BeagleDataError(f"{path}: a JSON file expected UTF-8 text, found byte {data[error.start]:#04x} at offset "
                              f"{error.start} (after leading whitespace).") from error
    decoder = json.JSONDecoder()
    try:
        whole, end = decoder.raw_decode(text)
    except json.JSONDecodeError:
        whole = end = None  # a cut-off array: read below up to its last complete element
    if end is not None:
        if not text[end:].strip():
            return whole
        if len(text.split("\n", 1)[0].strip()) == end:
            return None  # JSON lines, the first of them an array
        line = text.count("\n", 0, end) + 1
        raise BeagleDataError(f"{path}: expected one JSON array or JSON lines, found more text after the array that "
                              f"ends on line {line}.")
    records, index = [], 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            report.truncated_file = True
            break
        if text[index] == "]":
            break
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            report.truncated_file = True
            report.skipped["incomplete record at the end of the file"] += 1
            break
        records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ normalising
def to_messages(record) -> list[dict] | str | None:
    """A record as chat messages (`[{"role", "content"}]`) or plain text; None if it is malformed."""
    if isinstance(record, str):
        return record
    if isinstance(record, list):
        turns = record
    elif isinstance(record, dict):
        if "conversations" in record:
            turns = record["conversations"]
        elif "messages" in record:
            turns = record["messages"]
        elif isinstance(record.get("text"), str):
            return record["text"]
        else:
            return None
    else:
        return None
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = SHAREGPT_ROLES.get(role, None) if role not in ("user", "assistant", "system") else role
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


# ------------------------------------------------------------------------------------------------ tokenizing
def tokenize_messages(tokenizer, messages: list[dict], max_length: int, use_template: bool):
    """Token ids and a loss mask that is 1 exactly on the tokens of assistant turns."""
    if not use_template:
        ids, mask = [], []
        for message in messages:
            piece = tokenizer(f"{message['role']}: {message['content']}\n", add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(message["role"] == "assistant")] * len(piece)
        return ids[:max_length], mask[:max_length]
    ids = render_chat(tokenizer, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: i + 1]))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
        if start >= max_length:
            break
    return ids[:max_length], mask[:max_length]


def render_chat(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    """Token ids of `messages` through the chat template (transformers 5 may return a BatchEncoding: unwrapped)."""
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def build_dataset(source, tokenizer, max_length: int = 2048, max_records: int | None = None,
                  report: DataReport | None = None, skip_records: int = 0) -> tuple[datasets.Dataset, DataReport]:
    """Read, normalise and tokenize `source` into a Dataset of `input_ids` and `loss_mask` (assistant tokens):
    its records after the first `skip_records`, at most `max_records` of them."""
    report = report if report is not None else DataReport()
    if skip_records < 0:
        raise BeagleDataError(f"skip_records expected a non-negative integer, found {skip_records}.")
    check_count("max_length", max_length, 2, error=BeagleDataError)
    check_count("max_records", max_records, 1, optional=True, error=BeagleDataError)
    records = read_records(source, report)
    if skip_records:
        if skip_records >= len(records):
            raise BeagleDataError(f"skip_records {skip_records}: expected fewer than the source's {len(records)} "
                                  f"complete records.")
        report.available, report.first = len(records), skip_records
        records = records[skip_records:]
    if max_records is not None and len(records) > max_records:
        report.available = report.available or len(records)
        records = records[:max_records]
        # a cut-off end of the file lies beyond the records used: nothing this dataset lost
        report.truncated_file = False
        report.skipped.pop("incomplete record at the end of the file", None)
    report.records = len(records)
    use_template = getattr(tokenizer, "chat_template", None) is not None
    if not use_template:
        logger.warning("The tokenizer has no chat template: conversations are rendered as plain 'role: text' lines.")
    rows = []
    for record in records:
        messages = to_messages(record)
        if messages is None:
            report.skipped["malformed records"] += 1
            continue
        if isinstance(messages, str):
            if not messages.strip():
                report.skipped["empty records"] += 1
                continue
            ids = tokenizer(messages, add_special_tokens=True)["input_ids"][:max_length]
            mask = [1] * len(ids)
        else:
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                report.skipped["conversations without an assistant turn"] += 1
                continue
            ids, mask = tokenize_messages(tokenizer, messages, max_length, use_template)
        if sum(mask) == 0:
            report.skipped["records with no assistant token within max_length"] += 1
            continue
        rows.append({"input_ids": ids, "loss_mask": mask})
        report.tokens += len(ids)
        report.supervised_tokens += sum(mask)
    report.kept = len(rows)
    if not rows:
        raise BeagleDataError(f"the dataset has no assistant tokens to train on: {report.summary()}.")
    logger.info(report.summary())
    return datasets.Dataset.from_list(rows), report

"""Document sources: local .txt/.jsonl/.jsonl.gz/.parquet files, or a Hugging Face dataset (streaming)."""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from nmoe.data.errors import DataError, SourceUnavailableError

FILE_KINDS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def expand_glob(pattern: str) -> list[Path]:
    """Sorted files matching `pattern` (`**` recurses); raises SourceUnavailableError when none match."""
    paths = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise SourceUnavailableError(
            f"no files match --input {pattern!r} (relative to {Path.cwd()}); check the path or quote the glob"
        )
    for p in paths:
        _file_kind(p)
    return paths


def _file_kind(path: Path) -> str:
    for kind in sorted(FILE_KINDS, key=len, reverse=True):
        if path.name.endswith(kind):
            return kind
    raise DataError(f"{path}: unsupported file type; nmoe-data reads {', '.join(FILE_KINDS)}")


def iter_file_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """Documents of `paths` in order: a .txt file is one document, other kinds one per row."""
    for path in paths:
        kind = _file_kind(path)
        if kind == ".txt":
            yield _read_txt(path)
        elif kind == ".parquet":
            yield from _iter_parquet(path, text_field)
        else:
            yield from _iter_jsonl(path, text_field)


def _read_txt(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e}); convert it, e.g. `iconv -t utf-8`") from e
    except OSError as e:
        raise SourceUnavailableError(f"cannot read {path}: {e}") from e


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _text_of(_json_line(line, f"{path}:{lineno}"), text_field, f"{path}:{lineno}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e}); convert it, e.g. `iconv -t utf-8`") from e
    except (OSError, EOFError) as e:
        raise SourceUnavailableError(f"cannot read {path}: {e}") from e


def _json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON ({e}); each line must be one JSON object") from e


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise SourceUnavailableError(f"cannot read parquet file {path}: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r}; pass --text-field with one of {names}")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for i, text in enumerate(batch.column(0).to_pylist()):
            yield _check_text(text, f"{path} row {i}")


def _text_of(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = list(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where} has no field {text_field!r}; pass --text-field with one of {keys}")
    return _check_text(row[text_field], where)


def _check_text(text, where: str) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{where}: text field holds {type(text).__name__}, not a string; pick another --text-field")
    return text


def iter_hf_documents(dataset: str, config: str | None, split: str, text_field: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset (hub name or local folder), streamed in order."""
    try:
        import datasets

        stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
        rows = iter(stream)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            yield _text_of(row, text_field, f"{dataset} row {index}")
            index += 1
    except OSError as e:  # ConnectionError, FileNotFoundError, hub/offline errors all derive from it
        raise SourceUnavailableError(
            f"cannot read Hugging Face dataset {dataset!r} (config={config!r}, split={split!r}): {e}. "
            "Run the prep where the hub is reachable, or download the files and use --source files --input GLOB"
        ) from e

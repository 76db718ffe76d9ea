"""Parquet files as training data: a column of each row group, read with pyarrow.

pyarrow is the `train` extra (`pip install 'stablelm[train]'`): the one library that reads Parquet, without the
weight of `datasets` (pandas, fsspec, aiohttp...), whose streaming and caching `corpus` does itself. Text data
reads the "text" column (strings), chat data the "messages" column (a list of {"role", "content"} per row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def parquet_groups(path: Path, column: str) -> int:
    """The number of row groups of a Parquet file, once its `column` is checked."""
    file = _open_parquet(path)
    _check_column(path, file.schema_arrow, column)
    return file.metadata.num_row_groups


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise ImportError(
            "Reading Parquet files needs pyarrow: pip install 'stablelm[train]' (or pip install pyarrow)."
        ) from err
    return parquet


def _open_parquet(path: Path) -> Any:
    try:
        return _pyarrow_parquet().ParquetFile(path)
    except ImportError:
        raise
    except Exception as err:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a Parquet file pyarrow can read ({err}).") from err


def parquet_columns(path: Path) -> list[str]:
    """The column names of a Parquet file."""
    return list(_open_parquet(path).schema_arrow.names)


def _check_column(path: Path, schema: Any, column: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise ValueError(
            f'{path} has no "{column}" column (its columns: {", ".join(schema.names)}); training reads the '
            f'"{column}" column of Parquet files.'
        )
    kind = schema.field(column).type
    if column == "text" and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f'{path}: the "text" column holds {kind}, not strings.')


def parquet_rows(path: Path, column: str, *, group: int | None = None) -> tuple[int, list[Any]]:
    """(the number of the first row, the values) of a Parquet file's `column`, or of one row group's."""
    file = _open_parquet(path)
    _check_column(path, file.schema_arrow, column)
    groups = range(file.metadata.num_row_groups) if group is None else [group]
    first = sum(file.metadata.row_group(g).num_rows for g in range(groups[0])) if groups else 0
    values: list[Any] = []
    for g in groups:
        values += file.read_row_group(g, columns=[column]).column(column).to_pylist()
    return first, values


def parquet_texts(path: Path, *, group: int | None = None) -> list[str]:
    """The "text" column of a Parquet file (or of one of its row groups); a null is an error naming the row."""
    first, texts = parquet_rows(path, "text", group=group)
    for row, text in enumerate(texts):
        if text is None:
            raise ValueError(f'{path}: row {first + row} has a null "text"; fill or drop that row.')
    return texts


def parquet_group_bytes(path: Path, group: int) -> int:
    """The size of a row group (for the progress of tokenizing)."""
    return _pyarrow_parquet().ParquetFile(path).metadata.row_group(group).total_byte_size

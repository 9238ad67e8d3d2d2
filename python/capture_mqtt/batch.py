"""``Batch``: data points as Arrow columns, built in Rust, for pandas, Polars, DuckDB and Parquet."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from . import _core

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

__all__ = ["Batch"]


def _need(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this needs {module}: pip install 'capture-mqtt[{extra}]' (or pip install {module})"
        ) from None


class Batch:
    """Data points as columns: ``timestamp``, ``received_at`` (UTC), ``company``, ``source_id``,
    ``connection_tag``, ``measurement``, ``key``, ``value`` (float64: numbers, booleans as 1.0/0.0),
    ``value_text`` (strings; lists and objects as JSON text), ``value_type`` (``int``, ``float``,
    ``bool``, ``string``, ``json`` or ``null``), ``tags`` (a map), and one column per tag asked for
    with ``tag_columns``.

    It speaks the Arrow PyCapsule interface (``__arrow_c_stream__``), so ``pyarrow.table(batch)``,
    ``polars.DataFrame(batch)`` or ``duckdb.sql("select * from batch")`` take it without a copy.

    >>> import capture_mqtt as cm
    >>> p = cm.parse_raw("v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp", b'{"Value": 55}')
    >>> batch = cm.Batch.from_points([p])
    >>> len(batch), batch.columns[:3]
    (1, ['timestamp', 'received_at', 'company'])
    """

    __slots__ = ("_native",)

    def __init__(self, native: _core._Batch) -> None:
        self._native = native

    @classmethod
    def from_points(cls, points: Iterable[_core.DataPoint], *, tag_columns: Sequence[str] = ()) -> Batch:
        """A batch of data points (from ``get``, iteration or ``parse_raw``).

        >>> import capture_mqtt as cm
        >>> len(cm.Batch.from_points([]))
        0
        """
        return cls(_core._Batch.from_points(list(points), list(tag_columns)))

    @classmethod
    def concat(cls, batches: Iterable[Batch], *, tag_columns: Sequence[str] = ()) -> Batch:
        """One batch of several with the same columns.

        >>> import capture_mqtt as cm
        >>> len(cm.Batch.concat([cm.Batch.from_points([]), cm.Batch.from_points([])]))
        0
        """
        return cls(_core._Batch.concat([b._native for b in batches], list(tag_columns)))

    def __len__(self) -> int:
        return len(self._native)

    @property
    def columns(self) -> list[str]:
        """The column names, in order."""
        return list(self._native.column_names)

    def __arrow_c_schema__(self) -> object:
        return self._native.__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        return self._native.__arrow_c_stream__(requested_schema)

    def to_arrow(self) -> pa.Table:
        """A ``pyarrow.Table`` (needs pyarrow).

        >>> import capture_mqtt as cm
        >>> cm.Batch.from_points([]).to_arrow().num_rows
        0
        """
        pyarrow = _need("pyarrow", "pandas")
        table: pa.Table = pyarrow.table(self)
        return table

    def to_pandas(self, *, tags: Literal["struct", "dict", "arrow"] = "struct") -> pd.DataFrame:
        """A ``pandas.DataFrame``, one row per data point; timestamps are ``datetime64[ns, UTC]``.

        The ``tags`` column holds, by default, one Arrow struct per row with a field per tag name
        found in the batch (missing tags are None), built in Rust: a cell reads as a dict
        (``df.tags[0]["MachineName"]``) and a tag as a column (``df.tags.struct.field("MachineName")``).
        ``tags="dict"`` gives plain dicts of the tags each row has (a Python dict per row: slower);
        ``tags="arrow"`` the raw Arrow map (fastest; a cell is a list of pairs). For tags you group by,
        ask for ``tag_columns=[...]``: they become plain string columns. ``value_type`` says what each
        value was (``int``, ``float``, ``bool``, ``string``, ``json``, ``null``).

        >>> import capture_mqtt as cm
        >>> payload = '{"Value": 55, "Tags": {"MachineName": "M1"}}'
        >>> p = cm.parse_raw("v1/raw/AcmeCorp/s/Conn/Monitoring/CPU_Temp", payload)
        >>> df = cm.Batch.from_points([p]).to_pandas()
        >>> df[["key", "value", "value_type"]]
                key  value value_type
        0  CPU_Temp   55.0        int
        >>> df.tags[0]["MachineName"]
        'M1'
        """
        pandas = _need("pandas", "pandas")
        pyarrow = _need("pyarrow", "pandas")
        if tags not in ("struct", "dict", "arrow"):
            raise ValueError(f'tags must be "struct", "dict" or "arrow", got {tags!r}')
        source = Batch(self._native.with_struct_tags()) if tags == "struct" else self

        def mapper(arrow_type: Any) -> Any:
            nested = pyarrow.types.is_map(arrow_type) or pyarrow.types.is_struct(arrow_type)
            return pandas.ArrowDtype(arrow_type) if nested else None

        frame: pd.DataFrame = pyarrow.table(source).to_pandas(types_mapper=mapper)
        if tags == "dict":
            # Not Series.map(dict): pandas maps an Arrow map column through a struct of every name.
            frame["tags"] = pandas.Series([dict(pairs) for pairs in frame["tags"]], index=frame.index, dtype=object)
        return frame

    def to_polars(self) -> pl.DataFrame:
        """A ``polars.DataFrame`` (needs only polars).

        >>> import capture_mqtt as cm
        >>> cm.Batch.from_points([]).to_polars().shape
        (0, 11)
        """
        polars = _need("polars", "polars")
        frame: pl.DataFrame = polars.DataFrame(self)
        return frame

    def to_wide(self) -> pd.DataFrame:
        """The shape analysts plot and model: one row per source and timestamp (indexed by
        ``source_id``, then ``timestamp``, sorted by time within each source), the ``tag_columns``
        the batch was built with, then one column per ``measurement/key``. Each key gets its natural
        dtype: ``Int64`` for integers, ``boolean``, ``float64`` (integers mixed with floats too),
        ``string``; a key whose values mix numbers and text is ``object``. Missing values are NA.
        Plot one source with ``wide.loc["<source id>"].plot()``, or each with
        ``wide.groupby(level="source_id")``. (Integers are exact up to 2**53.)

        >>> import capture_mqtt as cm
        >>> t = '{"Value": %s, "Tags": {"MachineName": "Press1"}, "UtcTimestamp": "2024-11-08T10:22:0%dZ"}'
        >>> readings = [("Temp", 55, 7), ("State", '"On"', 7), ("Running", "true", 7), ("Temp", 56, 6)]
        >>> points = [cm.parse_raw(f"v1/raw/A/s1/C/Monitoring/{k}", t % (v, s)) for k, v, s in readings]
        >>> wide = cm.Batch.from_points(points, tag_columns=["MachineName"]).to_wide()
        >>> list(wide.index.names), wide.columns.tolist()
        (['source_id', 'timestamp'], ['MachineName', 'Monitoring/Running', 'Monitoring/State', 'Monitoring/Temp'])
        >>> wide["Monitoring/Temp"].tolist()  # in time order: 10:22:06, then 10:22:07
        [56, 55]
        >>> wide.loc["s1", "Monitoring/Running"].tolist()
        [<NA>, True]
        >>> wide.dtypes.astype(str).tolist()
        ['string', 'boolean', 'string', 'Int64']
        """
        pandas = _need("pandas", "pandas")
        index = ["source_id", "timestamp"]
        tag_columns = self.columns[self.columns.index("tags") + 1 :]
        frame = self.to_pandas(tags="arrow")
        frame["field"] = frame["measurement"] + "/" + frame["key"]
        frame = frame.drop_duplicates(subset=[*index, "field"], keep="last")
        numbers = frame.pivot(index=index, columns="field", values="value")
        texts = frame.pivot(index=index, columns="field", values="value_text")
        kinds: dict[str, set[str]] = {}
        pairs = frame[["field", "value_type"]].astype(str).drop_duplicates()
        for field, value_type in zip(pairs["field"], pairs["value_type"], strict=True):
            kinds.setdefault(field, set()).add(value_type)
        columns: dict[str, Any] = {}
        for field in numbers.columns:
            kind = kinds.get(field, set()) - {"null"}
            number, text = numbers[field], texts[field]
            if kind and kind <= {"int"} and number.abs().max() < 2**63:
                columns[field] = number.astype("Int64")
            elif kind == {"bool"}:
                columns[field] = number.astype("boolean")
            elif kind and kind <= {"int", "float"}:
                columns[field] = number.astype("float64")
            elif kind == {"string"}:
                columns[field] = text.astype("string")
            else:
                columns[field] = number.astype(object).where(number.notna(), text)
        wide = pandas.DataFrame(columns, index=numbers.index)
        if tag_columns:
            tags = frame.groupby(index)[tag_columns].first().astype("string")
            wide = tags.join(wide)
        wide.columns.name = "field"
        result: pd.DataFrame = wide.sort_index()
        return result

    def __repr__(self) -> str:
        return f"Batch({len(self)} rows, columns={self.columns})"

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
    ``value_text`` (strings; lists and objects as JSON text), ``tags`` (a map), and one column per
    tag asked for with ``tag_columns``.

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

    def to_pandas(self, *, tags: Literal["arrow", "dict"] = "arrow") -> pd.DataFrame:
        """A ``pandas.DataFrame``; timestamps are ``datetime64[ns, UTC]``.

        The ``tags`` column stays Arrow-backed (``pd.ArrowDtype``), which is about 40 times cheaper
        than a Python dict per row; ``tags="dict"`` gives dicts instead. For tags you group by, ask
        the subscription for ``tag_columns=[...]``: they become plain string columns.

        >>> import capture_mqtt as cm
        >>> p = cm.parse_raw("v1/raw/AcmeCorp/s/Conn/Monitoring/CPU_Temp", '{"Value": 55}')
        >>> cm.Batch.from_points([p]).to_pandas()[["key", "value"]]
                key  value
        0  CPU_Temp   55.0
        """
        pandas = _need("pandas", "pandas")
        pyarrow = _need("pyarrow", "pandas")

        def mapper(arrow_type: Any) -> Any:
            return pandas.ArrowDtype(arrow_type) if tags == "arrow" and pyarrow.types.is_map(arrow_type) else None

        frame: pd.DataFrame = self.to_arrow().to_pandas(types_mapper=mapper)
        if tags == "dict":
            frame["tags"] = frame["tags"].map(dict)
        return frame

    def to_polars(self) -> pl.DataFrame:
        """A ``polars.DataFrame`` (needs only polars).

        >>> import capture_mqtt as cm
        >>> cm.Batch.from_points([]).to_polars().shape
        (0, 10)
        """
        polars = _need("polars", "polars")
        frame: pl.DataFrame = polars.DataFrame(self)
        return frame

    def to_wide(self) -> pd.DataFrame:
        """The shape analysts want: one row per timestamp and source, one column per
        ``measurement/key``; a column holds numbers where the values are numbers, text otherwise.

        >>> import capture_mqtt as cm
        >>> t = '{"Value": %s, "UtcTimestamp": "2024-11-08T10:22:06Z"}'
        >>> readings = [("Temp", 55), ("State", '"On"')]
        >>> points = [cm.parse_raw(f"v1/raw/A/s1/C/Monitoring/{k}", t % v) for k, v in readings]
        >>> cm.Batch.from_points(points).to_wide()
        field                                Monitoring/State  Monitoring/Temp
        timestamp                 source_id
        2024-11-08 10:22:06+00:00 s1                       On             55.0
        """
        frame = self.to_pandas()
        frame = frame.assign(
            field=frame["measurement"] + "/" + frame["key"],
            reading=frame["value"].astype(object).where(frame["value"].notna(), frame["value_text"]),
        )
        frame = frame.drop_duplicates(subset=["timestamp", "source_id", "field"], keep="last")
        wide = frame.pivot(index=["timestamp", "source_id"], columns="field", values="reading")
        return wide.infer_objects()

    def __repr__(self) -> str:
        return f"Batch({len(self)} rows, columns={self.columns})"

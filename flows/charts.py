"""Charts and readable tables for Prefect artifacts, usable by any stage.

Prefect 3's UI shows a picture in a markdown artifact only as a data URI (`![alt](data:...)`;
an inline `<svg>` element is stripped), so a chart is rendered to PNG bytes and embedded with
`Chart.markdown()`; `Chart.save()` writes the same bytes to disk beside the stage's output.

- `line_chart`: lines against a shared x (loss against step, a metric against a weight),
  in one or more stacked panels, each line optionally smoothed over its faint raw points.
- `bar_chart`: one bar per label (comparing models on a benchmark).
- `markdown_table`, `round_significant`, `downsample`: tables a person can read (numbers at
  4 significant digits, at most a few hundred rows that keep the first, last and minimum).

Rendered with matplotlib's Agg backend through `matplotlib.figure.Figure` (no `pyplot`: no
global state, so parallel stages can render from their own threads). matplotlib is imported
inside the functions that draw, so importing `flows` stays cheap.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIGNIFICANT_DIGITS = 4
DPI = 100
DEFAULT_SIZE = (1000, 560)  # pixels: readable at the width of the Prefect UI's artifact page
FONT = {"title": 14, "label": 12, "ticks": 11, "legend": 10.5}  # explicit: rcParams are global state


@dataclass(frozen=True)
class Line:
    """One named line. `smoothing` in [0, 1): weight of a debiased exponential moving average
    (as TensorBoard's slider); above 0 the raw points are drawn faint under the smoothed line."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    smoothing: float = 0.0


@dataclass(frozen=True)
class Panel:
    """One set of axes of a chart: its lines, y label and scale."""

    lines: Sequence[Line]
    y_label: str
    log_y: bool = False
    height: float = 1.0  # relative to the other panels of the chart


@dataclass(frozen=True)
class Chart:
    """A rendered picture: PNG bytes and their size in pixels."""

    png: bytes
    width: int
    height: int
    title: str = ""

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def markdown(self, alt: str | None = None) -> str:
        """The image as markdown the Prefect UI renders."""
        text = (alt or self.title or "chart").replace("[", "(").replace("]", ")")
        return f"![{text}]({self.data_uri()})"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG atomically (a reader never sees half a picture)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(self.png)
        os.replace(tmp, path)
        return path


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average: the first value is not pulled towards 0."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(average / norm)
    return out


def auto_smoothing(points: int, window_fraction: float = 1 / 40) -> float:
    """A smoothing weight whose averaging window is ~2.5% of the points (none under 40)."""
    window = points * window_fraction
    return 0.0 if window <= 1.0 else 1.0 - 1.0 / window


def line_chart(
    panels: Panel | Sequence[Panel],
    *,
    title: str,
    x_label: str,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> Chart:
    """Stacked panels sharing one x axis (the last panel carries the x label)."""
    panels = [panels] if isinstance(panels, Panel) else list(panels)
    if not panels:
        raise ValueError("line_chart needs at least one panel")
    figure = _figure(size)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False,
                           gridspec_kw={"height_ratios": [p.height for p in panels]})[:, 0]
    colors = _colors()
    for ax, panel in zip(axes, panels):
        for index, line in enumerate(panel.lines):
            color = colors[index % len(colors)]
            x, y = list(line.x), list(line.y)
            if len(x) != len(y):
                raise ValueError(f"line {line.label!r}: {len(x)} x values but {len(y)} y values")
            if not x:
                continue
            marker = "o" if len(x) <= 60 else None
            if line.smoothing > 0:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=1.0, marker=marker, markersize=3)
                ax.plot(x, smooth(y, line.smoothing), color=color, linewidth=2.0, label=line.label)
            else:
                ax.plot(x, y, color=color, linewidth=1.8, marker=marker, markersize=4, label=line.label)
        if panel.log_y:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        ax.set_ylabel(panel.y_label, fontsize=FONT["label"])
        ax.tick_params(labelsize=FONT["ticks"])
        ax.grid(True, alpha=0.3)
        if any(line.x for line in panel.lines):
            ax.legend(loc="best", fontsize=FONT["legend"], framealpha=0.8)
    axes[-1].set_xlabel(x_label, fontsize=FONT["label"])
    axes[0].set_title(title, loc="left", fontweight="bold", fontsize=FONT["title"])
    return _render(figure, size, title)


def bar_chart(
    values: Mapping[str, float],
    *,
    title: str,
    value_label: str,
    size: tuple[int, int] = DEFAULT_SIZE,
    highlight: str | None = None,
) -> Chart:
    """Horizontal bars, one per label in the given order, each annotated with its value."""
    if not values:
        raise ValueError("bar_chart needs at least one value")
    labels, numbers = list(values), [float(v) for v in values.values()]
    figure = _figure(size)
    ax = figure.subplots()
    colors = _colors()
    bar_colors = [colors[1] if label == highlight else colors[0] for label in labels]
    positions = range(len(labels))
    bars = ax.barh(list(positions), numbers, color=bar_colors)
    ax.set_yticks(list(positions), labels)
    ax.invert_yaxis()  # first label on top
    ax.bar_label(bars, labels=[format_number(v) for v in numbers], padding=3, fontsize=FONT["ticks"])
    ax.set_xlabel(value_label, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["ticks"])
    ax.margins(x=0.12)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title, loc="left", fontweight="bold", fontsize=FONT["title"])
    return _render(figure, size, title)


def _figure(size: tuple[int, int]):
    from matplotlib.figure import Figure

    width, height = size
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    figure.set_facecolor("white")
    return figure


def _colors() -> list[str]:
    from matplotlib import rcParams

    return list(rcParams["axes.prop_cycle"].by_key()["color"])


def _render(figure, size: tuple[int, int], title: str) -> Chart:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # no bbox "tight": the size stays `size`
    return Chart(png=buffer.getvalue(), width=size[0], height=size[1], title=title)


# ---- tables ---------------------------------------------------------------------------------

def round_significant(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Floats to `digits` significant digits; everything else (ints, text, None) unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value != 0.0:
        return float(f"{value:.{digits}g}")
    return value


def format_number(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A table cell: floats at `digits` significant digits, ints with thousands separators."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 10 ** digits:  # 16534.5 -> "16,530", not "1.653e+04"
            return f"{round_significant(value, digits):,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def downsample(rows: Sequence[Mapping[str, Any]], max_rows: int, keep_min: str | None = None) -> list[Any]:
    """At most `max_rows` rows, evenly spaced, always with the first and the last row, and the
    row with the smallest `keep_min` value when given; order kept."""
    if max_rows < 3:
        raise ValueError(f"max_rows must be at least 3, got {max_rows}")
    count = len(rows)
    if count <= max_rows:
        return list(rows)
    even = max_rows - 1 if keep_min else max_rows  # one place kept for the minimum
    keep = {round(i * (count - 1) / (even - 1)) for i in range(even)}
    if keep_min:
        present = [i for i in range(count) if isinstance(rows[i].get(keep_min), (int, float))]
        if present:
            keep.add(min(present, key=lambda i: rows[i][keep_min]))
    return [rows[i] for i in sorted(keep)]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table of `rows` (every key any row has, in order of first appearance, unless
    `columns` says), numbers formatted by `format_number`, `|` escaped."""
    columns = list(columns) if columns is not None else _union_keys(rows)
    if not columns:
        return ""

    def cell(value: Any) -> str:
        return format_number(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _union_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


@dataclass
class Report:
    """A markdown artifact built piece by piece: headings, charts, tables, notes."""

    parts: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 3) -> "Report":
        self.parts.append(f"{'#' * level} {text}")
        return self

    def chart(self, chart: Chart, alt: str | None = None) -> "Report":
        self.parts.append(chart.markdown(alt))
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> "Report":
        if rows:
            self.parts.append(markdown_table(rows, columns))
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(text)
        return self

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"

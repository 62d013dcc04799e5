"""flows.charts: pictures that decode at their stated size, readable numbers, downsampling."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from flows.charts import (
    DEFAULT_SIZE,
    Line,
    Panel,
    Report,
    bar_chart,
    downsample,
    format_number,
    line_chart,
    markdown_table,
    round_significant,
    smooth,
)

DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def decode_png(markdown: str) -> Image.Image:
    """The one data-URI PNG in `markdown`, opened and fully decoded."""
    found = DATA_URI.findall(markdown)
    assert len(found) == 1, markdown[:200]
    image = Image.open(io.BytesIO(base64.b64decode(found[0], validate=True)))
    assert image.format == "PNG"
    image.load()  # decodes every pixel: a truncated file fails here
    return image


def test_line_chart_is_a_png_of_the_requested_size_in_markdown_and_on_disk(tmp_path):
    steps = list(range(1, 201))
    loss = [5.0 / s ** 0.3 for s in steps]
    chart = line_chart(
        [Panel([Line("loss", steps, loss, smoothing=0.8)], "loss"),
         Panel([Line("lora", steps, [2e-4] * 200), Line("mm_projector", steps, [2e-5] * 200)], "learning rate", height=0.5)],
        title="recipe-1: training loss", x_label="optimizer step", size=(640, 400),
    )
    assert decode_png(chart.markdown()).size == (640, 400)
    saved = chart.save(tmp_path / "deep" / "loss.png")
    assert saved.read_bytes() == chart.png
    assert Image.open(saved).size == (640, 400)
    assert [p.name for p in saved.parent.iterdir()] == ["loss.png"]  # no temporary file left


def test_default_size_and_bar_chart():
    chart = line_chart(Panel([Line("a", [1, 2, 3], [3.0, 2.0, 1.0])], "loss"), title="t", x_label="step")
    assert decode_png(chart.markdown("a [bracketed] alt")).size == DEFAULT_SIZE
    bars = bar_chart({"recipe-1": 61.2, "recipe-2": 63.4, "average": 64.0}, title="MMBench", value_label="accuracy (%)",
                     size=(500, 300), highlight="average")
    assert decode_png(bars.markdown()).size == (500, 300)


def test_mismatched_lengths_and_empty_input_are_refused():
    with pytest.raises(ValueError, match="'loss': 3 x values but 2 y values"):
        line_chart(Panel([Line("loss", [1, 2, 3], [1.0, 2.0])], "loss"), title="t", x_label="step")
    with pytest.raises(ValueError):
        line_chart([], title="t", x_label="step")
    with pytest.raises(ValueError):
        bar_chart({}, title="t", value_label="v")


def test_round_significant_keeps_four_digits_and_leaves_other_values_alone():
    assert round_significant(6.360794544219971) == 6.361
    assert round_significant(0.00019594929736144976) == 0.0001959
    assert round_significant(12345.678) == 12350.0
    assert round_significant(8700) == 8700 and isinstance(round_significant(8700), int)
    assert round_significant(None) is None and round_significant("ran") == "ran" and round_significant(0.0) == 0.0


def test_format_number():
    assert [format_number(v) for v in (None, True, 8700, 6.360794544219971, 2e-4, 16534.5, -201234.5, "x")] == [
        "—", "true", "8,700", "6.361", "0.0002", "16,530", "-201,200", "x"]


def test_downsample_keeps_first_last_and_minimum_evenly_spaced():
    rows = [{"step": i, "loss": 10.0 - i * 1e-3} for i in range(1, 8701)]
    rows[4321]["loss"] = -1.0  # the minimum, off any even grid
    kept = downsample(rows, 300, keep_min="loss")
    steps = [r["step"] for r in kept]
    assert len(kept) <= 300
    assert steps[0] == 1 and steps[-1] == 8700 and 4322 in steps
    assert steps == sorted(set(steps))
    gaps = [b - a for a, b in zip(steps, steps[1:]) if 4322 not in (a, b)]
    assert max(gaps) - min(gaps) <= 1  # even spacing apart from the inserted minimum


def test_downsample_leaves_short_tables_alone_and_works_without_a_key():
    rows = [{"step": i} for i in range(10)]
    assert downsample(rows, 10) == rows
    kept = downsample(rows, 4)
    assert [r["step"] for r in kept] == [0, 3, 6, 9]


def test_smooth_is_a_debiased_moving_average():
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # no pull towards zero at the start
    assert smooth([1.0, 5.0, 2.0], 0.0) == [1.0, 5.0, 2.0]
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_markdown_table_shows_every_key_and_escapes_pipes():
    table = markdown_table([{"stage": "pretrain", "seconds": 12.3456}, {"stage": "a|b", "attempts": 2}])
    assert table.splitlines() == [
        "| stage | seconds | attempts |",
        "| --- | --- | --- |",
        "| pretrain | 12.35 | — |",
        "| a\\|b | — | 2 |",
    ]


def test_report_joins_its_parts():
    chart = line_chart(Panel([Line("a", [1, 2], [1.0, 2.0])], "y"), title="t", x_label="x", size=(300, 200))
    text = Report().heading("Title").chart(chart).table([{"a": 1}]).table([]).text("note").markdown()
    assert text.startswith("### Title\n\n![t](data:image/png;base64,") and text.endswith("| 1 |\n\nnote\n")
    assert decode_png(text).size == (300, 200)

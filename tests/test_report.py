"""benchmarks/report.py: the doc tables and the decode plot follow the committed JSON."""

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from benchmarks import report

SVG_NS = "{http://www.w3.org/2000/svg}"


def region(text, name):
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    return text[text.index(start) + len(start) : text.index(end)]


def outside(text):
    for name in ("decode-table", "prefill-table"):
        text = text.replace(region(text, name), "")
    return text


def table(text):
    """Markdown table in `text` -> (header, {first cells joined by '|': {column: cell}})."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[tuple(cells[:3])] = dict(zip(header, cells))
    return header, rows


def numbers(cell):
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", cell)]


def generate(tmp_path, decode=report.DECODE_JSON, prefill=report.PREFILL_JSON):
    doc = tmp_path / "docs" / "performance.md"
    svg = tmp_path / "docs" / "img" / "decode_bandwidth.svg"
    doc.parent.mkdir(parents=True)
    shutil.copy(report.DOC, doc)
    args = ["--doc", str(doc), "--svg", str(svg), "--decode", str(decode)]
    assert report.main(args + ["--prefill", str(prefill)]) == 0
    return doc.read_text(), svg


def series(svg):
    root = ET.parse(svg).getroot()  # well-formed XML
    assert root.tag == SVG_NS + "svg"
    out = Counter()
    for panel in root.iter(SVG_NS + "g"):
        if panel.get("class") != "panel":
            continue
        for line in panel.iter(SVG_NS + "polyline"):
            if line.get("class") == "series":
                out[
                    (int(panel.get("data-B")), line.get("data-impl"), line.get("data-lengths"))
                ] += 1
    legend = [t.get("data-impl") for t in root.iter(SVG_NS + "text") if t.get("data-impl")]
    return out, legend


def measured(rows):
    return [r for r in rows if r.get("bench") == "decode" and "plan" not in r and "ms" in r]


def test_generated_tables_and_plot_match_json(tmp_path):
    text, svg = generate(tmp_path)
    assert outside(text) == outside(report.DOC.read_text())  # prose untouched

    dec = report.select_run(json.loads(report.DECODE_JSON.read_text()), report.DECODE_RUN)
    rows = measured(dec["rows"])
    impls = report.impl_order({r["impl"] for r in rows})
    assert impls[:2] == ["jaxmm", "jaxmm_kernel"]
    body = region(text, "decode-table")
    assert "![decode bandwidth](img/decode_bandwidth.svg)" in body
    assert f"run `{report.DECODE_RUN}`" in body  # the doc names the run it shows
    header, table_rows = table(body)
    assert header == ["B", "L", "lengths"] + [report.HEADER.get(i, i) for i in impls]
    for r in rows:
        cell = table_rows[(str(r["B"]), str(r["L"]), r["lengths"])][
            report.HEADER.get(r["impl"], r["impl"])
        ]
        ms, tb = numbers(cell)[:2]
        assert ms == pytest.approx(r["ms"], abs=5e-4 + 1e-9)
        assert tb == pytest.approx(r["tb_s"], abs=5e-3 + 1e-9)
    # every (B, L, lengths) row shows each implementation, or "-" when not measured
    seen = {
        (str(r["B"]), str(r["L"]), r["lengths"], report.HEADER.get(r["impl"], r["impl"]))
        for r in rows
    }
    for key, row in table_rows.items():
        for col in header[3:]:
            assert (row[col] == "-") == ((*key, col) not in seen)
    # one bold cell at most per row, never the kernel-only column
    for row in table_rows.values():
        assert sum("**" in c for c in row.values()) <= 1
        assert "**" not in row["kernel"]
    # the bold cell is the fastest whole call of its row
    fastest: dict = {}
    for r in rows:
        if r["impl"] != "jaxmm_kernel":
            key = (str(r["B"]), str(r["L"]), r["lengths"])
            if key not in fastest or r["ms"] < fastest[key]["ms"]:
                fastest[key] = r
    for key, r in fastest.items():
        if sum(1 for x in rows if (str(x["B"]), str(x["L"]), x["lengths"]) == key) > 1:
            assert "**" in table_rows[key][report.HEADER.get(r["impl"], r["impl"])]

    pre = report.select_run(json.loads(report.PREFILL_JSON.read_text()), report.PREFILL_RUN)
    header, prows = table(region(text, "prefill-table"))
    assert header[0] == "S" and "ours / cuDNN" in header
    for r in pre["rows"]:
        if r["bench"] != "prefill" or "ms" not in r:
            continue
        name = report.PREFILL_HEADER[r["impl"]]
        row = next(v for k, v in prows.items() if k[0] == str(r["S"]))
        assert numbers(row[f"{name} ms"])[0] == pytest.approx(r["ms"], abs=5e-4 + 1e-9)
        assert numbers(row[f"{name} TFLOP/s"])[0] == pytest.approx(r["tflops"], abs=0.5 + 1e-9)

    # the plot: one line per (B, implementation, lengths) measured, a legend entry each
    lines, legend = series(svg)
    want = Counter((r["B"], r["impl"], r["lengths"]) for r in rows)
    assert set(lines) == set(want) and set(lines.values()) == {1}
    assert legend == impls


def test_check_passes_on_committed_docs():
    assert report.main(["--check"]) == 0


def test_check_fails_when_json_changes(tmp_path):
    generate(tmp_path)
    dec = json.loads(report.DECODE_JSON.read_text())
    report.select_run(dec, report.DECODE_RUN)["rows"][0]["ms"] += 1.0
    stale = tmp_path / "decode.json"
    stale.write_text(json.dumps(dec))
    doc = tmp_path / "docs" / "performance.md"
    svg = tmp_path / "docs" / "img" / "decode_bandwidth.svg"
    args = ["--doc", str(doc), "--svg", str(svg), "--check"]
    assert report.main(args) == 0
    assert report.main(args + ["--decode", str(stale)]) == 1


def test_missing_rows_and_new_implementations(tmp_path):
    """A newer run: B=256 and L=8192 rows, an unknown implementation key, failed rows."""

    def row(impl, B, L, lengths, ms):
        return dict(bench="decode", impl=impl, B=B, L=L, lengths=lengths, ms=ms, tb_s=1.0 / ms)

    rows = [
        row("cudnn", 256, 8192, "equal", 3.0),
        row("jaxmm", 256, 8192, "equal", 2.5),
        row("flashinfer", 256, 8192, "equal", 2.0),
        row("jaxmm", 1, 512, "random", 0.02),
        dict(bench="decode", impl="xla_ref", B=256, L=8192, error="OOM"),
    ]
    dec = tmp_path / "decode.json"
    dec.write_text(json.dumps(dict(env={}, rows=rows)))
    pre = tmp_path / "prefill.json"
    only_ours = dict(bench="prefill", impl="jaxmm", S=512, ms=0.03, tflops=70.0)
    pre.write_text(json.dumps(dict(rows=[only_ours])))
    text, svg = generate(tmp_path, decode=dec, prefill=pre)
    header, table_rows = table(region(text, "decode-table"))
    assert header[3:] == ["jaxmm", "cuDNN paged", "XLA ref", "flashinfer"]
    r = table_rows[("256", "8192", "equal")]
    assert r["flashinfer"].startswith("**2.000 / 0.50")
    assert r["jaxmm"] == "2.500 / 0.40" and r["XLA ref"] == "-"
    assert table_rows[("1", "512", "random")]["cuDNN paged"] == "-"
    lines, legend = series(svg)
    assert legend == ["jaxmm", "cudnn", "flashinfer"]
    assert set(lines) == {(256, i, "equal") for i in legend} | {(1, "jaxmm", "random")}
    header, prows = table(region(text, "prefill-table"))
    assert header == ["S", "jaxmm ms", "jaxmm TFLOP/s"]


def test_tables_come_from_the_named_run(tmp_path):
    """A results file keeps every run: the table shows the run named, not the last one."""

    def run(variant, ms):
        row = dict(bench="decode", impl="jaxmm", B=8, L=512, lengths="equal", ms=ms, tb_s=1.0)
        return dict(date="2026-01-01", variant=variant, env={}, rows=[row])

    dec = tmp_path / "decode.json"
    runs = [run("all-peers", 0.5), run("later", 0.25)]
    dec.write_text(json.dumps(dict(benchmark="attention_decode", runs=runs)))
    text, _ = generate(tmp_path, decode=dec)
    _, rows = table(region(text, "decode-table"))
    assert rows[("8", "512", "equal")]["jaxmm"] == "0.500 / 1.00"
    assert "run `all-peers`" in region(text, "decode-table")
    doc = tmp_path / "docs" / "performance.md"
    svg = tmp_path / "docs" / "img" / "decode_bandwidth.svg"
    args = ["--doc", str(doc), "--svg", str(svg), "--decode", str(dec)]
    assert report.main(args + ["--decode-run", "later"]) == 0
    _, rows = table(region(doc.read_text(), "decode-table"))
    assert rows[("8", "512", "equal")]["jaxmm"] == "0.250 / 1.00"
    with pytest.raises(KeyError, match="all-peers, later"):
        report.main(args + ["--decode-run", "missing"])

"""Regenerate the attention tables and the decode bandwidth plot in docs/performance.md.

    python benchmarks/report.py [--decode JSON] [--decode-run NAME] [--prefill JSON]
        [--prefill-run NAME] [--doc MD] [--svg SVG] [--check]

Reads one run of each results file written by `benchmarks/attention_decode.py` and
`attention_prefill.py` (benchmarks/results/INDEX.md; the run named DECODE_RUN / PREFILL_RUN
unless told otherwise) and rewrites only what lies between the marker comments of the doc:

    <!-- report:decode-table -->  ...  <!-- /report:decode-table -->
    <!-- report:prefill-table --> ...  <!-- /report:prefill-table -->

and the plot `docs/img/decode_bandwidth.svg` (effective TB/s vs context length, one panel per
batch size; written by hand as SVG, no plotting dependency). `--check` writes nothing and
exits 1 if the doc or the plot differ from what the JSON gives.

Rows may be missing (a run that hit its time limit) and new implementation keys may appear:
every key found gets a column and a line, ours first. `-` marks a cell not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.results_io import select_run  # noqa: E402

DECODE_JSON = ROOT / "benchmarks" / "results" / "attention_decode_h100.json"
PREFILL_JSON = ROOT / "benchmarks" / "results" / "attention_prefill_h100.json"
# The runs the doc's tables show (a results file keeps every run; these name one each).
DECODE_RUN = "all-peers"
PREFILL_RUN = "mosaic"
DOC = ROOT / "docs" / "performance.md"
SVG = ROOT / "docs" / "img" / "decode_bandwidth.svg"

# Known implementation keys, in display order: ours first, then the peers.
OURS = ["jaxmm", "jaxmm_kernel"]
PEERS = ["jax_triton", "cudnn", "xla_ref"]
HEADER = {
    "jaxmm": "jaxmm",
    "jaxmm_kernel": "kernel",
    "jax_triton": "JAX Triton paged",
    "cudnn": "cuDNN paged",
    "xla_ref": "XLA ref",
}
PREFILL_HEADER = {
    "jaxmm": "jaxmm",
    "jaxmm_triton": "jaxmm Triton",
    "cudnn": "cuDNN",
    "jax_mgpu": "JAX Mosaic dense",
}
LEGEND = {
    "jaxmm": "jaxmm (whole ragged call)",
    "jaxmm_kernel": "jaxmm decode kernel alone",
    "jax_triton": "JAX Triton paged",
    "cudnn": "cuDNN paged",
    "xla_ref": "XLA reference",
}
# Parts of another implementation: shown, never ranked as the row's fastest.
NOT_RANKED = {"jaxmm_kernel"}
# Lists in the decode JSON (top level or one section down) holding a second measurement of
# some rows: shown as "ms / TB/s (ms / TB/s)*" next to the main one (the doc's footnote).
RERUN_KEYS = ("default_plan_rerun",)
LENGTHS_ORDER = {"equal": 0, "random": 1}
COLORS = {
    "jaxmm": "#d55e00",
    "jaxmm_kernel": "#e69f00",
    "jax_triton": "#0072b2",
    "cudnn": "#009e73",
    "xla_ref": "#7f7f7f",
}
SPARE_COLORS = ["#cc79a7", "#56b4e9", "#000000", "#8c564b", "#bcbd22", "#17becf"]


# ---------------------------------------------------------------------------- helpers


def fmt(x: float, digits: int) -> str:
    """Round half up on the decimal digits as stored (0.0155 -> 0.016, not 0.015)."""
    q = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(float(x))).quantize(q, rounding=ROUND_HALF_UP))


def impl_order(keys) -> list[str]:
    """Stable order: our known keys, other `jaxmm*` keys, known peers, the rest (sorted)."""
    keys = set(keys)
    out = [k for k in OURS if k in keys]
    out += sorted(k for k in keys if k.startswith("jaxmm") and k not in out)
    out += [k for k in PEERS if k in keys]
    out += sorted(k for k in keys if k not in out)
    return out


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def rel(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def decode_cells(data: dict):
    """{(B, L, lengths): {impl: row}} of the measured decode rows (last row wins), and the
    same for the rerun lists."""

    def index(rows):
        out: dict = {}
        for r in rows:
            if r.get("bench", "decode") != "decode" or "ms" not in r or "tb_s" not in r:
                continue
            key = (int(r["B"]), int(r["L"]), r.get("lengths", "equal"))
            out.setdefault(key, {})[r["impl"]] = r
        return out

    main = index(r for r in data.get("rows", []) if "plan" not in r)
    # a rerun list sits at the top level or in a top-level section (e.g. "sweep")
    sections = [data] + [v for v in data.values() if isinstance(v, dict)]
    reruns = index(r for s in sections for k in RERUN_KEYS for r in s.get(k, []))
    return main, reruns


# ---------------------------------------------------------------------------- tables


def decode_table(data: dict) -> str:
    cells, reruns = decode_cells(data)
    impls = impl_order(  # failed-only implementations too: a column of "-"
        {
            r["impl"]
            for r in data.get("rows", [])
            if r.get("bench", "decode") == "decode" and "plan" not in r
        }
    )
    head = ["B", "L", "lengths"] + [HEADER.get(i, i) for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted(cells, key=lambda k: (k[0], k[1], LENGTHS_ORDER.get(k[2], 9), k[2]))
    for key in keys:
        row = cells[key]
        ranked = [i for i in impls if i in row and i not in NOT_RANKED]
        best = min(ranked, key=lambda i: row[i]["ms"]) if len(ranked) > 1 else None
        out = [str(key[0]), str(key[1]), key[2]]
        for impl in impls:
            if impl not in row:
                out.append("-")
                continue
            r = row[impl]
            cell = f"{fmt(r['ms'], 3)} / {fmt(r['tb_s'], 2)}"
            if impl == best:
                cell = f"**{cell}**"
            alt = reruns.get(key, {}).get(impl)
            if alt is not None:
                cell += f" ({fmt(alt['ms'], 3)} / {fmt(alt['tb_s'], 2)})*"
            out.append(cell)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def prefill_table(data: dict) -> str:
    rows = [
        r
        for r in data.get("rows", [])
        if r.get("bench") == "prefill" and "plan" not in r and "ms" in r and "tflops" in r
    ]
    cells: dict = {}
    for r in rows:
        cells.setdefault(int(r["S"]), {})[r["impl"]] = r
    impls = impl_order({r["impl"] for r in rows})
    ours = impls[0] if impls and impls[0].startswith("jaxmm") else None
    peers = [i for i in impls if i != ours]
    head = ["S"]
    for i in impls:
        name = PREFILL_HEADER.get(i, HEADER.get(i, i))
        head += [f"{name} ms", f"{name} TFLOP/s"]
    if ours:
        head += [f"ours / {PREFILL_HEADER.get(p, HEADER.get(p, p))}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for S in sorted(cells):
        row = cells[S]
        best = min(row, key=lambda i: row[i]["ms"]) if len(row) > 1 else None
        out = [str(S)]
        for impl in impls:
            if impl not in row:
                out += ["-", "-"]
                continue
            ms, tf = fmt(row[impl]["ms"], 3), fmt(row[impl]["tflops"], 0)
            if impl == best:
                ms, tf = f"**{ms}**", f"**{tf}**"
            out += [ms, tf]
        if ours:
            for p in peers:  # speed of ours relative to the peer: > 1 means ours is faster
                if ours in row and p in row:
                    out.append(fmt(row[p]["ms"] / row[ours]["ms"], 2))
                else:
                    out.append("-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot


def nice_step(span: float, max_ticks: int = 7) -> float:
    for step in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 50, 100):
        if span / step <= max_ticks:
            return step
    return 10 ** math.ceil(math.log10(span))


def colors_for(impls) -> dict:
    spare = iter(SPARE_COLORS * 4)
    return {i: COLORS[i] if i in COLORS else next(spare) for i in impls}


def decode_svg(data: dict) -> str:
    """Effective TB/s vs L (log x), one panel per B; solid equal, dashed random lengths."""
    cells, _ = decode_cells(data)
    impls = impl_order({impl for row in cells.values() for impl in row})
    color = colors_for(impls)
    Bs = sorted({k[0] for k in cells})
    Ls = sorted({k[1] for k in cells})
    modes = sorted({k[2] for k in cells}, key=lambda m: (LENGTHS_ORDER.get(m, 9), m))
    tb_max = max((r["tb_s"] for row in cells.values() for r in row.values()), default=1.0)
    step = nice_step(max(tb_max, 0.5))
    y_top = step * math.ceil(max(tb_max, 0.5) / step - 1e-9)
    if y_top - tb_max < 0.04 * y_top:
        y_top += step
    if Ls:
        lo, hi = math.log2(Ls[0]), math.log2(Ls[-1])
    else:
        lo = hi = 11.0
    pad = 0.5 if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad

    ncols = 2 if len(Bs) > 1 else 1
    nrows = max(1, math.ceil(len(Bs) / ncols))
    pw, ph = 330, 250  # panel box
    ml, mr, mt, mb = 52, 14, 26, 44  # plot area inside a panel
    top = 62  # title block
    legend_w = 250
    width = 16 + ncols * pw + legend_w
    height = top + nrows * ph + 12

    device = data.get("env", {}).get("device", "")
    title = "Paged decode attention: effective bandwidth vs context length"
    sub = (
        f"{device}, " if device else ""
    ) + "bf16, 32 query / 8 KV heads, head 128, page 16; solid: equal lengths, dashed: random"
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="16" y="26" font-size="17" font-weight="bold" fill="#222">{escape(title)}</text>',
        f'<text x="16" y="46" font-size="12" fill="#444">{escape(sub)}</text>',
    ]
    for n, B in enumerate(Bs):
        px = 16 + (n % ncols) * pw
        py = top + (n // ncols) * ph
        x0, x1 = px + ml, px + pw - mr
        y0, y1 = py + mt, py + ph - mb  # y0 top, y1 bottom of the plot area

        def X(L, x0=x0, x1=x1):
            return x0 + (math.log2(L) - lo) / (hi - lo) * (x1 - x0)

        def Y(v, y0=y0, y1=y1):
            return y1 - v / y_top * (y1 - y0)

        o.append(f'<g class="panel" data-B="{B}">')
        o.append(
            f'<text x="{(x0 + x1) / 2:.1f}" y="{py + 16}" font-size="13" font-weight="bold" '
            f'text-anchor="middle" fill="#222">B = {B}</text>'
        )
        # grid and y ticks
        k = 0
        while k * step <= y_top + 1e-9:
            v = k * step
            y = Y(v)
            o.append(
                f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e3e3e3" '
                f'stroke-width="1"/>'
            )
            o.append(
                f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
                f'fill="#333">{v:g}</text>'
            )
            k += 1
        for L in Ls:
            x = X(L)
            o.append(
                f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 5}" stroke="#333" '
                f'stroke-width="1"/>'
            )
            o.append(
                f'<text x="{x:.1f}" y="{y1 + 18}" font-size="11" text-anchor="middle" '
                f'fill="#333">{L}</text>'
            )
        # axes
        o.append(
            f'<polyline class="axis" points="{x0},{y0} {x0},{y1} {x1},{y1}" fill="none" '
            f'stroke="#333" stroke-width="1"/>'
        )
        o.append(
            f'<text x="{(x0 + x1) / 2:.1f}" y="{y1 + 36}" font-size="11" text-anchor="middle" '
            f'fill="#333">context length L (tokens, log scale)</text>'
        )
        o.append(
            f'<text transform="translate({px + 14},{(y0 + y1) / 2:.1f}) rotate(-90)" '
            f'font-size="11" text-anchor="middle" fill="#333">TB/s</text>'
        )
        # series, ours drawn last (on top)
        for impl in reversed(impls):
            c = color[impl]
            wide = "2.5" if impl == "jaxmm" else "1.6"
            for mode in modes:
                pts = [
                    (L, cells[(B, L, mode)][impl]["tb_s"])
                    for L in Ls
                    if impl in cells.get((B, L, mode), {})
                ]
                if not pts:
                    continue
                dash = "" if mode == "equal" else ' stroke-dasharray="6 4"'
                xy = " ".join(f"{X(L):.1f},{Y(v):.1f}" for L, v in pts)
                o.append(
                    f'<polyline class="series" data-impl="{escape(impl)}" data-lengths='
                    f'"{escape(mode)}" points="{xy}" fill="none" stroke="{c}" '
                    f'stroke-width="{wide}"{dash}/>'
                )
                fill = c if mode == "equal" else "#ffffff"
                for L, v in pts:
                    o.append(
                        f'<circle cx="{X(L):.1f}" cy="{Y(v):.1f}" r="3.2" fill="{fill}" '
                        f'stroke="{c}" stroke-width="1.4"><title>{escape(impl)} B={B} L={L} '
                        f"{escape(mode)}: {v:g} TB/s</title></circle>"
                    )
        o.append("</g>")
    # legend
    lx = 16 + ncols * pw + 14
    ly = top + 20
    o.append('<g class="legend">')
    for i, impl in enumerate(impls):
        y = ly + i * 22
        c = color[impl]
        o.append(
            f'<line x1="{lx}" y1="{y}" x2="{lx + 28}" y2="{y}" stroke="{c}" '
            f'stroke-width="{"2.5" if impl == "jaxmm" else "1.6"}"/>'
        )
        o.append(f'<circle cx="{lx + 14}" cy="{y}" r="3.2" fill="{c}" stroke="{c}"/>')
        o.append(
            f'<text x="{lx + 36}" y="{y + 4}" font-size="12" fill="#222" '
            f'data-impl="{escape(impl)}">{escape(LEGEND.get(impl, impl))}</text>'
        )
    y = ly + len(impls) * 22 + 10
    for mode in modes:
        dash = "" if mode == "equal" else ' stroke-dasharray="6 4"'
        fill = "#555555" if mode == "equal" else "#ffffff"
        o.append(
            f'<line x1="{lx}" y1="{y}" x2="{lx + 28}" y2="{y}" stroke="#555555" '
            f'stroke-width="1.6"{dash}/>'
        )
        o.append(
            f'<circle cx="{lx + 14}" cy="{y}" r="3.2" fill="{fill}" stroke="#555555" '
            f'stroke-width="1.4"/>'
        )
        o.append(
            f'<text x="{lx + 36}" y="{y + 4}" font-size="12" fill="#222">'
            f"{escape(mode)} lengths</text>"
        )
        y += 22
    o.append("</g>")
    o.append("</svg>")
    return "\n".join(o) + "\n"


# ---------------------------------------------------------------------------- doc


def replace_region(text: str, name: str, body: str) -> str:
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"report: markers {start} ... {end} not found once each, in order")
    return text[: i + len(start)] + "\n\n" + body.strip("\n") + "\n\n" + text[j:]


def render(decode: dict, prefill: dict, doc_text: str, doc: Path, svg: Path, src: str):
    """The doc and the plot from one decode run and one prefill run; `src`: where the decode
    run came from, as the doc names it."""
    link = Path(os.path.relpath(svg, doc.parent)).as_posix()
    decode_body = "\n".join(
        [
            f"![decode bandwidth]({link})",
            "",
            f"Table and plot: `python benchmarks/report.py` from {src}.",
            "**Bold**: the fastest whole call of the row (`kernel`, a part of `jaxmm`, is not "
            "ranked).",
            "",
            decode_table(decode),
        ]
    )
    text = replace_region(doc_text, "decode-table", decode_body)
    text = replace_region(text, "prefill-table", prefill_table(prefill))
    return text, decode_svg(decode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", type=Path, default=DECODE_JSON)
    ap.add_argument("--decode-run", default=DECODE_RUN, help="variant name of the run to show")
    ap.add_argument("--prefill", type=Path, default=PREFILL_JSON)
    ap.add_argument("--prefill-run", default=PREFILL_RUN, help="variant name of the run to show")
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--svg", type=Path, default=SVG)
    ap.add_argument("--check", action="store_true", help="exit 1 if the doc/plot are stale")
    a = ap.parse_args(argv)
    doc_text = a.doc.read_text()
    decode_file = load(a.decode)
    src = f"`{rel(a.decode)}`"
    if "runs" in decode_file:
        src += f", run `{a.decode_run}`"
    decode = select_run(decode_file, a.decode_run)
    prefill = select_run(load(a.prefill), a.prefill_run)
    text, svg = render(decode, prefill, doc_text, a.doc, a.svg, src)
    if a.check:
        stale = []
        if text != doc_text:
            stale.append(str(a.doc))
        if not a.svg.exists() or a.svg.read_text() != svg:
            stale.append(str(a.svg))
        if stale:
            print(
                "report: out of date with the JSON: "
                + ", ".join(stale)
                + " (run python benchmarks/report.py)",
                file=sys.stderr,
            )
            return 1
        print("report: docs up to date")
        return 0
    a.svg.parent.mkdir(parents=True, exist_ok=True)
    a.svg.write_text(svg)
    a.doc.write_text(text)
    print(f"report: wrote {a.doc} and {a.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

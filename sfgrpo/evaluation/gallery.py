"""``gallery.html``: every (example, seed) row of an evaluation with its source and edited images,
instruction, scores and failure, in one self-contained page that opens from disk (no network: inline CSS
and script).

The page sits in the evaluation's folder: the rows' image paths are relative to it. Clicking a column header
sorts by that column (numbers numerically with empty cells last in either direction, text in natural order);
clicking again reverses. A script counts the images as they load and shows how many are missing, so a page
opened from the wrong folder says so; it also records the counts on the ``<html>`` element
(``data-images-loaded``, ``data-images-broken``, ``data-images-total``), which is what a headless browser
reads to check the page. Everything taken from the rows (instructions are user text) is escaped.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sfgrpo.evaluation.aggregate import fmt, is_number

_log = logging.getLogger(__name__)

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; }
thead th { background: #f2f2f2; position: sticky; top: 0; z-index: 1; }
thead th[data-type] { cursor: pointer; user-select: none; }
thead th[aria-sort=ascending]::after { content: " \\25B2"; }
thead th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.img img { max-width: 256px; max-height: 256px; display: block; }
td.img.broken { background: #fdd; }
td.instr { max-width: 28em; white-space: pre-wrap; }
tr.failed { background: #fff4e0; }
.failure { color: #a40; }
#image-status.bad { color: #b00; font-weight: bold; }
pre { white-space: pre-wrap; max-width: 40em; margin: 0; }
"""

# Runs in <head>, before any image is parsed: capturing listeners see every image's load or error event.
_COUNT_JS = """
(function () {
  var ok = 0, bad = 0;
  function show() {
    var root = document.documentElement, total = document.images.length;
    root.dataset.imagesLoaded = ok; root.dataset.imagesBroken = bad; root.dataset.imagesTotal = total;
    var el = document.getElementById('image-status');
    if (!el) return;
    el.textContent = ok + ' of ' + total + ' images loaded' +
      (bad ? '; ' + bad + ' missing (open the page from its evaluation folder)' : '');
    el.className = bad ? 'bad' : '';
  }
  function seen(e, good) {
    var t = e.target;
    if (!t || t.tagName !== 'IMG' || t.dataset.counted) return;
    t.dataset.counted = '1';
    if (good && t.naturalWidth > 0) { ok++; return show(); }
    bad++;
    t.parentNode.closest('td').classList.add('broken');
    show();
  }
  document.addEventListener('load', function (e) { seen(e, true); }, true);
  document.addEventListener('error', function (e) { seen(e, false); }, true);
  window.addEventListener('load', show);
})();
"""

_SORT_JS = """
(function () {
  var table = document.getElementById('rows'), body = table.tBodies[0];
  table.tHead.addEventListener('click', function (e) {
    var th = e.target.closest('th[data-type]');
    if (!th) return;
    var col = th.cellIndex, num = th.dataset.type === 'num';
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (num) {
        var nx = x === '', ny = y === '';
        if (nx || ny) return nx - ny;  // empty (failed) cells last in either direction
        return asc ? parseFloat(x) - parseFloat(y) : parseFloat(y) - parseFloat(x);
      }
      var c = x.localeCompare(y, undefined, {numeric: true});
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
})();
"""


def esc(value: Any) -> str:
    """``value`` as text safe in HTML content and in double- or single-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def image_url(path: str) -> str:
    """A row's relative image path as a URL (spaces, '#', '?' and '%' in names percent-encoded)."""
    return quote(path, safe="/")


def score_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sorted names of the numeric scores in any row: one column each."""
    return sorted({n for r in rows for n, v in (r.get("scores") or {}).items() if is_number(v)})


def columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str | None]]:
    """The table's (header, sort type) columns: 'num', 'text', or None for the unsortable image and
    judge-answer columns."""
    return [
        ("source", None),
        ("edit", None),
        ("key", "text"),
        ("seed", "num"),
        ("task type", "text"),
        ("language", "text"),
        ("instruction", "text"),
        ("overall", "num"),
        *[(name, "num") for name in score_columns(rows)],
        ("failure", "text"),
        ("judge", None),
    ]


def _num_cell(value: Any) -> str:
    if not is_number(value):
        return '<td class="num" data-v=""></td>'
    shown = str(value) if isinstance(value, int) else fmt(value)  # seeds stay integers
    return f'<td class="num" data-v="{esc(repr(float(value)))}">{esc(shown)}</td>'


def _text_cell(value: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f'<td{attr} data-v="{esc(value)}">{esc(value)}</td>'


def _img_cell(path: Any) -> str:
    if not isinstance(path, str) or not path:
        return '<td class="img">–</td>'
    url = esc(image_url(path))
    return (
        f'<td class="img"><a href="{url}" target="_blank">'
        f'<img src="{url}" alt="{esc(path)}" loading="lazy" decoding="async"></a></td>'
    )


def _row_html(i: int, row: Mapping[str, Any], scores: Sequence[str]) -> str:
    failure = row.get("failure") or {}
    reason = failure.get("reason") if failure else None
    if failure:
        fail_cell = (
            f'<td class="failure" data-v="{esc(reason)}" title="{esc(failure.get("message"))}">'
            f"{esc(reason)}<br><small>{esc(failure.get('message'))}</small></td>"
        )
    else:
        fail_cell = '<td data-v=""></td>'
    answers = ((row.get("judge") or {}).get("answers")) or {}
    judge = "".join(f"<b>{esc(name)}</b><pre>{esc(text)}</pre>" for name, text in answers.items())
    judge_cell = f"<td><details><summary>answers</summary>{judge}</details></td>" if answers else "<td></td>"
    row_scores = row.get("scores") or {}
    cells = [
        _img_cell(row.get("source")),
        _img_cell(row.get("edit")),
        _text_cell(row.get("key")),
        _num_cell(row.get("seed")),
        _text_cell(row.get("task_type")),
        _text_cell(row.get("language")),
        _text_cell(row.get("instruction"), "instr"),
        _num_cell(row.get("overall")),
        *[_num_cell(row_scores.get(name)) for name in scores],
        fail_cell,
        judge_cell,
    ]
    cls = ' class="failed"' if row.get("overall") is None else ""
    return f'<tr data-row="{i}"{cls}>' + "".join(cells) + "</tr>"


def _summary_html(summary: Mapping[str, Any]) -> str:
    """The page's header: the overall, a per-task-type table of means, failures and the settings."""
    scores = summary.get("scores") or {}
    counts = summary.get("counts_by_task_type") or {}
    head = "".join(f"<th>{esc(h)}</th>" for h in ["task type", "n", "scored", "overall", *scores])
    body = []
    for t, mean in (summary.get("by_task_type") or {}).items():
        c = counts.get(t, {})
        cells = [esc(t), esc(c.get("n", "")), esc(c.get("n_scored", "")), esc(fmt(mean))]
        cells += [esc(fmt(s["by_task_type"].get(t))) for s in scores.values()]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    macro = ["<b>macro mean</b>", esc(summary.get("n", "")), esc(summary.get("n_scored", ""))]
    macro += [
        f"<b>{esc(fmt(summary.get('overall')))}</b>",
        *[esc(fmt(s.get("overall"))) for s in scores.values()],
    ]
    body.append("<tr>" + "".join(f"<td>{c}</td>" for c in macro) + "</tr>")
    failures = summary.get("failures") or {}
    by_reason = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in (failures.get("by_reason") or {}).items())
    settings = {k: v for k, v in summary.items() if k in ("policy", "judge", "benchmark", "seeds")}
    return (
        f"<h1>Evaluation: {esc(summary.get('protocol'))}</h1>"
        f"<p><b>Overall {esc(fmt(summary.get('overall')))}</b> (unweighted mean over task types); "
        f"{esc(summary.get('n_scored'))} of {esc(summary.get('n'))} rows scored; "
        f"failures: {esc(failures.get('total', 0))}{' (' + by_reason + ')' if by_reason else ''}.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + (f"<details><summary>settings</summary><pre>{esc(json.dumps(settings, indent=1))}</pre></details>")
    )


def gallery_html(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The page's text for ``rows`` (in their order) under ``summary``'s header."""
    cols = columns(rows)
    scores = score_columns(rows)
    head = "".join(
        f'<th data-type="{kind}" title="click to sort">{esc(name)}</th>' if kind else f"<th>{esc(name)}</th>"
        for name, kind in cols
    )
    body = "\n".join(_row_html(i, r, scores) for i, r in enumerate(rows))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation gallery: {esc(summary.get('protocol'))}</title>"
        f"<style>{_CSS}</style><script>{_COUNT_JS}</script></head>\n<body>"
        f'{_summary_html(summary)}<p id="image-status"></p>\n'
        f'<table id="rows"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n'
        f"<script>{_SORT_JS}</script></body></html>\n"
    )


def write_gallery(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], path: str | Path) -> None:
    """Writes ``gallery.html`` for ``rows`` at ``path``, which must be in the evaluation's folder (the rows'
    image paths are relative to it). Logs a warning when images are missing there; the page still lists
    their rows."""
    path = Path(path)
    missing = [
        p
        for r in rows
        for p in (r.get("source"), r.get("edit"))
        if isinstance(p, str) and not (path.parent / p).exists()
    ]
    if missing:
        _log.warning(
            "%s: %d images are missing from %s, e.g. %s", path, len(missing), path.parent, missing[:3]
        )
    path.write_text(gallery_html(rows, summary), encoding="utf-8")

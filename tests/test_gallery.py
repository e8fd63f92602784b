"""sfgrpo.evaluation.gallery: gallery.html's images, escaping and sortable columns, parsed with html.parser;
then opened in headless Chromium, which must load every image and sort every column without a script error.

The browser test needs Chromium (Debian: ``apt-get install -y chromium``); without it the test fails, on
purpose: the gallery's script is only checked there.
"""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from sfgrpo.evaluation.aggregate import summarize
from sfgrpo.evaluation.gallery import write_gallery

EVIL = '<script>alert("x")</script> & "quotes" \'too\''


def make_rows(root: Path, missing: str | None = None) -> list[dict]:
    """Six rows (three examples x two seeds; one failed) with their PNGs written under root/images; an image
    name with a space and a '#' checks the URLs. ``missing``: an image path not written."""
    (root / "images").mkdir(parents=True)
    examples = [
        ("ex 1#a", "add", "en", "add a hat"),
        ("ex2", "remove", "zh", EVIL),
        ("ex3", "add", "en", "Zebra"),
    ]
    overall = {("ex 1#a", 0): 7.5, ("ex 1#a", 1): 3.0, ("ex2", 0): 10.0, ("ex2", 1): None, ("ex3", 0): 0.5}
    overall[("ex3", 1)] = 6.0
    rows = []
    for n, (key, task_type, lang, instruction) in enumerate(examples):
        source = f"images/{key}_source.png"
        for seed in (0, 1):
            value = overall[(key, seed)]
            rows.append(
                {
                    "key": key,
                    "seed": seed,
                    "task_type": task_type,
                    "language": lang,
                    "instruction": instruction,
                    "source": source,
                    "edit": f"images/{key}_seed{seed}.png",
                    "scores": {} if value is None else {"sc": value / 2, "pq": 10 - value},
                    "overall": value,
                    "failure": None
                    if value is not None
                    else {"reason": "unparsable", "message": "<b>no</b>"},
                    "judge": {
                        "answers": {"sc": '{"score": [5], "reasoning": "<img src=x onerror=alert(1)>"}'}
                    },
                }
            )
        for seed, path in enumerate([source, *[r["edit"] for r in rows[-2:]]]):
            if path != missing:
                pixels = np.full((8, 12, 3), 40 * n + 20 * seed, np.uint8)
                Image.fromarray(pixels).save(root / path)
    return rows


class Page(HTMLParser):
    """The parts of the gallery the tests check: image sources, script tags, sortable headers, row ids and the
    text of each row's instruction cell."""

    def __init__(self):
        super().__init__()
        self.imgs, self.scripts, self.headers, self.row_ids, self.instructions, self.root_attrs = (
            [],
            0,
            [],
            [],
            [],
            {},
        )
        self._in, self._text = None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root_attrs = a
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr" and "data-row" in a:
            self.row_ids.append(int(a["data-row"]))
        elif tag == "th" and "data-type" in a:
            self._in, self._text, self._kind = "th", [], a["data-type"]
        elif tag == "td" and a.get("class") == "instr":
            self._in, self._text = "instr", []

    def handle_endtag(self, tag):
        if tag == "th" and self._in == "th":
            self.headers.append(("".join(self._text), self._kind))
            self._in = None
        elif tag == "td" and self._in == "instr":
            self.instructions.append("".join(self._text))
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def gallery(tmp_path: Path, missing: str | None = None) -> tuple[list[dict], Path]:
    rows = make_rows(tmp_path, missing)
    path = tmp_path / "gallery.html"
    write_gallery(rows, summarize(rows, protocol="viescore", meta={"judge": {"model": "<m>"}}), path)
    return rows, path


def test_images_escaping_and_sort_columns(tmp_path):
    rows, path = gallery(tmp_path)
    text = path.read_text()
    page = parse(text)
    assert len(page.imgs) == 2 * len(rows)
    for src in page.imgs:
        assert (tmp_path / unquote(src)).is_file(), src
    assert "ex%201%23a_source.png" in text  # the space and '#' are percent-encoded
    # Only the gallery's two scripts; the instruction, failure message and judge answers stay text.
    assert page.scripts == 2
    assert "<b>no</b>" not in text and "<img src=x" not in text and "&lt;m&gt;" in text
    assert page.instructions[2] == EVIL
    assert page.headers == [
        ("key", "text"),
        ("seed", "num"),
        ("task type", "text"),
        ("language", "text"),
        ("instruction", "text"),
        ("overall", "num"),
        ("pq", "num"),
        ("sc", "num"),
        ("failure", "text"),
    ]
    assert page.row_ids == list(range(len(rows)))
    assert "http://" not in text and "https://" not in text  # opens without a network


def test_missing_images_are_logged(tmp_path, caplog):
    gallery(tmp_path, missing="images/ex2_seed1.png")
    assert "1 images are missing" in caplog.text and "ex2_seed1.png" in caplog.text


# Injected into a copy of the gallery: records script errors, loads the lazy images, then clicks every
# sortable header twice and records the row order after each click on the <html> element.
DRIVER = """<script>
var errors = [];
window.addEventListener('error', function (e) { if (e instanceof ErrorEvent) errors.push(e.message); }, true);
document.addEventListener('DOMContentLoaded', function () {
  var imgs = Array.prototype.slice.call(document.images);
  imgs.forEach(function (i) { i.loading = 'eager'; });
  Promise.all(imgs.map(function (i) {
    return i.complete ? null : new Promise(function (r) {
      i.addEventListener('load', r);
      i.addEventListener('error', r);
    });
  })).then(function () {
    var orders = {};
    var order = function () {
      var trs = document.querySelectorAll('#rows tbody tr');
      return Array.prototype.map.call(trs, function (r) { return +r.dataset.row; });
    };
    document.querySelectorAll('#rows thead th[data-type]').forEach(function (th) {
      th.click(); orders[th.textContent + ' asc'] = order();
      th.click(); orders[th.textContent + ' desc'] = order();
    });
    document.documentElement.dataset.check = JSON.stringify({orders: orders, errors: errors});
  });
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("Chromium is not installed; the gallery's browser test needs it: apt-get install -y chromium")


def open_in_browser(path: Path, tmp_path: Path) -> Page:
    """The DOM of ``path`` with DRIVER injected, after Chromium ran its scripts."""
    checked = path.with_name("check.html")  # next to the gallery: the same relative image paths
    checked.write_text(path.read_text().replace("<head>", "<head>" + DRIVER, 1))
    cmd = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,8000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        checked.as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    page = parse(out.stdout)
    assert "data-check" in page.root_attrs, out.stdout[:2000] + out.stderr[-2000:]
    return page


def expected_order(rows: list[dict], field: str, descending: bool) -> list[int]:
    """Row indices sorted by a numeric field, missing values last either way, ties in page order."""
    present = [i for i, r in enumerate(rows) if r[field] is not None]
    absent = [i for i, r in enumerate(rows) if r[field] is None]
    return sorted(present, key=lambda i: -rows[i][field] if descending else rows[i][field]) + absent


def test_in_headless_chromium_images_load_and_columns_sort(tmp_path):
    rows, path = gallery(tmp_path)
    page = open_in_browser(path, tmp_path)
    attrs = page.root_attrs
    assert (attrs["data-images-loaded"], attrs["data-images-broken"]) == (str(2 * len(rows)), "0")
    check = json.loads(attrs["data-check"])
    assert check["errors"] == []
    orders = check["orders"]
    assert len(orders) == 2 * 9  # every sortable column, both directions
    assert orders["overall asc"] == expected_order(rows, "overall", False) == [4, 1, 5, 0, 2, 3]
    assert orders["overall desc"] == expected_order(rows, "overall", True) == [2, 0, 5, 1, 4, 3]
    sc = [dict(r, sc=r["scores"].get("sc")) for r in rows]
    assert orders["sc desc"] == expected_order(sc, "sc", True)
    # Text in natural order: 'ex 1#a' < 'ex2' < 'ex3'; the failure column puts the failed row first when
    # descending ('' sorts before any reason).
    assert orders["key desc"] == [4, 5, 2, 3, 0, 1]
    assert orders["failure desc"][0] == 3


def test_in_headless_chromium_a_missing_image_is_counted(tmp_path):
    _, path = gallery(tmp_path, missing="images/ex3_seed0.png")
    attrs = open_in_browser(path, tmp_path).root_attrs
    assert (attrs["data-images-loaded"], attrs["data-images-broken"]) == ("11", "1")

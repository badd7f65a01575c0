"""The review report: one self-contained HTML page of a prediction run, for a person to check.

    from cops_deploy.runtime.review import ReviewSummary, write_review
    write_review(
        "results/review.html",
        report.results,                      # scores.json result records
        report.failures,                     # scores.json failure records
        ReviewSummary(model="bundles/mvtec", backend="onnxruntime", precision="fp32"),
        pictures_dir="results",              # where each record's ``visual`` lies
    )

The page holds the run's summary (model, backend, precision, image counts, decision counts,
failures), then a gallery of the results sorted by score, highest first: per image its picture
(image | heatmap | overlay, as the run wrote it), score, decision and threshold, and its defect
regions (bounding box, area, peak and mean score); failed images follow with their reasons.
Buttons filter the gallery by decision (NOT OK, OK, undecided, failed); ``review.html#filter=
not-ok`` opens it filtered.

Self-contained and offline: pictures are embedded as ``data:`` URIs (thumbnails re-encoded as
JPEG, longest side ``thumb_size``, so hundreds of images stay a few MB), CSS and JS are inline,
and a Content-Security-Policy ``<meta>`` forbids every network load and every script or style
but the page's own (by hash), so a file name can never run code: every string from the
records is escaped with :func:`html.escape` as well. Once loaded, the page counts pictures that
did not decode, shows a warning when there are any, and writes the count to ``<body
data-broken-images>`` (a headless browser reads it back in the tests).

Records are the dicts of ``scores.json`` (:mod:`cops_deploy.runtime.predict_files`):

- result: ``source`` (str), ``score`` (finite number); the picture as ``visual`` (a path, under
  ``pictures_dir`` when relative) or ``picture`` (encoded image bytes, e.g. PNG); optional
  ``is_anomalous`` (True: NOT OK, False: OK, None or absent: undecided), ``threshold``,
  ``regions`` (dicts with ``x``, ``y``, ``width``, ``height``, ``area``, ``peak``, ``mean``, as
  ``runtime.regions.Region.to_dict``). Other keys are ignored.
- failure: ``source``, ``reason`` (a code), ``error`` (the message).

A picture that is missing or does not decode does not stop the report: its card says so in
text (no broken image). Torch-free (Pillow only).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cops_deploy.errors import ConfigError
from cops_deploy.fileio import atomic_write_text

__all__ = [
    "DECISIONS",
    "DEFAULT_THUMB_SIZE",
    "REVIEW_FILE",
    "ReviewSummary",
    "decision_of",
    "render_review",
    "write_review",
]

REVIEW_FILE = "review.html"  # the usual name beside scores.json
DEFAULT_THUMB_SIZE = 384  # longest side of an embedded picture, in pixels
# decision key -> label, in the filter buttons' order
DECISIONS: dict[str, str] = {
    "not-ok": "NOT OK",
    "ok": "OK",
    "undecided": "undecided",
    "failed": "failed",
}
_JPEG_QUALITY = 85
_REGION_KEYS = ("x", "y", "width", "height", "area", "peak", "mean")


@dataclass(frozen=True)
class ReviewSummary:
    """What the page's header says about the run (counts come from the records).

    Args:
        model: the bundle path or the model name (and weights) that scored the images.
        backend: e.g. ``onnxruntime``, ``openvino``, ``tensorrt``, ``torch``.
        precision: e.g. ``fp32``, ``fp16``, ``bf16``.
        title: the page title.
        details: more rows for the summary table (e.g. ``{"calibrated": "2026-11-30, fpr 0.01"}``).
    """

    model: str = ""
    backend: str = ""
    precision: str = ""
    title: str = "CoPS review"
    details: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- the page

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:16px;
color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}
table.summary{border-collapse:collapse;margin:8px 0 12px}
table.summary th,table.summary td{border:1px solid #ccc;padding:3px 8px;text-align:left}
.filters button{margin:0 6px 6px 0;padding:4px 10px;border:1px solid #888;border-radius:4px;
background:#fff;cursor:pointer}
.filters button.active{background:#333;color:#fff}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-left:6px solid #999;border-radius:4px;
padding:8px;overflow-wrap:anywhere}
.card[data-decision=not-ok]{border-left-color:#c62828}
.card[data-decision=ok]{border-left-color:#2e7d32}
.card[data-decision=failed]{border-left-color:#6a1b9a}
.card[hidden]{display:none}
.card img{display:block;max-width:100%;height:auto;margin:4px 0}
.badge{display:inline-block;padding:1px 6px;border-radius:3px;font-weight:bold;color:#fff;
background:#777}
.card[data-decision=not-ok] .badge{background:#c62828}
.card[data-decision=ok] .badge{background:#2e7d32}
.card[data-decision=failed] .badge{background:#6a1b9a}
.score{font-size:16px;font-weight:bold;margin-left:6px}
.source{font-family:monospace;font-size:12px;color:#444}
table.regions{border-collapse:collapse;font-size:12px;margin-top:4px}
table.regions th,table.regions td{border:1px solid #ddd;padding:1px 5px;text-align:right}
.missing,.error{color:#6a1b9a;font-family:monospace;font-size:12px}
.warning{background:#fff3cd;border:1px solid #c9a400;padding:6px;margin:8px 0}
"""

# Filter buttons (and #filter=KEY in the address) show the cards of one decision; after load,
# pictures that did not decode are counted into <body data-broken-images> and a warning.
_JS = """
(function () {
  var cards = document.querySelectorAll('.card');
  var buttons = document.querySelectorAll('.filters button');
  function show(key) {
    if (!buttons.length) return;
    var known = false;
    buttons.forEach(function (b) { if (b.dataset.filter === key) known = true; });
    if (!known) key = 'all';
    cards.forEach(function (c) { c.hidden = key !== 'all' && c.dataset.decision !== key; });
    buttons.forEach(function (b) { b.classList.toggle('active', b.dataset.filter === key); });
    document.body.dataset.filter = key;
  }
  buttons.forEach(function (b) {
    b.addEventListener('click', function () {
      show(b.dataset.filter);
      history.replaceState(null, '', '#filter=' + b.dataset.filter);
    });
  });
  var m = /filter=([a-z-]+)/.exec(location.hash);
  show(m ? m[1] : 'all');
  window.addEventListener('load', function () {
    var broken = 0;
    document.querySelectorAll('img').forEach(function (i) {
      if (!i.complete || i.naturalWidth === 0) broken += 1;
    });
    document.body.dataset.brokenImages = String(broken);
    if (broken) {
      var w = document.getElementById('broken');
      w.textContent = broken + ' picture(s) could not be displayed.';
      w.hidden = false;
    }
  });
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No network, no plugins, no frames, no forms; images only as data: URIs; only this page's own
# style and script (by hash), so an injected tag could not run even if escaping failed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; "
    f"style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}; "
    "base-uri 'none'; form-action 'none'"
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def decision_of(record: Mapping[str, Any]) -> str:
    """The decision key of a result record: ``not-ok``, ``ok`` or ``undecided``."""
    verdict = record.get("is_anomalous")
    if verdict is None:
        return "undecided"
    if not isinstance(verdict, bool):
        raise ConfigError(
            f"result {record.get('source')!r}: is_anomalous {verdict!r}; valid: True, False "
            "or None (no threshold). Fix: pass Prediction.is_anomalous."
        )
    return "not-ok" if verdict else "ok"


def _number(record: Mapping[str, Any], key: str, what: str) -> float:
    value = record.get(key)
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    if not real or not math.isfinite(float(value)):
        raise ConfigError(
            f"{what} {record.get('source')!r}: {key} {value!r}; valid: a finite number. Fix: "
            f"pass the {key} the run gave (records as in scores.json)."
        )
    return float(value)


def _source(record: Any, what: str) -> str:
    if not isinstance(record, Mapping) or not isinstance(record.get("source"), str):
        raise ConfigError(
            f"{what} record {record!r}: valid records are dicts with a 'source' string (as "
            "in scores.json). Fix: pass PredictReport.results / .failures."
        )
    return record["source"]


def _thumbnail(data: bytes | Path, thumb_size: int) -> tuple[str | None, str]:
    """(data URI, '') of a downscaled JPEG of the picture, or (None, why it is missing)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
            rgb = img.convert("RGB")
    except FileNotFoundError:
        return None, f"picture {data} is missing"
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return None, f"picture cannot be read: {exc}"
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), ""


def _picture(record: Mapping[str, Any], pictures_dir: Path | None, thumb_size: int) -> str:
    picture = record.get("picture")
    visual = record.get("visual")
    if isinstance(picture, bytes | bytearray):
        uri, why = _thumbnail(bytes(picture), thumb_size)
    elif isinstance(visual, str | os.PathLike):
        path = Path(visual)
        if not path.is_absolute() and pictures_dir is not None:
            path = pictures_dir / path
        uri, why = _thumbnail(path, thumb_size)
    else:
        uri, why = None, "no picture was written"
    if uri is None:
        return f'<p class="missing">{_e(why)}</p>'
    alt = f"result picture of {record['source']}"
    return f'<img src="{uri}" alt="{_e(alt)}" loading="eager">'


def _regions(record: Mapping[str, Any]) -> str:
    regions = record.get("regions")
    if regions is None:
        return ""
    if not isinstance(regions, Sequence) or not all(isinstance(r, Mapping) for r in regions):
        raise ConfigError(
            f"result {record['source']!r}: regions {regions!r}; valid: a list of dicts with "
            f"{list(_REGION_KEYS)}. Fix: pass [region.to_dict() for region in prediction.regions]."
        )
    if not regions:
        return '<p class="regions">no defect region</p>'
    rows = []
    for r in regions:
        missing = [k for k in _REGION_KEYS if k not in r]
        if missing:
            raise ConfigError(
                f"result {record['source']!r}: a region lacks {missing}; valid keys are "
                f"{list(_REGION_KEYS)}. Fix: pass Region.to_dict()."
            )
        rows.append(
            f"<tr><td>{_e(r['x'])},{_e(r['y'])} {_e(r['width'])}&times;{_e(r['height'])}</td>"
            f"<td>{_e(r['area'])}</td><td>{_fmt(r['peak'])}</td><td>{_fmt(r['mean'])}</td></tr>"
        )
    return (
        f'<table class="regions"><tr><th>box (x,y w&times;h)</th><th>area px</th><th>peak</th>'
        f"<th>mean</th></tr>{''.join(rows)}</table>"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{float(value):.4f}"
    return _e(value)


def _result_card(record: Mapping[str, Any], pictures_dir: Path | None, thumb_size: int) -> str:
    decision = decision_of(record)
    score = _number(record, "score", "result")
    threshold = record.get("threshold")
    limit = f" (threshold {_fmt(threshold)})" if threshold is not None else ""
    regions = record.get("regions")
    count = f", {len(regions)} region(s)" if isinstance(regions, Sequence) else ""
    return (
        f'<div class="card" data-decision="{decision}" data-score="{score:.6f}">'
        f'<span class="badge">{_e(DECISIONS[decision])}</span>'
        f'<span class="score">{score:.4f}</span>{limit}{count}'
        f'<div class="source">{_e(record["source"])}</div>'
        f"{_picture(record, pictures_dir, thumb_size)}{_regions(record)}</div>"
    )


def _failure_card(record: Mapping[str, Any]) -> str:
    return (
        '<div class="card" data-decision="failed">'
        f'<span class="badge">failed</span> {_e(record.get("reason", ""))}'
        f'<div class="source">{_e(record["source"])}</div>'
        f'<p class="error">{_e(record.get("error", ""))}</p></div>'
    )


def _summary_table(summary: ReviewSummary, counts: dict[str, int], n_results: int) -> str:
    rows: list[tuple[str, Any]] = [
        ("model", summary.model),
        ("backend", summary.backend),
        ("precision", summary.precision),
        ("images scored", n_results),
        ("failed", counts["failed"]),
        (
            "decisions",
            ", ".join(f"{DECISIONS[k]} {counts[k]}" for k in ("not-ok", "ok", "undecided")),
        ),
        *summary.details.items(),
    ]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v != "")
    return f'<table class="summary">{cells}</table>'


def render_review(
    results: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]] = (),
    summary: ReviewSummary | None = None,
    pictures_dir: str | os.PathLike[str] | None = None,
    thumb_size: int = DEFAULT_THUMB_SIZE,
) -> str:
    """The review page as HTML text (see the module docstring for the records)."""
    if isinstance(thumb_size, bool) or not isinstance(thumb_size, int) or thumb_size < 16:
        raise ConfigError(
            f"thumb_size {thumb_size!r}; valid: an integer >= 16 (pixels of the longest side). "
            f"Fix: pass e.g. {DEFAULT_THUMB_SIZE}."
        )
    summary = summary or ReviewSummary()
    folder = Path(pictures_dir) if pictures_dir is not None else None
    for record in results:
        _source(record, "result")
    ordered = sorted(results, key=lambda r: -_number(r, "score", "result"))
    for record in failures:
        _source(record, "failure")
    counts = {key: 0 for key in DECISIONS}
    for record in ordered:
        counts[decision_of(record)] += 1
    counts["failed"] = len(failures)
    cards = [_result_card(r, folder, thumb_size) for r in ordered]
    cards += [_failure_card(r) for r in failures]
    total = len(ordered) + len(failures)
    buttons = [f'<button type="button" data-filter="all">all ({total})</button>']
    buttons += [
        f'<button type="button" data-filter="{k}">{_e(label)} ({counts[k]})</button>'
        for k, label in DECISIONS.items()
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(summary.title)}</title>\n<style>{_CSS}</style></head>\n"
        f'<body data-broken-images=""><h1>{_e(summary.title)}</h1>\n'
        f"{_summary_table(summary, counts, len(ordered))}\n"
        '<div class="warning" id="broken" hidden></div>\n'
        f'<div class="filters">{"".join(buttons)}</div>\n'
        f'<div class="gallery">{"".join(cards)}</div>\n'
        f"<script>{_JS}</script></body></html>\n"
    )


def write_review(
    path: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]] = (),
    summary: ReviewSummary | None = None,
    pictures_dir: str | os.PathLike[str] | None = None,
    thumb_size: int = DEFAULT_THUMB_SIZE,
) -> Path:
    """Write the review page to ``path`` atomically and return it (see :func:`render_review`)."""
    text = render_review(results, failures, summary, pictures_dir, thumb_size)
    return atomic_write_text(path, text, mode=0o644)  # a report to share, like the pictures

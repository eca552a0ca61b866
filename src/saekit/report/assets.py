"""The inline style and script every report page carries (no file, font or script is fetched:
the site opens from disk and works offline), and small SVG charts."""

from __future__ import annotations

from html import escape

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";color:#999}
.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:16px;flex-wrap:wrap}.card{border:1px solid #ddd;padding:8px 12px}
.card b{display:block;font-size:18px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;margin:2px 0}
.tok{border-radius:2px;margin-right:1px}.tok.sel{outline:1px solid #c40}
.tok:hover{outline:1px solid #000}.val{color:#777;display:inline-block;width:70px}
.charts{display:flex;gap:24px;flex-wrap:wrap}svg text{font-size:10px;fill:#555}
input{padding:4px 8px;width:320px}.muted{color:#777}a{color:#0645ad}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th.sortable').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var desc = th.dataset.dir !== 'desc'; th.dataset.dir = desc ? 'desc' : 'asc';
      var index = Array.prototype.indexOf.call(th.parentNode.children, th);
      rows.sort(function(a, b){
        var x = a.cells[index].dataset.sort, y = b.cells[index].dataset.sort;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return desc ? -c : c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
var search = document.getElementById('search');
if (search) search.addEventListener('input', function(){
  var q = search.value.toLowerCase();
  document.querySelectorAll('#latents tbody tr').forEach(function(r){
    r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
  });
});
// Linkable views: index.html#sort=max_act&q=w3 sorts by a column (descending) and filters.
var params = new URLSearchParams(location.hash.slice(1));
if (search && params.get('q')) {
  search.value = params.get('q'); search.dispatchEvent(new Event('input'));
}
var sortBy = document.querySelector('th[data-col="' + params.get('sort') + '"]');
if (sortBy) sortBy.click();
document.querySelectorAll('.tok').forEach(function(t){
  t.addEventListener('mouseenter', function(){
    var out = document.getElementById('hover');
    var text = JSON.stringify(t.textContent);
    if (out) out.textContent = 'activation ' + t.dataset.act + ' on ' + text;
  });
});
document.body.dataset.ready = '1';
"""


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}<script>{SCRIPT}</script></body></html>\n"
    )


def bar_chart(counts: list[int], *, title: str, x_labels: tuple[str, str], width: int = 360) -> str:
    """An inline SVG bar chart of ``counts`` (bars left to right), the x axis labelled at its
    two ends."""
    height, pad = 140, 20
    n = max(len(counts), 1)
    top = max(max(counts, default=0), 1)
    bar = (width - 2 * pad) / n
    bars = "".join(
        f'<rect x="{pad + i * bar:.1f}" y="{height - pad - c / top * (height - 2 * pad):.1f}"'
        f' width="{max(bar - 1, 1):.1f}" height="{c / top * (height - 2 * pad):.1f}"'
        f' fill="#4a7bd0"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    return (
        f"<figure><figcaption>{escape(title)}</figcaption>"
        f'<svg width="{width}" height="{height}" role="img">{bars}'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"'
        ' stroke="#999"/>'
        f'<text x="{pad}" y="{height - 5}">{escape(x_labels[0])}</text>'
        f'<text x="{width - pad}" y="{height - 5}" text-anchor="end">{escape(x_labels[1])}</text>'
        f'<text x="{pad}" y="12">max {top}</text></svg></figure>'
    )

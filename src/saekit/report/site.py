"""Write a report (:func:`saekit.report.build.report_data`) as a static site: ``index.html``,
one ``latent-ID.html`` per reported latent, ``unrecovered.html`` on synthetic data, and
``report.json``. Every page inlines its style and script; nothing is fetched when it is viewed.

Every number shown also sits in a ``data-value`` attribute (Python's repr of the float), so a
reader or a test can check the page against report.json.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from saekit.core.atomic import replace_directory
from saekit.report.assets import bar_chart, page


def write_site(data: dict[str, Any], out_dir: str | Path) -> Path:
    """Write every page of the report into ``out_dir``, replacing a previous report there
    whole (a directory that holds something else is refused); returns index.html's path."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise ValueError(f"{out} exists and is not a saekit report: give another --out")
    reported = {entry["id"] for entry in data["latents"]}

    def fill(tmp: Path) -> None:
        for entry in data["latents"]:
            (tmp / f"latent-{entry['id']}.html").write_text(latent_page(entry, data, reported))
        if data["summary"].get("synthetic"):
            (tmp / "unrecovered.html").write_text(unrecovered_page(data))
        (tmp / "report.json").write_text(json.dumps(data))
        (tmp / "index.html").write_text(index_page(data))

    return replace_directory(out, fill) / "index.html"


def num(value: float, key: str = "", digits: int = 4) -> str:
    """A number as shown: ``digits`` significant digits, the exact value in data-value."""
    attr = f' data-key="{key}"' if key else ""
    text = f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"
    return f'<span class="n"{attr} data-value="{value!r}">{text}</span>'


def cell(value: Any, shown: str | None = None) -> str:
    classes = ' class="num"' if isinstance(value, (int, float)) else ""
    sort = escape(repr(value) if isinstance(value, float) else str(value))
    text = shown if shown is not None else num(value) if isinstance(value, (int, float)) else value
    return f'<td{classes} data-sort="{sort}">{text}</td>'


def card(label: str, value: Any, key: str) -> str:
    shown = num(value, key) if isinstance(value, (int, float)) else escape(str(value))
    return f'<div class="card">{escape(label)}<b>{shown}</b></div>'


def index_page(data: dict[str, Any]) -> str:
    s = data["summary"]
    cards = "".join(
        [
            card("tokens", s["n_tokens"], "n_tokens"),
            card("FVU", s["fvu"], "fvu"),
            card("L0", s["l0"], "l0"),
            card(f"dead (of {s['d_sae']:,})", s["dead"], "dead"),
            card("dense (> 10% of tokens)", s["dense"], "dense"),
            card("reported latents", s["reported"], "reported"),
        ]
    )
    norms = s.get("decoder_norms")
    cards += "" if norms is None else norm_cards(norms)
    dens = s["density_histogram"]
    charts = bar_chart(
        s["l0_histogram"],
        title="L0: active latents per token",
        x_labels=("0", str(len(s["l0_histogram"]) - 1)),
    ) + bar_chart(
        dens["counts"],
        title=f"latent density, log10 (dead latents apart: {dens['dead']:,})",
        x_labels=(f"1e{dens['lo']:g}", f"1e{dens['hi']:g}"),
    )
    charts += "" if norms is None else norm_chart(norms)
    truth = bool(s.get("synthetic"))
    columns = [("density", "density"), ("max_act", "max act"), ("label", "top tokens")]
    columns += [("truth_feature", "true feature"), ("truth_cos", "|cos|")] * truth
    columns += [] if norms is None else NORM_COLUMNS[norms["kind"]]
    head = "<th>latent</th>" + "".join(
        f'<th class="sortable" data-col="{col}">{name}</th>' for col, name in columns
    )
    rows = []
    for e in data["latents"]:
        link = f'<a href="latent-{e["id"]}.html">{e["id"]}</a>'
        row = cell(e["id"], link) + cell(e["density"]) + cell(e["max_act"])
        row += cell(escape(e["label"]))
        if truth:
            row += cell(e["truth"]["feature"]) + cell(e["truth"]["cos"])
        if norms is not None:
            row += norm_cells(e["decoder_norms"], norms["kind"])
        rows.append(f'<tr data-latent="{e["id"]}">{row}</tr>')
    where = escape(" · ".join(str(s[k]) for k in ("model", "hook", "text") if s.get(k)))
    missed = (
        f'<p><a href="unrecovered.html">{len(data["unrecovered"]):,} true features'
        " no latent recovered</a></p>"
        if truth
        else ""
    )
    body = (
        f'<h1>SAE report: {escape(str(s.get("sae", "")))}</h1><p class="muted">{where}</p>'
        f'<div class="cards">{cards}</div><div class="charts">{charts}</div>{missed}'
        '<h2>Latents</h2><p><input id="search" placeholder="search id or tokens"></p>'
        f'<table id="latents" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return page("SAE report", body)


def token_text(token: int, vocab: dict[str, str]) -> str:
    """A token's text, newlines and tabs made visible; one that decodes to nothing (an id
    past the tokenizer's vocabulary) as #id."""
    text = vocab.get(str(token)) or f"#{token}"
    return escape(text.replace("\n", "\u23ce").replace("\t", "\u21e5"))


def context_html(ctx: dict[str, Any], scale: float, left: int, vocab: dict, synthetic: bool) -> str:
    """One context: tokens shaded by activation / ``scale`` (the latent's max), the value on
    hover (title, data-act); synthetic examples show the matched feature's coefficient."""
    value = f'<span class="val">{num(ctx["value"], "value")}</span>'
    if synthetic:
        return (
            f'<div class="ctx" data-key="{ctx["key"]}">{value}example {ctx["key"]:,}:'
            f" matched true feature coefficient {num(ctx['aux'], 'aux')}</div>"
        )
    spans = []
    for j, (token, act) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True)):
        if token < 0:
            continue
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        sel = " sel" if j == left else ""
        spans.append(
            f'<span class="tok{sel}" data-act="{act!r}" data-alpha="{alpha:.4f}"'
            f' title="{act:.4g}" style="background:rgba(255,102,0,{alpha:.4f})">'
            f"{token_text(token, vocab)}</span>"
        )
    return f'<div class="ctx" data-key="{ctx["key"]}">{value}{"".join(spans)}</div>'


def latent_page(e: dict[str, Any], data: dict[str, Any], reported: set[int]) -> str:
    vocab, left = data["vocab"], data["summary"]["window_left"]
    synthetic = bool(data["summary"].get("synthetic"))
    scale = e["max_act"]
    cards = card("density", e["density"], "density") + card("fired on", e["fired"], "fired")
    cards += card("max activation", e["max_act"], "max_act")
    if synthetic:
        cards += card("true feature", e["truth"]["feature"], "truth_feature")
        cards += card("|cos| with it", e["truth"]["cos"], "truth_cos")
    else:
        cards += card("top tokens", e["label"] or "-", "label")
    top = "".join(context_html(c, scale, left, vocab, synthetic) for c in e["top"])
    bands = "".join(
        f"<h3>band {q['band']} of {q['of']}: {num(q['low'], 'low')} to {num(q['high'], 'high')}"
        f"</h3>" + "".join(context_html(c, scale, left, vocab, synthetic) for c in q["contexts"])
        for q in e["quantiles"]
    )
    hist = e["histogram"]
    chart = bar_chart(
        hist["counts"],
        title="activation histogram (firing tokens)",
        x_labels=("0", f"{hist['hi']:.3g}"),
    )
    logits = ""
    if "logits" in e:
        logits = (
            '<h2>Logit effects (W_dec row · W_U)</h2><div class="charts">'
            + "".join(
                f'<table id="{side}"><thead><tr><th>{side}</th><th>effect</th></tr></thead><tbody>'
                + "".join(
                    f"<tr><td>{token_text(t, vocab)}</td>{cell(v)}</tr>"
                    for t, v in e["logits"][side]
                )
                + "</tbody></table>"
                for side in ("promoted", "suppressed")
            )
            + "</div>"
        )
    neighbours = "".join(
        f"<tr><td>{_latent_link(i, reported)}</td>{cell(c)}</tr>" for i, c in e["neighbours"]
    )
    body = (
        f'<p><a href="index.html">index</a></p><h1>Latent {e["id"]}</h1>'
        f'<div class="cards">{cards}</div><p id="hover" class="muted">hover a token</p>'
        f'<h2>Top activations</h2><div id="top">{top or "<p>never fired</p>"}</div>'
        f'<h2>Quantile samples</h2><div id="quantiles">{bands}</div>'
        f'<div class="charts">{chart}</div>{logits}{norm_section(e, data["summary"])}'
        '<h2>Nearest latents by decoder cosine</h2><table id="neighbours"><tbody>'
        f"{neighbours}</tbody></table>"
    )
    return page(f"latent {e['id']}", body)


def _latent_link(latent: int, reported: set[int]) -> str:
    return f'<a href="latent-{latent}.html">{latent}</a>' if latent in reported else str(latent)


def unrecovered_page(data: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr>{cell(u['feature'])}{cell(u['cos'])}{cell(u['latent'])}</tr>"
        for u in data["unrecovered"]
    )
    body = (
        '<p><a href="index.html">index</a></p><h1>True features no latent recovered</h1>'
        "<p>best |cos| with any decoder row below 0.9</p>"
        '<table id="unrecovered" class="sortable"><thead><tr><th class="sortable">feature</th>'
        '<th class="sortable">best |cos|</th><th class="sortable">its latent</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
    return page("unrecovered true features", body)


NORM_COLUMNS = {
    "source": [("norm_class", "decoder norms"), ("relative_norm", "Δnorm")],
    "target": [("layer", "layer"), ("own_layer_share", "own-layer share")],
}
"""Index columns of a crosscoder ("source") or a cross-layer transcoder ("target")."""


def norm_cells(d: dict[str, Any], kind: str) -> str:
    """A reported latent's decoder-norm cells of the index (a missing value: -)."""
    keys = ("class", "relative_norm") if kind == "source" else ("layer", "own_layer_share")
    values = [d.get(k) for k in keys]
    return "".join(
        cell("-") if v is None else cell(escape(v) if isinstance(v, str) else v) for v in values
    )


def norm_cards(n: dict[str, Any]) -> str:
    """A crosscoder's latent classes by decoder norms; a CLT's zero decoders."""
    if n["kind"] == "target":
        return card("zero decoders", n["zero_decoder"], "zero_decoder")
    cards = card("shared", n["shared"], "shared")
    cards += "".join(
        card(f"only {label}", count, f"only-{j}")
        for j, (label, count) in enumerate(zip(n["labels"], n["only"], strict=True))
    )
    return cards + card("other", n["other"], "other")


def norm_chart(n: dict[str, Any]) -> str:
    """The summary histogram: Δnorm of two sources, or a CLT's own-layer share."""
    if n["kind"] == "target":
        return bar_chart(
            n["own_layer_share_histogram"],
            title="own-layer share of decoder norm (latents of every layer but the last)",
            x_labels=("0: writes to later layers", "1: own layer only"),
        )
    hist = n.get("relative_norm_histogram")
    if hist is None:
        return ""
    a, b = n["labels"]
    return bar_chart(
        hist,
        title="relative decoder norm Δ = ½((‖d_B‖ − ‖d_A‖) / max + 1)",
        x_labels=(f"0: only {a}", f"1: only {b}"),
    )


def norm_section(e: dict[str, Any], summary: dict[str, Any]) -> str:
    """A latent page's decoder norms per source or target layer: a table and its bars."""
    d = e.get("decoder_norms")
    if d is None:
        return ""
    where = "source" if summary["decoder_norms"]["kind"] == "source" else "target layer"
    top = max((v for _, v in d["norms"]), default=0.0) or 1.0
    rows = "".join(
        f'<tr><td>{escape(label)}</td>{cell(value)}<td><svg width="160" height="10">'
        f'<rect width="{160 * value / top:.1f}" height="10" fill="#4a7bd0"/></svg></td></tr>'
        for label, value in d["norms"]
    )
    note = (
        f"class: {escape(d['class'])}"
        if where == "source"
        else f"layer {d['layer']}, latent {d['index']}"
    )
    return (
        f'<h2>Decoder norms per {where}</h2><p class="muted">{note}</p>'
        f'<table id="decoder-norms"><thead><tr><th>{where}</th><th>‖W_dec‖</th><th></th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )

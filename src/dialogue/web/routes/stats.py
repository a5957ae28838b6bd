"""Numbers as pictures, beside the dialogues: the training runs (each one's plot of loss,
learning rate and data mix, drawn from its metrics) and the local model's prefix cache (its
size, and how often a prompt found a saved prefix).

The plots are the service's SVG (`charts.py`), built here from numbers, never a file's markup:
every word in them is escaped, so they go into the page inline, with no script and no request."""
from __future__ import annotations

from typing import Any

from fasthtml.common import (H1, H2, A, APIRouter, Code, Div, Main, NotStr, P, Pre, Section, Small, Table, Tbody, Td, Th,
                             Thead, Title, Tr)
from starlette.requests import Request

from ...service import NotFoundError
from .. import paths
from .. import views as V
from ..common import refuse, site

rt = APIRouter()


def _loss(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _nav(current: str) -> Any:
    return [A(label, href=href, aria_current="page" if label == current else None, cls="secondary small")
            for label, href in (("Dialogues", paths.index), ("Training", paths.training),
                                ("Cache", paths.cache))]


@rt(paths.training)
async def training(req: Request) -> Any:
    runs = site(req).service.training_runs()
    rows = [Tr(Td(A(r.name, href=paths.training_run.to(rid=r.id))), Td(Small(r.path)),
               Td(f"{r.steps:,}" + (f" of {r.total_steps:,}" if r.total_steps else "")),
               Td(f"{_loss(r.first_loss)} → {_loss(r.last_loss)}"),
               Td("finished" if r.finished else "training or stopped"), Td(V._ago(r.updated)))
            for r in runs]
    body = (Table(Thead(Tr(*[Th(h) for h in ("run", "folder", "steps", "loss", "state", "updated")])),
                  Tbody(*rows), cls="runs")
            if rows else P("No training runs yet: ", Code("dialogue train --out DIR ..."),
                           " lists its run here while it trains.", cls="hint"))
    return (Title("training runs · dialogue"), V.topbar(*_nav("Training")),
            Main(H1("Training runs"), body, cls="container page-stats"))


@rt(paths.training_run)
async def training_run(rid: str, req: Request) -> Any:
    try:
        run, svg, summary = site(req).service.training_run(rid)
    except NotFoundError as e:
        return refuse(str(e), 404)
    facts = [(k, v) for k, v in run.config.items() if k in
             ("model", "method", "quant", "r", "alpha", "seq_len", "steps", "batch_size", "final_loss")]
    return (Title(f"{run.name} · training · dialogue"), V.topbar(*_nav("Training")),
            Main(H1(run.name), P(Small(run.path)),
                 Section(NotStr(svg), cls="chart-box"),  # charts.py escapes every word
                 Section(H2("Summary"), Pre("\n".join(summary)) if summary else P("No steps yet.")),
                 Section(H2("Settings"), Table(Tbody(*[Tr(Th(k), Td(str(v))) for k, v in facts])))
                 if facts else "", cls="container page-stats"))


@rt(paths.cache)
async def cache(req: Request) -> Any:
    st = site(req).service.cache_stats()
    used = f"{V._bytes(st.bytes) or '0 B'} of {V._bytes(st.max_bytes)}"
    rate = (f"{st.hit_rate:.0%}" if st.hit_rate is not None else "no lookups yet")
    facts = [("folder", st.root), ("size", f"{used} in {st.entries:,} saved prefixes"),
             ("hit rate", rate + (f" ({st.hits:,} of {st.lookups:,} lookups found a saved prefix)"
                                  if st.lookups else "")),
             ("saved, evicted, damaged", f"{st.saves:,}, {st.evicted:,}, {st.corrupt:,}"),
             ("counted since", V._when(st.since) if st.since else "")]
    models = [Tr(Td(str((ns.get("info") or {}).get("model") or ns["namespace"])), Td(f"{ns['entries']:,}"),
                 Td(V._bytes(ns["bytes"])), Td(f"{ns['longest']:,} tokens")) for ns in st.namespaces]
    return (Title("cache · dialogue"), V.topbar(*_nav("Cache")),
            Main(H1("Local model cache"),
                 P("Saved prompt prefixes of local models: a prompt that starts like an earlier one reads "
                   "only what is new. Counted by every process that uses this cache.", cls="hint"),
                 Table(Tbody(*[Tr(Th(k), Td(v)) for k, v in facts]), cls="cache-facts", id="cache-facts"),
                 Div(H2("By model"), Table(Thead(Tr(Th("model"), Th("prefixes"), Th("size"), Th("longest"))),
                                          Tbody(*models))) if models else "",
                 cls="container page-stats"))

/*
 * The index page: every BOM the caller may see, live, over one stream
 * (BomStream.openOrg: GET /api/enrichment/stream?scope=org). When streams are
 * refused it polls GET /api/enrichment/events?scope=org instead. A BOM gets
 * its row with its first event, also after the page opened. A token, when the
 * gateway needs one, goes in the fragment (#token=...): the admin token shows
 * every BOM, an organization's token that organization's. Optional query
 * parameters as on the monitor: poll_ms, fallback_after, sse_retry_ms.
 * A gateway on per-BOM subscriptions serves no stream of several BOMs; the
 * page then lists the BOMs it holds every 5 s (GET /api/enrichment/boms).
 */
(function () {
  "use strict";

  var LABELS = {
    pending: "Queued",
    enriching: "Enriching",
    completed: "Completed",
    failed: "Failed",
    error: "Failed",
    paused: "Paused",
    stopped: "Stopped",
  };
  // The status an event implies when its state does not say.
  var TYPE_STATUS = {
    "enrichment.started": "enriching",
    "enrichment.completed": "completed",
    "enrichment.failed": "failed",
    "enrichment.error": "failed",
  };
  var FINISHED = { completed: true, failed: true, error: true, stopped: true };
  var LIST_MS = 5000;

  function $(id) {
    return document.getElementById(id);
  }

  function takeToken() {
    var frag = new URLSearchParams(location.hash.replace(/^#/, ""));
    var token = frag.get("token");
    try {
      if (token) {
        history.replaceState(null, "", location.pathname + location.search);
        sessionStorage.setItem("bomstream.token", token);
        return token;
      }
      return sessionStorage.getItem("bomstream.token");
    } catch (err) {
      return token;
    }
  }

  function intParam(params, name, fallback) {
    var v = parseInt(params.get(name) || "", 10);
    return isNaN(v) || v < 0 ? fallback : v;
  }

  function num(v) {
    return typeof v === "number" && isFinite(v) ? v : 0;
  }

  function percentOf(state) {
    if (typeof state.percent_complete === "number") return Math.max(0, Math.min(100, state.percent_complete));
    var total = num(state.total_items);
    if (!total) return 0;
    return (100 * (num(state.enriched_items) + num(state.failed_items) + num(state.not_found_items))) / total;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = text;
    return node;
  }

  function Table() {
    this.rows = new Map();
    this.counts = {};
  }

  Table.prototype.row = function (bomId) {
    var row = this.rows.get(bomId);
    if (row) return row;
    var tr = el("tr");
    tr.dataset.bom = bomId;
    var link = el("a", "mono", bomId);
    link.href = "/monitor?bom=" + encodeURIComponent(bomId);
    var first = el("td", "bom-cell");
    first.appendChild(link);
    var badge = el("span", "badge", "—");
    var second = el("td");
    second.appendChild(badge);
    var bar = el("div", "bar bar-row");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-label", "Progress of " + bomId);
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", "0");
    var fill = el("div", "bar-fill");
    bar.appendChild(fill);
    var line = el("p", "progress-line row-line");
    var pct = el("strong", "pct", "0 %");
    var items = el("span", "muted items", "No parts yet");
    line.appendChild(pct);
    line.appendChild(items);
    var third = el("td", "progress-col");
    third.appendChild(bar);
    third.appendChild(line);
    var updated = el("td", "hide-narrow", "—");
    [first, second, third, updated].forEach(function (td) {
      tr.appendChild(td);
    });
    row = { tr: tr, badge: badge, bar: bar, fill: fill, pct: pct, items: items, updated: updated, status: null };
    this.rows.set(bomId, row);
    // In the document before its first render, so whatever watches the table sees every update.
    $("boms-body").appendChild(tr);
    $("boms").hidden = false;
    return row;
  };

  Table.prototype.render = function (bomId, view) {
    var row = this.row(bomId);
    var ev = view.latestEvent || {};
    var state = view.state || {};
    var status = String(state.status || TYPE_STATUS[ev.event_type] || "enriching");
    this._count(row, status);
    var pct = percentOf(state);
    var shown = pct >= 100 ? 100 : Math.floor(pct);
    var total = num(state.total_items);
    var enriched = num(state.enriched_items);
    var problems = num(state.failed_items) + num(state.not_found_items);
    var text = total ? enriched + " of " + total + " parts enriched" : "No parts yet";
    if (problems) text += ", " + problems + " failed or not found";

    row.tr.dataset.status = status;
    row.tr.dataset.event = ev.event_id || "";
    row.badge.dataset.status = status;
    row.badge.textContent = LABELS[status] || status;
    row.bar.dataset.status = status;
    row.bar.setAttribute("aria-valuenow", String(shown));
    row.bar.setAttribute("aria-valuetext", shown + " percent, " + text);
    row.fill.style.width = pct + "%";
    row.pct.textContent = shown + " %";
    row.items.textContent = text;
    var t = ev.created_at ? Date.parse(ev.created_at) : NaN;
    row.updated.textContent = isNaN(t) ? "—" : new Date(t).toLocaleTimeString("en-GB");
  };

  Table.prototype.remove = function (bomId) {
    var row = this.rows.get(bomId);
    if (!row) return;
    this._count(row, null);
    this.rows.delete(bomId);
    row.tr.remove();
  };

  Table.prototype._count = function (row, status) {
    if (row.status === status) return;
    if (row.status !== null) this.counts[row.status] -= 1;
    if (status !== null) this.counts[status] = (this.counts[status] || 0) + 1;
    row.status = status;
  };

  Table.prototype.summary = function () {
    var n = this.rows.size;
    if (!n) return "No BOMs yet. Events published for a BOM make it appear here.";
    var counts = this.counts;
    var finished = 0;
    Object.keys(counts).forEach(function (status) {
      if (FINISHED[status]) finished += counts[status];
    });
    var parts = [n + (n === 1 ? " BOM" : " BOMs"), (counts.enriching || 0) + " enriching", finished + " finished"];
    return parts.join(" · ") + ".";
  };

  function start() {
    var params = new URLSearchParams(location.search);
    var pollMs = intParam(params, "poll_ms", 3000);
    var table = new Table();
    var refused = null;

    function summarise() {
      if (refused === null) $("boms-summary").textContent = table.summary();
    }

    var token = takeToken();
    var client = BomStream.openOrg({
      token: token,
      pollInterval: pollMs,
      pollFallbackAfter: intParam(params, "fallback_after", 3),
      sseRetryInterval: intParam(params, "sse_retry_ms", 30000),
      onEvent: function (ev, bomId) {
        table.render(bomId, client.bom(bomId));
        summarise();
      },
      onForget: function (bomId) {
        table.remove(bomId);
        summarise();
      },
      onError: function (err, bomId) {
        if (bomId !== null) return; // a job failed: its row says so
        if (err.code === "multi_unavailable") {
          // Per-BOM subscriptions (interest mode, Redis Cluster) serve no
          // stream of several BOMs: list what the gateway holds instead.
          listEvery(LIST_MS, table, token, summarise);
          return;
        }
        refused = err;
        $("boms").hidden = true;
        $("boms-summary").textContent =
          err.code === "unauthorized" || err.code === "forbidden"
            ? "This gateway needs a token: open this page as /#token=<token>, or watch one BOM at /monitor?bom=<id>."
            : "The gateway refused the BOM stream: " + err.message;
      },
      onConnectionChange: function (info) {
        renderConnection(info, pollMs, refused);
        if (info.connected) summarise();
      },
    });
    window.bomstreamClient = client;
  }

  function listEvery(ms, table, token, summarise) {
    var headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    fetch("/api/enrichment/boms", { headers: headers, cache: "no-store" })
      .then(function (resp) {
        return resp.json().then(function (body) {
          return { status: resp.status, body: body };
        });
      })
      .then(
        function (res) {
          if (res.status !== 200) {
            setConn("disconnected", "Disconnected");
            $("boms-summary").textContent =
              "This gateway lists BOMs only to the admin token: open this page as /#token=<admin token>.";
            return;
          }
          res.body.boms.forEach(function (bom) {
            var latest = { event_id: bom.event_id, event_type: bom.event_type, created_at: bom.updated_at };
            table.render(bom.bom_id, { state: bom.state, latestEvent: latest });
          });
          summarise();
          setConn("polling", "Refreshed every " + ms / 1000 + " s");
          setTimeout(listEvery, ms, ms, table, token, summarise);
        },
        function () {
          setConn("disconnected", "Listing · server unreachable");
          setTimeout(listEvery, ms * 2, ms, table, token, summarise);
        }
      );
  }

  function renderConnection(info, pollMs, refused) {
    if (info.mode === "closed") {
      setConn("disconnected", refused ? "Disconnected" : "Closed");
    } else if (info.mode === "polling") {
      if (info.connected) setConn("polling", "Polling every " + (pollMs / 1000).toLocaleString("en", { maximumFractionDigits: 2 }) + " s");
      else setConn("disconnected", "Polling · server unreachable");
    } else if (info.connected) {
      setConn("live", "Live");
    } else if (info.retryCount > 0) {
      setConn("disconnected", "Reconnecting (attempt " + (info.retryCount + 1) + ")");
    } else {
      setConn("connecting", "Connecting…");
    }
  }

  function setConn(kind, text) {
    var node = $("connection");
    if (node.dataset.conn === kind && $("connection-text").textContent === text) return;
    node.dataset.conn = kind;
    $("connection-text").textContent = text;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

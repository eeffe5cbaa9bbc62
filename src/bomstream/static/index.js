/*
 * The index page: every BOM the gateway holds, refreshed every few seconds.
 * Listing needs the admin token (or an open gateway); give it as #token=...
 */
(function () {
  "use strict";

  var REFRESH_MS = 5000;
  var LABELS = { enriching: "Enriching", completed: "Completed", failed: "Failed", pending: "Queued" };

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

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) td.className = className;
    if (text instanceof Node) td.appendChild(text);
    else td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function render(body) {
    var tbody = document.getElementById("boms-body");
    var rows = document.createDocumentFragment();
    body.boms.forEach(function (bom) {
      var state = bom.state || {};
      var tr = document.createElement("tr");
      tr.dataset.bom = bom.bom_id;
      var link = document.createElement("a");
      link.href = "/monitor?bom=" + encodeURIComponent(bom.bom_id);
      link.className = "mono";
      link.textContent = bom.bom_id;
      cell(tr, link);
      var status = String(state.status || bom.event_type || "unknown");
      var badge = document.createElement("span");
      badge.className = "badge";
      badge.dataset.status = status;
      badge.textContent = LABELS[status] || status;
      cell(tr, badge);
      var pct = typeof state.percent_complete === "number" ? Math.floor(state.percent_complete) + " %" : "—";
      cell(tr, pct, "num");
      var processed = (state.enriched_items || 0) + (state.failed_items || 0) + (state.not_found_items || 0);
      cell(tr, state.total_items ? processed + " / " + state.total_items : "—", "num hide-narrow");
      cell(tr, String(bom.streams), "num hide-narrow");
      var t = bom.updated_at ? Date.parse(bom.updated_at) : NaN;
      cell(tr, isNaN(t) ? "—" : new Date(t).toLocaleTimeString("en-GB"), "hide-narrow");
      rows.appendChild(tr);
    });
    tbody.replaceChildren(rows);
    document.getElementById("boms").hidden = body.boms.length === 0;
    var summary = document.getElementById("boms-summary");
    summary.textContent = body.boms.length
      ? "Showing " + body.boms.length + " of " + body.total + " BOMs; refreshed every 5 s."
      : "No BOMs yet. Events published for a BOM make it appear here.";
  }

  function load(token) {
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
          if (res.status === 200) {
            render(res.body);
            setTimeout(load, REFRESH_MS, token);
            return;
          }
          document.getElementById("boms").hidden = true;
          var text = res.status === 401 || res.status === 403
            ? "Listing BOMs needs the admin token: open this page as /#token=<admin token>, or watch one BOM at /monitor?bom=<id>."
            : "The gateway answered " + res.status + ": " + (res.body.error || "error");
          document.getElementById("boms-summary").textContent = text;
        },
        function () {
          document.getElementById("boms-summary").textContent = "The gateway is unreachable; retrying.";
          setTimeout(load, REFRESH_MS * 2, token);
        }
      );
  }

  load(takeToken());
})();

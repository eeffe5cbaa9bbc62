/*
 * The monitor page: /monitor?bom=<id>. Renders what BomStream reports.
 * Optional query parameters: poll_ms (polling interval), fallback_after
 * (failed connects before polling), sse_retry_ms (how often polling tries
 * the stream again). A token, when the gateway needs one, goes in the
 * fragment (#token=...), which the browser never sends to the server; the
 * page removes it from the address bar at once.
 */
(function () {
  "use strict";

  var BOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
  var STATUS_LABELS = {
    waiting: "Waiting for events",
    pending: "Queued",
    enriching: "Enriching",
    completed: "Completed",
    failed: "Failed",
    error: "Failed",
    paused: "Paused",
    stopped: "Stopped",
  };
  var COMPONENT_LABELS = { enriched: "Enriched", failed: "Failed", not_found: "Not found", enriching: "Enriching", pending: "Pending" };

  function $(id) {
    return document.getElementById(id);
  }

  function intParam(params, name, fallback) {
    var v = parseInt(params.get(name) || "", 10);
    return isNaN(v) || v < 0 ? fallback : v;
  }

  function takeToken() {
    var frag = new URLSearchParams(location.hash.replace(/^#/, ""));
    var token = frag.get("token");
    if (token) {
      history.replaceState(null, "", location.pathname + location.search);
      try {
        sessionStorage.setItem("bomstream.token", token);
      } catch (err) {
        // Storage may be disabled; the token then lasts for this page only.
      }
      return token;
    }
    try {
      return sessionStorage.getItem("bomstream.token");
    } catch (err) {
      return null;
    }
  }

  function num(v) {
    return typeof v === "number" && isFinite(v) ? v : 0;
  }

  function duration(ms) {
    var s = Math.max(0, Math.round(ms / 1000));
    var h = Math.floor(s / 3600);
    var m = Math.floor((s % 3600) / 60);
    s = s % 60;
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + s + " s";
    return s + " s";
  }

  function parseTime(text) {
    var t = text ? Date.parse(text) : NaN;
    return isNaN(t) ? null : t;
  }

  function percentOf(state) {
    if (typeof state.percent_complete === "number") return Math.max(0, Math.min(100, state.percent_complete));
    var total = num(state.total_items);
    if (!total) return 0;
    return (100 * (num(state.enriched_items) + num(state.failed_items) + num(state.not_found_items))) / total;
  }

  function start() {
    var params = new URLSearchParams(location.search);
    var bomId = params.get("bom") || "";
    if (!BOM_RE.test(bomId)) {
      $("pick").hidden = false;
      $("pick-bom").value = bomId;
      setConn("closed", "Not connected");
      return;
    }
    document.title = bomId + " · Enrichment monitor";
    $("monitor").hidden = false;
    $("bom-id").textContent = bomId;

    var view = {
      startedAt: null,
      endedAt: null,
      lastStatus: null,
      lastMilestone: 0,
      tick: null,
      componentTotal: 0,
    };
    var pollMs = intParam(params, "poll_ms", 3000);

    var client = BomStream.open({
      bomId: bomId,
      token: takeToken(),
      pollInterval: pollMs,
      pollFallbackAfter: intParam(params, "fallback_after", 3),
      sseRetryInterval: intParam(params, "sse_retry_ms", 30000),
      onEvent: function (ev) {
        var t = parseTime(ev.created_at);
        if (view.startedAt === null) view.startedAt = t !== null ? t : Date.now();
        if (ev.event_type === "enrichment.started" && t !== null) view.startedAt = t;
      },
      onProgress: function (state) {
        renderState(state, view);
      },
      onComponentCompleted: function (comp) {
        addComponent(comp, view);
      },
      onComponentFailed: function (comp) {
        addComponent(comp, view);
      },
      onComplete: function (state) {
        announce(
          "Enrichment completed: " + num(state.enriched_items) + " enriched, " + num(state.failed_items) +
            " failed, " + num(state.not_found_items) + " not found."
        );
      },
      onError: function (err) {
        if (err.code === "job_failed") {
          showAlert("Enrichment failed: " + err.message, false);
        } else {
          showAlert("Connection problem: " + err.message, true);
        }
      },
      onConnectionChange: function (info) {
        renderConnection(client, info, pollMs);
        $("gap").hidden = !info.gaps;
        if (info.mode === "closed") stopTicking(view);
      },
    });
    // The client reports its first state from inside open(), before `client`
    // is assigned; render the connection once more now that it exists.
    renderConnection(client, { mode: client.mode, connected: client.connected, retryCount: client.retryCount }, pollMs);
    window.bomstreamClient = client;

    $("reconnect").addEventListener("click", function () {
      $("alert").hidden = true;
      client.reconnect();
    });
    view.tick = setInterval(function () {
      renderTimes(client.state, view);
    }, 1000);
  }

  function renderConnection(client, info, pollMs) {
    if (!client) return;
    if (info.mode === "closed") {
      if (client.error && client.error.code !== "job_failed") setConn("disconnected", "Disconnected");
      else setConn("closed", "Finished");
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
    var el = $("connection");
    if (el.dataset.conn === kind && $("connection-text").textContent === text) return;
    el.dataset.conn = kind;
    $("connection-text").textContent = text;
  }

  function renderState(state, view) {
    if (!state) return;
    var status = String(state.status || "waiting");
    var pct = percentOf(state);
    var shown = pct >= 100 ? 100 : Math.floor(pct);
    var total = num(state.total_items);
    var enriched = num(state.enriched_items);
    var failed = num(state.failed_items);
    var notFound = num(state.not_found_items);
    var processed = enriched + failed + notFound;
    var pending = typeof state.pending_items === "number" ? state.pending_items : Math.max(0, total - processed);

    var badge = $("status");
    badge.dataset.status = status;
    badge.textContent = STATUS_LABELS[status] || status;
    var bar = $("bar");
    bar.dataset.status = status;
    bar.setAttribute("aria-valuenow", String(shown));
    bar.setAttribute("aria-valuetext", shown + " percent, " + processed + " of " + total + " items");
    $("bar-fill").style.width = pct + "%";
    $("percent").textContent = shown + " %";
    $("items").textContent = total ? processed + " of " + total + " items" : "No items yet";
    $("stage").textContent = state.current_stage || (status === "completed" ? "done" : "—");
    $("batch").textContent =
      state.current_batch != null && state.total_batches ? state.current_batch + " of " + state.total_batches : "—";
    $("count-enriched").textContent = enriched;
    $("count-failed").textContent = failed;
    $("count-not-found").textContent = notFound;
    $("count-pending").textContent = pending;

    var started = parseTime(state.started_at);
    if (started !== null) view.startedAt = started;
    var ended = parseTime(state.completed_at || state.failed_at);
    if (ended !== null) view.endedAt = ended;
    else if (status === "completed" || status === "failed") view.endedAt = view.endedAt || Date.now();

    if (status !== view.lastStatus) {
      if (status === "enriching" && view.lastStatus !== null) announce("Enrichment in progress.");
      else if (status === "enriching") announce("Enrichment in progress, " + shown + " percent.");
      view.lastStatus = status;
    }
    // Announce quarters, not every update: a screen reader cannot keep up with more.
    var milestone = Math.floor(shown / 25) * 25;
    if (status === "enriching" && milestone > view.lastMilestone && milestone < 100) {
      view.lastMilestone = milestone;
      announce(milestone + " percent complete.");
    }
    renderTimes(state, view);
  }

  function renderTimes(state, view) {
    if (!state || view.startedAt === null) return;
    var end = view.endedAt !== null ? view.endedAt : Date.now();
    $("elapsed").textContent = duration(end - view.startedAt);
    var status = state.status;
    if (status === "completed" || status === "failed") {
      $("eta-label").textContent = status === "failed" ? "Failed at" : "Finished at";
      $("eta").textContent = new Date(end).toLocaleTimeString("en-GB");
      return;
    }
    var total = num(state.total_items);
    var processed = num(state.enriched_items) + num(state.failed_items) + num(state.not_found_items);
    var elapsed = Date.now() - view.startedAt;
    if (processed > 0 && total > processed && elapsed > 0) {
      $("eta").textContent = "about " + duration(((total - processed) * elapsed) / processed);
    } else {
      $("eta").textContent = "—";
    }
  }

  function stopTicking(view) {
    if (view.tick !== null) {
      clearInterval(view.tick);
      view.tick = null;
    }
  }

  function addComponent(comp, view) {
    var feed = $("feed");
    var li = document.createElement("li");
    li.dataset.lineItem = comp.line_item_id || "";
    li.dataset.eventId = comp.event_id || "";
    var name = document.createElement("span");
    name.className = "mpn";
    name.textContent = comp.mpn || comp.line_item_id || "(unnamed part)";
    if (comp.manufacturer) {
      var mfr = document.createElement("span");
      mfr.className = "muted";
      mfr.textContent = " · " + comp.manufacturer;
      name.appendChild(mfr);
    }
    var status = String(comp.status || (comp.event_type === "enrichment.component.failed" ? "failed" : "enriched"));
    var badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.status = status;
    badge.textContent = COMPONENT_LABELS[status] || status;
    var detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = describe(comp, status);
    li.appendChild(name);
    li.appendChild(badge);
    li.appendChild(detail);
    feed.insertBefore(li, feed.firstChild);
    while (feed.children.length > 50) feed.removeChild(feed.lastChild);
    view.componentTotal += 1;
    $("feed-empty").hidden = true;
    $("feed-count").textContent = "(" + view.componentTotal + " received)";
  }

  function describe(comp, status) {
    var parts = [];
    var data = comp.enrichment_data || {};
    if (status === "enriched") {
      if (data.supplier) parts.push(data.supplier);
      if (typeof data.price === "number") parts.push("$" + data.price.toFixed(data.price < 1 ? 4 : 2));
      if (typeof data.stock === "number") parts.push(data.stock.toLocaleString("en") + " in stock");
      if (data.lifecycle_status) parts.push(data.lifecycle_status);
    } else if (comp.error_message) {
      parts.push(comp.error_message);
    }
    var t = parseTime(comp.updated_at);
    if (t !== null) parts.push(new Date(t).toLocaleTimeString("en-GB"));
    return parts.join(" · ");
  }

  function showAlert(text, canReconnect) {
    $("alert-text").textContent = text;
    $("reconnect").hidden = !canReconnect;
    $("alert").hidden = false;
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

/*
 * bomstream.js: the browser client for one BOM. Include
 * /static/bomstream-connection.js before it. No build step, no dependencies.
 *
 *   const client = BomStream.open({ bomId: "bom-1", onProgress: (state) => ... });
 *   client.state       latest EnrichmentState (or null)
 *   client.components  latest 50 component updates, newest first
 *   client.mode        "sse" | "polling" | "closed"
 *   client.connected   true while a stream is open or the last poll succeeded
 *   client.retryCount  failed connects in a row
 *   client.reconnect() / client.close()
 *
 * It closes itself for good when the job ends. Several BOMs on one connection:
 * BomStream.openMany / openOrg in bomstream-many.js.
 */
(function (global) {
  "use strict";

  var BomStream = global.BomStream;
  if (!BomStream || !BomStream._parts) {
    throw new Error("bomstream.js needs /static/bomstream-connection.js included before it");
  }
  var parts = BomStream._parts;
  var Engine = parts.Engine;
  var bomStreamError = parts.bomStreamError;
  var query = parts.query;
  var POLL_LIMIT = parts.POLL_LIMIT;
  var MAX_COMPONENTS = 50;
  // Ids remembered per BOM for dropping duplicates; far more than one buffer replays.
  var SEEN_IDS = 5000;

  // -- one BOM: what its events say, and the callbacks they fire -------------

  function BomView(bomId, call) {
    this.bomId = bomId;
    this.state = null;
    this.components = [];
    this.latestEvent = null;
    this.eventCount = 0;
    this.error = null;
    // The latest event is terminal (a new enrichment.started clears it).
    this.finished = false;
    this.finishReason = null;
    this.gaps = 0;
    this._call = call;
    this._seen = new Set();
    this._seenOrder = [];
  }

  // Applies one event unless its id was applied before; says whether it was applied.
  BomView.prototype.apply = function (ev, id, terminalTypes) {
    if (id) {
      if (this._seen.has(id)) return false;
      this._seen.add(id);
      this._seenOrder.push(id);
      if (this._seenOrder.length > SEEN_IDS) this._seen.delete(this._seenOrder.shift());
    }
    var call = this._call;
    var type = ev.event_type;
    this.latestEvent = ev;
    this.eventCount += 1;
    if (ev.state && typeof ev.state === "object") this.state = ev.state;
    call("onEvent", ev);
    if (type === "enrichment.started") {
      this.finished = false;
      this.finishReason = null;
      call("onStarted", this.state);
    }
    if (ev.component && typeof ev.component === "object") {
      var comp = Object.assign({}, ev.component, {
        event_id: id,
        event_type: type,
        updated_at: ev.component.updated_at || ev.created_at || null,
      });
      this.components.unshift(comp);
      if (this.components.length > MAX_COMPONENTS) this.components.length = MAX_COMPONENTS;
      if (type === "enrichment.component.failed") call("onComponentFailed", comp);
      else call("onComponentCompleted", comp);
    }
    if (ev.state) call("onProgress", this.state);
    if (type === "enrichment.completed") call("onComplete", this.state);
    if (type === "enrichment.failed" || type === "enrichment.error") {
      var st = this.state || {};
      var payload = ev.payload || {};
      this.error = bomStreamError(
        "job_failed",
        st.error_message || payload.error || payload.message || "enrichment " + type.split(".")[1],
        { event: ev, bomId: this.bomId }
      );
      call("onError", this.error);
    }
    if (terminalTypes.indexOf(type) >= 0) {
      this.finished = true;
      this.finishReason = type;
    }
    return true;
  };

  // -- one BOM: BomStream.open ------------------------------------------------

  function Client(opts) {
    if (!opts || !opts.bomId) throw new TypeError("BomStream.open needs a bomId");
    this.bomId = String(opts.bomId);
    this._init(opts);
    var self = this;
    this.view = new BomView(this.bomId, function (name, arg) {
      // A job failure is the client's error too, already when onError runs.
      if (name === "onError") self.error = arg;
      self._call(name, arg);
    });
    this._connectSse();
  }

  Object.assign(Client.prototype, Engine);
  ["state", "components", "latestEvent"].forEach(function (name) {
    Object.defineProperty(Client.prototype, name, {
      get: function () {
        return this.view[name];
      },
    });
  });

  // A 400 is left to retry: the single-BOM poll always behaved so.
  Client.prototype._fatalStatus = [401, 403];

  Client.prototype._url = function (kind, params) {
    return this.baseUrl + "/api/enrichment/" + kind + "/" + encodeURIComponent(this.bomId) + query(params);
  };

  Client.prototype._streamUrl = function (creds) {
    return this._url("stream", { token: creds.token, ticket: creds.ticket, last_event_id: this.lastEventId });
  };

  Client.prototype._pollUrl = function () {
    return this._url("events", { after: this.lastEventId, limit: POLL_LIMIT });
  };

  Client.prototype._ticketRequest = function () {
    return { bom_id: this.bomId };
  };

  Client.prototype._onConnected = function (data) {
    if (data.resumed === false && this.lastEventId) {
      this.gaps += 1;
      this._notify();
    }
  };

  Client.prototype._endsWith = function (reason) {
    return this.terminalTypes.indexOf(reason) >= 0;
  };

  Client.prototype._onMessage = function (ev, sseId) {
    var id = ev.event_id || sseId;
    if (!this.view.apply(ev, id, this.terminalTypes)) return;
    if (id) this.lastEventId = id;
    this.eventCount += 1;
    if (this.view.finished) this._finish(this.view.finishReason);
  };

  Client.prototype._applyPage = function (page) {
    if (page.resumed === false && this.lastEventId && page.events.length) this.gaps += 1;
    var events = page.events || [];
    for (var i = 0; i < events.length && this.mode === "polling"; i++) {
      this._onMessage(events[i], null);
    }
    if (this.mode !== "polling") return;
    if (page.last_event_id) this.lastEventId = page.last_event_id;
    if (!events.length && page.state && !this.view.state) {
      this.view.state = page.state;
      this._call("onProgress", page.state);
    }
    if (page.terminal) {
      var last = this.view.latestEvent;
      this._finish(last && last.event_type ? last.event_type : "terminal");
    } else {
      this._pollAgain(events.length >= POLL_LIMIT);
    }
  };

  BomStream.open = function (opts) {
    return new Client(opts);
  };
  parts.BomView = BomView;
})(typeof window !== "undefined" ? window : this);

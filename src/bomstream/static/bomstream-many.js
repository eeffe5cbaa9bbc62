/*
 * bomstream-many.js: several BOMs on one connection. Include it after
 * /static/bomstream-connection.js and /static/bomstream.js.
 *
 *   const client = BomStream.openMany({ bomIds: ["bom-1", "bom-2"],
 *                                       onProgress: (state, bomId) => ... });
 *   const org = BomStream.openOrg({ onProgress: (state, bomId) => ... });
 *   client.boms        Map of BOM id -> { state, components, latestEvent, finished, ... }
 *   client.bom(id)     one of them
 *   client.bomIds      the BOMs listed (openMany) or seen so far (openOrg)
 *   client.mode, connected, retryCount, gaps, lastEventId, duplicates
 *   client.reconnect() / client.close()
 *
 * Options and callbacks are BomStream.open's. Each BOM callback gets what it
 * gets there, then the BOM id, so a handler written for one BOM works as it
 * is. onConnectionChange is about the one connection and gets no BOM id;
 * onError gets null for a connection error.
 *
 * One EventSource carries every BOM. Its `id:` is a cursor over all of them,
 * kept in lastEventId and sent back on every reopen and poll; an event whose
 * event_id its BOM has already applied is dropped as well. openMany closes
 * for good once every listed BOM is finished; openOrg stays open.
 */
(function (global) {
  "use strict";

  var BomStream = global.BomStream;
  if (!BomStream || !BomStream._parts || !BomStream._parts.BomView) {
    throw new Error("bomstream-many.js needs bomstream-connection.js and bomstream.js included before it");
  }
  var parts = BomStream._parts;
  var BomView = parts.BomView;
  var query = parts.query;
  var POLL_LIMIT = parts.POLL_LIMIT;
  // Beyond this many BOMs an org client forgets the finished one updated
  // longest ago, so a page left open for days keeps a bounded memory.
  var DEFAULT_MAX_BOMS = 500;

  function ManyClient(opts, scope) {
    opts = opts || {};
    this.scope = scope;
    if (scope) {
      this._listed = null;
    } else {
      if (!Array.isArray(opts.bomIds) || !opts.bomIds.length) {
        throw new TypeError("BomStream.openMany needs a non-empty bomIds array");
      }
      // The gateway refuses a repeated id; asking twice for one BOM means once.
      this._listed = Array.from(new Set(opts.bomIds.map(String)));
    }
    this._init(opts, ["onForget"]);
    this.maxBoms = !scope ? Infinity : opts.maxBoms == null ? DEFAULT_MAX_BOMS : opts.maxBoms;
    this.boms = new Map();
    // Events dropped because their BOM had applied their event_id already.
    this.duplicates = 0;
    this._seq = 0;
    (this._listed || []).forEach(this._add, this);
    this._connectSse();
  }

  Object.assign(ManyClient.prototype, parts.Engine);

  Object.defineProperty(ManyClient.prototype, "bomIds", {
    get: function () {
      return Array.from(this.boms.keys());
    },
  });

  // A refused list (too many, repeated or malformed ids, a bad scope) stays
  // refused however often it is asked.
  ManyClient.prototype._fatalStatus = [400, 401, 403];

  ManyClient.prototype.bom = function (bomId) {
    return this.boms.get(String(bomId));
  };

  ManyClient.prototype._add = function (bomId) {
    var self = this;
    var view = new BomView(bomId, function (name, arg) {
      self._call(name, arg, bomId);
    });
    view.touched = 0;
    this.boms.set(bomId, view);
    return view;
  };

  ManyClient.prototype._viewFor = function (bomId) {
    var view = this.boms.get(bomId);
    if (view || !this.scope) return view || null;
    view = this._add(bomId);
    if (this.boms.size > this.maxBoms) this._forgetOne(view);
    return view;
  };

  ManyClient.prototype._forgetOne = function (keep) {
    var oldest = null;
    this.boms.forEach(function (view) {
      if (view !== keep && view.finished && (!oldest || view.touched < oldest.touched)) oldest = view;
    });
    if (oldest) {
      this.boms.delete(oldest.bomId);
      this._call("onForget", oldest.bomId);
    }
  };

  ManyClient.prototype._which = function (extra) {
    var params = this.scope ? { scope: this.scope } : { bom_id: this._listed };
    return Object.assign(params, extra);
  };

  ManyClient.prototype._streamUrl = function (creds) {
    var params = this._which({ token: creds.token, ticket: creds.ticket, last_event_id: this.lastEventId });
    return this.baseUrl + "/api/enrichment/stream" + query(params);
  };

  ManyClient.prototype._pollUrl = function () {
    var params = this._which({ after: this.lastEventId, limit: POLL_LIMIT });
    return this.baseUrl + "/api/enrichment/events" + query(params);
  };

  ManyClient.prototype._ticketRequest = function () {
    return this.scope ? { scope: this.scope } : { bom_ids: this._listed.slice() };
  };

  // A terminal event ends one BOM, never the connection.
  ManyClient.prototype._endsWith = function () {
    return false;
  };

  ManyClient.prototype._onConnected = function (data) {
    if (this.lastEventId) this._countGaps(data);
  };

  ManyClient.prototype._countGaps = function (answer) {
    // BOMs whose place the gateway could not find get a snapshot instead of
    // what they missed: their state is current, their feed may have holes.
    var gaps = Array.isArray(answer.gaps) ? answer.gaps : [];
    if (!gaps.length && answer.resumed !== false) return;
    gaps.forEach(function (bomId) {
      var view = this.boms.get(bomId);
      if (view) view.gaps += 1;
    }, this);
    this.gaps += gaps.length || 1;
    this._notify();
  };

  ManyClient.prototype._onMessage = function (ev, cursor) {
    // The cursor moves past every event, applied or dropped.
    if (cursor) this.lastEventId = cursor;
    var view = typeof ev.bom_id === "string" && ev.bom_id ? this._viewFor(ev.bom_id) : null;
    if (!view) return;
    view.touched = ++this._seq;
    if (!view.apply(ev, ev.event_id || null, this.terminalTypes)) {
      this.duplicates += 1;
      return;
    }
    this.eventCount += 1;
    if (view.finished) this._closeIfAllFinished();
  };

  ManyClient.prototype._closeIfAllFinished = function () {
    if (this.scope) return false;
    var open = false;
    this.boms.forEach(function (view) {
      if (!view.finished) open = true;
    });
    if (!open) this._finish("finished");
    return !open;
  };

  ManyClient.prototype._applyPage = function (page) {
    var events = page.events || [];
    if (this.lastEventId) this._countGaps(page);
    for (var i = 0; i < events.length && this.mode === "polling"; i++) {
      this._onMessage(events[i], null);
    }
    if (this.mode !== "polling") return;
    if (page.cursor != null && page.cursor !== "") this.lastEventId = String(page.cursor);
    var full = events.length >= POLL_LIMIT;
    if (!full && Array.isArray(page.finished)) {
      // Caught up: the gateway's word on which BOMs are finished also covers
      // terminal types this page was not told about.
      page.finished.forEach(function (bomId) {
        var view = this.boms.get(bomId);
        if (view && !view.finished) {
          view.finished = true;
          view.finishReason = (view.latestEvent && view.latestEvent.event_type) || "terminal";
        }
      }, this);
    }
    if (!this._closeIfAllFinished()) this._pollAgain(full);
  };

  BomStream.openMany = function (opts) {
    return new ManyClient(opts, null);
  };
  BomStream.openOrg = function (opts) {
    return new ManyClient(opts, "org");
  };
})(typeof window !== "undefined" ? window : this);

/*
 * bomstream.js: the browser client for the bomstream gateway. No build step,
 * no dependencies.
 *
 *   const client = BomStream.open({ bomId: "bom-1", onProgress: (state) => ... });
 *   client.state       latest EnrichmentState (or null)
 *   client.components  latest 50 component updates, newest first
 *   client.mode        "sse" | "polling" | "closed"
 *   client.connected   true while a stream is open or the last poll succeeded
 *   client.retryCount  failed connects in a row
 *   client.reconnect() / client.close()
 *
 * It listens with EventSource and lets the browser reconnect natively (which
 * sends Last-Event-ID, so the gateway replays what was missed). After
 * `pollFallbackAfter` failed connects in a row it polls the events endpoint
 * instead, and tries the stream again every `sseRetryInterval` ms. It closes
 * itself for good when the job ends, so a finished page stays quiet.
 */
(function (global) {
  "use strict";

  var KNOWN_TYPES = [
    "enrichment.started",
    "enrichment.progress",
    "enrichment.component.completed",
    "enrichment.component.failed",
    "enrichment.completed",
    "enrichment.failed",
    "enrichment.error",
  ];
  var DEFAULT_TERMINAL = ["enrichment.completed", "enrichment.failed", "enrichment.error"];
  // stream_end reasons after which the stream must not be reopened.
  var FATAL_REASONS = { forbidden: true, token_expired: true };
  var MAX_COMPONENTS = 50;
  // Ids remembered for dropping duplicates; far more than one buffer replays.
  var SEEN_IDS = 5000;
  var POLL_LIMIT = 100;

  function noop() {}

  function bomStreamError(code, message, extra) {
    var err = new Error(message);
    err.code = code;
    if (extra) {
      Object.keys(extra).forEach(function (k) {
        err[k] = extra[k];
      });
    }
    return err;
  }

  function resolveCredential(value) {
    // A credential may be a string or a function returning a string or a
    // promise of one (a fresh single-use ticket, a refreshed token).
    return Promise.resolve(typeof value === "function" ? value() : value);
  }

  function Client(opts) {
    if (!opts || !opts.bomId) throw new TypeError("BomStream.open needs a bomId");
    this.bomId = String(opts.bomId);
    this.baseUrl = String(opts.baseUrl || "").replace(/\/+$/, "");
    this.pollFallbackAfter = opts.pollFallbackAfter == null ? 3 : opts.pollFallbackAfter;
    this.pollInterval = opts.pollInterval == null ? 3000 : opts.pollInterval;
    this.sseRetryInterval = opts.sseRetryInterval == null ? 30000 : opts.sseRetryInterval;
    this.terminalTypes = (opts.terminalTypes || DEFAULT_TERMINAL).slice();
    this.eventTypes = KNOWN_TYPES.concat(opts.eventTypes || []);
    this._opts = opts;
    this._cb = {};
    [
      "onStarted",
      "onProgress",
      "onComponentCompleted",
      "onComponentFailed",
      "onComplete",
      "onError",
      "onEvent",
      "onConnectionChange",
    ].forEach(function (name) {
      this._cb[name] = typeof opts[name] === "function" ? opts[name] : noop;
    }, this);

    this.state = null;
    this.components = [];
    this.latestEvent = null;
    this.lastEventId = opts.lastEventId || null;
    this.mode = "sse";
    this.connected = false;
    this.retryCount = 0;
    this.error = null;
    this.eventCount = 0;
    // Reconnects whose Last-Event-ID the gateway no longer held: updates
    // may have been missed (the state is still current).
    this.gaps = 0;
    this.finishReason = null;

    this._seen = new Set();
    this._seenOrder = [];
    this._es = null;
    this._timer = null;
    this._sseRetryTimer = null;
    this._poller = null;
    this._expectReconnect = false;
    this._trial = false;
    this._pollOk = false;
    this._generation = 0;
    this._connectSse();
  }

  Client.prototype._call = function (name, arg) {
    try {
      this._cb[name](arg);
    } catch (err) {
      // A failing callback must not break the stream; surface it for debugging.
      setTimeout(function () {
        throw err;
      });
    }
  };

  Client.prototype._notify = function () {
    // While polling, a trial of the stream stays out of sight until it opens:
    // the page keeps showing the polling it still relies on instead of
    // flickering to "reconnecting" every few seconds.
    var trial = this._trial && this.mode === "sse" && !this.connected;
    this._call("onConnectionChange", {
      mode: trial ? "polling" : this.mode,
      connected: trial ? this._pollOk : this.connected,
      retryCount: this.retryCount,
      gaps: this.gaps,
    });
  };

  Client.prototype._url = function (kind, params) {
    var q = Object.keys(params)
      .filter(function (k) {
        return params[k] != null && params[k] !== "";
      })
      .map(function (k) {
        return encodeURIComponent(k) + "=" + encodeURIComponent(params[k]);
      })
      .join("&");
    return (
      this.baseUrl + "/api/enrichment/" + kind + "/" + encodeURIComponent(this.bomId) + (q ? "?" + q : "")
    );
  };

  Client.prototype._clearTimers = function () {
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._sseRetryTimer);
    this._sseRetryTimer = null;
    if (this._poller) {
      this._poller.abort();
      this._poller = null;
    }
  };

  Client.prototype._dropStream = function () {
    if (this._es) {
      this._es.close();
      this._es = null;
    }
  };

  // -- SSE ------------------------------------------------------------------

  Client.prototype._connectSse = function () {
    var self = this;
    var generation = ++this._generation;
    this._clearTimers();
    this._dropStream();
    this.mode = "sse";
    this.connected = false;
    this._expectReconnect = false;
    this._notify();
    var opts = this._opts;
    Promise.all([resolveCredential(opts.token), resolveCredential(opts.ticket)]).then(
      function (creds) {
        if (generation !== self._generation) return;
        // EventSource cannot send headers, so the credential rides in the query
        // (the gateway's access log redacts it). last_event_id resumes a stream
        // opened anew; the browser's own reconnects send the Last-Event-ID header.
        var url = self._url("stream", {
          token: creds[1] ? null : creds[0],
          ticket: creds[1],
          last_event_id: self.lastEventId,
        });
        self._openEventSource(url);
      },
      function (err) {
        if (generation !== self._generation) return;
        self._fail(bomStreamError("credential", "could not get a credential: " + err));
      }
    );
  };

  Client.prototype._openEventSource = function (url) {
    var self = this;
    var es = new EventSource(url, { withCredentials: !!this._opts.withCredentials });
    this._es = es;
    es.onopen = function () {
      if (es !== self._es) return;
      self.connected = true;
      self.retryCount = 0;
      self.error = null;
      self._trial = false;
      self._notify();
    };
    es.addEventListener("connected", function (msg) {
      if (es !== self._es) return;
      var data = safeParse(msg.data);
      if (data && data.resumed === false && self.lastEventId) {
        self.gaps += 1;
        self._notify();
      }
    });
    this.eventTypes.forEach(function (type) {
      es.addEventListener(type, function (msg) {
        if (es !== self._es) return;
        var ev = safeParse(msg.data);
        if (ev && typeof ev === "object") self._handleEvent(ev, msg.lastEventId);
      });
    });
    es.addEventListener("stream_end", function (msg) {
      if (es !== self._es) return;
      var data = safeParse(msg.data) || {};
      self._onStreamEnd(String(data.reason || ""));
    });
    // The native "error" event: a dropped or refused connection.
    es.onerror = function () {
      if (es !== self._es) return;
      self._onSseError(es);
    };
  };

  Client.prototype._onStreamEnd = function (reason) {
    if (this.terminalTypes.indexOf(reason) >= 0) {
      this._finish(reason);
    } else if (reason === "token_expired" && typeof this._opts.token === "function") {
      // A refreshable token: get a new one and open a fresh stream.
      this._connectSse();
    } else if (FATAL_REASONS[reason]) {
      this._fail(bomStreamError(reason, "the gateway ended the stream: " + reason));
    } else {
      // max_duration, server_shutdown, slow_consumer: the browser reconnects by
      // itself with Last-Event-ID, which is not a failure.
      this._expectReconnect = true;
    }
  };

  Client.prototype._onSseError = function (es) {
    this.connected = false;
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (a refused request: 4xx/5xx, wrong type, 204).
      this._dropStream();
      this.retryCount += 1;
      if (this._trial || this.retryCount >= this.pollFallbackAfter) {
        this._startPolling();
      } else {
        this._schedule(this._connectSse, backoff(this.retryCount, 500, 8000));
      }
    } else if (this._expectReconnect) {
      this._expectReconnect = false;
    } else {
      this.retryCount += 1;
      if (this._trial || this.retryCount >= this.pollFallbackAfter) {
        this._dropStream();
        this._startPolling();
        return;
      }
    }
    this._notify();
  };

  // -- polling --------------------------------------------------------------

  Client.prototype._startPolling = function () {
    this._clearTimers();
    this._dropStream();
    var afterTrial = this._trial;
    this._trial = false;
    this.mode = "polling";
    // Back from a failed trial, the last poll's outcome still holds.
    this.connected = afterTrial ? this._pollOk : false;
    this._pollFailures = 0;
    this._notify();
    this._poll();
    if (this.sseRetryInterval > 0) {
      var self = this;
      this._sseRetryTimer = setTimeout(function () {
        // Try the stream again; a single failure returns to polling at once.
        self._trial = true;
        self._connectSse();
      }, this.sseRetryInterval);
    }
  };

  Client.prototype._poll = function () {
    var self = this;
    var generation = this._generation;
    var opts = this._opts;
    var controller = new AbortController();
    this._poller = controller;
    resolveCredential(opts.token)
      .then(function (token) {
        var headers = { Accept: "application/json" };
        if (token) headers.Authorization = "Bearer " + token;
        var url = self._url("events", { after: self.lastEventId, limit: POLL_LIMIT });
        return fetch(url, {
          headers: headers,
          cache: "no-store",
          credentials: opts.withCredentials ? "include" : "same-origin",
          signal: controller.signal,
        });
      })
      .then(function (resp) {
        if (resp.status === 401 || resp.status === 403) {
          return resp.json().then(
            function (body) {
              throw bomStreamError(resp.status === 401 ? "unauthorized" : "forbidden", body.error, {
                fatal: true,
              });
            },
            function () {
              throw bomStreamError("http_" + resp.status, "HTTP " + resp.status, { fatal: true });
            }
          );
        }
        if (!resp.ok) throw bomStreamError("http_" + resp.status, "poll failed: HTTP " + resp.status);
        return resp.json();
      })
      .then(function (page) {
        if (generation !== self._generation || self.mode !== "polling") return;
        self._poller = null;
        self._pollFailures = 0;
        self._pollOk = true;
        if (!self.connected) {
          self.connected = true;
          self._notify();
        }
        self._applyPage(page);
      })
      .catch(function (err) {
        if (generation !== self._generation || self.mode !== "polling") return;
        if (err && err.name === "AbortError") return;
        self._poller = null;
        if (err && err.fatal) {
          self._fail(err);
          return;
        }
        self._pollFailures += 1;
        self._pollOk = false;
        if (self.connected) {
          self.connected = false;
          self._notify();
        }
        self._schedule(self._poll, backoff(self._pollFailures, self.pollInterval, 30000));
      });
  };

  Client.prototype._applyPage = function (page) {
    if (page.resumed === false && this.lastEventId && page.events.length) this.gaps += 1;
    var events = page.events || [];
    for (var i = 0; i < events.length && this.mode === "polling"; i++) {
      this._handleEvent(events[i], null);
    }
    if (this.mode !== "polling") return;
    if (page.last_event_id) this.lastEventId = page.last_event_id;
    if (!events.length && page.state && !this.state) {
      this.state = page.state;
      this._call("onProgress", this.state);
    }
    if (page.terminal) {
      var last = this.latestEvent;
      this._finish(last && last.event_type ? last.event_type : "terminal");
    } else if (events.length >= POLL_LIMIT) {
      this._schedule(this._poll, 0);
    } else {
      this._schedule(this._poll, this.pollInterval);
    }
  };

  // -- events ---------------------------------------------------------------

  Client.prototype._handleEvent = function (ev, sseId) {
    var id = ev.event_id || sseId;
    if (id) {
      if (this._seen.has(id)) return;
      this._seen.add(id);
      this._seenOrder.push(id);
      if (this._seenOrder.length > SEEN_IDS) this._seen.delete(this._seenOrder.shift());
      this.lastEventId = id;
    }
    var type = ev.event_type;
    this.latestEvent = ev;
    this.eventCount += 1;
    if (ev.state && typeof ev.state === "object") this.state = ev.state;
    this._call("onEvent", ev);
    if (type === "enrichment.started") this._call("onStarted", this.state);
    if (ev.component && typeof ev.component === "object") {
      var comp = Object.assign({}, ev.component, {
        event_id: id,
        event_type: type,
        updated_at: ev.component.updated_at || ev.created_at || null,
      });
      this.components.unshift(comp);
      if (this.components.length > MAX_COMPONENTS) this.components.length = MAX_COMPONENTS;
      if (type === "enrichment.component.failed") this._call("onComponentFailed", comp);
      else this._call("onComponentCompleted", comp);
    }
    if (ev.state) this._call("onProgress", this.state);
    if (type === "enrichment.completed") this._call("onComplete", this.state);
    if (type === "enrichment.failed" || type === "enrichment.error") {
      var st = this.state || {};
      var payload = ev.payload || {};
      this.error = bomStreamError(
        "job_failed",
        st.error_message || payload.error || payload.message || "enrichment " + type.split(".")[1],
        { event: ev }
      );
      this._call("onError", this.error);
    }
    if (this.terminalTypes.indexOf(type) >= 0) this._finish(type);
  };

  // -- lifecycle ------------------------------------------------------------

  Client.prototype._schedule = function (fn, ms) {
    var self = this;
    clearTimeout(this._timer);
    this._timer = setTimeout(function () {
      self._timer = null;
      fn.call(self);
    }, ms);
  };

  Client.prototype._finish = function (reason) {
    if (this.mode === "closed") return;
    this._generation += 1;
    this._clearTimers();
    this._dropStream();
    this.mode = "closed";
    this.connected = false;
    this.finishReason = reason;
    this._notify();
  };

  Client.prototype._fail = function (err) {
    this.error = err;
    this._finish(err.code || "error");
    this._call("onError", err);
  };

  Client.prototype.close = function () {
    this._finish("closed");
  };

  Client.prototype.reconnect = function () {
    this.finishReason = null;
    this.error = null;
    this.retryCount = 0;
    this._trial = false;
    this._connectSse();
  };

  function safeParse(text) {
    try {
      return JSON.parse(text);
    } catch (err) {
      return null;
    }
  }

  function backoff(attempt, base, cap) {
    // Exponential with jitter, so many pages do not retry in step.
    var ms = Math.min(cap, base * Math.pow(2, Math.max(0, attempt - 1)));
    return Math.round(ms * (0.75 + Math.random() * 0.5));
  }

  global.BomStream = {
    open: function (opts) {
      return new Client(opts);
    },
    KNOWN_TYPES: KNOWN_TYPES.slice(),
  };
})(typeof window !== "undefined" ? window : this);

/*
 * bomstream-connection.js: the connection every bomstream.js client uses. It
 * listens with EventSource and lets the browser reconnect natively (which
 * sends Last-Event-ID, so the gateway replays what was missed). After
 * `pollFallbackAfter` failed connects in a row it polls instead, and tries the
 * stream again every `sseRetryInterval` ms. A client closes it for good when
 * its jobs end, so a finished page stays quiet.
 *
 * Pages include it first, then bomstream.js (one BOM), then, for several BOMs
 * on one connection, bomstream-many.js. No build step, no dependencies.
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
  var CALLBACKS = [
    "onStarted",
    "onProgress",
    "onComponentCompleted",
    "onComponentFailed",
    "onComplete",
    "onError",
    "onEvent",
    "onConnectionChange",
  ];
  // stream_end reasons after which the stream must not be reopened.
  var FATAL_REASONS = { forbidden: true, token_expired: true };
  var POLL_LIMIT = 100;
  var STATUS_CODES = { 401: "unauthorized", 403: "forbidden" };

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

  function resolveCredential(value, arg) {
    // A credential may be a string or a function returning a string or a
    // promise of one (a fresh single-use ticket, a refreshed token).
    return Promise.resolve(typeof value === "function" ? value(arg) : value);
  }

  function query(params) {
    // An array value repeats its key (bom_id=A&bom_id=B).
    var parts = [];
    Object.keys(params).forEach(function (k) {
      [].concat(params[k]).forEach(function (v) {
        if (v != null && v !== "") parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(v));
      });
    });
    return parts.length ? "?" + parts.join("&") : "";
  }

  function errorBody(body) {
    // {"error": "<sentence>", "code": "<slug>"}, or the error as an object.
    var e = body && body.error;
    if (e && typeof e === "object") return { code: e.code, message: e.message || e.code };
    return { code: body && body.code, message: e };
  }

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

  // -- the connection: EventSource, falling back to polling ------------------
  //
  // Mixed into each client. A client supplies _streamUrl(creds), _pollUrl(),
  // _ticketRequest(), _onConnected(data), _onMessage(ev, sseId),
  // _endsWith(reason), _applyPage(page) and _fatalStatus (the poll answers
  // that no retry can mend).

  var Engine = {};

  Engine._init = function (opts, moreCallbacks) {
    this.baseUrl = String(opts.baseUrl || "").replace(/\/+$/, "");
    this.pollFallbackAfter = opts.pollFallbackAfter == null ? 3 : opts.pollFallbackAfter;
    this.pollInterval = opts.pollInterval == null ? 3000 : opts.pollInterval;
    this.sseRetryInterval = opts.sseRetryInterval == null ? 30000 : opts.sseRetryInterval;
    this.terminalTypes = (opts.terminalTypes || DEFAULT_TERMINAL).slice();
    this.eventTypes = KNOWN_TYPES.concat(opts.eventTypes || []);
    this._opts = opts;
    this._cb = {};
    CALLBACKS.concat(moreCallbacks || []).forEach(function (name) {
      this._cb[name] = typeof opts[name] === "function" ? opts[name] : noop;
    }, this);
    this.lastEventId = opts.lastEventId || null;
    this.mode = "sse";
    this.connected = false;
    this.retryCount = 0;
    this.error = null;
    this.eventCount = 0;
    // Resumes the gateway could not place: updates may have been missed
    // (the state is still current).
    this.gaps = 0;
    this.finishReason = null;
    this._es = null;
    this._timer = null;
    this._sseRetryTimer = null;
    this._poller = null;
    this._pollFailures = 0;
    this._expectReconnect = false;
    this._trial = false;
    this._pollOk = false;
    this._generation = 0;
  };

  Engine._call = function (name, arg, extra) {
    try {
      this._cb[name](arg, extra);
    } catch (err) {
      // A failing callback must not break the stream; surface it for debugging.
      setTimeout(function () {
        throw err;
      });
    }
  };

  Engine._notify = function () {
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

  Engine._clearTimers = function () {
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._sseRetryTimer);
    this._sseRetryTimer = null;
    if (this._poller) {
      this._poller.abort();
      this._poller = null;
    }
  };

  Engine._dropStream = function () {
    if (this._es) {
      this._es.close();
      this._es = null;
    }
  };

  Engine._connectSse = function () {
    var self = this;
    var generation = ++this._generation;
    this._clearTimers();
    this._dropStream();
    this.mode = "sse";
    this.connected = false;
    this._expectReconnect = false;
    this._notify();
    var opts = this._opts;
    var creds = [resolveCredential(opts.token), resolveCredential(opts.ticket, this._ticketRequest())];
    Promise.all(creds).then(
      function (values) {
        if (generation !== self._generation) return;
        // EventSource cannot send headers, so the credential rides in the query
        // (the gateway's access log redacts it). last_event_id resumes a stream
        // opened anew; the browser's own reconnects send the Last-Event-ID header.
        self._openEventSource(self._streamUrl({ token: values[1] ? null : values[0], ticket: values[1] }));
      },
      function (err) {
        if (generation !== self._generation) return;
        self._fail(bomStreamError("credential", "could not get a credential: " + err));
      }
    );
  };

  Engine._openEventSource = function (url) {
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
      self._onConnected(safeParse(msg.data) || {});
    });
    this.eventTypes.forEach(function (type) {
      es.addEventListener(type, function (msg) {
        if (es !== self._es) return;
        var ev = safeParse(msg.data);
        if (ev && typeof ev === "object") self._onMessage(ev, msg.lastEventId);
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

  Engine._onStreamEnd = function (reason) {
    if (this._endsWith(reason)) {
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

  Engine._onSseError = function (es) {
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

  Engine._startPolling = function () {
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

  Engine._poll = function () {
    var self = this;
    var generation = this._generation;
    var opts = this._opts;
    var controller = new AbortController();
    this._poller = controller;
    resolveCredential(opts.token)
      .then(function (token) {
        var headers = { Accept: "application/json" };
        if (token) headers.Authorization = "Bearer " + token;
        return fetch(self._pollUrl(), {
          headers: headers,
          cache: "no-store",
          credentials: opts.withCredentials ? "include" : "same-origin",
          signal: controller.signal,
        });
      })
      .then(function (resp) {
        if (self._fatalStatus.indexOf(resp.status) >= 0) {
          var refused = function (body) {
            var e = errorBody(body);
            var code = STATUS_CODES[resp.status] || e.code || "http_" + resp.status;
            throw bomStreamError(code, e.message || "HTTP " + resp.status, { fatal: true, status: resp.status });
          };
          return resp.json().then(refused, function () {
            refused(null);
          });
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

  Engine._pollAgain = function (pageWasFull) {
    // A page cut by the limit means more is waiting: ask again at once.
    this._schedule(this._poll, pageWasFull ? 0 : this.pollInterval);
  };

  Engine._schedule = function (fn, ms) {
    var self = this;
    clearTimeout(this._timer);
    this._timer = setTimeout(function () {
      self._timer = null;
      fn.call(self);
    }, ms);
  };

  Engine._finish = function (reason) {
    if (this.mode === "closed") return;
    this._generation += 1;
    this._clearTimers();
    this._dropStream();
    this.mode = "closed";
    this.connected = false;
    this.finishReason = reason;
    this._notify();
  };

  Engine._fail = function (err) {
    this.error = err;
    this._finish(err.code || "error");
    this._call("onError", err, null);
  };

  Engine.close = function () {
    this._finish("closed");
  };

  Engine.reconnect = function () {
    this.finishReason = null;
    this.error = null;
    this.retryCount = 0;
    this._trial = false;
    this._connectSse();
  };

  global.BomStream = {
    KNOWN_TYPES: KNOWN_TYPES.slice(),
    // For bomstream.js and bomstream-many.js; not a public interface.
    _parts: {
      Engine: Engine,
      bomStreamError: bomStreamError,
      query: query,
      POLL_LIMIT: POLL_LIMIT,
    },
  };
})(typeof window !== "undefined" ? window : this);

/*!
 * uploadkit.js: upload progress for ordinary forms, no dependencies.
 *
 * 1. Mark a form:   <form method="post" enctype="multipart/form-data" data-uploadkit> ... </form>
 *    On submit it is sent by XMLHttpRequest with a fresh ?X-Progress-ID=<id>;
 *    a <progress> bar and a status line show the server's progress (Server-Sent
 *    Events, falling back to polling when the server refuses a stream), "Processing..." while the server makes
 *    thumbnails, and the server's own error message when it refuses the upload.
 *    Put your own elements in the form with data-uploadkit-bar (a <progress>)
 *    and data-uploadkit-status to place them; data-uploadkit-progress="/url"
 *    overrides the status route (default: where this script was loaded from).
 *    The form receives "uploadkit:progress", "uploadkit:done" (cancelable: by
 *    default a redirected response is followed) and "uploadkit:error" events.
 *
 * 2. Or use the API:
 *    var job = uploadkit.upload(formOrFormData, {
 *      url: "/upload", progressUrl: "/upload/progress",
 *      onProgress: function (p) {},  // {state, received, size, rate, eta, files, sent, total, id}
 *      onDone: function (r) {},      // {status, json, text, url, redirected, xhr}
 *      onError: function (e) {}      // {status, code, message, error, xhr}
 *    });
 *    job.abort(); job.promise.then(...);
 */
(function (root) {
  "use strict";

  var ID_PARAM = "X-Progress-ID";
  var FINAL = { done: true, error: true };
  var SCRIPT_RE = /\/uploadkit\.js(?:[?#].*)?$/;
  var doc = root.document;

  // The script is served at <progress_path>/uploadkit.js: that tells the route.
  var script = doc && doc.currentScript;
  var defaultProgressUrl = script && script.src && SCRIPT_RE.test(script.src)
    ? script.src.replace(SCRIPT_RE, "") : "/upload/progress";

  function newId() {
    var bytes = new Uint8Array(16), out = "", i;
    var cryptoObj = root.crypto || root.msCrypto;
    if (cryptoObj && cryptoObj.getRandomValues) {
      cryptoObj.getRandomValues(bytes);
    } else {
      for (i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    for (i = 0; i < 16; i++) out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return out; // 32 characters of [0-9a-f]: inside the server's [A-Za-z0-9_-]{1,64}
  }

  function withId(url, id) {
    var hash = url.indexOf("#");
    if (hash >= 0) url = url.slice(0, hash);
    return url + (url.indexOf("?") < 0 ? "?" : "&") + ID_PARAM + "=" + encodeURIComponent(id);
  }

  function formatSize(n) {
    if (n == null || isNaN(n)) return "?";
    var units = ["bytes", "KiB", "MiB", "GiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? Math.floor(n) + " bytes" : n.toFixed(1) + " " + units[i];
  }

  function formatTime(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function percent(p) {
    return p.size ? Math.min(100, Math.floor((100 * p.received) / p.size)) : null;
  }

  // A status in words, for people (the status line) and screen readers.
  function describe(p) {
    switch (p && p.state) {
      case "starting":
        return "Starting upload\u2026";
      case "uploading": {
        var pct = percent(p), parts = [];
        parts.push(formatSize(p.received) + (p.size ? " of " + formatSize(p.size) : ""));
        if (p.rate) parts.push(formatSize(p.rate) + "/s");
        if (p.eta != null && p.rate) parts.push(formatTime(p.eta) + " left");
        return "Uploading" + (pct == null ? "" : " " + pct + "%") + ": " + parts.join(", ");
      }
      case "processing":
        return "Processing\u2026";
      case "done":
        return "Done";
      case "error": {
        var err = p.error || {};
        return "Upload failed: " + (err.message || "the server refused the upload") +
          (p.status ? " (" + p.status + ")" : "");
      }
      default:
        return "";
    }
  }

  function parseJSON(text) {
    try { return JSON.parse(text); } catch (e) { return null; }
  }

  function copy(obj) {
    var out = {}, k;
    for (k in obj) if (Object.prototype.hasOwnProperty.call(obj, k)) out[k] = obj[k];
    return out;
  }

  // Follow one upload's status on the server: Server-Sent Events when the
  // browser has them, polling otherwise (or when the stream fails). Calls
  // onStatus(value) per change; stops itself on "done" or "error".
  function watch(progressUrl, id, onStatus, opts) {
    opts = opts || {};
    var pollInterval = opts.pollInterval || 1000;
    var stopped = false, source = null, timer = null, sawEvent = false;
    var url = withId(progressUrl, id);

    function stop() {
      stopped = true;
      if (source) { source.close(); source = null; }
      if (timer) { clearTimeout(timer); timer = null; }
    }
    function handle(value) {
      if (stopped || !value || !value.state) return;
      onStatus(value);
      if (FINAL[value.state]) stop();
    }
    function schedule() {
      if (!stopped) timer = setTimeout(poll, pollInterval);
    }
    function poll() {
      if (stopped) return;
      var xhr = new XMLHttpRequest();
      xhr.open("GET", url);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.onload = function () {
        var value = parseJSON(xhr.responseText);
        if (xhr.status === 200) handle(value);
        else if (xhr.status === 400) { stop(); return; } // a bad id will not get better
        schedule(); // 503: the store may come back
      };
      xhr.onerror = schedule;
      xhr.send();
    }
    function fallBack(now) {
      if (source) { source.close(); source = null; }
      if (now === true) poll(); else schedule();
    }

    if (root.EventSource && opts.sse !== false) {
      source = new root.EventSource(url);
      source.onmessage = function (e) { sawEvent = true; handle(parseJSON(e.data)); };
      source.addEventListener("unavailable", fallBack);
      source.onerror = function () {
        if (stopped) return;
        // After a good stream ends (its lifetime is bounded, and a stream for
        // an upload not started yet ends after a few seconds) EventSource
        // reconnects by itself. A stream refused before its first event polls
        // at once: the server holds few streams and answers the others as a
        // poll (JSON, which EventSource reports as an error). A stream that
        // failed later polls after the usual interval.
        if (!sawEvent) fallBack(true);
        else if (source.readyState === 2 /* CLOSED */) fallBack(false);
      };
    } else {
      poll();
    }
    return { stop: stop };
  }

  function isForm(x) {
    return !!x && typeof x === "object" && String(x.nodeName).toUpperCase() === "FORM";
  }

  function errorFrom(status, json, fallback) {
    var err = (json && json.error) || { code: "http_" + status, message: fallback };
    return { status: status, code: err.code, message: err.message, error: err };
  }

  // Send a form (or a FormData) with progress. Returns {id, xhr, abort, promise}.
  function upload(target, opts) {
    opts = opts || {};
    var form = isForm(target) ? target : null;
    var data = form ? new FormData(form) : target;
    var url = opts.url || (form && form.getAttribute("action")) || root.location.href;
    var method = (opts.method || (form && form.getAttribute("method")) || "POST").toUpperCase();
    if (method === "GET") method = "POST"; // files only travel in a body
    var progressUrl = opts.progressUrl ||
      (form && form.getAttribute("data-uploadkit-progress")) || defaultProgressUrl;
    var id = opts.id || newId();
    var status = { id: id, state: "starting", received: 0, size: null, rate: null, eta: null,
                   files: [], sent: 0, total: null, source: "client" };
    var finished = false, resolve, reject, watcher = null;
    var promise = root.Promise ? new root.Promise(function (ok, ko) { resolve = ok; reject = ko; }) : null;
    if (promise) promise["catch"](function () {}); // no "unhandled rejection" if unused

    function emit() {
      if (opts.onProgress) opts.onProgress(copy(status));
    }
    function finish(ok, result) {
      if (finished) return;
      finished = true;
      if (watcher) watcher.stop();
      if (ok) {
        if (opts.onDone) opts.onDone(result);
        if (resolve) resolve(result);
      } else {
        if (opts.onError) opts.onError(result);
        if (reject) reject(result);
      }
    }
    function fail(result) {
      status.state = "error";
      status.status = result.status;
      status.error = result.error;
      emit();
      finish(false, result);
    }

    var xhr = new XMLHttpRequest();
    xhr.open(method, withId(url, id));
    if (opts.headers) for (var h in opts.headers) xhr.setRequestHeader(h, opts.headers[h]);

    xhr.upload.onprogress = function (e) {
      if (finished) return;
      status.sent = e.loaded;
      status.total = e.lengthComputable ? e.total : null;
      if (status.source === "client") { // until the server speaks, show what left the browser
        status.state = "uploading";
        status.received = e.loaded;
        status.size = status.total;
      }
      emit();
    };
    xhr.upload.onload = function () {
      // Every byte left the browser; the server is finishing (thumbnails...).
      if (finished || status.state === "processing") return;
      if (status.source === "client" || status.state === "uploading") {
        status.state = "processing";
        status.received = status.size = status.total != null ? status.total : status.received;
        emit();
      }
    };
    xhr.onload = function () {
      var json = parseJSON(xhr.responseText);
      if (xhr.status >= 200 && xhr.status < 400) {
        status.state = "done";
        if (status.size != null) status.received = status.size;
        emit();
        // XHR follows redirects silently: a final URL without our id means the
        // app answered with a redirect (post/redirect/get).
        var responseUrl = xhr.responseURL || "";
        finish(true, { status: xhr.status, json: json, text: xhr.responseText, url: responseUrl,
                       redirected: !!responseUrl && responseUrl.indexOf(ID_PARAM + "=" + id) === -1,
                       xhr: xhr });
      } else {
        var result = errorFrom(xhr.status, json, xhr.statusText || "the server refused the upload");
        result.xhr = xhr;
        fail(result);
      }
    };
    xhr.onerror = function () {
      fail({ status: 0, code: "network_error", message: "the connection to the server failed",
             error: { code: "network_error", message: "the connection to the server failed" }, xhr: xhr });
    };
    xhr.onabort = function () {
      fail({ status: 0, code: "aborted", message: "the upload was cancelled",
             error: { code: "aborted", message: "the upload was cancelled" }, xhr: xhr });
    };

    if (opts.progress !== false) {
      watcher = watch(progressUrl, id, function (value) {
        if (finished) return;
        status.source = "server";
        var keys = ["state", "received", "size", "rate", "eta", "files", "started_at", "status", "error"];
        for (var i = 0; i < keys.length; i++) if (keys[i] in value) status[keys[i]] = value[keys[i]];
        if (value.state === "error") {
          // Refused mid-body: stop sending and say why, in the server's words.
          var result = errorFrom(value.status || 400, value, "the server refused the upload");
          result.xhr = xhr;
          fail(result);
          xhr.onabort = null;
          xhr.abort();
          return;
        }
        if (value.state === "starting") status.source = "client";
        emit();
      }, opts);
    }
    xhr.send(data);
    return { id: id, xhr: xhr, promise: promise, abort: function () { xhr.abort(); } };
  }

  // -- forms marked data-uploadkit ----------------------------------------------------

  function element(form, selector, tag, attrs) {
    var el = form.querySelector(selector);
    if (el) return el;
    el = doc.createElement(tag);
    for (var k in attrs) el.setAttribute(k, attrs[k]);
    form.appendChild(el);
    return el;
  }

  function dispatch(form, name, detail, cancelable) {
    var ev;
    if (typeof root.CustomEvent === "function") {
      ev = new root.CustomEvent(name, { detail: detail, bubbles: true, cancelable: !!cancelable });
    } else {
      ev = doc.createEvent("CustomEvent");
      ev.initCustomEvent(name, true, !!cancelable, detail);
    }
    return form.dispatchEvent(ev);
  }

  function submitForm(form, submitter) {
    if (form.getAttribute("data-uploadkit-busy")) return;
    form.setAttribute("data-uploadkit-busy", "1");
    var bar = element(form, "[data-uploadkit-bar]", "progress", { "data-uploadkit-bar": "", max: "100" });
    var line = element(form, "[data-uploadkit-status]", "output",
                       { "data-uploadkit-status": "", role: "status", "aria-live": "polite" });
    var data = new FormData(form);
    if (submitter && submitter.name) data.append(submitter.name, submitter.value || "");
    bar.hidden = false;
    bar.removeAttribute("value"); // indeterminate until sizes are known

    function show(p) {
      // Never backwards: the server's count may trail the browser's when it takes over.
      if (p.size) { bar.max = p.size; bar.value = Math.max(bar.value || 0, Math.min(p.received, p.size)); }
      if (p.state === "done" && bar.max) bar.value = bar.max;
      line.textContent = describe(p);
    }
    function idle() { form.removeAttribute("data-uploadkit-busy"); }

    upload(data, {
      url: form.getAttribute("action") || root.location.href,
      method: form.getAttribute("method") || "POST",
      progressUrl: form.getAttribute("data-uploadkit-progress") || defaultProgressUrl,
      onProgress: function (p) { show(p); dispatch(form, "uploadkit:progress", p); },
      onDone: function (r) {
        idle();
        line.textContent = describe({ state: "done" });
        if (dispatch(form, "uploadkit:done", r, true) && r.redirected) root.location.assign(r.url);
      },
      onError: function (e) {
        idle();
        line.textContent = describe({ state: "error", status: e.status, error: e.error });
        dispatch(form, "uploadkit:error", e);
      }
    });
  }

  if (doc && doc.addEventListener) {
    // Delegated, so forms added later work too.
    doc.addEventListener("submit", function (ev) {
      var form = ev.target;
      if (!isForm(form) || !form.hasAttribute("data-uploadkit")) return;
      if (!root.FormData || !root.XMLHttpRequest) return; // old browser: a normal submit
      ev.preventDefault();
      submitForm(form, ev.submitter);
    });
  }

  root.uploadkit = {
    upload: upload,
    watch: watch,
    submit: submitForm,
    newId: newId,
    withId: withId,
    describe: describe,
    formatSize: formatSize,
    formatTime: formatTime,
    progressUrl: defaultProgressUrl
  };
})(typeof window !== "undefined" ? window : this);

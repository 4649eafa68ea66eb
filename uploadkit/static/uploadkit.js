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
 *    Resumable: data-uploadkit-tus="/upload/tus/" on the form sends each file
 *    with the tus 1.0 protocol instead (in chunks of data-uploadkit-chunk-size
 *    bytes, 5 MiB by default); a lost connection is resumed from the offset the
 *    server holds, and a page reloaded mid-upload resumes when the same file is
 *    picked again. Only the files travel; the status line names them when done.
 *
 * 2. Or use the API:
 *    var job = uploadkit.upload(formOrFormData, {
 *      url: "/upload", progressUrl: "/upload/progress",
 *      onProgress: function (p) {},  // {state, received, size, rate, eta, files, sent, total, id}
 *      onDone: function (r) {},      // {status, json, text, url, redirected, xhr}
 *      onError: function (e) {}      // {status, code, message, error, xhr}
 *    });
 *    job.abort(); job.promise.then(...);
 *    With tus: "/upload/tus/" the target is a File, a list of them, a FormData
 *    or a form; more options: chunkSize, retryDelays ([0, 1000, 3000, 5000] ms;
 *    a 423 "locked" is retried for up to lockedWait ms, 60000 by default),
 *    metadata ({key: value}, sent beside filename and filetype), resume (false:
 *    nothing kept in localStorage). job.abort() pauses, job.start() goes on;
 *    onDone gets {uploads: [{url, id, filename, size, type}], ...}.
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

  // An upload's end, told to its callbacks and to its promise.
  function settle(opts, resolve, reject, ok, result) {
    if (ok) {
      if (opts.onDone) opts.onDone(result);
      if (resolve) resolve(result);
    } else {
      if (opts.onError) opts.onError(result);
      if (reject) reject(result);
    }
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
    if (opts.tus) return resumable(target, opts);
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
      settle(opts, resolve, reject, ok, result);
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

  // -- resumable uploads (tus 1.0) -------------------------------------------------------
  //
  // Each file is created on the tus endpoint (POST, its name and type in
  // Upload-Metadata), then sent in chunks (PATCH at Upload-Offset). A PATCH
  // that fails (connection lost, 409, 423, 5xx) is followed by a HEAD, after
  // a delay from retryDelays, and the file goes on from the offset the server
  // reports: what arrived is never sent twice. The upload's URL is kept in
  // localStorage under the file's name, size and date, so a page reloaded
  // mid-upload resumes when the same file is picked again.

  var TUS_VERSION = "1.0.0";
  var TUS_KEY = "uploadkit.tus::";
  var RETRY_DELAYS = [0, 1000, 3000, 5000];
  var CHUNK_SIZE = 5 * 1024 * 1024; // a short resend on a lost connection; few requests per file

  function absolute(url, base) {
    try { return new root.URL(url, base || root.location.href).href; } catch (e) { return url; }
  }

  function base64(text) {
    var bytes = root.TextEncoder ? new root.TextEncoder().encode(text) : null, bin = "", i;
    if (!bytes) return root.btoa(unescape(encodeURIComponent(text)));
    for (i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return root.btoa(bin);
  }

  // Upload-Metadata: "key base64,key base64"; keys may not hold spaces or commas.
  function tusMetadata(meta) {
    var out = [], k;
    for (k in meta) {
      if (Object.prototype.hasOwnProperty.call(meta, k) && meta[k] != null && /^[^\s,]+$/.test(k)) {
        out.push(k + " " + base64(String(meta[k])));
      }
    }
    return out.join(",");
  }

  function fingerprint(file, endpoint) {
    return TUS_KEY + endpoint + "::" + file.name + "::" + file.size + "::" + (file.lastModified || 0);
  }

  // localStorage throws in some private modes and sandboxed frames: resuming
  // after a reload is then off, nothing else.
  var remembered = {
    get: function (key) {
      try { var v = parseJSON(root.localStorage.getItem(key)); return v && v.url ? v : null; }
      catch (e) { return null; }
    },
    set: function (key, url) {
      try { root.localStorage.setItem(key, JSON.stringify({ url: url, at: Date.now() })); } catch (e) { /* off */ }
    },
    remove: function (key) {
      try { root.localStorage.removeItem(key); } catch (e) { /* off */ }
    }
  };

  function filesOf(target) {
    var out = [], i;
    function add(v) { if (v && typeof v === "object" && "size" in v && "slice" in v && (v.name || v.size)) out.push(v); }
    if (!target) return out;
    if (isForm(target)) target = new FormData(target);
    if (typeof root.FormData === "function" && target instanceof root.FormData) {
      target.forEach(function (v) { add(v); });
    } else if (typeof target.length === "number" && typeof target !== "string") {
      for (i = 0; i < target.length; i++) add(target[i]);
    } else {
      add(target);
    }
    return out;
  }

  function networkError(xhr) {
    return { status: 0, code: "network_error", message: "the connection to the server failed",
             error: { code: "network_error", message: "the connection to the server failed" }, xhr: xhr };
  }

  // Upload files one after another with tus. Same options and callbacks as
  // upload(), plus: tus (the endpoint URL), chunkSize, retryDelays, metadata
  // (extra Upload-Metadata pairs), resume (false: no localStorage). Returns
  // {xhr, promise, abort, start}: abort() pauses (the server keeps what
  // arrived), start() goes on from the server's offset.
  function resumable(target, opts) {
    opts = opts || {};
    var endpoint = absolute(opts.tus);
    var files = filesOf(target);
    var chunkSize = Math.max(1, opts.chunkSize || CHUNK_SIZE);
    var delays = opts.retryDelays || RETRY_DELAYS;
    var progressUrl = opts.progressUrl || defaultProgressUrl;
    var total = 0, i;
    for (i = 0; i < files.length; i++) total += files[i].size;
    var status = { id: null, state: "starting", received: 0, size: total, rate: null, eta: null,
                   files: [], sent: 0, total: total, source: "client", uploads: [] };
    var index = 0, done = 0, offset = 0, retries = 0, url = null, key = null;
    var xhr = null, timer = null, watcher = null, paused = false, finished = false, serverError = null;
    var rateAt = null, rateBytes = 0, lockedSince = 0;
    var lockedWait = opts.lockedWait != null ? opts.lockedWait : 60000;
    var resolve, reject;
    var promise = root.Promise ? new root.Promise(function (ok, ko) { resolve = ok; reject = ko; }) : null;
    if (promise) promise["catch"](function () {});

    for (i = 0; i < files.length; i++) {
      status.files.push({ field: opts.fieldName || "file", filename: files[i].name, received: 0, done: false });
    }

    function emit() { if (opts.onProgress) opts.onProgress(copy(status)); }
    function stopWatching() { if (watcher) { watcher.stop(); watcher = null; } }
    function finish(ok, result) {
      if (finished) return;
      finished = true;
      stopWatching();
      if (timer) { clearTimeout(timer); timer = null; }
      settle(opts, resolve, reject, ok, result);
    }
    function fail(result) {
      status.state = "error";
      status.status = result.status;
      status.error = result.error;
      emit();
      finish(false, result);
    }
    function refused(req, fallback) {
      var result = errorFrom(req.status, parseJSON(req.responseText), req.statusText || fallback);
      result.xhr = req;
      return result;
    }

    // The bar counts what the server holds plus what left the browser, and never goes back.
    function report(fileBytes, state) {
      var file = files[index], now = Date.now();
      var received = Math.max(status.received, done + Math.min(fileBytes, file.size));
      if (rateAt === null) { rateAt = now; rateBytes = received; }
      else if (now - rateAt >= 500) {
        var r = (1000 * (received - rateBytes)) / (now - rateAt);
        status.rate = status.rate == null ? r : 0.7 * status.rate + 0.3 * r;
        rateAt = now; rateBytes = received;
      }
      status.received = received;
      status.sent = received;
      status.state = state || "uploading";
      status.eta = status.rate ? Math.max(0, (total - received) / status.rate) : null;
      status.files[index].received = Math.min(fileBytes, file.size);
      emit();
    }

    function request(method, to, headers) {
      var req = new XMLHttpRequest();
      req.open(method, to);
      req.setRequestHeader("Tus-Resumable", TUS_VERSION);
      for (var h in headers) req.setRequestHeader(h, headers[h]);
      if (opts.headers) for (var o in opts.headers) req.setRequestHeader(o, opts.headers[o]);
      xhr = req;
      return req;
    }

    function watchServer(uploadId) {
      stopWatching();
      if (opts.progress === false) return;
      status.id = uploadId;
      watcher = watch(progressUrl, uploadId, function (value) {
        if (finished || paused) return;
        if (value.state === "error") { serverError = value; return; } // the PATCH's own answer decides
        if (value.state === "uploading" && typeof value.received === "number") {
          status.source = "server";
          report(value.received);
        } else if (value.state === "processing") {
          status.source = "server";
          report(files[index].size, "processing");
        }
      }, opts);
    }

    // A failed request: wait, ask the server where the upload stands, go on.
    function recover(result) {
      if (paused || finished) return;
      var delay;
      if (result.status === 423 && Date.now() - (lockedSince = lockedSince || Date.now()) < lockedWait) {
        // Another request holds the upload: most often our own PATCH whose
        // connection died without the server noticing. The server frees it
        // after its lock timeout (30 s by default): wait that out.
        delay = Math.max(1000, delays[delays.length - 1] || 0);
      } else if (retries < delays.length) {
        delay = delays[retries++];
      } else {
        fail(result);
        return;
      }
      timer = setTimeout(function () { timer = null; locate(result); }, delay);
    }

    // HEAD: the offset the server holds. 404/410: the upload is gone
    // (expired, terminated, refused): a remembered one is started afresh.
    function locate(lastError) {
      if (paused || finished) return;
      var req = request("HEAD", url, {});
      req.onload = function () {
        if (paused || finished) return;
        var at = parseInt(req.getResponseHeader("Upload-Offset"), 10);
        var length = req.getResponseHeader("Upload-Length");
        if (req.status === 200 && !isNaN(at) && (length == null || +length === files[index].size)) {
          offset = at;
          report(offset);
          send();
        } else if (req.status === 404 || req.status === 410 || req.status === 403 || req.status === 200) {
          remembered.remove(key);
          if (!lastError) { create(); return; } // a remembered or paused upload the server let go
          if (serverError) { fail(errorFrom(serverError.status || 400, serverError, "the server refused the upload")); return; }
          fail(errorFrom(req.status, null, "the upload is gone from the server"));
        } else {
          recover(lastError || refused(req, "the server did not answer"));
        }
      };
      req.onerror = function () { if (!paused) recover(lastError || networkError(req)); };
      req.send();
    }

    function retryCreate(result) {
      if (retries >= delays.length) { fail(result); return; }
      timer = setTimeout(function () { timer = null; create(); }, delays[retries++]);
    }

    function create() {
      var file = files[index];
      var meta = { filename: file.name, filetype: file.type || "application/octet-stream" };
      if (opts.metadata) for (var m in opts.metadata) meta[m] = opts.metadata[m];
      var req = request("POST", endpoint, { "Upload-Length": String(file.size), "Upload-Metadata": tusMetadata(meta) });
      req.onload = function () {
        if (paused || finished) return;
        var location = req.getResponseHeader("Location");
        if (req.status === 201 && location) {
          url = absolute(location, endpoint);
          if (opts.resume !== false) remembered.set(key, url);
          offset = parseInt(req.getResponseHeader("Upload-Offset") || "0", 10) || 0;
          retries = 0;
          watchServer(url.replace(/[?#].*$/, "").replace(/\/+$/, "").split("/").pop());
          send();
        } else if (req.status >= 500 || req.status === 423) {
          retryCreate(refused(req, "the server did not answer"));
        } else {
          fail(refused(req, "the server refused the upload"));
        }
      };
      req.onerror = function () { if (!paused && !finished) retryCreate(networkError(req)); };
      req.send(null);
    }

    function send() {
      if (paused || finished) return;
      var file = files[index];
      if (offset >= file.size) { fileDone(); return; }
      var end = Math.min(file.size, offset + chunkSize);
      var req = request("PATCH", url, { "Upload-Offset": String(offset),
                                         "Content-Type": "application/offset+octet-stream" });
      var from = offset;
      req.upload.onprogress = function (e) { if (!paused && !finished) report(from + e.loaded); };
      req.onload = function () {
        if (paused || finished) return;
        var at = parseInt(req.getResponseHeader("Upload-Offset"), 10);
        if (req.status >= 200 && req.status < 300 && !isNaN(at)) {
          offset = at;
          retries = 0; // progress was made: the next failure gets the whole retry budget
          lockedSince = 0;
          report(offset);
          send();
        } else if (req.status === 409 || req.status === 423 || req.status >= 500) {
          recover(refused(req, "the server did not take the chunk"));
        } else {
          remembered.remove(key); // a refusal: the server terminated the upload
          fail(refused(req, "the server refused the upload"));
        }
      };
      req.onerror = function () { if (!paused && !finished) recover(networkError(req)); };
      req.send(file.slice(offset, end));
    }

    function fileDone() {
      var file = files[index];
      remembered.remove(key);
      stopWatching();
      status.files[index].done = true;
      status.files[index].received = file.size;
      status.uploads.push({ url: url, id: status.id, filename: file.name, size: file.size, type: file.type });
      done += file.size;
      index++;
      startFile();
    }

    function startFile() {
      if (paused || finished) return;
      if (index >= files.length) {
        status.state = "done";
        status.received = total;
        emit();
        var last = status.uploads[status.uploads.length - 1];
        finish(true, { status: xhr ? xhr.status : 0, json: null, text: "", url: last ? last.url : "",
                       redirected: false, uploads: status.uploads.slice(), xhr: xhr });
        return;
      }
      var file = files[index];
      key = fingerprint(file, endpoint);
      retries = 0;
      serverError = null;
      var previous = opts.resume !== false ? remembered.get(key) : null;
      if (previous) {
        url = previous.url;
        watchServer(url.replace(/[?#].*$/, "").replace(/\/+$/, "").split("/").pop());
        locate(null);
      } else {
        url = null;
        create();
      }
    }

    function start() {
      if (finished || !paused) return;
      paused = false;
      retries = 0;
      if (!url) { startFile(); return; }
      watchServer(status.id);
      locate(null);
    }

    function pause() {
      if (finished || paused) return;
      paused = true;
      stopWatching();
      if (timer) { clearTimeout(timer); timer = null; }
      if (xhr) xhr.abort();
    }

    if (!files.length) {
      var none = { status: 0, code: "no_files", message: "choose a file to upload",
                   error: { code: "no_files", message: "choose a file to upload" }, xhr: null };
      setTimeout(function () { fail(none); }, 0);
    } else {
      emit();
      startFile();
    }
    return { promise: promise, abort: pause, pause: pause, start: start,
             status: function () { return copy(status); } };
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

    var tusEndpoint = form.getAttribute("data-uploadkit-tus"); // resumable: each file by tus
    upload(data, {
      url: form.getAttribute("action") || root.location.href,
      method: form.getAttribute("method") || "POST",
      progressUrl: form.getAttribute("data-uploadkit-progress") || defaultProgressUrl,
      tus: tusEndpoint || null,
      chunkSize: tusEndpoint ? +form.getAttribute("data-uploadkit-chunk-size") || null : null,
      onProgress: function (p) { show(p); dispatch(form, "uploadkit:progress", p); },
      onDone: function (r) {
        idle();
        line.textContent = describe({ state: "done" }) + (r.uploads ? ": " + r.uploads.map(function (u) {
          return u.filename + " (" + formatSize(u.size) + ")";
        }).join(", ") : "");
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
    resumable: resumable,
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

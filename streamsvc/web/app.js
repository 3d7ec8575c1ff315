// streamsvc's page: run a tool on a project, follow its job live over Server-Sent Events,
// open past jobs. No framework, no build step. Tool output is untrusted: the page builds its
// DOM with createElement and textContent only, never with HTML strings.
"use strict";

(() => {
  /** the newest lines kept on the page; the full log is one link away */
  const MAX_LINES = 20000;
  /** lines per chunk of the log (the unit the browser skips when out of sight) */
  const CHUNK_LINES = 200;
  /** at most this many lines reach the page per animation frame */
  const LINES_PER_FRAME = 2000;
  /** a busy log is laid out at most this often (each batch costs a layout of the whole log) */
  const FLUSH_EVERY_MS = 50;
  const QUEUE_POLL_MS = 1000;
  /** how often a running job's duration is redrawn (it shows tenths of a second) */
  const TICK_MS = 200;
  const JOBS_SHOWN = 50;
  /** how close to the bottom (px) still counts as "at the bottom" for auto-scroll */
  const BOTTOM_SLACK_PX = 40;
  const TOKEN_KEY = "streamsvc.token";
  const FINAL = new Set(["completed", "failed", "timeout", "cancelled", "lost"]);
  const RANK = { queued: 0, running: 1 };

  const $ = (id) => document.getElementById(id);

  /** An element with properties (className, textContent, href, ...) and children. */
  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {
    constructor(status, error) {
      super(error?.message || (status ? `HTTP ${status}` : "the service cannot be reached"));
      this.status = status;
      this.code = error?.code || "http_error";
    }
  }

  function token() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function setToken(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      notify("This browser does not let the page keep the token.");
    }
    showTokenState();
  }

  function authHeaders() {
    return token() ? { Authorization: `Bearer ${token()}` } : {};
  }

  /** The `data` of a JSON envelope; an ApiError with the envelope's message otherwise. */
  async function api(path, options = {}) {
    const headers = { ...authHeaders(), ...options.headers };
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch {
      throw new ApiError(0, null);
    }
    const isJson = (response.headers.get("Content-Type") || "").startsWith("application/json");
    const body = isJson ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      if (response.status === 401) askForToken();
      throw new ApiError(response.status, body?.error);
    }
    return body?.data;
  }

  const jobApi = (jobId) => `/api/jobs/${encodeURIComponent(jobId)}`;
  const jobPath = (jobId) => `/jobs/${encodeURIComponent(jobId)}`;

  // ---------------------------------------------------------------- notices and the token

  function notify(message) {
    $("notice-text").textContent = message;
    $("notice").hidden = false;
  }

  function clearNotice() {
    $("notice").hidden = true;
  }

  function askForToken() {
    notify(token()
      ? "The service refused the saved access token. Enter the right one under “Access token” at the top of the page."
      : "This service needs an access token. Enter it under “Access token” at the top of the page.");
    $("token-box").open = true;
    $("token").focus();
  }

  function showTokenState() {
    $("token-box").querySelector("summary").textContent = token() ? "Access token ✓" : "Access token";
  }

  // ---------------------------------------------------------------- ANSI colours

  // CSI (colours are `m`), OSC, DCS/PM/APC/SOS strings, and any other escape: all matched, only SGR kept.
  const ESCAPES =
    /\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[P^_X][^\x1b]*(?:\x1b\\)?|\x1b[ -/]*[0-~]?/g;
  // control characters left over (tab is kept)
  const CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/g;
  const FLAGS = ["bold", "dim", "italic", "underline"];
  const SIMPLE_SGR = {
    1: { bold: true },
    2: { dim: true },
    3: { italic: true },
    4: { underline: true },
    7: { inverse: true },
    22: { bold: false, dim: false },
    23: { italic: false },
    24: { underline: false },
    27: { inverse: false },
    39: { fg: null },
    49: { bg: null },
  };

  function plainStyle() {
    return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false };
  }

  function rgb(r, g, b) {
    const ok = [r, g, b].every((v) => Number.isInteger(v) && v >= 0 && v <= 255);
    return ok ? `rgb(${r}, ${g}, ${b})` : undefined;
  }

  /** A 256-colour index: 0-15 stay palette indexes (themed by CSS), the rest become rgb(). */
  function color256(n) {
    if (!Number.isInteger(n) || n < 0 || n > 255) return undefined;
    if (n < 16) return n;
    if (n >= 232) {
      const grey = 8 + (n - 232) * 10;
      return rgb(grey, grey, grey);
    }
    const level = (v) => (v ? 55 + v * 40 : 0);
    const cube = n - 16;
    return rgb(level(Math.floor(cube / 36)), level(Math.floor(cube / 6) % 6), level(cube % 6));
  }

  /** `38;5;n` or `38;2;r;g;b` (and 48): the colour and how many codes it used. */
  function extendedColor(codes, i) {
    if (codes[i] === 5) return [color256(codes[i + 1]), 2];
    if (codes[i] === 2) return [rgb(codes[i + 1], codes[i + 2], codes[i + 3]), 4];
    return [undefined, 0];
  }

  function applyCode(style, code) {
    if (code === 0) Object.assign(style, plainStyle());
    else if (code in SIMPLE_SGR) Object.assign(style, SIMPLE_SGR[code]);
    else if (code >= 30 && code <= 37) style.fg = code - 30;
    else if (code >= 40 && code <= 47) style.bg = code - 40;
    else if (code >= 90 && code <= 97) style.fg = code - 90 + 8;
    else if (code >= 100 && code <= 107) style.bg = code - 100 + 8;
  }

  function applySgr(style, params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i++) {
      if (codes[i] === 38 || codes[i] === 48) {
        const [color, used] = extendedColor(codes, i + 1);
        if (color !== undefined) style[codes[i] === 38 ? "fg" : "bg"] = color;
        i += used;
      } else {
        applyCode(style, codes[i]);
      }
    }
  }

  function isPlain(style) {
    return style.fg === null && style.bg === null && !style.inverse && !FLAGS.some((flag) => style[flag]);
  }

  function paint(span, layer, color) {
    if (typeof color === "number") span.classList.add(`ansi-${layer}-${color}`);
    else if (typeof color === "string") span.style[layer === "fg" ? "color" : "backgroundColor"] = color;
  }

  function styledText(text, style) {
    if (isPlain(style)) return document.createTextNode(text);
    const span = el("span", { textContent: text });
    let { fg, bg } = style;
    if (style.inverse) {
      [fg, bg] = [bg, fg];
      if (fg === null) span.classList.add("ansi-inverse-fg");
      if (bg === null) span.classList.add("ansi-inverse-bg");
    }
    paint(span, "fg", fg);
    paint(span, "bg", bg);
    for (const flag of FLAGS) if (style[flag]) span.classList.add(`ansi-${flag}`);
    return span;
  }

  /** The nodes of one piece of a line; `style` carries over from piece to piece, line to line. */
  function ansiNodes(text, style) {
    const nodes = [];
    let last = 0;
    const emit = (piece) => {
      const clean = piece.replace(CONTROLS, "");
      if (clean) nodes.push(styledText(clean, style));
    };
    for (const match of text.matchAll(ESCAPES)) {
      emit(text.slice(last, match.index));
      if (match[2] === "m") applySgr(style, match[1]);
      last = match.index + match[0].length;
    }
    emit(text.slice(last));
    return nodes;
  }

  /** A line as a terminal shows it: after a carriage return, what follows overwrites what came before. */
  function lineNodes(line, style) {
    let nodes = [];
    for (const piece of line.split("\r")) {
      const next = ansiNodes(piece, style);
      if (next.length) nodes = next;
    }
    return nodes;
  }

  // ---------------------------------------------------------------- the log view

  function newView() {
    return {
      pending: [], // lines not on the page yet, oldest first
      count: 0, // output lines received
      shown: 0, // output lines on the page
      follow: true, // keep the newest line in sight
      pinnedTop: 0, // the log's scrollTop where the page last put it
      scheduled: false,
      styles: { stdout: plainStyle(), stderr: plainStyle() },
    };
  }

  function addLine(view, line, stream) {
    view.count += 1;
    view.pending.push({ n: view.count, line, stream });
    if (view.pending.length > 2 * MAX_LINES) view.pending.splice(0, view.pending.length - MAX_LINES);
    scheduleFlush(view);
  }

  /** Lines reach the page in batches: on the next frame, at most one batch every FLUSH_EVERY_MS. */
  function scheduleFlush(view) {
    if (view.scheduled) return;
    view.scheduled = true;
    const run = () => {
      view.scheduled = false;
      view.flushedAt = performance.now();
      if (view === state.view) flush(view, LINES_PER_FRAME);
    };
    const wait = Math.max(0, (view.flushedAt || 0) + FLUSH_EVERY_MS - performance.now());
    if (document.hidden) setTimeout(run, 250);
    else if (wait > 0) setTimeout(() => requestAnimationFrame(run), wait);
    else requestAnimationFrame(run);
  }

  function lineElement(view, { n, line, stream }) {
    const style = stream === "stderr" ? view.styles.stderr : view.styles.stdout;
    const div = el("div", { className: stream === "stderr" ? "line err" : "line" }, ...lineNodes(line, style));
    div.dataset.n = n;
    return div;
  }

  /** Put up to `limit` pending lines on the page, drop the oldest beyond MAX_LINES, keep the bottom in sight. */
  function flush(view, limit) {
    if (view.pending.length > MAX_LINES) view.pending.splice(0, view.pending.length - MAX_LINES); // never shown
    const batch = view.pending.splice(0, limit);
    const log = $("log");
    if (batch.length) {
      appendLines(view, log, batch.map((item) => lineElement(view, item)));
      trim(view, log);
      showCounts(view);
      if (view.follow) scrollToBottom(view, log);
    }
    if (view.pending.length) scheduleFlush(view);
  }

  /** Lines live in chunks of up to CHUNK_LINES, so the browser skips whole chunks out of sight. */
  function appendLines(view, log, lines) {
    view.shown += lines.length;
    let chunk = log.lastElementChild;
    for (let start = 0; start < lines.length; ) {
      if (!chunk || chunk.childElementCount >= CHUNK_LINES) chunk = log.appendChild(el("div", { className: "chunk" }));
      const end = start + CHUNK_LINES - chunk.childElementCount;
      chunk.append(...lines.slice(start, end));
      start = end;
    }
  }

  /** Remove the oldest lines beyond MAX_LINES: whole chunks, then lines of the first one. */
  function trim(view, log) {
    while (view.shown > MAX_LINES) {
      const chunk = log.firstElementChild;
      const excess = view.shown - MAX_LINES;
      if (chunk.childElementCount <= excess) {
        view.shown -= chunk.childElementCount;
        chunk.remove();
      } else {
        for (let i = 0; i < excess; i++) chunk.firstElementChild.remove();
        view.shown -= excess;
      }
    }
  }

  function showCounts(view) {
    $("lines").textContent = view.count.toLocaleString("en");
    const shown = view.shown;
    const trimmed = $("trimmed");
    trimmed.hidden = view.count <= shown;
    if (!trimmed.hidden) {
      const link = el("a", { href: `${jobApi(state.jobId)}/log`, className: "full-log", textContent: "the full log" });
      trimmed.replaceChildren(
        `Showing the newest ${shown.toLocaleString("en")} of ${view.count.toLocaleString("en")} lines; `,
        link,
        " has them all.",
      );
    }
  }

  function setFollow(on) {
    if (state.view) state.view.follow = on;
    $("follow").hidden = on || !state.view;
  }

  /** At the bottom, the log follows; scrolled up above where the page last put it, it stops.
   * (Chunks growing as they are laid out move the bottom away, but never scroll the log up.) */
  function onLogScroll() {
    const log = $("log");
    const view = state.view;
    if (!view) return;
    if (log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_SLACK_PX) setFollow(true);
    else if (log.scrollTop < view.pinnedTop - 1) setFollow(false);
  }

  function scrollToBottom(view, log) {
    log.scrollTop = log.scrollHeight;
    view.pinnedTop = log.scrollTop;
  }

  function jumpToLatest() {
    const log = $("log");
    setFollow(true);
    if (state.view) scrollToBottom(state.view, log);
    log.focus();
  }

  // ---------------------------------------------------------------- formatting

  const known = (value) => value !== null && value !== undefined;

  function formatDuration(ms) {
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.floor(ms / 1000);
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function formatTime(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    const today = date.toDateString() === new Date().toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function formatAgo(iso) {
    const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
    if (!Number.isFinite(seconds)) return "";
    if (seconds < 45) return "just now";
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return new Date(iso).toLocaleDateString();
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function exitText(job) {
    if (known(job.exitCode)) return String(job.exitCode);
    if (job.signal) return `signal ${job.signal}`;
    return "–";
  }

  function badge(status) {
    const span = el("span", { className: "badge", textContent: status });
    span.dataset.status = status;
    return span;
  }

  // ---------------------------------------------------------------- the open job

  const state = {
    jobId: null,
    job: null, // what is known of the open job: its record, updated by its events
    source: null, // the EventSource of the open job
    lastId: 0, // the id of the newest event shown
    view: null,
    cancelling: false,
    clock: null, // a running job's duration: {ms, at} (ms as of performance.now() = at)
    pollTimer: 0,
    tickTimer: 0,
  };

  function closeJob() {
    if (state.source) state.source.close();
    clearTimeout(state.pollTimer);
    clearInterval(state.tickTimer);
    Object.assign(state, { jobId: null, job: null, source: null, lastId: 0, view: null });
    Object.assign(state, { cancelling: false, clock: null });
    $("log").replaceChildren();
    $("trimmed").hidden = true;
    $("lines").textContent = "0";
    $("job-error").hidden = true;
    $("resume").hidden = true;
    setFollow(true);
    setConn("idle");
  }

  function showIdle() {
    closeJob();
    $("job-title").textContent = "No job open";
    $("job-sub").textContent = "Pick a tool and a project, then Run; or open a past job.";
    renderJob({ status: "idle" });
    for (const id of ["share", "full-log", "cancel"]) $(id).hidden = true;
    document.title = "streamsvc";
    markCurrent();
  }

  async function openJob(jobId, { push = false } = {}) {
    closeJob();
    Object.assign(state, { jobId, job: { jobId }, view: newView() });
    if (push && location.pathname !== jobPath(jobId)) history.pushState({ jobId }, "", jobPath(jobId));
    renderJob({ jobId, status: "loading" });
    $("job-title").textContent = "Loading…";
    $("job-sub").textContent = jobId;
    markCurrent();
    try {
      const job = await api(jobApi(jobId));
      if (state.jobId !== jobId) return;
      updateJob(job);
    } catch (err) {
      if (state.jobId !== jobId) return;
      if (err.status === 404) return showMissing(jobId);
      if (err.status === 401) return;
      notify(`Could not load the job: ${err.message}`);
    }
    openStream(jobId);
  }

  function showMissing(jobId) {
    closeJob();
    $("job-title").textContent = "No such job";
    $("job-sub").textContent = `The service knows no job ${jobId}: it may have been removed by retention.`;
    renderJob({ status: "unknown" });
    for (const id of ["share", "full-log", "cancel"]) $(id).hidden = true;
  }

  /** Merge what we learnt into the open job's record and show it; never move a status backwards. */
  function updateJob(patch) {
    const current = state.job?.status;
    if (current && FINAL.has(current) && !FINAL.has(patch.status)) return;
    if (RANK[patch.status] < RANK[current]) return;
    state.job = { ...state.job, ...patch };
    if (patch.status === "running" && (known(patch.durationMs) || !state.clock)) {
      state.clock = { ms: patch.durationMs || 0, at: performance.now() };
    }
    renderJob(state.job);
    pollQueue();
  }

  function renderJob(job) {
    const status = job.status;
    $("badge").textContent = status;
    $("badge").dataset.status = status;
    $("job").dataset.status = status;
    if (job.toolId) {
      $("job-title").textContent = `${job.toolId} on ${job.projectId}`;
      $("job-sub").textContent = `Job ${job.jobId}${job.createdAt ? ` · created ${formatTime(job.createdAt)}` : ""}`;
      document.title = `${status} · ${job.toolId} on ${job.projectId} · streamsvc`;
    }
    renderQueue(job);
    $("started").textContent = formatTime(job.startedAt);
    $("exit").textContent = exitText(job);
    renderDuration();
    const active = status === "queued" || status === "running";
    $("cancel").hidden = !active;
    $("cancel").disabled = state.cancelling;
    $("cancel").textContent = state.cancelling ? "Cancelling…" : "Cancel job";
    if (job.jobId) {
      $("share").href = jobPath(job.jobId);
      $("full-log").href = `${jobApi(job.jobId)}/log`;
      $("share").hidden = $("full-log").hidden = false;
    }
    $("job-error").textContent = job.error || "";
    $("job-error").hidden = !job.error;
    clearInterval(state.tickTimer);
    if (status === "running") state.tickTimer = setInterval(renderDuration, TICK_MS);
  }

  function renderQueue(job) {
    const queued = job.status === "queued" && known(job.queuePosition);
    $("fact-queue").hidden = !queued;
    if (!queued) return;
    const wait = job.estimatedWaitMs ? ` · about ${formatDuration(job.estimatedWaitMs)}` : "";
    $("queue").textContent = `${job.queuePosition}${wait}`;
  }

  /** A final job's duration; a running one's counts up from what the service last said (no clock skew). */
  function renderDuration() {
    const job = state.job;
    let text = "–";
    const clock = state.clock;
    if (job?.status === "running" && clock) text = formatDuration(clock.ms + performance.now() - clock.at);
    else if (FINAL.has(job?.status) && known(job.durationMs)) text = formatDuration(job.durationMs);
    $("duration").textContent = text;
  }

  /** While the job waits in the queue, ask for its position every second. */
  function pollQueue() {
    clearTimeout(state.pollTimer);
    if (state.job?.status !== "queued") return;
    const jobId = state.jobId;
    state.pollTimer = setTimeout(async () => {
      try {
        const job = await api(jobApi(jobId));
        if (state.jobId === jobId) updateJob(job);
      } catch {
        if (state.jobId === jobId) pollQueue();
      }
    }, QUEUE_POLL_MS);
  }

  function setConn(conn) {
    const labels = { live: "Live", replay: "Loading the log…", reconnecting: "Reconnecting…", lost: "Disconnected" };
    $("conn").dataset.state = conn;
    $("conn").textContent = labels[conn] || "";
  }

  // ---------------------------------------------------------------- the stream

  function openStream(jobId) {
    const params = new URLSearchParams();
    if (token()) params.set("token", token());
    if (state.lastId) params.set("lastEventId", String(state.lastId));
    const query = params.toString() ? `?${params}` : "";
    const source = new EventSource(`/api/stream/${encodeURIComponent(jobId)}${query}`);
    state.source = source;
    $("resume").hidden = true;
    const mine = (handler) => (event) => {
      if (state.source === source) handler(event);
    };
    source.addEventListener("open", mine(() => setConn(FINAL.has(state.job?.status) ? "replay" : "live")));
    source.addEventListener("status", mine(onStatus));
    source.addEventListener("output", mine(onOutput));
    source.addEventListener("complete", mine(onComplete));
    source.addEventListener("error", mine(onError));
  }

  function endStream() {
    if (state.source) state.source.close();
    state.source = null;
  }

  /** Whether the event is new: ids only grow, so anything at or below the last one was shown already. */
  function isNew(event) {
    const id = Number(event.lastEventId);
    if (!Number.isSafeInteger(id) || id <= state.lastId) return false;
    state.lastId = id;
    return true;
  }

  function dataOf(event) {
    try {
      return JSON.parse(event.data);
    } catch {
      return null;
    }
  }

  function onStatus(event) {
    const data = isNew(event) && dataOf(event);
    if (!data) return;
    const patch = { status: data.status };
    if (data.status === "running" && !state.job.startedAt) patch.startedAt = new Date(data.timestamp).toISOString();
    updateJob(patch);
  }

  function onOutput(event) {
    const data = isNew(event) && dataOf(event);
    if (data) addLine(state.view, String(data.line), data.stream);
  }

  function onComplete(event) {
    const data = isNew(event) && dataOf(event);
    if (!data) return;
    endStream();
    flush(state.view, Infinity); // the final status never shows before the last line
    const { output, ...result } = data;
    updateJob(result);
    setConn("idle");
    refreshJobs();
  }

  function onError(event) {
    if (event instanceof MessageEvent) return onServerError(event);
    if (state.source.readyState === EventSource.CONNECTING) {
      // the connection dropped: the browser reconnects by itself and sends Last-Event-ID
      setConn("reconnecting");
      return;
    }
    endStream(); // the service refused the stream: find out why
    setConn("lost");
    diagnose(state.jobId);
  }

  /** The service's own `error` event is a job's last event (logs written before 2026-12 end a
   * lost job so). A stopping service ends the stream without one: the browser reconnects. */
  function onServerError(event) {
    if (!isNew(event)) return;
    const message = dataOf(event)?.message || "The stream ended with an error.";
    endStream();
    flush(state.view, Infinity);
    $("job-error").textContent = message;
    $("job-error").hidden = false;
    setConn("idle");
    refreshRecord(state.jobId);
    refreshJobs();
  }

  async function refreshRecord(jobId) {
    try {
      const job = await api(jobApi(jobId));
      if (state.jobId === jobId) updateJob(job);
    } catch {
      // the stream said what matters; the record's details are a bonus
    }
  }

  async function diagnose(jobId) {
    try {
      const job = await api(jobApi(jobId));
      if (state.jobId !== jobId) return;
      updateJob(job);
      notify("The live output could not be opened. Reconnect to try again.");
    } catch (err) {
      if (state.jobId !== jobId) return;
      if (err.status === 404) return showMissing(jobId);
      if (err.status !== 401) notify(`The live output could not be opened: ${err.message}`);
    }
    $("resume").hidden = false;
  }

  function resume() {
    if (!state.jobId) return;
    clearNotice();
    $("job-error").hidden = true;
    openStream(state.jobId);
  }

  async function cancelJob() {
    const jobId = state.jobId;
    state.cancelling = true;
    renderJob(state.job);
    try {
      await api(jobApi(jobId), { method: "DELETE" });
    } catch (err) {
      if (state.jobId !== jobId) return;
      state.cancelling = false;
      renderJob(state.job);
      if (err.status !== 409 && err.status !== 401) notify(`Could not cancel the job: ${err.message}`);
    }
  }

  /** With a token, the full log is fetched with it and saved; without, the link works as it is. */
  async function openFullLog(event) {
    const link = event.target.closest("a.full-log, #full-log");
    if (!link || !token()) return;
    event.preventDefault();
    try {
      const response = await fetch(link.href, { headers: authHeaders() });
      if (!response.ok) throw new ApiError(response.status, null);
      const url = URL.createObjectURL(await response.blob());
      el("a", { href: url, download: `${state.jobId}.log` }).click();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      notify(`Could not fetch the full log: ${err.message}`);
    }
  }

  // ---------------------------------------------------------------- the forms

  function fillSelect(select, options, wanted) {
    const previous = wanted || select.value;
    select.replaceChildren(...options);
    if ([...select.options].some((option) => option.value === previous)) select.value = previous;
  }

  let descriptions = new Map();

  async function loadTools() {
    try {
      const tools = await api("/api/tools");
      descriptions = new Map(tools.map((tool) => [tool.id, tool.description]));
      fillSelect($("tool"), tools.map((tool) => el("option", { value: tool.id, textContent: tool.id })));
      describeTool();
    } catch (err) {
      if (err.status !== 401) notify(`Could not list the tools: ${err.message}`);
    }
  }

  function describeTool() {
    $("tool-desc").textContent = descriptions.get($("tool").value) || "";
  }

  async function loadProjects(wanted) {
    try {
      const projects = await api("/api/projects");
      const option = (p) => el("option", { value: p.projectId, textContent: p.projectId });
      const configured = projects.filter((p) => !p.uploaded).map(option);
      const uploaded = projects.filter((p) => p.uploaded).map(option);
      const groups = uploaded.length
        ? [el("optgroup", { label: "Projects" }, ...configured), el("optgroup", { label: "Uploaded" }, ...uploaded)]
        : configured;
      fillSelect($("project"), groups, wanted);
    } catch (err) {
      if (err.status !== 401) notify(`Could not list the projects: ${err.message}`);
    }
  }

  async function runTool(event) {
    event.preventDefault();
    const run = $("run");
    run.disabled = true;
    try {
      const body = JSON.stringify({ toolId: $("tool").value, projectId: $("project").value });
      const data = await api("/api/execute", { method: "POST", headers: { "Content-Type": "application/json" }, body });
      clearNotice();
      openJob(data.jobId, { push: true });
      refreshJobs();
      if (matchMedia("(max-width: 860px)").matches) $("job").scrollIntoView({ block: "start" }); // one column
    } catch (err) {
      if (err.status !== 401) notify(`Could not start the job: ${err.message}`);
    } finally {
      run.disabled = false;
    }
  }

  async function upload(event) {
    event.preventDefault();
    const file = $("upload-file").files[0];
    const status = $("upload-status");
    if (!file) return;
    const form = new FormData();
    form.append("file", file, file.name);
    status.textContent = `Uploading ${file.name}…`;
    $("upload").disabled = true;
    try {
      const data = await api("/api/projects", { method: "POST", body: form });
      await loadProjects(data.projectId); // the new project is listed and picked before we say so
      $("upload-form").reset();
      const files = data.fileCount === 1 ? "1 file" : `${data.fileCount} files`;
      status.textContent = `Uploaded as “${data.projectId}”: ${files}, ${formatBytes(data.bytes)}.`;
    } catch (err) {
      const unsupported = err.status === 404 || err.status === 405;
      status.textContent = unsupported ? "This service does not take uploads." : `Upload refused: ${err.message}`;
    } finally {
      $("upload").disabled = false;
    }
  }

  // ---------------------------------------------------------------- past jobs

  let listRequest = 0;

  async function refreshJobs() {
    const request = ++listRequest;
    let jobs;
    try {
      jobs = await api(`/api/jobs?limit=${JOBS_SHOWN}`);
    } catch (err) {
      if (err.status !== 401) $("jobs-empty").textContent = `Could not list the jobs: ${err.message}`;
      $("jobs-empty").hidden = false;
      return;
    }
    if (request !== listRequest) return; // a newer listing is on its way
    $("jobs").replaceChildren(...jobs.map(jobItem));
    $("jobs-empty").textContent = "No jobs yet.";
    $("jobs-empty").hidden = jobs.length > 0;
    markCurrent();
  }

  function jobItem(job) {
    const when = el("time", { dateTime: job.createdAt || "", textContent: formatAgo(job.createdAt) });
    const duration = FINAL.has(job.status) && known(job.durationMs) ? ` · ${formatDuration(job.durationMs)}` : "";
    const link = el(
      "a",
      { href: jobPath(job.jobId), className: "job-link" },
      el(
        "span",
        { className: "job-line" },
        el("strong", { textContent: job.toolId }),
        el("span", { className: "on", textContent: " on " }),
        job.projectId,
      ),
      badge(job.status),
      el("span", { className: "job-meta" }, when, duration),
    );
    link.dataset.jobId = job.jobId;
    return el("li", {}, link);
  }

  function markCurrent() {
    for (const link of $("jobs").querySelectorAll("a.job-link")) {
      if (link.dataset.jobId === state.jobId) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  /** A plain click opens the job in place; other clicks (new tab, ...) are the browser's. */
  function onJobClick(event) {
    const link = event.target.closest("a.job-link");
    if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    openJob(link.dataset.jobId, { push: true });
  }

  // ---------------------------------------------------------------- routing and start-up

  function jobIdOfPath() {
    const match = location.pathname.match(/^\/jobs\/([^/]+)$/);
    if (!match) return null;
    try {
      return decodeURIComponent(match[1]);
    } catch {
      return null;
    }
  }

  function route() {
    const jobId = jobIdOfPath();
    if (jobId) openJob(jobId);
    else showIdle();
  }

  function goHome(event) {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    if (location.pathname !== "/") history.pushState({}, "", "/");
    showIdle();
  }

  function reloadAll() {
    loadTools();
    loadProjects();
    refreshJobs();
    route();
  }

  function wire() {
    $("run-form").addEventListener("submit", runTool);
    $("tool").addEventListener("change", describeTool);
    $("upload-form").addEventListener("submit", upload);
    $("jobs").addEventListener("click", onJobClick);
    $("jobs-refresh").addEventListener("click", refreshJobs);
    $("cancel").addEventListener("click", cancelJob);
    $("resume").addEventListener("click", resume);
    $("log").addEventListener("scroll", onLogScroll, { passive: true });
    $("follow").addEventListener("click", jumpToLatest);
    $("notice-close").addEventListener("click", clearNotice);
    $("home").addEventListener("click", goHome);
    document.addEventListener("click", openFullLog);
    window.addEventListener("popstate", route);
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setToken($("token").value.trim());
      $("token-box").open = false;
      clearNotice();
      reloadAll();
    });
    $("token-clear").addEventListener("click", () => {
      $("token").value = "";
      setToken("");
      reloadAll();
    });
  }

  function start() {
    wire();
    $("token").value = token();
    showTokenState();
    loadTools();
    loadProjects();
    refreshJobs();
    route();
  }

  start();
})();

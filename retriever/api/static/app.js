// The retriever search page: text search, image search (drop, pick or paste), a result grid and a
// detail view. Plain browser JavaScript, no build step and no dependencies. Every URL is relative, so
// the page also works behind a reverse proxy that serves it under a path prefix.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);

  const els = {
    form: $("#search-form"),
    q: $("#q"),
    button: $("#search-btn"),
    k: $("#k"),
    rerank: $("#rerank"),
    file: $("#file"),
    health: $("#health"),
    status: $("#status"),
    error: $("#error"),
    results: $("#results"),
    overlay: $("#drop-overlay"),
    queryImage: $("#query-image"),
    queryImageImg: $("#query-image-img"),
    queryImageName: $("#query-image-name"),
    modal: $("#modal"),
    modalTitle: $("#modal-title"),
    modalImg: $("#modal-img"),
    modalScores: $("#modal-scores"),
    modalMeta: $("#modal-meta"),
    modalOpen: $("#modal-open"),
    modalClose: $("#modal-close"),
  };

  const DEFAULT_RETRY_SECONDS = 2;
  const MAX_RETRY_SECONDS = 30;

  /** The search in progress: its AbortController and its pending retry timer. */
  let current = null;
  /** The last image searched with, so that switching "similar images"/"captions" can search again. */
  let lastImage = null;
  let lastImageUrl = null;
  /** Counts nested dragenter/dragleave pairs, to know when a drag has really left the window. */
  let dragDepth = 0;
  /** Increases with each opened detail view, so a slow metadata answer cannot fill a newer one. */
  let modalToken = 0;

  // -- helpers ------------------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function basename(path) {
    if (!path) return "";
    const parts = String(path).split(/[\\/]/);
    return parts[parts.length - 1] || String(path);
  }

  function fmtNumber(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "—";
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }

  function fmtTime(value) {
    if (value === null || value === undefined || value === "") return "—";
    let date;
    if (typeof value === "number") date = new Date(value > 1e12 ? value : value * 1000);
    else date = new Date(value);
    return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
  }

  function plural(n, word) {
    return `${n.toLocaleString()} ${word}${n === 1 ? "" : "s"}`;
  }

  /** FastAPI's `detail` is a string for errors the app raises, a list of problems for validation. */
  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((item) => {
          if (!item || typeof item !== "object") return String(item);
          const where = Array.isArray(item.loc)
            ? item.loc.filter((p) => p !== "query" && p !== "body").join(".")
            : "";
          return where ? `${where}: ${item.msg}` : String(item.msg);
        })
        .join("; ");
    }
    if (detail && typeof detail === "object") return detail.message || JSON.stringify(detail);
    return "";
  }

  async function errorMessage(resp) {
    let detail = "";
    try {
      detail = formatDetail((await resp.json()).detail);
    } catch {
      // not JSON: fall back to the status line
    }
    return detail || `The server answered ${resp.status} ${resp.statusText || ""}`.trim();
  }

  /** Retry-After is either seconds or an HTTP date. */
  function retryAfterSeconds(resp) {
    const raw = resp.headers.get("Retry-After");
    let seconds = DEFAULT_RETRY_SECONDS;
    if (raw !== null && raw.trim() !== "") {
      const n = Number(raw);
      if (Number.isFinite(n)) seconds = n;
      else {
        const at = Date.parse(raw);
        if (!Number.isNaN(at)) seconds = (at - Date.now()) / 1000;
      }
    }
    return Math.min(Math.max(Math.ceil(seconds), 1), MAX_RETRY_SECONDS);
  }

  // -- state shown to the user --------------------------------------------------------------------

  function setStatus(state, text, { spinner = false } = {}) {
    els.status.dataset.state = state;
    els.status.replaceChildren();
    if (spinner) els.status.append(el("span", { class: "spinner", "aria-hidden": "true" }));
    if (text) els.status.append(el("span", { class: "status-text", text }));
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function setBusy(busy) {
    els.button.disabled = busy;
    els.button.textContent = busy ? "Searching…" : "Search";
    els.results.setAttribute("aria-busy", String(busy));
    document.body.classList.toggle("busy", busy);
  }

  function cancelCurrent() {
    if (!current) return;
    current.controller.abort();
    clearTimeout(current.timer);
    current = null;
  }

  // -- searching ----------------------------------------------------------------------------------

  /**
   * Run one search. `request()` builds a fresh {url, init} each attempt (a FormData body cannot be
   * sent twice); `kind` is "images" or "texts", the kind of hits to render.
   */
  function runSearch(request, kind) {
    cancelCurrent();
    const job = { controller: new AbortController(), timer: 0 };
    current = job;
    clearError();

    const attempt = async () => {
      if (current !== job) return;
      setBusy(true);
      setStatus("busy", "Searching…", { spinner: true });
      const { url, init } = request();
      let resp;
      try {
        resp = await fetch(url, { ...init, signal: job.controller.signal, headers: { Accept: "application/json" } });
      } catch (err) {
        if (job.controller.signal.aborted || current !== job) return;
        finish(job);
        setStatus("error", "");
        showError(`Could not reach the server: ${err && err.message ? err.message : err}`);
        return;
      }
      if (current !== job) return;
      // 503 with Retry-After: the models are still loading. A 503 without it (the models failed to
      // load) is an error like any other.
      if (resp.status === 503 && resp.headers.has("Retry-After")) {
        const wait = retryAfterSeconds(resp);
        // The button stays usable while waiting: a new search replaces this one.
        setBusy(false);
        els.results.setAttribute("aria-busy", "true");
        setStatus("loading", `Models are loading, retrying in ${wait} s…`, { spinner: true });
        job.timer = setTimeout(attempt, wait * 1000);
        return;
      }
      if (!resp.ok) {
        const message = await errorMessage(resp);
        if (current !== job) return;
        finish(job);
        setStatus("error", "");
        showError(message);
        return;
      }
      let body;
      try {
        body = await resp.json();
      } catch {
        if (current !== job) return;
        finish(job);
        setStatus("error", "");
        showError("The server sent a response that is not JSON.");
        return;
      }
      if (current !== job) return;
      finish(job);
      render(body, kind);
    };
    attempt();
  }

  function finish(job) {
    if (current === job) current = null;
    setBusy(false);
  }

  function textSearch() {
    const q = els.q.value;
    if (!q.trim()) {
      // Said here in words, instead of the server's "q: String should have at least 1 character".
      cancelCurrent();
      els.results.replaceChildren();
      setStatus("error", "");
      showError("Type some words to search for, or drop an image.");
      els.q.focus();
      return;
    }
    const params = new URLSearchParams({ q, k: els.k.value, rerank: String(els.rerank.checked) });
    const pageParams = new URLSearchParams(location.search);
    if (q.trim()) pageParams.set("q", q.trim());
    else pageParams.delete("q");
    const query = pageParams.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
    runSearch(() => ({ url: `v1/search?${params}`, init: { method: "GET" } }), "images");
  }

  function selectedTarget() {
    const checked = document.querySelector('input[name="target"]:checked');
    return checked ? checked.value : "images";
  }

  function imageSearch(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      cancelCurrent();
      setStatus("error", "");
      showError(`${file.name || "That file"} is not an image (${file.type}).`);
      return;
    }
    lastImage = file;
    if (lastImageUrl) URL.revokeObjectURL(lastImageUrl);
    lastImageUrl = URL.createObjectURL(file);
    els.queryImageImg.src = lastImageUrl;
    els.queryImageName.textContent = file.name || "pasted image";
    els.queryImage.hidden = false;
    const target = selectedTarget();
    runSearch(() => {
      const form = new FormData();
      form.append("file", file, file.name || "image");
      form.append("target", target);
      form.append("k", els.k.value);
      return { url: "v1/search/image", init: { method: "POST", body: form } };
    }, target);
  }

  // -- rendering ----------------------------------------------------------------------------------

  // The same three numbers, under the same names, as the API and the CLI: first the score the hits
  // are ranked by, then the ITM logit (when the hit was reranked) and the prefilter cosine.
  function scoreBadges(hit) {
    const reranked = hit.rerank_score !== null && hit.rerank_score !== undefined;
    return el(
      "span",
      { class: "scores" },
      el(
        "span",
        {
          class: "score score-main",
          title: reranked
            ? `Ranked by this score: the ITM logit plus the prefilter's logit: ${hit.score}`
            : `Ranked by this score: the prefilter cosine: ${hit.score}`,
        },
        el("span", { class: "score-label", text: "score" }),
        el("span", { class: "score-value", text: fmtNumber(hit.score, 2) }),
      ),
      reranked
        ? el(
            "span",
            {
              class: "score score-itm",
              title: `ViLT image-text matching logit, higher is better: ${hit.rerank_score}`,
            },
            el("span", { class: "score-label", text: "ITM" }),
            el("span", { class: "score-value", text: fmtNumber(hit.rerank_score, 2) }),
          )
        : null,
      el(
        "span",
        { class: "score score-cos", title: `CLIP prefilter cosine similarity: ${hit.prefilter_score}` },
        el("span", { class: "score-label", text: "cos" }),
        el("span", { class: "score-value", text: fmtNumber(hit.prefilter_score, 3) }),
      ),
    );
  }

  function imageHit(hit) {
    const name = hit.filename || basename(hit.path) || `image ${hit.id}`;
    const open = () => openModal(hit, name);
    return el(
      "li",
      { class: "hit", dataset: { id: String(hit.id), rank: String(hit.rank) } },
      el(
        "button",
        { type: "button", class: "thumb", "aria-label": `Open ${name}`, onclick: open },
        el("img", {
          src: `v1/images/${encodeURIComponent(hit.id)}/thumbnail?size=256`,
          alt: name,
          loading: "lazy",
          decoding: "async",
        }),
        el("span", { class: "rank", text: `#${hit.rank}`, "aria-hidden": "true" }),
      ),
      el(
        "div",
        { class: "hit-info" },
        el("span", { class: "filename", title: hit.path || name, text: name }),
        scoreBadges(hit),
      ),
    );
  }

  function captionHit(hit) {
    return el(
      "li",
      { class: "caption", dataset: { id: String(hit.id), rank: String(hit.rank) } },
      el("span", { class: "rank", text: `#${hit.rank}` }),
      el("p", { class: "caption-text", text: hit.text ?? "" }),
      scoreBadges(hit),
    );
  }

  function totalSeconds(seconds) {
    if (!seconds || typeof seconds !== "object") return null;
    if (typeof seconds.total === "number") return seconds.total;
    const values = Object.values(seconds).filter((v) => typeof v === "number");
    return values.length ? values.reduce((a, b) => a + b, 0) : null;
  }

  function render(body, kind) {
    const hits = Array.isArray(body.data) ? body.data : [];
    els.results.dataset.kind = kind;
    els.results.setAttribute("aria-busy", "false");
    const secs = totalSeconds(body.seconds);
    const timing = secs === null ? "" : ` in ${secs.toFixed(2)} s`;
    const noun = kind === "texts" ? "caption" : "image";
    setStatus("done", `${plural(hits.length, noun)}${timing}`);
    if (!hits.length) {
      els.results.replaceChildren(el("p", { class: "empty", text: "Nothing found." }));
      return;
    }
    const list =
      kind === "texts"
        ? el("ol", { class: "captions" }, ...hits.map(captionHit))
        : el("ol", { class: "grid" }, ...hits.map(imageHit));
    els.results.replaceChildren(list);
  }

  // -- detail view --------------------------------------------------------------------------------

  function metaRows(target, rows) {
    target.replaceChildren();
    for (const [label, value, key] of rows) {
      target.append(el("dt", { text: label }), el("dd", { text: value, dataset: key ? { key } : undefined }));
    }
  }

  function openModal(hit, name) {
    const token = ++modalToken;
    const id = encodeURIComponent(hit.id);
    els.modal.dataset.id = String(hit.id);
    els.modalTitle.textContent = name;
    els.modalImg.alt = name;
    els.modalImg.onerror = () => {
      // Browsers cannot show every format that can be indexed (TIFF, HEIC…): fall back to a large JPEG.
      els.modalImg.onerror = null;
      els.modalImg.src = `v1/images/${id}/thumbnail?size=1024`;
    };
    els.modalImg.src = `v1/images/${id}/file`;
    els.modalOpen.href = `v1/images/${id}/file`;
    metaRows(els.modalScores, [
      ["Rank", String(hit.rank), "rank"],
      ["Score (ranked by)", fmtNumber(hit.score, 3), "score"],
      ["ITM logit", fmtNumber(hit.rerank_score, 3), "rerank_score"],
      ["Prefilter cosine", fmtNumber(hit.prefilter_score, 4), "prefilter_score"],
    ]);
    metaRows(els.modalMeta, [["Details", "Loading…"]]);
    els.modalMeta.setAttribute("aria-busy", "true");
    if (!els.modal.open) els.modal.showModal();
    fetch(`v1/images/${id}`, { headers: { Accept: "application/json" } })
      .then(async (resp) => {
        if (!resp.ok) throw new Error(await errorMessage(resp));
        return resp.json();
      })
      .then((m) => {
        if (token !== modalToken) return;
        const dims = m.width && m.height ? `${m.width} × ${m.height}` : "—";
        metaRows(els.modalMeta, [
          ["File", m.filename ?? name, "filename"],
          ["Path", m.path ?? "—", "path"],
          ["Dimensions", dims, "dimensions"],
          ["Size", fmtBytes(m.size), "size"],
          ["Modified", fmtTime(m.mtime), "mtime"],
          ["Indexed", fmtTime(m.indexed_at), "indexed_at"],
          ["Content hash", m.content_hash ? String(m.content_hash).slice(0, 16) : "—", "content_hash"],
          ["Prefilter", m.prefilter_model ?? "—", "prefilter_model"],
          ["Reranker", m.reranker_model ?? "—", "reranker_model"],
        ]);
        els.modalMeta.setAttribute("aria-busy", "false");
      })
      .catch((err) => {
        if (token !== modalToken) return;
        metaRows(els.modalMeta, [["Details", `could not be loaded: ${err.message || err}`, "error"]]);
        els.modalMeta.setAttribute("aria-busy", "false");
      });
  }

  function closeModal() {
    if (els.modal.open) els.modal.close();
  }

  els.modalClose.addEventListener("click", closeModal);
  // A click on the backdrop lands on the <dialog> itself, outside its content box.
  els.modal.addEventListener("click", (event) => {
    if (event.target !== els.modal) return;
    const r = els.modal.getBoundingClientRect();
    const inside = event.clientX >= r.left && event.clientX <= r.right && event.clientY >= r.top && event.clientY <= r.bottom;
    if (!inside) closeModal();
  });
  // <dialog> closes on Escape by itself; this also covers a browser that only fires keydown.
  els.modal.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      closeModal();
    }
  });
  els.modal.addEventListener("close", () => {
    modalToken += 1;
    els.modalImg.onerror = null;
    els.modalImg.removeAttribute("src");
    delete els.modal.dataset.id;
  });

  // -- health -------------------------------------------------------------------------------------

  async function pollHealth() {
    let next = 0;
    try {
      const resp = await fetch("health", { headers: { Accept: "application/json" }, cache: "no-store" });
      const body = await resp.json();
      if (body.status === "ok") {
        els.health.dataset.state = "ok";
        els.health.textContent = `${plural(body.images ?? 0, "image")} · ${plural(body.texts ?? 0, "caption")}`;
      } else if (body.status === "error") {
        els.health.dataset.state = "down";
        els.health.textContent = `Models failed to load${body.error ? `: ${body.error}` : ""}`;
      } else {
        const loading = Array.isArray(body.loading) && body.loading.length ? `: ${body.loading.join(", ")}` : "";
        els.health.dataset.state = "loading";
        els.health.textContent = `Loading models${loading}…`;
        next = 2000;
      }
    } catch {
      els.health.dataset.state = "down";
      els.health.textContent = "Server unreachable";
      next = 5000;
    }
    if (next) setTimeout(pollHealth, next);
  }

  // -- wiring -------------------------------------------------------------------------------------

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    textSearch();
  });

  els.file.addEventListener("change", () => {
    const file = els.file.files && els.file.files[0];
    if (file) imageSearch(file);
    els.file.value = ""; // choosing the same file again still fires change
  });

  for (const radio of document.querySelectorAll('input[name="target"]')) {
    radio.addEventListener("change", () => {
      if (lastImage && els.results.dataset.kind !== "none" && !els.queryImage.hidden) imageSearch(lastImage);
    });
  }

  function hasFiles(event) {
    return !!event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }

  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    els.overlay.hidden = false;
  });
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) els.overlay.hidden = true;
  });
  window.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    els.overlay.hidden = true;
    imageSearch(event.dataTransfer.files[0]);
  });

  // Paste an image (e.g. a screenshot) to search with it.
  window.addEventListener("paste", (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.files || []) : [];
    const image = items.find((f) => f.type.startsWith("image/"));
    if (image) {
      event.preventDefault();
      imageSearch(image);
    }
  });

  // "/" focuses the search box, as on many search pages.
  document.addEventListener("keydown", (event) => {
    const t = event.target;
    const typing = t instanceof HTMLElement && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
    if (event.key === "/" && !typing && !els.modal.open) {
      event.preventDefault();
      els.q.focus();
    }
  });

  pollHealth();
  const initial = new URLSearchParams(location.search).get("q");
  if (initial && initial.trim()) {
    els.q.value = initial;
    textSearch();
  }
  document.documentElement.dataset.ready = "true";
})();

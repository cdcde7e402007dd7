// har-flax web UI: choose/drop/paste a photo, preview it, POST it to /predict, show the bars.
// Plain browser JavaScript, no build step and no third-party code (the page works offline).
// Every server-supplied string (class names, messages) goes in with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const maxUploadBytes = Number(app.dataset.maxUploadBytes);
  const maxUploadMb = app.dataset.maxUploadMb;
  const TOP_VISIBLE = 5;
  const ACCEPTED = ["image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"];

  const views = {
    start: $("start-view"),
    preview: $("preview-view"),
    result: $("result-view"),
    error: $("error-view"),
  };
  const fileInput = $("file-input");
  const dropzone = $("dropzone");
  const recognizeButton = $("recognize-button");
  const changeButton = $("change-button");
  const spinner = $("spinner");
  const cancelButton = $("cancel-button");
  const retryButton = $("error-retry");
  const bars = $("bars");
  const showAll = $("show-all");

  let chosen = []; // File objects, in frame order
  let previewUrls = [];
  let busy = false;
  let inFlight = null; // the AbortController of the request being answered

  function show(name) {
    for (const [key, el] of Object.entries(views)) el.hidden = key !== name;
  }

  function percent(x) {
    return (100 * x).toFixed(1) + "%";
  }

  function formatBytes(n) {
    // Binary units, as the server's limit (HAR_MAX_UPLOAD_MB) is counted.
    return n >= 1048576 ? (n / 1048576).toFixed(1) + " MiB" : Math.ceil(n / 1024) + " KiB";
  }

  // ---- model information -------------------------------------------------------------------

  // Which model the header describes ("name version"), null until /classes has answered. The
  // page may load while the model server is down, and the server may be restarted with another
  // model: the header is refreshed on retry and whenever a result comes from a different model.
  let shownModel = null;
  let infoLoading = false;
  let infoRetryTimer = null;
  let infoRetryDelay = 2000;
  const INFO_RETRY_MAX = 60000;

  // The model last described by /classes or a result (null before either): it decides what
  // several photos mean. A sequence model (num_frames > 1) takes them as the frames of one
  // sequence; a one-frame model (the ImageNet classifier, an action model trained on stills)
  // classifies each and averages the answers.
  let currentModel = null;

  function modelKey(model) {
    return model.name + " " + model.version;
  }

  function isSequenceModel() {
    return currentModel !== null && currentModel.num_frames > 1;
  }

  function describeFrames() {
    $("frames-hint").textContent = isSequenceModel()
      ? "Several photos are the frames of one sequence, in the order chosen (this model takes " +
        currentModel.num_frames + " frames: more or fewer are sampled evenly); an animated GIF " +
        "counts as its frames."
      : "Several photos are each classified and their scores averaged; an animated GIF counts " +
        "as its frames.";
    if (chosen.length > 1) $("preview-caption").textContent = previewCaption();
  }

  function showKind(model) {
    $("imagenet-notice").hidden = model.kind !== "imagenet";
  }

  async function loadModelInfo() {
    if (infoLoading) return;
    infoLoading = true;
    clearTimeout(infoRetryTimer);
    infoRetryTimer = null;
    const info = $("model-info");
    try {
      const response = await fetch("classes", { headers: { Accept: "application/json" } });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
      const model = body.model;
      const kind = model.kind === "imagenet" ? "ImageNet object classifier" : "action model";
      info.textContent =
        "Model: " + model.name + (model.version ? " (" + model.version + ")" : "") +
        " — " + kind + ", " + body.classes.length + " classes" +
        (model.num_frames > 1 ? ", " + model.num_frames + " frames per sequence" : "") + ".";
      info.classList.remove("warning");
      showKind(model);
      currentModel = model;
      describeFrames();
      const list = $("class-list");
      list.replaceChildren();
      for (const name of body.classes) {
        const li = document.createElement("li");
        li.textContent = name;
        list.append(li);
      }
      $("classes-summary").textContent = "All " + body.classes.length + " classes";
      $("classes-details").hidden = false;
      shownModel = modelKey(model);
      infoRetryDelay = 2000;
    } catch (err) {
      if (shownModel === null) {
        info.textContent = "No model information yet: " + err.message.replace(/\.$/, "") +
          ". You can still choose a photo; recognition will work once the model server answers.";
        info.classList.add("warning");
      }
      // Try again later, less often each time, so the header recovers by itself.
      infoRetryTimer = setTimeout(loadModelInfo, infoRetryDelay);
      infoRetryDelay = Math.min(2 * infoRetryDelay, INFO_RETRY_MAX);
    } finally {
      infoLoading = false;
    }
  }

  function modelAnswered(model) {
    // The notice must match the model that produced the result on screen, at once.
    showKind(model);
    currentModel = model;
    describeFrames();
    if (shownModel !== modelKey(model)) loadModelInfo();
  }

  // ---- choosing files ----------------------------------------------------------------------

  function selectFiles(fileList) {
    const files = Array.from(fileList || []);
    if (files.length === 0) return;
    // New photos replace the ones being recognised: that answer would be for the old ones.
    if (inFlight) inFlight.abort();
    // The browser guesses the type from the name; with no guess the server decides.
    const unknown = ["", "application/octet-stream"];
    const notImage = files.find((f) => !unknown.includes(f.type) && !ACCEPTED.includes(f.type));
    if (notImage) {
      showError(
        "“" + notImage.name + "” " +
        (notImage.type.startsWith("image/")
          ? "is in the " + notImage.type.slice(6).toUpperCase() + " format, which this service cannot read."
          : "is not a photo (" + notImage.type + ").") +
        " Choose a JPEG, PNG, WebP, GIF or BMP image."
      );
      return;
    }
    const total = files.reduce((n, f) => n + f.size, 0);
    if (total > maxUploadBytes) {
      showError(
        "That is " + formatBytes(total) + "; the limit is " + maxUploadMb +
        " MiB for all files together. Choose a smaller photo or fewer frames."
      );
      return;
    }
    chosen = files;
    renderPreview();
  }

  function clearPreview() {
    for (const url of previewUrls) URL.revokeObjectURL(url);
    previewUrls = [];
    $("preview-list").replaceChildren();
  }

  function previewCaption() {
    if (chosen.length === 1) return chosen[0].name + " (" + formatBytes(chosen[0].size) + ")";
    if (currentModel === null) return chosen.length + " photos, sent together in this order.";
    return chosen.length + " photos, " + (isSequenceModel()
      ? "sent as the frames of one sequence in this order."
      : "each classified and their scores averaged.");
  }

  function renderPreview() {
    clearPreview();
    const list = $("preview-list");
    chosen.forEach((file, i) => {
      const url = URL.createObjectURL(file);
      previewUrls.push(url);
      const img = document.createElement("img");
      img.src = url;
      img.alt = chosen.length > 1 ? "Frame " + (i + 1) + ": " + file.name : file.name;
      img.className = "preview";
      list.append(img);
    });
    $("preview-caption").textContent = previewCaption();
    show("preview");
    recognizeButton.focus();
  }

  fileInput.addEventListener("change", () => {
    const files = Array.from(fileInput.files);
    // Emptied, so that choosing the same file again (after a drop or paste) is a change too.
    fileInput.value = "";
    selectFiles(files);
  });
  $("choose-button").addEventListener("click", () => fileInput.click());
  changeButton.addEventListener("click", () => fileInput.click());

  // Dragging over the whole page is allowed so a near-miss drop does not open the image.
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  document.addEventListener("dragleave", (event) => {
    if (event.target === dropzone || !event.relatedTarget) dropzone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragging");
    if (event.dataTransfer) selectFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? Array.from(event.clipboardData.files) : [];
    if (files.length) {
      event.preventDefault();
      selectFiles(files);
    }
  });

  // ---- recognising -------------------------------------------------------------------------

  function setBusy(on) {
    busy = on;
    spinner.hidden = !on;
    views.preview.setAttribute("aria-busy", on ? "true" : "false");
    // Focus moves before the focused button is disabled, so keyboard users keep their place:
    // to the status, which a screen reader then reads, not to Cancel, which a second Enter
    // (or a held key) would press at once. Cancel is a Tab away, and Escape cancels too.
    if (on) $("busy-status").focus();
    recognizeButton.disabled = on;
    changeButton.disabled = on;
  }

  // Statuses worth sending the same photos again for: rate limited, model server unreachable,
  // busy or slow (the upload itself was fine).
  const RETRYABLE = [429, 502, 503, 504];

  function failure(message, retryable) {
    const err = new Error(message);
    err.retryable = retryable;
    return err;
  }

  async function recognize() {
    if (busy || chosen.length === 0) return;
    const form = new FormData();
    for (const file of chosen) form.append("file", file, file.name);
    const controller = new AbortController();
    inFlight = controller;
    setBusy(true);
    try {
      let response;
      try {
        response = await fetch("predict", {
          method: "POST",
          body: form,
          headers: { Accept: "application/json" },
          signal: controller.signal,
        });
      } catch (err) {
        if (controller.signal.aborted) throw err;
        throw failure("Could not reach the web server (" + err.message + "). Check the connection and try again.", true);
      }
      let body;
      try {
        body = await response.json();
      } catch (err) {
        if (controller.signal.aborted) throw err;
        // A proxy in front of the app may answer with HTML (e.g. a gateway error page).
        throw failure("The server answered " + response.status + " " + response.statusText + " without details.",
          RETRYABLE.includes(response.status) || response.status >= 500);
      }
      if (!response.ok) {
        // How long to wait, when the server says (a rate limit, a model server starting).
        const wait = Math.ceil(Number(response.headers.get("Retry-After")));
        const when = wait > 0 ? " You can try again in " + wait + " s." : "";
        throw failure((body.error || "The server answered " + response.status + ".") + when,
          RETRYABLE.includes(response.status));
      }
      renderResult(body);
      modelAnswered(body.model);
    } catch (err) {
      // Cancelled, or replaced by newly chosen photos: whatever is on screen now stays.
      if (!controller.signal.aborted) showError(err.message, err.retryable === true);
    } finally {
      if (inFlight === controller) inFlight = null;
      setBusy(false);
      // After a cancel (or new photos while busy) the preview is back: focus its main button.
      if (controller.signal.aborted && !views.preview.hidden) recognizeButton.focus();
    }
  }

  recognizeButton.addEventListener("click", recognize);
  function cancel() {
    if (!inFlight) return;
    inFlight.abort();
    announce("Cancelled.");
  }

  cancelButton.addEventListener("click", cancel);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel();
  });

  // Said by screen readers (a polite live region that is never hidden): what a sighted user
  // sees change without focus going there.
  function announce(text) {
    const region = $("announce");
    region.textContent = "";
    // A new node each time, so the same words twice are read twice.
    setTimeout(() => { region.textContent = text; }, 50);
  }

  function renderResult(body) {
    $("top-action").textContent = body.action;
    $("top-confidence").textContent = percent(body.confidence);
    // What the model saw: body.num_frames is the decoded frame count for a one-frame model.
    let frames = "";
    if (body.model.num_frames > 1) {
      if (chosen.length > 1) {
        frames = chosen.length + " photos as one sequence of " + body.num_frames + " frames, ";
      }
    } else if (body.num_frames > 1) {
      frames = body.num_frames + " frames, each classified and their scores averaged, ";
    }
    $("result-meta").textContent =
      frames + "answered by " + body.model.name + " in " + Math.round(body.latency_ms) + " ms.";
    // Thumbnails of what was classified (the preview images, reused).
    const photos = $("result-photos");
    photos.replaceChildren();
    for (const img of $("preview-list").querySelectorAll("img")) {
      const copy = img.cloneNode();
      copy.className = "";
      photos.append(copy);
    }
    bars.replaceChildren();
    body.all_predictions.forEach((p, i) => {
      const li = document.createElement("li");
      li.className = "bar-row" + (i === 0 ? " best" : "");
      li.hidden = i >= TOP_VISIBLE;
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = p.action;
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      // CSSOM writes are allowed by the CSP (style-src 'self'); style="" markup would not be.
      fill.style.width = Math.max(0, Math.min(100, 100 * p.confidence)).toFixed(2) + "%";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p.confidence);
      li.append(label, track, value);
      bars.append(li);
    });
    const n = body.all_predictions.length;
    showAll.hidden = n <= TOP_VISIBLE;
    showAll.setAttribute("aria-expanded", "false");
    showAll.textContent = "Show all " + n + " classes";
    show("result");
    $("result-heading").focus();
    announce("Result: " + body.action + ", " + percent(body.confidence) + ".");
  }

  showAll.addEventListener("click", () => {
    const expand = showAll.getAttribute("aria-expanded") !== "true";
    Array.from(bars.children).forEach((li, i) => {
      li.hidden = !expand && i >= TOP_VISIBLE;
    });
    showAll.setAttribute("aria-expanded", String(expand));
    showAll.textContent = expand
      ? "Show top " + TOP_VISIBLE + " only"
      : "Show all " + bars.children.length + " classes";
  });

  // ---- errors and starting over ------------------------------------------------------------

  function showError(message, retryable = false) {
    $("error-message").textContent = message;
    // "Try again" sends the same photos once more; "Try another" starts over.
    const retry = retryable && chosen.length > 0;
    retryButton.hidden = !retry;
    retryButton.classList.toggle("primary", retry);
    $("error-try-another").classList.toggle("primary", !retry);
    show("error");
    (retry ? retryButton : $("error-try-another")).focus();
  }

  function reset() {
    chosen = [];
    clearPreview();
    fileInput.value = "";
    bars.replaceChildren();
    $("result-photos").replaceChildren();
    show("start");
    $("choose-button").focus();
  }

  $("try-another").addEventListener("click", reset);
  $("error-try-another").addEventListener("click", reset);
  retryButton.addEventListener("click", () => {
    show("preview");
    recognize();
  });

  loadModelInfo();
})();

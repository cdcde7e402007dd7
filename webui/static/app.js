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
  const bars = $("bars");
  const showAll = $("show-all");

  let chosen = []; // File objects, in frame order
  let previewUrls = [];
  let busy = false;

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

  function modelKey(model) {
    return model.name + " " + model.version;
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
    if (shownModel !== modelKey(model)) loadModelInfo();
  }

  // ---- choosing files ----------------------------------------------------------------------

  function selectFiles(fileList) {
    const files = Array.from(fileList || []);
    if (files.length === 0 || busy) return;
    const notImage = files.find((f) => !ACCEPTED.includes(f.type));
    if (notImage) {
      showError(
        "“" + notImage.name + "” is not a photo (" + (notImage.type || "unknown type") +
        "). Choose a JPEG, PNG, WebP, GIF or BMP image."
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
    $("preview-caption").textContent =
      chosen.length > 1
        ? chosen.length + " photos, sent as the frames of one sequence in this order."
        : chosen[0].name + " (" + formatBytes(chosen[0].size) + ")";
    show("preview");
    recognizeButton.focus();
  }

  fileInput.addEventListener("change", () => selectFiles(fileInput.files));
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
    recognizeButton.disabled = on;
    changeButton.disabled = on;
  }

  async function recognize() {
    if (busy || chosen.length === 0) return;
    const form = new FormData();
    for (const file of chosen) form.append("file", file, file.name);
    setBusy(true);
    try {
      let response;
      try {
        response = await fetch("predict", {
          method: "POST",
          body: form,
          headers: { Accept: "application/json" },
        });
      } catch (err) {
        throw new Error("Could not reach the web server (" + err.message + "). Check the connection and try again.");
      }
      let body;
      try {
        body = await response.json();
      } catch (err) {
        // A proxy in front of the app may answer with HTML (e.g. a gateway error page).
        throw new Error("The server answered " + response.status + " " + response.statusText + " without details.");
      }
      if (!response.ok) throw new Error(body.error || "The server answered " + response.status + ".");
      renderResult(body);
      modelAnswered(body.model);
    } catch (err) {
      showError(err.message);
    } finally {
      setBusy(false);
    }
  }

  recognizeButton.addEventListener("click", recognize);

  function renderResult(body) {
    $("top-action").textContent = body.action;
    $("top-confidence").textContent = percent(body.confidence);
    const frames = chosen.length > 1 ? chosen.length + " photos as one sequence, " : "";
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

  function showError(message) {
    $("error-message").textContent = message;
    show("error");
    $("error-try-another").focus();
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

  loadModelInfo();
})();

// Tuneboard page behaviour that htmx attributes alone do not cover: drag-and-drop into the upload form,
// a size check before sending, upload progress, and a visible message when a request fails.
(function () {
  "use strict";

  function flash(message) {
    var box = document.getElementById("flash");
    if (!box) return;
    box.textContent = message;
    box.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(function () { box.hidden = true; }, 6000);
  }

  function formatSize(bytes) {
    if (bytes < 1000) return bytes + " B";
    if (bytes < 1e6) return (bytes / 1e3).toFixed(1) + " kB";
    return (bytes / 1e6).toFixed(1) + " MB";
  }

  function setupUpload() {
    var form = document.getElementById("upload-form");
    if (!form) return;
    var input = form.querySelector("input[type=file]");
    var zone = document.getElementById("dropzone");
    var label = document.getElementById("dropzone-file");
    var progress = document.getElementById("upload-progress");
    var result = document.getElementById("upload-result");

    function showChosen() {
      var file = input.files[0];
      label.textContent = file ? file.name + " · " + formatSize(file.size) : "";
    }
    input.addEventListener("change", showChosen);
    ["dragenter", "dragover"].forEach(function (type) {
      zone.addEventListener(type, function (e) { e.preventDefault(); zone.classList.add("dragover"); });
    });
    ["dragleave", "drop"].forEach(function (type) {
      zone.addEventListener(type, function () { zone.classList.remove("dragover"); });
    });
    zone.addEventListener("drop", function (e) {
      e.preventDefault();
      if (!e.dataTransfer.files.length) return;
      input.files = e.dataTransfer.files;
      showChosen();
    });

    form.addEventListener("htmx:confirm", function (e) {
      var file = input.files[0];
      if (file && file.size > Number(form.dataset.maxBytes)) {
        e.preventDefault();
        result.innerHTML = "";
        var box = document.createElement("div");
        box.className = "alert alert-error";
        box.setAttribute("role", "alert");
        box.textContent = file.name + " is " + formatSize(file.size) + ", over the " + form.dataset.maxMb +
          " MB upload limit (TUNEBOARD_MAX_UPLOAD_MB). Nothing was sent.";
        result.appendChild(box);
      }
    });
    var status = document.getElementById("upload-status");
    function say(text) { status.textContent = text; status.hidden = !text; }
    form.addEventListener("htmx:beforeRequest", function () {
      progress.value = 0; progress.hidden = false; say("Uploading…");
    });
    form.addEventListener("htmx:xhr:progress", function (e) {
      if (!e.detail.lengthComputable) return;
      var percent = (e.detail.loaded / e.detail.total) * 100;
      if (percent < 100) {
        progress.value = percent;
        say("Uploading… " + Math.floor(percent) + "% of " + formatSize(e.detail.total));
      } else {  // sent: the server now checks every row (an indeterminate bar while it does)
        progress.removeAttribute("value");
        say("Uploaded. Checking every row…");
      }
    });
    form.addEventListener("htmx:afterRequest", function () { progress.hidden = true; say(""); });
  }

  // A duration the server rendered keeps counting while the thing it measures runs ([data-ticking]); the
  // server's next fragment replaces it with the true figure.
  function formatDuration(s) {
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }
  setInterval(function () {
    document.querySelectorAll("[data-ticking]").forEach(function (el) {
      el.dataset.seconds = Number(el.dataset.seconds || 0) + 1;
      el.textContent = formatDuration(Number(el.dataset.seconds));
    });
  }, 1000);

  // [data-copy="#selector"]: copy that element's text.
  document.addEventListener("click", function (e) {
    var button = e.target.closest("[data-copy]");
    if (!button) return;
    var label = button.textContent;
    navigator.clipboard.writeText(document.querySelector(button.dataset.copy).textContent).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = label; }, 2000);
    });
  });

  // <button data-sort="name"> in a table head: order the rows by their data-name value, high to low, then
  // low to high on the next click.
  document.addEventListener("click", function (e) {
    var button = e.target.closest("th [data-sort]");
    if (!button) return;
    var body = button.closest("table").tBodies[0];
    var key = button.dataset.sort, down = button.dataset.order !== "down";
    button.dataset.order = down ? "down" : "up";
    Array.prototype.slice.call(body.rows)
      .sort(function (a, b) { return (Number(b.dataset[key]) - Number(a.dataset[key])) * (down ? 1 : -1); })
      .forEach(function (row) { body.appendChild(row); });
  });

  // <button data-set-field="name" data-value="v">: set that field of the page's form (opening the section
  // that holds it) and tell the form it changed, so the estimate beside it follows.
  document.addEventListener("click", function (e) {
    var button = e.target.closest("[data-set-field]");
    if (!button) return;
    var field = document.querySelector('[name="' + button.dataset.setField + '"]');
    if (!field) return;
    field.value = button.dataset.value;
    var section = field.closest("details");
    if (section) section.open = true;
    field.dispatchEvent(new Event("change", { bubbles: true }));
  });

  // [data-follow]: a log that stays scrolled to its newest line.
  function follow(el) { el.scrollTop = el.scrollHeight; }
  document.addEventListener("htmx:afterSwap", function (e) { if (e.target.hasAttribute("data-follow")) follow(e.target); });

  document.addEventListener("DOMContentLoaded", function () {
    setupUpload();
    document.querySelectorAll("[data-follow]").forEach(follow);
  });
  // Errors answer htmx with an alert fragment (app.errors.error_kind): show its sentence.
  document.addEventListener("htmx:responseError", function (e) {
    var xhr = e.detail.xhr;
    var alert = new DOMParser().parseFromString(xhr.responseText || "", "text/html").querySelector(".alert");
    var sentence = alert && alert.textContent.trim();
    flash(sentence || "The server could not complete that request (HTTP " + xhr.status + "). Check the server log.");
  });
  document.addEventListener("htmx:sendError", function () {
    flash("Could not reach the Tuneboard server. Is it still running?");
  });
})();

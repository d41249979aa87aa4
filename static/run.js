// A run's page: uPlot charts fed by the run's server-sent event stream (its whole history first, then
// live points), the progress panel, and refreshes of the server-rendered parts when the status changes.
(function () {
  "use strict";

  var page = document.getElementById("run-page");
  if (!page) return;
  var runId = page.dataset.runId;
  var points = {};       // step -> {loss, eval_loss, learning_rate, grad_norm, tokens_per_second}
  var pending = false;
  var charts = {};

  function fmtDuration(s) {
    if (s == null) return "—";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }

  function scientific(u, values) {
    return values.map(function (v) { return v === 0 ? "0" : v.toExponential(1); });
  }

  function makeChart(id, series, yLabel, yValues) {
    var el = document.getElementById(id);
    var opts = {
      width: el.clientWidth || 400,
      height: 220,
      scales: { x: { time: false } },
      legend: { live: false },
      axes: [{ label: "step", size: 40 }, { label: yLabel, size: 60, values: yValues }],
      series: [{ label: "step" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, spanGaps: true, points: { show: s.points || false, size: 6, fill: s.color } };
      })),
    };
    var data = [[]].concat(series.map(function () { return []; }));
    var chart = new uPlot(opts, data, el);
    new ResizeObserver(function () { chart.setSize({ width: el.clientWidth, height: 220 }); }).observe(el);
    return { chart: chart, el: el, keys: series.map(function (s) { return s.key; }) };
  }

  function redraw() {
    pending = false;
    var steps = Object.keys(points).map(Number).sort(function (a, b) { return a - b; });
    Object.keys(charts).forEach(function (name) {
      var c = charts[name];
      var rows = steps.filter(function (s) {
        return c.keys.some(function (k) { return points[s][k] != null; });
      });
      var data = [rows].concat(c.keys.map(function (k) {
        return rows.map(function (s) { return points[s][k] != null ? points[s][k] : null; });
      }));
      c.chart.setData(data);
      c.el.dataset.points = String(rows.filter(function (s) { return points[s][c.keys[0]] != null; }).length);
    });
  }

  function add(metric) {
    var p = points[metric.step] || (points[metric.step] = {});
    ["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"].forEach(function (k) {
      if (metric[k] != null) p[k] = metric[k];
    });
    if (!pending) { pending = true; requestAnimationFrame(redraw); }
  }

  function refresh(target) {
    if (!window.htmx || !document.getElementById(target)) return;
    htmx.ajax("GET", "/runs/" + runId, { target: "#" + target, swap: "outerHTML" });
  }

  var lastStatus = page.dataset.status;
  function showStatus(s) {
    var bar = document.getElementById("run-progress");
    bar.value = s.fraction || 0;
    document.getElementById("run-step").textContent = s.step + (s.total_steps ? " / " + s.total_steps : "");
    document.getElementById("run-epoch").textContent = s.epoch != null ? s.epoch.toFixed(2) : "—";
    document.getElementById("run-eta").textContent = s.eta_seconds != null ? fmtDuration(s.eta_seconds) : "—";
    document.getElementById("run-speed").textContent = s.tokens_per_second ? Math.round(s.tokens_per_second) : "—";
    var elapsed = document.getElementById("run-elapsed");
    elapsed.dataset.seconds = s.elapsed_seconds || 0;
    elapsed.textContent = fmtDuration(s.elapsed_seconds);
    var status = s.status === "running" && s.cancel_requested ? "cancelling" : s.status;
    if (status !== lastStatus) {
      lastStatus = status;
      page.dataset.status = s.status;
      refresh("run-summary");
      refresh("run-checkpoints");
    }
  }

  function start() {
    charts.loss = makeChart("chart-loss", [
      { key: "loss", label: "train loss", color: "#4f46e5" },
      { key: "eval_loss", label: "validation loss", color: "#d97706", points: true },
    ], "loss");
    charts.lr = makeChart("chart-lr", [{ key: "learning_rate", label: "learning rate", color: "#0e9384" }], "learning rate", scientific);
    charts.grad = makeChart("chart-grad", [{ key: "grad_norm", label: "grad norm", color: "#c11574" }], "norm");
    charts.speed = makeChart("chart-speed", [{ key: "tokens_per_second", label: "tokens/s", color: "#2e90fa" }], "tokens/s");

    var source = new EventSource("/api/runs/" + runId + "/events");
    source.addEventListener("metric", function (e) { add(JSON.parse(e.data)); });
    source.addEventListener("status", function (e) { showStatus(JSON.parse(e.data)); });
    source.addEventListener("done", function (e) {
      source.close();
      showStatus(JSON.parse(e.data));
      page.dataset.done = "true";
      refresh("run-summary");
      refresh("run-checkpoints");
    });

    setInterval(function () {
      if (page.dataset.status !== "running") return;
      var el = document.getElementById("run-elapsed");
      el.dataset.seconds = Number(el.dataset.seconds) + 1;
      el.textContent = fmtDuration(Number(el.dataset.seconds));
    }, 1000);
  }

  document.addEventListener("click", function (e) {
    var button = e.target.closest("[data-copy]");
    if (!button) return;
    var text = document.querySelector(button.dataset.copy).textContent;
    navigator.clipboard.writeText(text).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy as CLI config"; }, 2000);
    });
  });

  function scrollLog() {
    var log = document.getElementById("run-log");
    if (log) log.scrollTop = log.scrollHeight;
  }
  document.addEventListener("htmx:afterSwap", function (e) { if (e.target.id === "run-log") scrollLog(); });
  document.addEventListener("DOMContentLoaded", function () { start(); scrollLog(); });
})();

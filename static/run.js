// A run's page: uPlot charts fed by the `metric` events of the page's stream (its whole history first,
// then live points), drawn as the server's chart spec says (app/charts.py, in #run-charts' data-charts).
// Everything else on the page is server-rendered fragments swapped in by htmx.
(function () {
  "use strict";

  var page = document.getElementById("run-page");
  if (!page) return;
  var points = {};       // step -> {"train:loss": 1.2, "eval:eval_loss": 1.4, ...}: every logged value
  var pending = false;
  var charts = {};

  var FORMATS = {
    plain: undefined,
    scientific: function (u, values) {
      return values.map(function (v) { return v === 0 ? "0" : v.toExponential(1); });
    },
    percent: function (u, values) { return values.map(function (v) { return Math.round(v * 100) + "%"; }); },
  };

  function makeChart(id, series, yLabel, yValues) {
    var el = document.getElementById(id);
    var opts = {
      width: el.clientWidth || 400,
      height: 220,
      scales: { x: { time: false } },
      legend: { live: false },
      axes: [{ label: "step", size: 40 }, { label: yLabel, size: 60, values: yValues }],
      series: [{ label: "step" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: s.line === false ? 0 : 2, spanGaps: true, points: { show: s.points || false, size: s.line === false ? 10 : 6, fill: s.color } };
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
    steps.forEach(function (s) {
      var p = points[s];
      p.best = s === bestStep ? (p["train:loss"] != null ? p["train:loss"] : p["eval:eval_loss"]) : null;
    });
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

  // Scored answers by step (server-rendered into #chart-answers' data-evaluation; the block is swapped in
  // again at each checkpoint), with the base model's score as flat reference lines; the best checkpoint
  // is also marked on the loss chart.
  var bestStep = null;
  var answerMetric = "chrf";  // chosen in #answers-metric; kept when the block is swapped in again
  var METRIC_LABELS = { chrf: "chrF", rouge_l: "ROUGE-L", exact: "exact match %", judge: "judge (1-10)" };
  function drawAnswers() {
    var el = document.getElementById("chart-answers");
    if (!el || el.dataset.drawn) return;
    el.dataset.drawn = "true";
    el.innerHTML = "";
    var chooser = document.getElementById("answers-metric");
    if (chooser) {
      if (!chooser.querySelector('option[value="' + answerMetric + '"]')) answerMetric = "chrf";
      chooser.value = answerMetric;
      chooser.onchange = function () {
        answerMetric = chooser.value;
        delete el.dataset.drawn;
        drawAnswers();
      };
    }
    var metric = answerMetric, label = METRIC_LABELS[metric];
    el.dataset.metric = metric;
    var data = JSON.parse(el.dataset.evaluation);
    bestStep = data.best_step;
    var base = data.steps.filter(function (s) { return s.step === 0; })[0] || {};
    var steps = data.steps.filter(function (s) { return s.step > 0; });
    var x = steps.map(function (s) { return s.step; });
    function line(split, fromBase) {
      return steps.map(function (s) {
        var source = fromBase ? base : s;
        var value = source[split] ? source[split][metric] : null;
        return value == null ? null : value;
      });
    }
    var chart = makeChart("chart-answers", [
      { key: "v", label: "held-out " + label, color: "#4f46e5", points: true },
      { key: "t", label: "training rows " + label, color: "#0e9384", points: true },
      { key: "vb", label: "base, held out", color: "#a5b4fc" },
      { key: "tb", label: "base, training rows", color: "#99f6e4" },
    ], label);
    chart.chart.setData([x, line("validation"), line("train"), line("validation", true), line("train", true)]);
    el.dataset.points = String(x.length);
    if (!pending) { pending = true; requestAnimationFrame(redraw); }
  }

  function add(metric) {
    var p = points[metric.step] || (points[metric.step] = {});
    Object.keys(metric).forEach(function (k) {
      if (k !== "kind" && k !== "step" && typeof metric[k] === "number") p[metric.kind + ":" + k] = metric[k];
    });
    if (!pending) { pending = true; requestAnimationFrame(redraw); }
  }

  function start() {
    var spec = JSON.parse(document.getElementById("run-charts").dataset.charts);
    spec.forEach(function (c) {
      var series = c.series.map(function (s) {
        return { key: s.kind + ":" + s.key, label: s.label, color: s.color, points: s.points };
      });
      if (c.best) series.push({ key: "best", label: "best checkpoint", color: "#16a34a", points: true, line: false });
      charts[c.id] = makeChart("chart-" + c.id, series, c.axis, FORMATS[c.format]);
    });

    // The page's one stream (htmx's SSE extension, on #run-page) also carries the metrics: listen to each
    // EventSource it opens (a reconnect replays the history, and points are keyed by step).
    page.addEventListener("htmx:sseOpen", function (e) {
      e.detail.source.addEventListener("metric", function (m) { add(JSON.parse(m.data)); });
    });
    page.addEventListener("htmx:sseClose", function () { page.dataset.done = "true"; });
    document.addEventListener("htmx:load", drawAnswers);  // the evaluation block, swapped in again
    drawAnswers();
  }

  start();
})();

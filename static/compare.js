// The Compare page: every chosen run's train loss (lines) and validation loss (points) on one uPlot chart,
// and their scored answers by step on a second.
(function () {
  "use strict";
  var COLORS = ["#4f46e5", "#d97706", "#0e9384", "#c11574", "#2e90fa", "#7a5af8", "#dc6803", "#099250"];

  function draw() {
    var el = document.getElementById("compare-chart");
    if (!el) return;
    var curves = JSON.parse(el.dataset.curves);
    var ids = Object.keys(curves);
    var tables = [];
    var series = [{ label: "step" }];
    ids.forEach(function (id, i) {
      var c = curves[id], color = COLORS[i % COLORS.length];
      tables.push([c.train.map(function (p) { return p[0]; }), c.train.map(function (p) { return p[1]; })]);
      series.push({ label: c.name + " train", stroke: color, width: 2, spanGaps: true, points: { show: false } });
      tables.push([c.eval.map(function (p) { return p[0]; }), c.eval.map(function (p) { return p[1]; })]);
      series.push({ label: c.name + " validation", stroke: color, width: 0, spanGaps: true, points: { show: true, size: 7, fill: color } });
    });
    var data = uPlot.join(tables);
    var chart = new uPlot({
      width: el.clientWidth || 600,
      height: 320,
      scales: { x: { time: false } },
      axes: [{ label: "step", size: 40 }, { label: "loss", size: 60 }],
      series: series,
    }, data, el);
    el.dataset.series = String(ids.length);
    new ResizeObserver(function () { chart.setSize({ width: el.clientWidth, height: 320 }); }).observe(el);
    drawAnswers(curves, ids);
  }

  // Each run's scored answers by step (step 0: its base model), one line per run.
  function drawAnswers(curves, ids) {
    var el = document.getElementById("compare-answers");
    if (!el) return;
    var scored = ids.filter(function (id) { return curves[id].answers.length; });
    var tables = scored.map(function (id) {
      var a = curves[id].answers;
      return [a.map(function (p) { return p[0]; }), a.map(function (p) { return p[1]; })];
    });
    var series = [{ label: "step" }].concat(scored.map(function (id) {
      var color = COLORS[ids.indexOf(id) % COLORS.length];
      return { label: curves[id].name + " chrF", stroke: color, width: 2, spanGaps: true, points: { show: true, size: 6, fill: color } };
    }));
    var chart = new uPlot({
      width: el.clientWidth || 600,
      height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step", size: 40 }, { label: "chrF", size: 50 }],
      series: series,
    }, uPlot.join(tables), el);
    el.dataset.series = String(scored.length);
    new ResizeObserver(function () { chart.setSize({ width: el.clientWidth, height: 260 }); }).observe(el);
  }

  document.addEventListener("DOMContentLoaded", draw);
})();

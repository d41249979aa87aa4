// Charts drawn with uPlot (vendored). The token-length histogram on a dataset page.
(function () {
  "use strict";

  function drawHistogram(el) {
    if (!el || el.dataset.drawn === el.dataset.counts) return;
    el.dataset.drawn = el.dataset.counts;
    el.innerHTML = "";
    var edges = JSON.parse(el.dataset.edges);
    var counts = JSON.parse(el.dataset.counts);
    var limit = Number(el.dataset.limit);
    var xs = counts.map(function (_, i) { return edges[i]; });
    var width = edges[1] - edges[0];
    var over = counts.map(function (c, i) { return edges[i] + width > limit ? c : null; });
    var within = counts.map(function (c, i) { return edges[i] + width > limit ? null : c; });
    var bars = uPlot.paths.bars({ size: [0.9, Infinity], align: 1 });
    var opts = {
      width: el.clientWidth || 600,
      height: 220,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false, range: [edges[0], edges[edges.length - 1]] } },
      axes: [
        { label: "tokens per row", size: 40 },
        { label: "rows", size: 50 },
      ],
      series: [
        {},
        { label: "rows", fill: "rgba(79,70,229,.55)", stroke: "#4f46e5", paths: bars, points: { show: false } },
        { label: "rows over max length", fill: "rgba(217,45,32,.55)", stroke: "#d92d20", paths: bars, points: { show: false } },
      ],
    };
    var plot = new uPlot(opts, [xs, within, over], el);
    new ResizeObserver(function () { plot.setSize({ width: el.clientWidth, height: 220 }); }).observe(el);
  }

  function drawAll() { drawHistogram(document.getElementById("length-histogram")); }
  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", drawAll);
})();

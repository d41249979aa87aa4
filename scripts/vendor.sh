#!/usr/bin/env bash
# Refresh the vendored front-end libraries in static/vendor from the npm registry.
# The versions are pinned in static/vendor/package.json; the files are committed so that
# Tuneboard serves them itself and works without internet access.
set -euo pipefail
cd "$(dirname "$0")/../static/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { python3 -c "import json,sys; print(json.load(open('package.json'))['dependencies'][sys.argv[1]])" "$1"; }
fetch() {  # npm pack writes NAME-VERSION.tgz for an unscoped package
  local version; version=$(pin "$1")
  (cd "$work" && npm pack --silent "$1@$version" >/dev/null && mkdir "$1" && tar xzf "$1-$version.tgz" -C "$1")
}
htmx=$(pin htmx.org); sse=$(pin htmx-ext-sse); uplot=$(pin uplot); parser=$(pin eventsource-parser)
rm -rf htmx-*.js uPlot-*.js uPlot-*.css eventsource-parser-*/
fetch htmx.org; fetch htmx-ext-sse; fetch uplot; fetch eventsource-parser
cp "$work/htmx.org/package/dist/htmx.min.js" "htmx-$htmx.min.js"
cp "$work/htmx.org/package/LICENSE" htmx.LICENSE
cp "$work/htmx-ext-sse/package/dist/sse.min.js" "htmx-ext-sse-$sse.min.js"
cp "$work/htmx-ext-sse/package/LICENSE" htmx-ext-sse.LICENSE
cp "$work/uplot/package/dist/uPlot.iife.min.js" "uPlot-$uplot.iife.min.js"
cp "$work/uplot/package/dist/uPlot.min.css" "uPlot-$uplot.min.css"
cp "$work/uplot/package/LICENSE" uPlot.LICENSE
# ES modules (the playground imports stream.js), without their source-map comments (maps are not shipped)
mkdir "eventsource-parser-$parser"
for module in stream parse errors; do
  sed '/^\/\/# sourceMappingURL=/d' "$work/eventsource-parser/package/dist/$module.js" > "eventsource-parser-$parser/$module.js"
done
cp "$work/eventsource-parser/package/LICENSE" eventsource-parser.LICENSE
ls -l

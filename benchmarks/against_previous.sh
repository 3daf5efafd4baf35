#!/bin/bash
# The plain I/O link crawl with scrapy-speedup of this tree against an older
# tree of it (a git worktree), one process each (SPEEDUP_CRAWL_PROCESSES=1),
# in rounds whose order alternates; prints each run's crawl span (seconds).
#
#   git worktree add /tmp/previous <commit>
#   benchmarks/against_previous.sh /tmp/previous [rounds]
#
# The old tree gets this tree's link-graph site if it has none (the spider
# imports it); its own scrapy_speedup is what the crawl runs with.
set -eu
OLD=$(realpath "$1")
ROUNDS=${2:-8}
HERE=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$OLD/scrapy_speedup/demo/graph.py" ] || cp "$HERE/scrapy_speedup/demo/graph.py" "$OLD/scrapy_speedup/demo/"
"$HERE/.venv/bin/python" -m scrapy_speedup.demo.graph --pages 2000 --links 10 --latency-ms 20 > "${TMPDIR:-/tmp}/graph-site.out" &
SITE_PID=$!
trap 'kill $SITE_PID' EXIT
sleep 1.5
SITE=$(grep -o 'http://[^ ]*' "${TMPDIR:-/tmp}/graph-site.out")
cd "$HERE/example_project"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 0 ]; then ORDER="this previous"; else ORDER="previous this"; fi
  for who in $ORDER; do
    if [ "$who" = previous ]; then TREE=$OLD; else TREE=$HERE; fi
    SPAN=$(PYTHONPATH="$TREE:$HERE/example_project" ../.venv/bin/python -m scrapy crawl links \
      -a "site=$SITE" -s LOG_LEVEL=INFO -s SPEEDUP_CRAWL_PROCESSES=1 2>&1 \
      | grep -o "'elapsed_time_seconds': [0-9.]*" | grep -o "[0-9.]*$")
    echo "round $round $who $SPAN"
  done
done

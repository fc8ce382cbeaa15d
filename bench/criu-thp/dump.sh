#!/bin/bash
# usage: dump.sh IMGDIR [APP_HG]  — start app.py in its own PID namespace, dump it
set -e
img=$1; rm -rf "$img"; mkdir -p "$img"; res=$PWD/res; mkdir -p $res; rm -f $res/*
APP_HG=${2:-0} unshare --pid --fork setsid /usr/bin/python3 $PWD/app.py $res/r </dev/null >/dev/null 2>&1 &
UPID=$!
for i in $(seq 300); do [ -e $res/r.ready ] && break; sleep 0.05; done
PID=$(pgrep -P $UPID)
grep AnonHuge /proc/$PID/smaps_rollup
CRIU_FAULT=130 timeout 60 ${CRIU:-/usr/local/lib/beam/criu} dump -D "$img" -t $PID --shell-job -o dump.log
wait $UPID || true
du -sh "$img"

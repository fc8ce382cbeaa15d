#!/bin/bash
# usage: restore1.sh CRIU IMGDIR — one eager restore; prints ms, AnonHugePages, checksum
img=$2; res=$PWD/res; rm -f $res/r.post.* $PWD/$img.pid
t0=$(date +%s%N)
timeout 60 $1 restore -D "$img" -d --shell-job -o restore.log ${VERB:+-v4} --pidfile $PWD/$img.pid || { echo restore failed; tail -5 $img/restore.log; exit 1; }
t1=$(date +%s%N)
pid=$(cat $PWD/$img.pid)
ahp=$(awk '/AnonHugePages/ {print $2}' /proc/$pid/smaps_rollup)
rss=$(awk '/^Rss/ {print $2}' /proc/$pid/smaps_rollup)
kill -USR1 $pid
for i in $(seq 200); do ls $res/r.post.* >/dev/null 2>&1 && break; sleep 0.05; done
fill=$(awk '/Preadv/ {gsub(/[()]/,"",$1); a=$1} /returned/ && a {gsub(/[()]/,"",$1); printf "%.1f", ($1-a)*1000; exit}' $img/restore.log)
echo "$(basename $1) $(( (t1-t0)/1000000 )) ms fill=${fill}ms AnonHugePages=${ahp}kB Rss=${rss}kB $(cat $res/r.post.* | cut -c1-12)"

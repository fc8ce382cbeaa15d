#!/bin/bash
# bench2.sh IMG N IDLE — per round: huge populate, patched restore, 4k populate,
# stock restore (order swapped every other round); IDLE seconds of sleep before
# each measured step (free page reporting hands idle free memory back to the host).
img=$1; n=${2:-5}; idle=${3:-0}
mib=$(du -m --apparent-size $img/pages-*.img | awk '{s+=$1} END {print s}')
echo "image pages: ${mib} MiB, idle=${idle}s"
rate() { awk -v m=$mib -v t=$1 'BEGIN {printf "%.2f", m/1024/(t/1000)}'; }
for i in $(seq $n); do
  if [ $((i % 2)) = 1 ]; then order="${THP:-thp} stock"; else order="stock ${THP:-thp}"; fi
  for b in $order; do
    sleep $idle
    if [ $b = ${THP:-thp} ]; then p=$(./populate 500 1); else p=$(./populate 500 0); fi
    sleep $idle
    r=$(VERB=1 ./restore1.sh ${CRIU_BIN_DIR:-$PWD/bin}/criu-$b $img); t=$(grep -o "thp: [0-9]* KiB read into huge pages" $img/restore.log)
    ms=$(echo "$r" | awk '{print $2}'); fill=$(echo "$r" | sed 's/.*fill=\([0-9.]*\)ms.*/\1/')
    echo "round $i | $p | $r | ${t:-} | wall $(rate $ms) GiB/s fill $(rate $fill) GiB/s"
  done
done

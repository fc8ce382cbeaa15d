#!/bin/bash
# cycle.sh IMG N — back-to-back restores of one binary (each replica killed before the next)
for b in stock ${THP:-thp}; do for i in $(seq $2); do ./restore1.sh ${CRIU_BIN_DIR:-$PWD/bin}/criu-$b $1 | sed 's/fill=[0-9.]*ms //'; done; done

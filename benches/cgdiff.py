#!/usr/bin/env python3
"""Per-function cost of one transaction (or login) from two callgrind runs.

instructions.sh runs each pooler twice, for a short and a long pgbench run; with KEEP=DIR the
callgrind files stay. Annotate both (`callgrind_annotate --inclusive=yes --threshold=100
--auto=no FILE > short.txt`, the same for the long run) and give this script the two outputs
and the number of transactions (or logins) between the runs: it prints the difference per
function divided by that number, largest first.

    benches/cgdiff.py short.txt long.txt 8000 [TOP]
"""
import re
import sys


def load(path):
    costs = {}
    for line in open(path):
        m = re.match(r'\s*([\d,]+)\s+\([^)]*\)\s+(.*)', line)
        if m and 'PROGRAM TOTALS' not in line:
            name = re.sub(r'\s*\[[^\]]*\]$', '', m.group(2))
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(',', ''))
    return costs


def main():
    short, long_ = load(sys.argv[1]), load(sys.argv[2])
    n = float(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 60
    rows = sorted(((long_.get(k, 0) - short.get(k, 0)) / n, k) for k in set(short) | set(long_))
    for per, name in reversed(rows[-top:]):
        print(f"{per:8.0f}  {name[:170]}")


if __name__ == '__main__':
    main()

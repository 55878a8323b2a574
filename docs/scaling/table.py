#!/usr/bin/env python3
"""Measured vs simulated step time from a `dsattn bench scaling` output folder (default: docs/scaling).

Prints one markdown table: for P = 2 and 4 and every scheme, the measured step (slowest rank, forward +
backward, best of the measured steps) beside the calibrated model's, at each kind's largest N.
"""
import json
import sys

folder = sys.argv[1] if len(sys.argv) > 1 else "docs/scaling"
doc = json.load(open(f"{folder}/scaling.json"))
hw = json.load(open(f"{folder}/hardware.json"))
print(f"Calibration: link α {hw['intraLatencyUs']:.1f} µs, β {hw['intraBandwidthGBs']:.2f} GB/s; "
      f"kernels flash {hw['flashTflops'] * 1e3:.2f} GFLOP/s (forward+backward), lightning {hw['lightningTflops'] * 1e3:.2f} GFLOP/s (forward+backward); {doc['environment']}\n")
print("| attention | scheme | P | N | measured ms | model ms | measured / model | compute ms | comm ms | wait ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
cases = doc["cases"]
for kind in ("lightning", "softmax"):
    ofkind = [c for c in cases if c["attention"] == kind]
    if not ofkind:
        continue
    n = max(c["n"] for c in ofkind)
    for p in (2, 4):
        for c in sorted((c for c in ofkind if c["ranks"] == p and c["n"] == n), key=lambda c: c["scheme"]):
            ranks = c["perRank"]
            mean = lambda f: sum(r["forward"][f] + r["backward"][f] for r in ranks) / len(ranks)
            model = c.get("modelMs")
            ratio = f"{c['stepMs'] / model:.2f}" if model else "-"
            print(f"| {kind} | {c['scheme']} | {p} | {n} | {c['stepMs']:.1f} | {model or 0:.1f} | {ratio} | "
                  f"{mean('computeMs'):.1f} | {mean('commMs'):.1f} | {mean('waitMs'):.1f} |")

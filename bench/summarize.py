"""Print a Markdown table of the result.json files under a directory (used by accuracy.sh)."""
import json
import sys
from pathlib import Path


def pct(s):
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def main(root: str) -> None:
    print("| run | method | ipc | pool | clom α | PTM input | synthetic (%) | random real (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(Path(root).glob("*/result.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        arch = next(iter(r["accuracy"]))
        ptm = "augmented" if c["loss"].get("augmented", True) else "raw"
        pool = ", ".join(f"{p['arch']}/e{p['epoch']} ({100 * p['test_accuracy']:.0f}%)" for p in r["pool"]) or "-"
        print(f"| {path.parent.name} | {c['distill']['method'].upper()} | {c['distill']['ipc']} | {pool} | "
              f"{c['loss']['clom'] if r['pool'] else 0} | {ptm if r['pool'] else '-'} | {pct(r['accuracy'][arch])} | "
              f"{pct(r['baseline_random'][arch])} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/accuracy")

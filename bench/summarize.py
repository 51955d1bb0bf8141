"""Print a Markdown table of the result.json files under a directory (used by accuracy.sh)."""
import json
import sys
from pathlib import Path


def pct(s):
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def main(root: str) -> None:
    print("| run | method | ipc | clom α | PTM input | synthetic (%) | random real (%) | s/iter |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(Path(root).glob("*/result.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        arch = next(iter(r["accuracy"]))
        ptm = "augmented" if c["loss"]["augmented"] else "raw"
        print(f"| {path.parent.name} | {c['distill']['method'].upper()} | {c['distill']['ipc']} | "
              f"{c['loss']['clom']} | {ptm if r['pool'] else '-'} | {pct(r['accuracy'][arch])} | "
              f"{pct(r['baseline_random'][arch])} | {r['timing']['seconds_per_iteration']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/accuracy")

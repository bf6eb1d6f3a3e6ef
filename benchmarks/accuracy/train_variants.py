#!/usr/bin/env python3
"""Train several recipes of the accuracy model side by side on one machine (one GPU is
shared by the processes) and keep the best.

    python benchmarks/accuracy/train_variants.py --out-dir OUT --work-dir /tmp/acc \\
        --common "--time-budget 290 --eval-budget 70" \\
        --variant "lr1e-3:--lr 1e-3 --seed 0" --variant "lr2e-3:--lr 2e-3 --seed 1"

Each variant runs train_accuracy_model.py with the common arguments followed by its own,
writing into WORK_DIR/NAME.  The best variant is the one with the highest mean held-out
dense accuracy over the --select-lens (all tasks); ties go to the first listed.  Into
OUT go: best/config.json, best/model.safetensors, best/results.json, summary.json (every
variant's results and the choice) and NAME.log per variant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--common", type=str, default="")
    p.add_argument("--variant", action="append", required=True, help="NAME:ARGS")
    p.add_argument("--select-lens", type=str, default="4096,8192")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for spec in args.variant:
        name, _, extra = spec.partition(":")
        wd = args.work_dir / name
        wd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-u", str(HERE / "train_accuracy_model.py"), "--out-dir", str(wd)]
        cmd += shlex.split(args.common) + shlex.split(extra)
        log = open(args.out_dir / f"{name}.log", "w")
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), wd, log, cmd)
    t0 = time.time()
    summary = {"variants": {}, "select_lens": args.select_lens}
    lens = [x for x in args.select_lens.split(",") if x]
    best, best_score = None, -1.0
    for name, (proc, wd, log, cmd) in procs.items():
        rc = proc.wait()
        log.close()
        entry = {"rc": rc, "cmd": cmd}
        res_path = wd / "results.json"
        if rc == 0 and res_path.is_file():
            res = json.loads(res_path.read_text())
            entry["results"] = res
            vals = [res["dense_accuracy"][t].get(L) for t in res["dense_accuracy"] for L in lens]
            score = sum(v for v in vals if v is not None) / max(1, len(vals))
            entry["score"] = score
            if score > best_score:
                best, best_score = name, score
        print(f"[{name}] rc={rc} score={entry.get('score')} after {time.time() - t0:.0f}s", flush=True)
        summary["variants"][name] = entry
    summary["best"] = best
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if best is None:
        print("no variant finished", flush=True)
        return 1
    dst = args.out_dir / "best"
    dst.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors", "results.json"):
        shutil.copy2(procs[best][1] / f, dst / f)
    print(f"best: {best} (score {best_score:.4f})", flush=True)
    for name, entry in summary["variants"].items():
        acc = entry.get("results", {}).get("dense_accuracy")
        print(f"{name}: {json.dumps(acc)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

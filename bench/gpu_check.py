"""The Python half of ``bench/gpu_check.sh``: the environment report at the top of the run, and
the one JSON the run leaves (step -> rc, seconds, results).

    python bench/gpu_check.py env --json ENV.json
    python bench/gpu_check.py collect --work DIR --out OUT/gpu_check.json

``collect`` reads ``DIR/steps.tsv`` (one line per step: name, rc, seconds, timeout), each
step's ``DIR/<name>.json`` and, for the parity step, pytest's ``DIR/parity.xml`` (or, when
pytest was stopped before writing it, the test lines of its output ``DIR/parity.out``); a step
whose file is missing or unreadable gets ``results: null`` and says why, and a step that
failed carries the end of its output. It prints a summary table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "numpy", "zmq",
           "llguidance", "requests", "pytest")
# the figures each step's summary row shows, from its JSON
HEADLINES = {
    "tpot": ("ratio_vs_transformers_b1", "ratio_vs_transformers_b8", "ratio_vs_floor_b1",
             "ratio_vs_floor_b8", "ratio_vs_bandwidth_floor_b1", "ratio_vs_bandwidth_floor_b8"),
    "load": ("registered_vs_pinned", "staged_vs_pinned", "pageable_vs_pinned", "h2d_registered",
             "h2d_staged"),
    "coldstart": ("speedup_pp4_vs_sequential", "pp4_vs_lower_bound"),
    "parity": ("passed", "failed", "errors", "skipped"),
    "kernels": ("passed", "failed", "errors", "skipped"),
}
PYTEST_STEPS = ("parity", "kernels")  # their results are pytest's junit XML


def versions() -> dict:
    """Each module's version, or why it does not import."""
    out = {}
    for name in MODULES:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as exc:  # noqa: BLE001 - any import failure is the answer here
            out[name] = f"missing: {type(exc).__name__}: {exc}"
    return out


def cuda_facts() -> dict:
    import torch

    facts: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if not torch.cuda.is_available():
        return facts
    props = torch.cuda.get_device_properties(0)
    facts |= {"device_count": torch.cuda.device_count(), "name": props.name,
              "capability": f"{props.major}.{props.minor}",
              "total_memory_gib": round(props.total_memory / 2**30, 1)}
    from gpu_runtime.coldstart.cuda_copy import CopyConfig, cuda_driver, probe_registration

    device = torch.device("cuda", 0)
    torch.ones(1, device=device).sum().item()
    why = probe_registration(cuda_driver(device))  # what a worker's boot will decide
    facts["h2d_probe"] = "registered" if not why else f"staged: {why}"
    facts["h2d_mode"] = CopyConfig().mode()[0]
    return facts


def nvidia_smi() -> str | None:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                               "pcie.link.gen.max,pcie.link.width.max", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not run: {exc}"
    return proc.stdout.strip() or proc.stderr.strip()


def env_report(out: Path | None) -> dict:
    from bench.common import environment

    report = {"modules": versions(), "nvidia_smi": nvidia_smi()}
    try:
        report |= {"env": environment(), "cuda": cuda_facts()}
    except Exception as exc:  # noqa: BLE001 - reported, and the steps run regardless
        report["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(report, indent=2))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def parity_results(xml_path: Path) -> dict:
    """Counts and the failures of a pytest run, from its JUnit XML."""
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"no testsuite in {xml_path}"
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "kind": kind, "message": (node.get("message") or "")[:600]})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "time_s": float(suite.get("time", 0.0)),
            "failures": failed}


TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)
TAIL_CHARS = 3000


def parity_from_output(text: str) -> dict:
    """Outcomes of the tests ``pytest -v`` printed before it was stopped."""
    outcomes = {name: outcome for name, outcome in TEST_LINE.findall(text)}
    counts = {k: sum(v == k.upper() for v in outcomes.values())
              for k in ("passed", "failed", "error", "skipped")}
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "partial": True,
            "failures": [{"test": k, "kind": v.lower()} for k, v in outcomes.items()
                         if v in ("FAILED", "ERROR")]}


def step_results(work: Path, name: str) -> tuple[dict | None, str | None]:
    """(results, why there are none)."""
    tests = name in PYTEST_STEPS
    path = work / (f"{name}.xml" if tests else f"{name}.json")
    out = work / f"{name}.out"
    if tests and not path.is_file() and out.is_file():
        return parity_from_output(out.read_text(errors="replace")), f"{name}.xml was not written"
    if not path.is_file():
        return None, f"{path.name} was not written"
    try:
        return (parity_results(path) if tests else json.loads(path.read_text())), None
    except (ValueError, AssertionError, ET.ParseError) as exc:
        return None, f"{path.name} unreadable: {exc}"


def load_paths(coldstart: dict) -> list[str]:
    """The host-to-device paths the cold starts' stages took (their load stats' ``h2d``)."""
    paths = {str((load or {}).get("h2d")) for runs in coldstart.get("runs", {}).values()
             for run in runs.values() if isinstance(run, dict)
             for load in run.get("loads", [])}
    return sorted(paths)


def collect(work: Path, out: Path, meta: dict) -> dict:
    steps: dict = {}
    lines = (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").is_file() else []
    for line in lines:
        name, rc, seconds, timeout_s = line.split("\t")
        entry: dict = {"rc": None if rc == "-" else int(rc), "seconds": float(seconds),
                       "timeout_s": int(timeout_s)}
        entry["timed_out"] = entry["rc"] in (124, 137)
        if rc == "-":
            entry["skipped"] = "no time left in the budget"
        results, why = step_results(work, name)
        entry["results"] = results
        if why:
            entry["no_results"] = why
        entry["headline"] = {k: results.get(k) for k in HEADLINES.get(name, ())} if results else {}
        if name == "coldstart" and results:
            entry["headline"]["h2d"] = load_paths(results)
        printed = work / f"{name}.out"
        if entry["rc"] not in (0, None) and printed.is_file():
            entry["output_tail"] = printed.read_text(errors="replace")[-TAIL_CHARS:]
        steps[name] = entry
    data = meta | {"steps": steps, "ok": bool(steps) and all(s["rc"] == 0 for s in steps.values())}
    out.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    print_summary(steps)
    return data


def print_summary(steps: dict) -> None:
    from bench.common import markdown_table

    rows = [{"step": k, "rc": v["rc"], "seconds": v["seconds"], "timeout": v["timeout_s"],
             "headline": ", ".join(f"{h}={_fmt(x)}" for h, x in v["headline"].items())
             or v.get("no_results", "")} for k, v in steps.items()]
    print(markdown_table(rows, ["step", "rc", "seconds", "timeout", "headline"], "{:.1f}"))


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    env = sub.add_parser("env", help="versions, the GPU, the host-register probe")
    env.add_argument("--json", type=Path, default=None)
    col = sub.add_parser("collect", help="every step's results into one JSON")
    col.add_argument("--work", type=Path, required=True)
    col.add_argument("--out", type=Path, required=True)
    col.add_argument("--device", default="cuda")
    col.add_argument("--budget-s", type=float, default=None)
    col.add_argument("--started", type=float, default=None, help="epoch seconds of the start")
    args = ap.parse_args(argv)
    if args.cmd == "env":
        env_report(args.json)
        return 0
    meta: dict = {"check": "gpu_check", "device": args.device, "budget_s": args.budget_s,
                  "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.started:
        meta["wall_s"] = time.time() - args.started
    collect(args.work, args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

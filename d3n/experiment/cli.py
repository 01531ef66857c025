"""CLI: `d3n experiment EXP.yaml [--cells a,b] [--jobs N [--devices a,b]] [--gather]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="variants x seeds of the pipeline, shared stages once, paired statistics")
    p.add_argument("config", type=Path, help="experiment YAML, e.g. experiments/neu-det-cpu.yaml")
    p.add_argument("--cells", help="comma-separated subset of cells (VARIANT-sSEED), e.g. d3n-s0,d3n-s1")
    p.add_argument("--out", type=Path, help="experiment folder (default: the file's `out`)")
    p.add_argument("--gather", action="store_true", help="only write the report from the cells that finished")
    p.add_argument("--status", action="store_true",
                   help="where every cell stands (done / running / stopped / waiting), then exit")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run side by side, each in its own process with cores / N CPU threads (default 1); "
                        "a stage two cells share is made once, the other waits for it")
    p.add_argument("--devices", help="comma-separated devices dealt out to the --jobs processes, e.g. cuda:0,cuda:1 "
                                     "(default: the config's device)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --jobs' processes
    p.add_argument("--device", help=argparse.SUPPRESS)  # a --jobs process's device
    p.set_defaults(func=_experiment)


def _experiment(args) -> int:
    from d3n.errors import ConfigError
    from d3n.experiment.runner import run_experiment, run_jobs, select
    from d3n.experiment.spec import load_experiment
    from d3n.train.device import check_device

    exp = load_experiment(args.config)
    if args.out is not None:
        exp.out = args.out.resolve()
    if args.status:
        return _status(exp)
    cells = [c.strip() for c in args.cells.split(",")] if args.cells else None
    if cells:
        select(exp, cells)  # unknown names are an error before anything starts
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {args.jobs})")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if devices and len(devices) > args.jobs and not args.worker:
        raise ConfigError(f"--devices lists {len(devices)} devices for {args.jobs} job(s): give --jobs {len(devices)}")
    for d in devices or ():
        try:
            check_device(d)
        except ValueError as exc:
            raise ConfigError(f"--devices: {exc}") from None
    if not args.gather and args.jobs > 1 and not args.worker:
        rc = run_jobs(args.config.resolve(), exp, args.jobs, cells, devices)
        if rc:
            return rc
    elif not args.gather:
        run_experiment(exp, cells, device=args.device or (devices[0] if devices else None))
    if args.worker:
        return 0  # the process that started the workers writes the report
    from d3n.experiment.report import write_experiment_report

    write_experiment_report(exp)
    return 0


def _status(exp) -> int:
    from d3n.experiment.runner import cell_states

    states = cell_states(exp)
    for st in states:
        if st["state"] == "done":
            how = f"{st['seconds'] / 60:.0f} min" if st.get("seconds") else ""
        elif st["state"] == "waiting":
            how = ""
        else:
            how = (f"at {st['stage']}" if st["stage"] else "") + (f" (made: {', '.join(st['made'])})" if st["made"] else "")
        print(f"{st['cell']:<28} {st['state']:<8} {how}")
    counts = {k: sum(st["state"] == k for st in states) for k in ("done", "running", "stopped", "waiting")}
    print(", ".join(f"{n} {k}" for k, n in counts.items()) + f" of {len(states)} cells in {exp.out}")
    return 0

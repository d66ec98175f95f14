"""``gensuite validate | train | sample | fid | summary | report``: thin commands over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gensuite.errors import GensuiteError, Interrupted, TrainingDiverged


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field, e.g. --set train.steps=100 (repeatable)")


def cmd_validate(args) -> int:
    """Each job, and each run of its sweep, as the trainer would check it before its first step on the
    launch section's rank count; with ``--data`` also against its (verified) shards."""
    from gensuite.config import load_job
    from gensuite.data.shards import open_shard_set
    from gensuite.report import job_data_spec
    from gensuite.sweep import expand
    from gensuite.trainer import JobPlan, preflight

    for path in args.jobs:
        job = load_job(path, args.overrides)
        runs = expand(job, default_run_dir(job))  # every sweep task is a valid job too
        if args.data:  # the shard set is complete and every shard matches its sha256
            open_shard_set(Path(job.data.root) / job.data.dataset)
        for run in runs:
            if args.data:
                preflight(run.job)
                continue
            spec = job_data_spec(run.job)  # the shards' manifest when they exist, else the dataset's defaults
            try:
                JobPlan.of(run.job, spec, run.job.launch.world_size, inputs_required=False)
            except GensuiteError:
                if spec.samples:  # real shards: a real refusal
                    raise
                # No shards yet: their build options (--size) may be what the family checks; --data will tell.
        sweep = f", sweep of {len(runs)} runs" if len(runs) > 1 else ""
        print(f"ok  {path}  ({job.family}/{job.flavor} on {job.data.dataset}{sweep})")
    return 0


def default_run_dir(job) -> Path:
    return Path("runs") / job.name


def cmd_train(args) -> int:
    from gensuite.config import load_job
    from gensuite.trainer import train

    job = load_job(args.job, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(job)
    train(job, run_dir)
    return 0


def cmd_summary(args) -> int:
    from gensuite.config import load_job
    from gensuite.registry import get_family
    from gensuite.report import job_data_spec, network_summary

    job = load_job(args.job, args.overrides)
    spec = job_data_spec(job)  # the shard manifest, else the dataset's static facts
    report = network_summary(job, spec)
    if args.json:
        print(json.dumps({"job": job.name, "family": job.family, "flavor": job.flavor,
                          "data_shape": list(spec.shape), "networks": report}, indent=2))
        return 0
    print(f"{job.name}: {job.family}/{job.flavor}, data {spec.dataset} {tuple(spec.shape)}")
    for name, info in report.items():
        print(f"\n== {name}: {info['parameters']:,} parameters ({info['trainable']:,} trainable)")
        print(info["architecture"])
    total = sum(i['parameters'] for i in report.values())
    paper = get_family(job.family).paper_parameters.get(job.flavor)
    print(f"\ntotal: {total:,} parameters" + (f" ({total / 1e6:.1f}M; the paper: {paper})" if paper else ""))
    return 0


def cmd_sample(args) -> int:
    from gensuite.registry import SamplerChoice
    from gensuite.sampling import draw, load_run, save_samples

    run = load_run(args.run)
    sampler = SamplerChoice.given(args.sampler, args.steps, args.eta)
    samples = draw(run, args.n, args.seed, args.label, args.text, sampler)
    out = Path(args.out) if args.out else (
        Path(args.run) / "samples" / f"sample-step{run.step}-seed{args.seed}"
                                     f"{'' if args.label is None else f'-class{args.label}'}"
                                     f"{'' if args.text is None else '-text'}"
                                     f"{'' if sampler is None else '-' + run.family.sampler.describe_short()}.png"
        if Path(args.run).is_dir() else Path("samples.png"))
    save_samples(samples, run.family, out)
    weights = "EMA" if any(run.networks.ema(n) is not run.networks[n] for n in run.networks) else "trained"
    print(f"{out}  ({args.n} samples, {weights} weights of {run.checkpoint})")
    return 0


def cmd_fid(args) -> int:
    from gensuite.evaluation.inception import compare

    values, about = compare(args.a, args.b, args.weights, args.n, args.split, args.seed, args.batch_size, args.device)
    if args.json:
        print(json.dumps({"values": values, "a": about[0], "b": about[1]}, indent=2))
        return 0
    print(f"A: {about[0]}\nB: {about[1]}")
    for name, value in values.items():
        print(f"{name:10s} {value:.6g}")
    return 0


def cmd_report(args) -> int:
    from gensuite.report import write_report

    print(write_report(args.runs, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gensuite", description="Train generative models as batch jobs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check job files without running them")
    p.add_argument("jobs", nargs="+", metavar="JOB")
    p.add_argument("--data", action="store_true",
                   help="also require each job's shard set and verify every shard against its sha256")
    _job_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train (or resume) a job")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--run-dir", help="where checkpoints, samples and TensorBoard logs go (default runs/<job name>)")
    _job_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples from a trained run (no dataset needed)")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory (latest checkpoint) or a checkpoint file")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--class", dest="label", type=int, help="draw every sample of this class (conditional runs)")
    p.add_argument("--text", help="draw every sample for this caption (text-to-image runs whose text encoder "
                                  "can embed new text: hashing or sentence)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", help="models with several samplers (diffusion: ddpm, ddim, langevin)")
    p.add_argument("--steps", type=int, help="sampler steps (DDIM: any number up to T; default: the run's)")
    p.add_argument("--eta", type=float, help="DDIM's eta in [0, 1] (0: deterministic)")
    p.add_argument("--out", help="PNG to write (default RUN_DIR/samples/sample-step<N>-seed<S>.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fid", help="Inception FID/KID/precision/recall (and IS of A) between two image sources")
    p.add_argument("a", metavar="A", help="an image folder, a shard set folder, or a run directory/checkpoint")
    p.add_argument("b", metavar="B", help="the reference: an image folder, a shard set folder, or a run")
    p.add_argument("--weights", help="torch-fidelity InceptionV3 weights file (else $GENSUITE_INCEPTION_WEIGHTS, "
                                     "then torch hub's cache)")
    p.add_argument("--n", type=int, default=10_000, help="samples drawn from a run; cap on a shard split (10000)")
    p.add_argument("--split", default="test", help="split of a shard set (default test)")
    p.add_argument("--seed", type=int, help="sampling seed for runs (default: the run's eval.seed)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("summary", help="print each network's architecture and parameter count")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true")
    _job_args(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("report", help="curves, sample GIFs, tables and an index page from runs' TensorBoard logs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory or a sweep root (several compare them)")
    p.add_argument("--out", help="report folder (default RUN_DIR/report for one run or sweep root, else ./report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as e:  # a stop signal, after the checkpoint at that step was written
        if e.announce:
            print(f"{e}; run the same command to resume", file=sys.stderr)
        return e.exit_code
    except GensuiteError as e:
        if str(e):  # empty: another rank stopped the run and said why
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastsiam`` command line: train, knn, linear, test, info, predict, export, plot, verify.

Every subcommand that takes ``--config`` also takes dotted ``section.key=value`` overrides
and ``--print-config``. Errors a user can fix (a bad config key, a missing file, a wrong data
format, a non-finite loss) are printed as one line, ``fastsiam <command>: error: ...``, and
exit with status 2, without a traceback; ``--debug`` (before or after the command) re-raises
them instead, for the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastsiam.config import Config, ConfigError, describe, load_config
from fastsiam.run_log import use_progress_lines

log = logging.getLogger("fastsiam")


def _config_args(p: argparse.ArgumentParser) -> None:
    # Overrides are not an argparse positional: a ``nargs="*"`` positional takes only the first
    # run of them, so ``X a=1 --device cpu b=2`` would fail. main() collects them from the
    # unparsed arguments instead, anywhere on the line and in order.
    p.usage = "%(prog)s --config CONFIG [options] [section.key=value ...]"
    p.set_defaults(overrides=[])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (overrides train.device)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    overrides = list(extra) + list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    return load_config(args.config, overrides)


def _print_config_and_exit(cfg: Config) -> int:
    print(cfg.to_yaml(), end="")
    return 0


def _check_work_dir(path: str | Path, from_flag: bool) -> None:
    """Refuse a work dir that is, or lies under, an existing file now, in words, rather than
    as an ``OSError`` once the model and the loader are built."""
    name = f"--work-dir {path}" if from_flag else f"output.work_dir {path}"
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "" if q == p else f": {q}"
                raise ConfigError(f"{name}{where} is a file; the work dir must be a directory (created if missing)")
            return


# ----------------------------------------------------------------------------------------------
# subcommands


def cmd_train(args: argparse.Namespace) -> int:
    extra = []
    if args.data:
        extra.append(f"data.train_path={args.data}")
    if args.backend:
        extra.append(f"data.backend={args.backend}")
    if args.max_steps is not None:
        extra.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    if args.deterministic:
        extra.append("train.deterministic=true")
    if args.work_dir:
        extra.append(f"output.work_dir={args.work_dir}")
    cfg = _load(args, extra)
    if args.print_config:
        return _print_config_and_exit(cfg)
    if cfg.task != "pretrain":
        raise ConfigError(f"{args.config}: task is {cfg.task!r}, a linear-evaluation config; "
                          f"run it with fastsiam linear (fastsiam train pretrains)")

    from fastsiam.runtime import default_work_dir
    from fastsiam.trainer import Trainer

    _check_work_dir(default_work_dir(cfg), from_flag=bool(args.work_dir))
    trainer = Trainer(cfg, resume=args.resume, resume_changed=args.resume_changed)
    result = trainer.fit()
    if trainer.dist.is_main:
        _print_train_summary(result)
    return 0


def _print_train_summary(result: Any) -> None:
    lines = [f"work dir: {result.work_dir}", f"epochs: {result.epoch}, steps: {result.step}"
             + (f" (stopped by {result.stopped_by})" if result.stopped_by else "")]
    if result.last_loss is not None:
        lines.append(f"final loss: {result.last_loss:.4f}  z-std (collapse monitor): {result.last_z_std:.4f}")
    if result.images_per_s is not None:
        lines.append(f"throughput: {result.images_per_s:,.1f} images/s (all processes, evaluation excluded)")
    if result.knn:
        rnd = result.knn_random_init.get("top1")
        vs = f"  (same network at random init: {rnd:.2f}%)" if rnd is not None else ""
        lines.append(f"kNN top-1 on val: {result.knn['top1']:.2f}%{vs}")
    if result.probe:
        lines.append(f"online linear probe on val: top-1 {result.probe['top1']:.2f}%, top-5 {result.probe['top5']:.2f}%")
    if result.checkpoint:
        lines.append(f"checkpoint: {result.checkpoint}")
    print("\n".join(lines))


def cmd_knn(args: argparse.Namespace) -> int:
    cfg = _load(args, [f"eval.pretrained={args.pretrained}"] if args.pretrained else [])
    if args.print_config:
        return _print_config_and_exit(cfg)
    from fastsiam.knn import run_knn

    res = run_knn(cfg, cfg.eval.pretrained)
    if _is_main_process():
        print(f"kNN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}): top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    extra = [f"eval.pretrained={args.pretrained}"] if args.pretrained else []
    if args.work_dir:
        extra.append(f"output.work_dir={args.work_dir}")
    cfg = _load(args, extra)
    if args.print_config:
        return _print_config_and_exit(cfg)
    from fastsiam.runtime import default_work_dir

    _check_work_dir(default_work_dir(cfg), from_flag=bool(args.work_dir))
    from fastsiam.linear import run_linear

    res = run_linear(cfg, cfg.eval.pretrained, resume=args.resume)
    if _is_main_process():
        print(f"linear eval: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  checkpoint: {res['checkpoint']}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.print_config:
        return _print_config_and_exit(cfg)
    from fastsiam.linear import run_test

    res = run_test(cfg, args.checkpoint)
    if _is_main_process():
        print(f"test: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['num_samples']} images)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from fastsiam.flops import model_info

    info = model_info(args.name, image_size=args.image_size)
    head = (f" + {info['params_per_class']} per class of the data (model.num_classes: null)"
            if info["params_per_class"] else "")
    print(f"{info['name']}: {info['params_m']:.2f} M params{head}, {info['gflops']:.3g} GFLOPs "
          f"(multiply-accumulates per {info['image_size']} px image)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fastsiam.api import inference_model

    res = inference_model(args.model, args.image, pretrained=args.pretrained, device=args.device or "auto")
    if "features" in res:  # a pretraining (not linear) model: pooled backbone features
        f = res["features"]
        print(f"{args.image}: features of shape {tuple(f.shape)} (norm {float((f ** 2).sum()) ** 0.5:.4f}); "
              "pass a linear model to classify")
    else:
        print(f"{args.image}: {res['pred_class']} (label {res['pred_label']}, score {res['pred_score']:.4f})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastsiam.weights import export_torchvision

    out, arch = export_torchvision(args.checkpoint, args.out)
    print(f"wrote a torchvision ResNet state dict to {out} "
          f"(torchvision.models.{arch}().load_state_dict(torch.load(path)); strict=False without fc)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fastsiam.plot import plot_run

    for path in plot_run(args.work_dir, out_dir=args.out):
        print(path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from fastsiam.verify import verify

    report = verify(args.path, decode=args.decode, workers=args.workers)
    for line in [*report.problems, report.summary()]:
        print(line)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsiam", description=__doc__.splitlines()[0])
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="SimSiam pretraining (single process or under torchrun)")
    _config_args(p)
    p.add_argument("--data", help="training data path (overrides data.train_path)")
    p.add_argument("--backend", help="loader backend (overrides data.backend)")
    p.add_argument("--work-dir", help="run directory (default: work_dirs/<config name>)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps, with a checkpoint")
    p.add_argument("--resume", nargs="?", const="auto", help="'auto' (newest valid checkpoint in the work dir) or a path")
    p.add_argument("--resume-changed", action="store_true",
                   help="resume even though the config changes the run's trajectory (batch size, model, "
                        "data, seed, optimizer, schedule, epochs): the changes are logged, the epoch "
                        "continues at the same sample")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible CPU run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("knn", help="weighted kNN accuracy of a pretrained backbone")
    _config_args(p)
    p.add_argument("--pretrained", help="checkpoint (fastsiam, official SimSiam, mmpretrain, torchvision)")
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("linear", help="linear evaluation on a frozen pretrained backbone")
    _config_args(p)
    p.add_argument("--pretrained", help="pretrained checkpoint")
    p.add_argument("--work-dir", help="run directory for the classifier")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                   help="continue after the last completed epoch (auto: the work dir's last.pt, if any)")
    p.set_defaults(func=cmd_linear)

    p = sub.add_parser("test", help="top-1/top-5 of a linear classifier on the val split")
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="linear classifier checkpoint")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("info", help="parameters and FLOPs of a model name or config")
    p.add_argument("name", help="a model name (fastsiam.list_models()) or a config file")
    p.add_argument("--image-size", type=int, help="side of the input (default: the config's data.image_size)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="classify an image with a linear model")
    p.add_argument("model", help="model name, config file or linear checkpoint")
    p.add_argument("image", help="image file")
    p.add_argument("--pretrained", help="weights for a model name or config")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a checkpoint's backbone as a torchvision ResNet state dict")
    p.add_argument("checkpoint", help="fastsiam, official SimSiam, mmpretrain or linear checkpoint")
    p.add_argument("out", help="output .pt file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="PNG plots of a run's metrics")
    p.add_argument("work_dir")
    p.add_argument("--out", help="output folder (default: <work_dir>/plots)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("verify", help="check a shard folder or .beton against its checksums (exit 1 on any problem)")
    p.add_argument("path", help="a shard folder (data_prep/to_dali.py) or a .beton (data_prep/to_ffcv.py)")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG, naming the damaged samples (slow)")
    p.add_argument("--workers", type=int, help="threads hashing and decoding (default: one per core)")
    p.set_defaults(func=cmd_verify)
    for p in dict.fromkeys(sub.choices.values()):  # also after the command; SUPPRESS keeps a global flag
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET_HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        p.set_defaults(command_parser=p)
    return parser


_DEBUG_HELP = "on an error, raise it with its traceback instead of the one-line message"
_QUIET_HELP = ("warnings, results and a plain progress line per log window (no redrawn bar, as in a "
               "log file)")
# ValueError includes the data layer's (ShardFormatError, JPEGHeaderError) and WeightsError;
# OSError includes FileNotFoundError and PermissionError.
_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError, ImportError)


def _one_line(e: BaseException) -> str:
    """The message's first line (a library's may span several; the rest is for --debug), and
    an OSError as ``file: reason``, the order of fastsiam's own messages."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + (" (details: --debug)" if len(lines) > 1 else "")


def _take_overrides(args: argparse.Namespace, unparsed: list[str], parser: argparse.ArgumentParser) -> None:
    """Append the ``section.key=value`` words among ``unparsed`` to ``args.overrides`` (a
    command with ``--config``); anything else is an unrecognized argument, as argparse says."""
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    bad = [w for w in unparsed if not (takes_overrides and _OVERRIDE.match(w))]
    if bad:
        (getattr(args, "command_parser", None) or parser).error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides.extend(unparsed)


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if unparsed:
        _take_overrides(args, unparsed, parser)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        use_progress_lines()
    if args.help_config:
        print(describe())
        return 0
    if not args.command:
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    from fastsiam.checkpoint import CheckpointError
    from fastsiam.trainer import TrainingError

    try:
        return func(args)
    except (*_USER_ERRORS, CheckpointError, TrainingError) as e:
        if args.debug:
            raise
        print(f"fastsiam {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _is_main_process() -> bool:
    """Rank 0 under torchrun (which prints the result every rank computed), else True."""
    import torch.distributed as torch_dist

    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def _leave_process_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_parser", "main"]

"""The ``spinal`` command: ``spinal demo``, ``spinal audit PATH [PATH ...]`` and
``spinal localize --base PATH --tuned PATH --pairs FILE.jsonl``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from spinal_callback.config import MIN_PROBE_LENGTH, TRANSPORT_MEASURES, SpinalConfig
from spinal_callback.demos.tiny import (
    DEFAULT_PROBE_TEXTS,
    TINY_ARCHITECTURES,
    build_tiny_model,
    build_tiny_tokenizer,
)
from spinal_callback.probe.loading import (
    DTYPES,
    check_device,
    checkpoint_directory,
    is_adapter_directory,
    load_local_adapted_model,
    load_local_model,
    load_local_tokenizer,
)
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe
from spinal_callback.probe.trace import DepthTrace
from spinal_callback.tools.localize import check_pair_count, localize
from spinal_callback.tools.pairs import load_pairs
from spinal_callback.tools.report import (
    format_comparison_table,
    plot_depth_paths,
    plot_localization,
)

logger = logging.getLogger("spinal_callback")

# The failures a user can cause and fix: missing, unreadable or damaged files, including
# checkpoints (``CheckpointLoadError`` is an ``OSError``) and traces (``DepthTraceFormatError``
# is a ``ValueError``); bad values (an unusable device, mismatched models, malformed pairs); a
# missing optional dependency. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (OSError, ValueError, ImportError)

# Counts reach torch and the tokenizer as int64 sizes.
_INT64_MAX = 2**63 - 1
# scikit-learn's LassoCV (the sparse attribution) takes seeds in [0, 2**32).
_SEED_MAX = 2**32 - 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spinal`` console script.

    Returns:
        The exit status: 0 on success, 2 on an expected failure (bad arguments, missing or
        damaged files, an unavailable device), reported as one line on stderr without a
        traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.handler(args))
    except _USER_ERRORS as error:
        print(f"spinal {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="probe a tiny built-in model (no download)")
    demo.add_argument("--architecture", default="llama", choices=sorted(TINY_ARCHITECTURES))
    demo.add_argument(
        "--out", default="spinal_demo", help="output directory (default: %(default)s)"
    )
    demo.set_defaults(handler=_run_demo)

    audit = commands.add_parser("audit", help="compare the depth traces of local checkpoints")
    audit.add_argument("paths", nargs="+", help="checkpoint directories (save_pretrained output)")
    audit.add_argument("--texts", help="probe texts, one per line (default: built-in texts)")
    audit.add_argument("--tokenizer", help="tokenizer directory (default: the first checkpoint)")
    audit.add_argument(
        "--out", default="spinal_audit", help="output directory (default: %(default)s)"
    )
    audit.add_argument(
        "--late-layers", type=int, nargs="+", help="block indices (default: last third)"
    )
    audit.add_argument("--transport", default="hellinger", choices=TRANSPORT_MEASURES)
    audit.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    audit.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: cpu)")
    audit.add_argument(
        "--max-length",
        type=_integer(
            MIN_PROBE_LENGTH,
            f"rows of fewer than {MIN_PROBE_LENGTH} tokens are the BOS token and a word or two, "
            "the same for most texts; the default is 256",
        ),
        default=256,
        help=f"tokens kept per probe text, at least {MIN_PROBE_LENGTH} (default: %(default)s)",
    )
    audit.set_defaults(handler=_run_audit)

    localize = commands.add_parser(
        "localize", help="patch a tuned model into its base, layer by layer, on preference pairs"
    )
    localize.add_argument("--base", required=True, help="base checkpoint directory")
    localize.add_argument(
        "--tuned",
        required=True,
        help="tuned checkpoint directory, or a PEFT adapter directory (merged into --base)",
    )
    localize.add_argument(
        "--pairs", required=True, help='JSONL, one {"prompt", "chosen", "rejected"} per line'
    )
    localize.add_argument("--tokenizer", help="tokenizer directory (default: --base)")
    localize.add_argument(
        "--out", default="spinal_localize", help="output directory (default: %(default)s)"
    )
    localize.add_argument(
        "--batch-size",
        type=_integer(1, "the default is 8"),
        default=8,
        help="pairs per forward (default: %(default)s)",
    )
    localize.add_argument(
        "--all-tokens", action="store_true", help="patch every token, not only the reply's"
    )
    localize.add_argument(
        "--top-layers",
        type=_integer(0, "0 skips the low-rank analysis"),
        default=3,
        help="blocks given the low-rank analysis, 0 for none (default: %(default)s)",
    )
    localize.add_argument(
        "--ranks",
        type=_integer(1, "a rank counts directions"),
        nargs="+",
        help="ranks k to try (default: 1, 2, 4, ... width)",
    )
    localize.add_argument(
        "--bootstrap",
        type=_integer(
            40, "a 95% interval needs a resample beyond each 2.5% tail; the default is 1000"
        ),
        default=1000,
        help="bootstrap resamples (default: %(default)s)",
    )
    localize.add_argument(
        "--seed",
        type=_integer(0, "scikit-learn takes seeds below 2**32", maximum=_SEED_MAX),
        default=0,
        help="seed of the bootstrap and the LASSO folds (default: %(default)s)",
    )
    localize.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    localize.add_argument("--device", default="cpu", help="device of the base model")
    localize.add_argument("--tuned-device", help="device of the tuned model (default: --device)")
    localize.add_argument("--no-progress", action="store_true", help="no progress bar")
    localize.set_defaults(handler=_run_localize)
    return parser


def _integer(minimum: int, reason: str, maximum: int = _INT64_MAX) -> Callable[[str], int]:
    """An argparse ``type`` that reads an int in ``[minimum, maximum]``; ``reason`` ends the
    error (why the range, or the default), which argparse prints with the option's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= maximum:
            too_large = value is not None and value > maximum
            upper = f" and <= {maximum}" if maximum != _INT64_MAX or too_large else ""
            raise argparse.ArgumentTypeError(
                f"got {text!r}, expected an integer >= {minimum}{upper} ({reason})"
            )
        return value

    return parse


def _run_demo(args: argparse.Namespace) -> int:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(args.architecture, vocab_size=len(tokenizer))
    probe = SpinalProbe(model, ProbeBatch.from_texts(tokenizer, list(DEFAULT_PROBE_TEXTS)))
    trace = probe.run()
    _write_outputs({f"tiny-{args.architecture}": trace}, Path(args.out))
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    check_device(args.device, option="--device")
    for path in args.paths:
        checkpoint_directory(path)
    texts = _read_texts(args.texts) if args.texts else list(DEFAULT_PROBE_TEXTS)
    tokenizer = load_local_tokenizer(args.tokenizer or args.paths[0])
    batch = ProbeBatch.from_texts(tokenizer, texts, max_length=args.max_length)
    config = SpinalConfig(
        late_layers=args.late_layers, transport=args.transport, max_probe_length=args.max_length
    )
    traces: dict[str, DepthTrace] = {}
    lens_tokens: dict[int, int] = {}  # every checkpoint's lens over the same tokens
    for path in args.paths:
        logger.info("probing %s", path)
        model = load_local_model(path, dtype=args.dtype, device=args.device)
        _check_vocabulary(model, tokenizer, path)
        probe = SpinalProbe(model, batch, config, lens_tokens=lens_tokens)
        traces[_unique_name(Path(path), traces)] = probe.run()
        del model
    _write_outputs(traces, Path(args.out))
    return 0


def _run_localize(args: argparse.Namespace) -> int:
    check_device(args.device, option="--device")
    if args.tuned_device is not None:
        check_device(args.tuned_device, option="--tuned-device")
    adapter = is_adapter_directory(args.tuned)
    for path in (args.base,) if adapter else (args.base, args.tuned):
        checkpoint_directory(path)
    pairs = _read_pairs(args.pairs)
    check_pair_count(len(pairs))
    tokenizer = load_local_tokenizer(args.tokenizer or args.base)
    base = load_local_model(args.base, dtype=args.dtype, device=args.device)
    tuned_device = args.tuned_device or args.device
    tuned = (
        load_local_adapted_model(args.tuned, args.base, dtype=args.dtype, device=tuned_device)
        if adapter
        else load_local_model(args.tuned, dtype=args.dtype, device=tuned_device)
    )
    for model, path in ((base, args.base), (tuned, args.tuned)):
        _check_vocabulary(model, tokenizer, path)
    result = localize(
        base,
        tuned,
        tokenizer,
        pairs,
        batch_size=args.batch_size,
        all_tokens=args.all_tokens,
        top_layers=args.top_layers,
        ranks=args.ranks,
        bootstrap=args.bootstrap,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    print(result.format_table())
    report = result.save(out / "localize.json")
    image = plot_localization(result, out / "localize.png")
    print(f"\nreport: {report}\nfigure: {image}")
    return 0


def _write_outputs(traces: dict[str, DepthTrace], out: Path) -> None:
    print(format_comparison_table(traces))
    for name, trace in traces.items():
        trace.save(out / "traces" / name)
    image = plot_depth_paths(traces, out / "depth_paths.png")
    print(f"\ntraces: {out / 'traces'}\nfigure: {image}")


def _read_texts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--texts {path}: no such file (expected one probe text per line)")
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(_not_utf8("--texts", path, error, "one probe text per line")) from None
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--texts {path} holds no non-empty line; put one probe text per line")
    return texts


def _read_pairs(path: str) -> list[dict[str, str]]:
    try:
        return load_pairs(path)
    except UnicodeDecodeError as error:
        raise ValueError(_not_utf8("--pairs", path, error, "one JSON pair per line")) from None


def _not_utf8(option: str, path: str, error: UnicodeDecodeError, layout: str) -> str:
    return (
        f"{option} {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
        f"{error.start} cannot be decoded); it must be a UTF-8 text file, {layout}: re-save it "
        "as UTF-8"
    )


def _check_vocabulary(model: object, tokenizer: object, path: str) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:  # type: ignore[arg-type]
        raise ValueError(
            f"{path} has a vocabulary of {vocab} tokens but the probe tokenizer has "
            f"{len(tokenizer)}; pass --tokenizer with the checkpoint's own tokenizer"  # type: ignore[arg-type]
        )


def _unique_name(path: Path, taken: dict[str, DepthTrace]) -> str:
    name = path.resolve().name or "checkpoint"
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    return candidate


if __name__ == "__main__":
    raise SystemExit(main())

"""`tunesmith export RUN_DIR (--merge --out DIR | --gguf TYPE --out FILE.gguf | --adapter-only
[--gguf f32|f16|bf16|q8_0] --out FILE.gguf) [--no-verify]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

CHECK_FAILED = 1
USER_ERROR = 2


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    from tunesmith.export.gguf_writer import TYPES

    export = subparsers.add_parser(
        "export",
        help="export a finished run: a merged model directory or a GGUF file, checked against the trained model",
    )
    export.add_argument("run_dir", help="a finished run directory (or a model directory)")
    kind = export.add_mutually_exclusive_group()
    kind.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights")
    kind.add_argument(
        "--gguf",
        metavar="TYPE",
        help=f"write one GGUF file of this type ({', '.join(TYPES)}); LoRA adapters are merged first",
    )
    export.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the LoRA alone as a GGUF LoRA adapter (llama.cpp --lora); --gguf f32 (default), f16, bf16 or q8_0",
    )
    export.add_argument("--out", required=True, help="output directory (--merge) or .gguf file (--gguf)")
    export.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the behaviour check (reading the export back and comparing it with the trained model)",
    )
    return export


def run_export(args: argparse.Namespace) -> int:
    from tunesmith.export.gguf_arch import UnsupportedModel
    from tunesmith.export.gguf_lora import UnsupportedAdapter, check_adapter_type
    from tunesmith.export.gguf_tokenizer import UnsupportedTokenizer
    from tunesmith.export.gguf_writer import UnsupportedGGUFType, check_type
    from tunesmith.export.merge import NeedsMerge, export
    from tunesmith.training.progress import PhaseSteps
    from tunesmith.training.run_dir import read_run_info

    steps = PhaseSteps()
    run_dir, out = Path(args.run_dir), Path(args.out)
    try:
        if args.adapter_only and args.merge:
            raise UnsupportedAdapter("--adapter-only writes the adapter alone; it does not go with --merge")
        if args.adapter_only:
            check_adapter_type(args.gguf or "f32")
        elif args.gguf is not None:
            check_type(args.gguf)
        if args.gguf is not None or args.adapter_only:
            if out.suffix != ".gguf":
                raise UnsupportedGGUFType(f"--out {out}: a GGUF export is one file; name it FILE.gguf")
            if out.is_dir():
                raise UnsupportedGGUFType(f"--out {out} is a directory; name the .gguf file to write")
        if not run_dir.is_dir():
            read_run_info(
                run_dir
            )  # says the run does not exist (or is not a run) instead of looking for a model
        result = export(
            run_dir,
            out,
            merge=args.merge,
            gguf_type=args.gguf,
            verify=not args.no_verify,
            adapter_only=args.adapter_only,
            say=steps,
        )
        steps.finish()
    except (
        UnsupportedGGUFType,
        UnsupportedModel,
        UnsupportedTokenizer,
        NeedsMerge,
        UnsupportedAdapter,
    ) as exc:
        steps.finish(failed=True)
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    except BaseException:
        steps.finish(failed=True)
        raise
    print(f"exported to {result.path}")
    if result.check is None:
        for note in result.notes:
            print(f"  note: {note}")
        print("behaviour check skipped (--no-verify)")
        return 0
    print(result.check.summary())
    print(f"report: {result.report}")
    if not result.check.passed:
        print(
            f"error: the export at {result.path} does not behave like the trained model: {result.check.failures()}",
            file=sys.stderr,
        )
        return CHECK_FAILED
    return 0

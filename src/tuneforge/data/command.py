"""`tuneforge data validate | convert | split`: check, reshape and divide dataset files.

validate exits 0 when the file is valid, 1 when it has problems, 2 when it cannot be read as data at all.
convert and split refuse invalid input and write their outputs whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneforge.data.formats import FORMATS

EXIT_OK, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2


def add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="validate, convert and split dataset files")
    verbs = data.add_subparsers(dest="data_command", required=True, metavar="VERB")

    validate = verbs.add_parser("validate", help="check every record; statistics with --model",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_argument("file", type=Path)
    validate.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    validate.add_argument("--model", help="base model (built-in name or HF directory) whose tokenizer and template count tokens")
    validate.add_argument("--prompt-template", default="auto", choices=["auto", "chat", "alpaca", "plain"])
    validate.add_argument("--max-seq-length", type=int, default=2048)
    validate.add_argument("--too-long", default="drop", choices=["drop", "truncate", "error"],
                          help="policy for examples over --max-seq-length: error makes them errors, else warnings")
    validate.add_argument("--batch-size", type=int, default=8, help="batch size for the padding-waste estimate")
    validate.add_argument("--show", type=int, default=5, help="problems shown per kind")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(handler=cmd_validate)

    convert = verbs.add_parser("convert", help="rewrite a dataset in another format or file type")
    convert.add_argument("input", type=Path)
    convert.add_argument("output", type=Path, help="the output's name sets its type: .jsonl .json .csv .parquet [.gz]")
    convert.add_argument("--to", required=True, choices=["chat", "instruction", "completion", "text", "preference"])
    convert.add_argument("--format", default="auto", help="format of the input (default: detected)")
    convert.add_argument("--shape", choices=["trl", "openai", "sharegpt"],
                         help="--to preference only: TRL's prompt/chosen/rejected (default), OpenAI's "
                              "input/preferred_output/non_preferred_output, or ShareGPT's conversations/chosen/rejected")
    convert.set_defaults(handler=cmd_convert)

    split = verbs.add_parser("split", help="a deterministic train / validation split")
    split.add_argument("input", type=Path)
    split.add_argument("--val", type=float, default=0.05, help="fraction for validation")
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--out-dir", type=Path, help="where NAME.train.EXT and NAME.val.EXT go (default: beside the input)")
    split.set_defaults(handler=cmd_split)


def _renderer(model: str, data_format: str, template: str):
    from tuneforge.data.templating import PromptRenderer, resolve_template
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.model_loading import load_tokenizer

    tokenizer = load_tokenizer(resolve_base_model(model))
    return PromptRenderer(tokenizer, resolve_template(template, data_format, tokenizer))


def cmd_validate(args: argparse.Namespace) -> int:
    from tuneforge.data.loading import iter_examples
    from tuneforge.data.problems import DataError
    from tuneforge.data.validation import validate_file

    renderer = None
    if args.model:
        try:
            data_format, _ = iter_examples(args.file, args.format)
        except DataError:
            data_format = None  # the report below says why
        if data_format is not None:
            try:
                renderer = _renderer(args.model, data_format, args.prompt_template)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_UNUSABLE
    report = validate_file(args.file, fmt=args.format, renderer=renderer, max_seq_length=args.max_seq_length,
                           too_long=args.too_long, batch_size=args.batch_size, samples_per_kind=args.show)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return report.exit_code


def _valid_examples(path: Path, fmt: str):
    """All examples of a file, or the rendered report of why there are none to use."""
    from tuneforge.data.loading import load_examples
    from tuneforge.data.problems import DataError
    from tuneforge.data.reader import UnusableInput

    try:
        return load_examples(path, fmt), None
    except UnusableInput as exc:
        return None, (str(exc), EXIT_UNUSABLE)
    except DataError as exc:
        return None, (f"{exc}\nnothing was written", EXIT_INVALID)


def cmd_convert(args: argparse.Namespace) -> int:
    from tuneforge.data.convert import ConversionError, convert
    from tuneforge.data.problems import DataError
    from tuneforge.data.writer import output_type, write_records

    try:
        output_type(args.output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.shape and args.to != "preference":
        print(f"error: --shape applies to --to preference only, not to --to {args.to}", file=sys.stderr)
        return EXIT_UNUSABLE
    loaded, failure = _valid_examples(args.input, args.format)
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr)
        return failure[1]
    examples, source = loaded
    converted, problems = [], []
    for example in examples:
        try:
            converted.append(convert(example, args.to, file=str(args.input), shape=args.shape))
        except ConversionError as exc:
            problems.append(exc.problem)
    if problems:
        print(f"error: {DataError(problems, headline=f'{args.input}: {len(problems)} example(s) cannot become {args.to}')}"
              "\nnothing was written", file=sys.stderr)
        return EXIT_INVALID
    count = write_records(args.output, converted)
    shape = f" ({args.shape or 'trl'} shape)" if args.to == "preference" else ""
    print(f"{args.output}: {count} {args.to} examples{shape} (from {source})")
    return EXIT_OK


def cmd_split(args: argparse.Namespace) -> int:
    from tuneforge.data.formats import detect_format, validate_record
    from tuneforge.data.loading import split_indices
    from tuneforge.data.problems import DataError
    from tuneforge.data.reader import UnusableInput, iter_records
    from tuneforge.data.writer import write_records

    if not 0 < args.val < 1:
        print(f"error: --val: expected a fraction between 0 and 1, found {args.val}", file=sys.stderr)
        return EXIT_UNUSABLE
    # Split the records as the user wrote them (extra fields kept), after checking every one.
    try:
        records, problems, fmt = [], [], None
        for line, item in iter_records(args.input):
            if not isinstance(item, dict):
                problems.append(item)
                continue
            fmt = fmt or detect_format(item)
            found = validate_record(item, fmt, file=str(args.input), line=line) if fmt else []
            problems.extend(found)
            records.append(item)
    except UnusableInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if problems or fmt is None:
        print(f"error: {DataError(problems) if problems else f'{args.input}: no records'}\nnothing was written",
              file=sys.stderr)
        return EXIT_INVALID
    train, val = split_indices(len(records), 1 - args.val, args.seed)
    out_dir = args.out_dir or args.input.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    name, suffixes = args.input.name.split(".", 1)[0], "".join(args.input.suffixes) or ".jsonl"
    paths = (out_dir / f"{name}.train{suffixes}", out_dir / f"{name}.val{suffixes}")
    for path, ids in zip(paths, (train, val)):
        write_records(path, (records[i] for i in ids))
    print(f"{paths[0]}: {len(train)} records\n{paths[1]}: {len(val)} records (seed {args.seed})")
    return EXIT_OK

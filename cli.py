"""The `diffusion-moe` command line.

    diffusion-moe convert llada2 SRC DST [--mask-token-id N] [--eos-token-id N] [--dtype D] [--overwrite]
                                         [--decoding llada2.0|llada2.1-quality|llada2.1-speed]
    diffusion-moe convert to-llada2 SRC DST [--dtype D] [--overwrite]
    diffusion-moe eval LM_EVAL_ARGS...     (lm_eval's flags; needs the `eval` extra)
    diffusion-moe upgrade-code PATH        (rewrite a saved checkpoint's remote code with this version's)
"""

import argparse
import sys

from .conversion.llada2 import (
    DECODING_PRESETS,
    DTYPES,
    LLADA2_EOS_TOKEN_ID,
    LLADA2_MASK_TOKEN_ID,
    convert_diffusion_moe_to_llada2,
    convert_llada2_to_diffusion_moe,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-moe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert checkpoints between formats")
    formats = convert.add_subparsers(dest="format", required=True)

    def common(sub):
        sub.add_argument("src", help="source checkpoint folder (config.json + safetensors)")
        sub.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
        sub.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="weights dtype (auto: keep)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is written")
        sub.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")

    llada2 = formats.add_parser("llada2", help="LLaDA2-MoE (dMoE, LLaDA2.2) checkpoint -> diffusion-moe")
    common(llada2)
    llada2.add_argument("--mask-token-id", type=int, default=LLADA2_MASK_TOKEN_ID)
    llada2.add_argument("--eos-token-id", type=int, nargs="+", default=None,
                        help="stop token id(s) (default: the source's generation_config.json, else its config.json, "
                             f"else {LLADA2_EOS_TOKEN_ID})")
    llada2.add_argument("--decoding", choices=tuple(DECODING_PRESETS), default=None,
                        help="generation defaults (default: llada2.2 for a LLaDA2.2 source; else LLaDA2.1 editing if "
                             "the source's generation_config.json sets it, else llada2.0)")
    common(formats.add_parser("to-llada2", help="diffusion-moe checkpoint -> LLaDA2-MoE layout"))
    commands.add_parser(
        "eval", add_help=False,
        help="run lm-evaluation-harness with the `diffusion_moe` model: `diffusion-moe eval --model_args "
             "pretrained=PATH --tasks T ...` takes lm_eval's flags (see `diffusion-moe eval --help`)",
    )
    upgrade = commands.add_parser(
        "upgrade-code",
        help="rewrite a saved checkpoint's remote code (its .py files and config.json's auto_map and "
             "diffusion_moe_version) with this installed version's; weights and other files untouched",
    )
    upgrade.add_argument("path", help="a folder written by save_pretrained (config.json with model_type diffusion_moe)")
    return parser


def run_upgrade_code(path) -> int:
    """`diffusion-moe upgrade-code PATH`: 0 on success, 2 (with a message) when PATH is refused."""
    from .configuration import DiffusionMoeConfig
    from .configuration.remote_code import __version__, read_checkpoint_config, upgrade_code

    try:
        config = read_checkpoint_config(path)
        try:  # the new code must be able to build this config
            DiffusionMoeConfig.from_dict(dict(config))
        except ValueError as error:
            raise ValueError(f"{path}/config.json does not load with diffusion-moe {__version__}: {error}") from None
        result = upgrade_code(path)
    except (ValueError, OSError) as error:
        print(f"diffusion-moe: error: {error}", file=sys.stderr)
        return 2
    print(f"upgraded {path}: remote code {result['from'] or 'unrecorded (before 0.2.0)'} -> {result['to']} "
          f"({len(result['files'])} .py files, config.json auto_map and diffusion_moe_version); weights untouched")
    return 0


def run_eval(argv) -> int:
    """`diffusion-moe eval ARGS` = `lm_eval ARGS` with the adapter registered (`--model diffusion_moe` by default)."""
    try:
        from .evaluation import run_lm_eval_cli
    except ImportError as error:
        print(f"diffusion-moe: error: {error}", file=sys.stderr)
        return 2
    return run_lm_eval_cli(list(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lm_eval's parser
        return run_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "upgrade-code":
        return run_upgrade_code(args.path)
    try:
        if args.format == "llada2":
            dst = convert_llada2_to_diffusion_moe(
                args.src, args.dst, mask_token_id=args.mask_token_id,
                eos_token_id=args.eos_token_id[0] if args.eos_token_id and len(args.eos_token_id) == 1
                else args.eos_token_id,
                dtype=args.dtype, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                decoding=args.decoding,
            )
        else:
            dst = convert_diffusion_moe_to_llada2(
                args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, max_shard_size=args.max_shard_size
            )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"diffusion-moe: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

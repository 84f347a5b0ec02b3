"""The ``mmbridge`` command: thin sub-commands that parse arguments and call the library.

    mmbridge train RECIPE.yaml [key.path=value ...] [--resume]
    mmbridge pretrain-qformer RECIPE.yaml [key.path=value ...] [--resume]   (train with objective itc_itm_itg)
    mmbridge generate --model DIR --image PATH --prompt TEXT [--max-new-tokens N] [--do-sample ...]
    mmbridge info --model DIR
    mmbridge export --model DIR --format hf --out OUT [--force]   (a transformers directory: weights, processor)
    mmbridge data miniworld --task TASK --split SPLIT --n N --out DIR [--seed S] [--box-format plain|qwen]
                           [--image-format png|jpeg] [--format webdataset --shard-size N]
    mmbridge data stats RECIPE.yaml [key.path=value ...]   (samples per source per epoch, per stage; no image read)
    mmbridge data select IN.json --method random|coreset --keep 0.5|N --out OUT.json [--seed S] [--concepts FILE]
    mmbridge eval --model DIR --suite miniworld [--tasks T ...] [--n N] [--shots K] [--box-format plain|qwen] [--out FILE] [--blind | --with-blind]
    mmbridge eval --compare A.json B.json ...
    mmbridge serve --model DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [limits ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from mmbridge.model.multimodal import MODULE_KEYS
from mmbridge.model.output.side import describe as describe_output


def _train(args: argparse.Namespace) -> int:
    from mmbridge.config import load_run_config
    from mmbridge.train import train

    run = load_run_config(args.recipe, args.overrides)
    if args.output_dir:
        run.output_dir = args.output_dir
    result = train(run, resume=args.resume, progress=not args.no_progress)
    last = result.history[-1] if result.history else None
    if last and result.main_process:  # one line however many processes trained
        print(f"done: {len(result.history)} steps, final loss {last['loss']:.4f}; model saved to {run.output_dir}/final")
    return 0  # skipped-sample counts were logged at the end of each stage


def _pretrain_qformer(args: argparse.Namespace) -> int:
    """``mmbridge train`` on a BLIP-2 stage-1 recipe: stages that name no objective train ``itc_itm_itg``."""
    from mmbridge.config import load_run_config
    from mmbridge.train import train
    from mmbridge.train.qformer_pretrain import stage1_recipe

    run = stage1_recipe(load_run_config(args.recipe, args.overrides))
    if args.output_dir:
        run.output_dir = args.output_dir
    result = train(run, resume=args.resume, progress=not args.no_progress)
    last = result.history[-1] if result.history else None
    if last and result.main_process:
        print(f"done: {len(result.history)} steps, final loss {last['loss']:.4f} (itc {last['itc']:.4f}, "
              f"itm {last['itm']:.4f}, itg {last['itg']:.4f}); Q-Former saved to {run.output_dir}/final")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mmbridge.model.multimodal import MultimodalModel

    sampling = {"--temperature": args.temperature, "--top-p": args.top_p}
    ignored = [flag for flag, value in sampling.items() if value is not None and not args.do_sample]
    if ignored:
        print(f"mmbridge generate: warning: {' and '.join(ignored)} only apply with --do-sample; "
              f"decoding greedily", file=sys.stderr)
    model = MultimodalModel.from_pretrained(args.model)
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                "temperature": 1.0 if args.temperature is None else args.temperature,
                "top_p": 1.0 if args.top_p is None else args.top_p, "seed": args.seed}
    if args.stream:
        tokenizer = model.tokenizer
        settings["streamer"] = lambda tokens: print(tokenizer.decode(tokens[0], skip_special_tokens=True),
                                                    end="", flush=True)
    if args.out is None:
        answer = model.chat(args.prompt, args.image or [], **settings)
        print() if args.stream else print(answer)
        return 0
    return _generate_media(model, args, settings)


def _generate_media(model, args: argparse.Namespace, settings: dict) -> int:
    """``generate --out DIR``: the answer's text, and the images its signal tokens ask for written as PNG files."""
    from mmbridge.model.output.render import ImageSettings

    if not model.output_modalities:
        raise ValueError(f"--out: {args.model} answers with text only (no output side), so there are no images "
                         f"to write")
    image_settings = ImageSettings(steps=args.image_steps, seed=args.image_seed)
    answer = model.chat(args.prompt, args.image or [], return_media=True, image_settings=image_settings, **settings)
    print() if args.stream else print(answer.text)
    os.makedirs(args.out, exist_ok=True)
    for number, image in enumerate(answer.images, start=1):
        path = os.path.join(args.out, f"image-{number}.png")
        image.save(path)
        print(f"image {number}: {path}")
    if not answer.images:
        print("the answer asked for no image", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from mmbridge.model.multimodal import MultimodalModel

    model = MultimodalModel.from_pretrained(args.model)
    print(info_text(model))
    if args.image_size:
        print(image_cost_text(model, args.image_size))
    return 0


def _export(args: argparse.Namespace) -> int:
    import os

    from mmbridge.interop.export import export_hf
    from mmbridge.model.multimodal import MultimodalModel

    model_dir, out = os.path.realpath(args.model), os.path.realpath(args.out)
    if model_dir == out or model_dir.startswith(out + os.sep):
        raise ValueError(f"--out {args.out} would replace the model directory {args.model}; choose another --out")
    exported = export_hf(MultimodalModel.from_pretrained(args.model), args.out, force=args.force)
    print(f"exported {exported.model_class} + {exported.processor_class} to {exported.path}")
    return 0


def parse_image_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (as image tools write it) → (height, width); a malformed value is an ``ArgumentTypeError``."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"--image-size takes WIDTHxHEIGHT in pixels, e.g. 672x1008; got {text!r}")
    width, height = (int(part) for part in parts)
    return height, width


def image_cost_text(model, sizes: list[tuple[int, int]]) -> str:
    """Per image size: crops, visual and separator tokens, encoder and bridge GFLOPs for the model's strategy."""
    from mmbridge.model.highres.compute import cost_table, image_cost

    label = model.config.highres.type if model.highres is not None else "base resolution"
    rows = [(label, image_cost(model.vision, model.bridge, model.highres, size)) for size in sizes]
    return "compute per image (FLOPs counted by torch.utils.flop_counter; 1 multiply-add = 2):\n" + cost_table(rows)


def _eval(args: argparse.Namespace) -> int:
    import os

    from mmbridge.eval.harness import compare_table, results_table, run_suite, save_results

    if args.compare:
        print(compare_table(args.compare))
        return 0
    if not args.model:
        raise ValueError("--model DIR is required (or --compare A.json B.json ...)")
    from mmbridge.model.multimodal import MultimodalModel

    model = MultimodalModel.from_pretrained(args.model)
    results = run_suite(model, args.suite, args.tasks, n=args.n, seed=args.seed, blind=args.blind,
                        with_blind=args.with_blind, batch_size=args.batch_size, progress=not args.no_progress,
                        model_dir=args.model, shots=args.shots, box_format=args.box_format)
    shots = f"-{args.shots}shot" if args.shots else ""
    out = args.out or os.path.join(args.model, f"eval-{args.suite}{shots}{'-blind' if args.blind else ''}.json")
    save_results(out, results)
    print(results_table(results))
    print(f"results written to {out}")
    return 0


def _data_miniworld(args: argparse.Namespace) -> int:
    from mmbridge.train.preflight import check_not_a_file
    from mmbridge.worlds.miniworld import write_task

    check_not_a_file(args.out, "--out")
    if args.format == "webdataset":
        from mmbridge.worlds.miniworld.writer import write_webdataset

        paths = write_webdataset(args.task, args.split, args.n, args.out, seed=args.seed, shard_size=args.shard_size,
                                 progress=not args.no_progress, box_format=args.box_format)
        last = len(paths) - 1
        pattern = paths[0] if len(paths) == 1 else paths[0].replace("-00000.tar", f"-{{00000..{last:05d}}}.tar")
        print(f"wrote {args.n} {args.task}/{args.split} samples in {len(paths)} shard(s): {pattern}")
        return 0
    path = write_task(args.task, args.split, args.n, args.out, seed=args.seed, progress=not args.no_progress,
                      box_format=args.box_format, image_format=args.image_format)
    print(f"wrote {args.n} {args.task}/{args.split} samples to {path}")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from mmbridge.config import load_run_config
    from mmbridge.train.recipe import recipe_stats

    print(recipe_stats(load_run_config(args.recipe, args.overrides)))
    return 0


def _data_select(args: argparse.Namespace) -> int:
    import os

    from mmbridge.data.selection import select_file, summary

    report = select_file(args.input, args.out, args.method, args.keep, seed=args.seed, concepts_path=args.concepts,
                         balance_yes_no=args.balance_yes_no, min_count=args.min_count,
                         max_fraction=args.max_fraction)
    print(summary(report))
    print(f"wrote {args.out} and {report['report']}")
    in_dir, out_dir = (os.path.dirname(os.path.abspath(path)) for path in (args.input, args.out))
    if in_dir != out_dir:
        print(f"note: records are unchanged, so relative image paths still resolve against {in_dir}; "
              f"load {args.out} with image_root: {in_dir}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mmbridge.serve.server import default_model_name, serve
    from mmbridge.serve.settings import LIMIT_FLAGS, ServeSettings

    fields = {name: getattr(args, name) for name in LIMIT_FLAGS}
    settings = ServeSettings(served_model_name=args.served_model_name or default_model_name(args.model),
                             allow_remote_images=args.allow_remote_images, image_root=args.image_root, **fields)
    serve(args.model, settings, host=args.host, port=args.port, device=args.device)
    return 0


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from mmbridge.serve.settings import LIMIT_FLAGS, ServeSettings, flag

    serve = commands.add_parser("serve", help="serve a saved model over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", required=True, help="directory written by save_pretrained / training")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    serve.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s) image URLs (public addresses only, no redirects)")
    serve.add_argument("--image-root", help="read file:// URLs and bare paths, only under this directory")
    defaults = ServeSettings()
    for name, (kind, text) in LIMIT_FLAGS.items():
        serve.add_argument(f"--{flag(name)}", type=kind, default=getattr(defaults, name), help=text)
    serve.set_defaults(run=_serve)


def info_text(model) -> str:
    """Components, parameters per key (trainable/frozen) and visual tokens per image."""
    config = model.export_config()
    # the transform is what pads: a config field of the encoder may be absent or stale
    vision = {**_fields(config.vision), "pad_to_square": model.vision.transform.pad_to_square}
    counts = model.parameters_at_save or model.parameter_counts()
    lines = [
        f"vision : {type(model.vision).__name__} ({_describe(vision)}; weights: the model's own), "
        f"{model.vision.num_tokens()} features × {model.vision.feature_dim}, input {model.vision.transform.output_size}",
        f"bridge : {_describe(config.bridge)}",
        f"llm    : {type(model.llm.model).__name__} ({model.llm.config.model_type}), hidden {model.llm.hidden_size}, "
        f"vocab {model.llm.config.vocab_size}",
        f"visual tokens per image: {model.tokens_per_image}  (placeholder {model.config.image_token!r} = id {model.image_token_id})",
    ]
    if model.highres is not None:
        lines[-1] = (f"high resolution: {_describe(config.highres)}; visual tokens depend on each image's size "
                     f"(--image-size WxH); placeholder {model.config.image_token!r} = id {model.image_token_id}")
    lines += describe_output(model.output)  # what the model answers with besides text (NExT-GPT)
    if config.adapters:
        lines.append("adapters: " + ", ".join(f"LoRA r={a['r']} on {a['key']}" for a in config.adapters))
    when = "when saved (end of the last stage)" if model.parameters_at_save else "now"
    lines.append(f"parameters, trainable/frozen {when}:")
    lines.append(f"{'key':<8}{'trainable':>14}{'frozen':>14}")
    held = [key for key in MODULE_KEYS if key in counts and counts[key]["trainable"] + counts[key]["frozen"]]
    for key in held:  # a text-only model has no output row; a model saved before the key existed has none either
        lines.append(f"{key:<8}{counts[key]['trainable']:>14,}{counts[key]['frozen']:>14,}")
    total = sum(counts[key]["trainable"] + counts[key]["frozen"] for key in held)
    idle = model.inactive_parameters_per_token()
    lines.append(f"total {total:,}; active per token {total - idle:,}"
                 + (f" ({idle:,} the bridge routes around per token)" if idle else ""))
    return "\n".join(lines)


def _fields(spec) -> dict:
    """A component's config (dataclass or dict) as a dict."""
    return dict(spec) if isinstance(spec, dict) else dict(vars(spec))


_PLAIN_WORD = re.compile(r"[\w.+:/-]+")


def _describe(spec) -> str:
    """``key=value, ...`` on one line; a string other than a plain word (a separator such as ``","`` or
    ``"\\n"``) is printed quoted and escaped, as Python writes it."""
    # `pretrained` says where a fresh build takes its weights; a saved model's come from its own checkpoint
    shown = {k: v for k, v in _fields(spec).items()
             if k not in ("hf_config", "image_processor", "pretrained") and v not in (None, {}, [])}
    return ", ".join(f"{k}={_value_text(v)}" for k, v in shown.items())


def _value_text(value) -> str:
    if isinstance(value, str) and not _PLAIN_WORD.fullmatch(value):
        return repr(value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``mmbridge`` parser: one sub-command each, its arguments added by its own ``_add_*_parser``."""
    parser = argparse.ArgumentParser(prog="mmbridge", description="Bridge vision encoders and LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_pretrain_qformer_parser, _add_generate_parser, _add_info_parser,
                _add_export_parser, _add_data_parser, _add_eval_parser, _add_serve_parser):
        add(commands)
    return parser


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge train RECIPE [overrides]``."""
    train = commands.add_parser("train", help="train a recipe, stage by stage")
    train.add_argument("recipe", help="YAML recipe")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.lr=1e-4 output_dir=runs/x")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--output-dir", help="shorthand for output_dir=…")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=_train)


def _add_pretrain_qformer_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge pretrain-qformer RECIPE [overrides]`` (BLIP-2 stage 1)."""
    stage1 = commands.add_parser("pretrain-qformer", help="BLIP-2 stage 1 for a Q-Former bridge (no LLM): `train` "
                                 "with objective itc_itm_itg on stages that name none")
    stage1.add_argument("recipe", help="YAML recipe (model.vision + a qformer-family model.bridge)")
    stage1.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.steps=10")
    stage1.add_argument("--output-dir", help="shorthand for output_dir=…")
    stage1.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    stage1.add_argument("--no-progress", action="store_true", help="no progress bars")
    stage1.set_defaults(run=_pretrain_qformer)


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge generate --model DIR --prompt TEXT [--image PATH ...]``."""
    generate = commands.add_parser("generate", help="answer a prompt about images with a saved model")
    generate.add_argument("--model", required=True, help="directory written by save_pretrained / training")
    generate.add_argument("--image", action="append", help="image path (repeat for several)")
    generate.add_argument("--prompt", required=True, help="text; <image> marks where images go (prepended if absent)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true")
    generate.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    generate.add_argument("--top-p", type=float, default=None, help="with --do-sample (default 1.0)")
    generate.add_argument("--out", help="a model that answers with images: write them here as PNG files")
    generate.add_argument("--image-steps", type=int, default=30, help="with --out: denoising steps (default 30)")
    generate.add_argument("--image-seed", type=int, default=None, help="with --out: seed of the image draws")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    generate.set_defaults(run=_generate)


def _add_info_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge info --model DIR [--image-size WxH ...]``."""
    info = commands.add_parser("info", help="describe a saved model")
    info.add_argument("--model", required=True)
    info.add_argument("--image-size", nargs="+", metavar="WxH", type=parse_image_size,
                      help="also report visual tokens and encoder FLOPs per image of these sizes "
                           "(e.g. 336x336 672x1008)")
    info.set_defaults(run=_info)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge export --model DIR --out OUT``."""
    export = commands.add_parser("export", help="write a saved model as a transformers directory")
    export.add_argument("--model", required=True, help="directory written by save_pretrained / training")
    export.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers classes (default)")
    export.add_argument("--out", required=True, help="output directory (written atomically)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.set_defaults(run=_export)


def _add_data_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge data miniworld|stats|select``."""
    data = commands.add_parser("data", help="generate datasets")
    generators = data.add_subparsers(dest="generator", required=True)
    for add in (_add_miniworld_parser, _add_data_stats_parser, _add_data_select_parser):
        add(generators)


def _add_miniworld_parser(generators: argparse._SubParsersAction) -> None:
    """``mmbridge data miniworld --task T --split S --n N --out DIR``."""
    miniworld = generators.add_parser("miniworld", help="write a MiniWorld task split as LLaVA JSON + PNGs, "
                                                             "or WebDataset shards")
    miniworld.add_argument("--task", required=True, help="task name, e.g. caption, attribute, counting, video")
    miniworld.add_argument("--split", required=True, help="train, val, test or compositional")
    miniworld.add_argument("--n", type=int, required=True, help="number of samples")
    miniworld.add_argument("--out", required=True, help="output directory (JSON + images/)")
    miniworld.add_argument("--seed", type=int, default=0, help="seed of the sample generator")
    miniworld.add_argument("--image-format", choices=["png", "jpeg"], default="png",
                           help="image files of the llava format: png (default) or jpeg (quality 90)")
    miniworld.add_argument("--no-progress", action="store_true", help="no progress bar")
    miniworld.add_argument("--box-format", choices=["plain", "qwen"], default="plain",
                           help="grounding boxes: plain [x0, y0, x1, y1] in 000-999 (default) or qwen "
                                "<ref>phrase</ref><box>(x1,y1),(x2,y2)</box> in 0-1000")
    miniworld.add_argument("--format", choices=["llava", "webdataset"], default="llava",
                           help="llava: one JSON + PNGs (default); webdataset: tar shards of KEY.jpg + KEY.json/.txt")
    miniworld.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard (default 1000)")
    miniworld.set_defaults(run=_data_miniworld)


def _add_data_stats_parser(generators: argparse._SubParsersAction) -> None:
    """``mmbridge data stats RECIPE [overrides]``."""
    stats = generators.add_parser("stats", help="samples per source per epoch of each stage of a recipe (no images "
                                                "are read)")
    stats.add_argument("recipe", help="YAML recipe")
    stats.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.sources.0.weight=sqrt")
    stats.set_defaults(run=_data_stats)


def _add_data_select_parser(generators: argparse._SubParsersAction) -> None:
    """``mmbridge data select IN --method M --keep K --out OUT``."""
    select = generators.add_parser("select", help="keep a random or informative (coreset) subset of a LLaVA file")
    select.add_argument("input", metavar="IN", help="LLaVA conversation JSON or JSONL file")
    select.add_argument("--method", required=True, choices=["random", "coreset"],
                        help="random: seeded uniform subset; coreset: concept coverage (SVIT)")
    select.add_argument("--keep", required=True, help="a fraction in (0, 1] (e.g. 0.5) or a sample count (e.g. 200)")
    select.add_argument("--out", required=True,
                        help="output JSON/JSONL (records unchanged); OUT.report.json beside it")
    select.add_argument("--seed", type=int, default=0, help="seed of the random subset / coreset tie-breaks")
    select.add_argument("--concepts", help="concept vocabulary file, one word or phrase per line "
                                           "(default: built from the data)")
    select.add_argument("--balance-yes-no", action=argparse.BooleanOptionalAction, default=None,
                        help="even out kept yes/no answers (default: on for coreset, off for random)")
    select.add_argument("--min-count", type=int, default=2, help="data vocabulary: a concept in >= this many samples")
    select.add_argument("--max-fraction", type=float, default=0.5,
                        help="data vocabulary: a concept in <= this fraction of samples")
    select.set_defaults(run=_data_select)


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """``mmbridge eval --model DIR`` or ``mmbridge eval --compare A.json B.json ...``."""
    evaluate = commands.add_parser("eval", help="evaluate a saved model on a suite, or compare results files")
    evaluate.add_argument("--model", help="directory written by save_pretrained / training")
    evaluate.add_argument("--suite", default="miniworld", help="registered suite (default: miniworld)")
    evaluate.add_argument("--tasks", nargs="+", help="task names (default: all of the suite)")
    evaluate.add_argument("--n", type=int, default=100, help="samples per task")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the suite's sample generator")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--shots", type=int, default=0,
                          help="solved examples from each task's train split before every query (in-context)")
    evaluate.add_argument("--out", help="results JSON (default: DIR/eval-SUITE.json)")
    evaluate.add_argument("--box-format", choices=["plain", "qwen"], default=None,
                          help="ask grounding in this box format (default: the one the model was trained on)")
    baseline = evaluate.add_mutually_exclusive_group()
    baseline.add_argument("--blind", action="store_true", help="only the blind baseline (no image)")
    baseline.add_argument("--with-blind", action="store_true", help="also run the blind baseline, side by side")
    evaluate.add_argument("--compare", nargs="+", metavar="RESULTS", help="print results files side by side")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=_eval)


EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # 130 = 128 + SIGINT, as shells report a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. A user's mistake (recipe, data, arguments, paths) prints one line naming the field,
    file or value and returns 2; Ctrl-C returns 130 (training first saves a checkpoint to resume from)."""
    from mmbridge.train.interrupt import TrainingInterrupted

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except TrainingInterrupted as stopped:
        print(f"mmbridge {args.command}: {stopped}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"mmbridge {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, KeyError) as error:
        # a KeyError's str() is the repr of its message, quotes included
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mmbridge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

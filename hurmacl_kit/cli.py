"""Command-line interface: ``python -m hurmacl_kit train|evaluate|predict``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hurmacl_kit.models import ABLATIONS, INFERENCE_RULES

logger = logging.getLogger("hurmacl_kit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hurmacl_kit",
        description="Train, evaluate and run HUR-MACL for head-and-neck OAR segmentation on CT.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING); default INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    return parser


def _add_train(commands) -> None:
    from hurmacl_kit.engine.presets import PRESETS

    train = commands.add_parser("train", help="train a model; resumes from OUT/checkpoint.pt when it exists")
    train.add_argument("--data", required=True, help="dataset folder with dataset.json, imagesTr/ and labelsTr/")
    train.add_argument("--out", required=True, help="output folder for checkpoint.pt and train_history.json")
    train.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="base settings; default demo (CPU)")
    train.add_argument("--ablation", default="hurmacl", choices=list(ABLATIONS), help="model variant; default hurmacl")
    train.add_argument("--steps", type=int, help="optimiser steps in the whole schedule (default: from the preset)")
    train.add_argument("--batch-size", type=int, help="slices per step (default: from the preset)")
    train.add_argument("--lr", type=float, help="initial learning rate (default: from the preset, 1e-2 for quick and demo)")
    train.add_argument("--patch-size", type=int, help="side of the random training crop in pixels, 0 for whole slices (default: from the preset)")
    train.add_argument("--threshold", type=float, help="uncertainty threshold T in (0, 1); default 0.001")
    train.add_argument("--seed", type=int, help="random seed; default 42")
    train.add_argument("--split", default="train", help="dataset.json split to train on; default train")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (CUDA if present)")
    train.add_argument("--model-json", help='extra HURMACLConfig fields as JSON, e.g. \'{"vim_depth": 2}\'')
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score held-out cases: per-organ 3D Dice and ASSD in mm")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    evaluate.add_argument("--data", required=True, help="dataset folder with dataset.json")
    evaluate.add_argument("--out", required=True, help="folder for metrics_summary.json, metrics_per_case.csv, predictions/")
    evaluate.add_argument("--split", default="test", help="dataset.json split to evaluate; default test")
    evaluate.add_argument("--cases", nargs="+", help="explicit case ids instead of a split")
    evaluate.add_argument("--save-predictions", type=int, default=1, help="number of cases, in order, whose label and uncertainty NIfTI are saved; default 1")
    evaluate.add_argument("--inference-rule", choices=INFERENCE_RULES, help="override how branches join the U-Net in hard regions (default: the checkpoint's, normally average)")
    evaluate.add_argument("--threshold", type=float, help="override the uncertainty threshold T")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (CUDA if present)")


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="CT NIfTI (HU) to a label-map NIfTI and an uncertainty NIfTI")
    predict.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    predict.add_argument("--input", required=True, help="CT image, NIfTI in Hounsfield units")
    predict.add_argument("--labels-out", required=True, help="output label map (.nii.gz), same grid as the input")
    predict.add_argument("--uncertainty-out", required=True, help="output normalised-entropy map (.nii.gz)")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (CUDA if present)")


def run_train(args) -> None:
    from hurmacl_kit.engine.presets import preset
    from hurmacl_kit.engine.train import TrainConfig, train

    values = preset(args.preset)
    overrides = {
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    if args.patch_size is not None:
        values["patch_size"] = args.patch_size or None
    if args.model_json:
        values["model"].update(_parse_json(args.model_json))
    if args.threshold is not None:
        values["model"]["threshold"] = args.threshold

    config = TrainConfig(
        data_root=args.data, output_dir=args.out, ablation=args.ablation,
        train_split=args.split, device=args.device, **values,
    )
    result = train(config, resume=not args.no_resume)
    last = result.history[-1] if result.history else {}
    print(f"trained {config.ablation} for {config.steps} steps; final loss {last.get('loss', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint_path}")


def run_evaluate(args) -> None:
    from hurmacl_kit.engine.evaluate import evaluate, format_summary

    summary = evaluate(
        args.checkpoint, args.data, args.out, split=args.split, case_ids=args.cases,
        save_predictions=args.save_predictions, device=args.device,
        inference_rule=args.inference_rule, threshold=args.threshold,
    )
    print(format_summary(summary))
    print(f"wrote {args.out}/metrics_summary.json and {args.out}/metrics_per_case.csv")


def run_predict(args) -> None:
    from hurmacl_kit.engine.predict import predict_file

    prediction = predict_file(args.checkpoint, args.input, args.labels_out, args.uncertainty_out, device=args.device)
    print(f"wrote {args.labels_out} and {args.uncertainty_out}; hard-region fraction {prediction.hard_fraction:.4f}")


def _parse_json(text: str) -> dict:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--model-json is not valid JSON ({error}): {text!r}") from error
    if not isinstance(values, dict):
        raise SystemExit(f"--model-json must be a JSON object, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"train": run_train, "evaluate": run_evaluate, "predict": run_predict}
    try:
        handlers[args.command](args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; checkpoints on disk are complete, so the same command resumes training")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
